"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis), over real HTTP.

A sidecar on loopback (tiny model, embedded Redis, an admin key, every request flagged so the audit trail
has records) serves `/openapi.json`; schemathesis generates valid and invalid requests for every route
in it (inference, shadow scoring, the audit API, the admin policy API, health and metrics) and checks:

- `not_a_server_error`: no 5xx, whatever arrives;
- `status_code_conformance`: only documented statuses (2xx, and 4XX/5XX with the error schema);
- `content_type_conformance`, `response_schema_conformance`, `response_headers_conformance`: responses
  are what the document says (JSON errors in OpenAI's shape, SSE for streams, JSON Lines for export).

Requests the schema forbids (negative mode) get the same checks. Disabled, and why:
`negative_data_rejection` (query values are strings on the wire: a "non-string" tenant such as `false`
arrives as the string "false", a valid tenant name, and is rightly accepted; test_bad_input.py asserts the
4xx for every kind of bad input by hand); `positive_data_acceptance` (a schema-valid request may rightly be
refused: a record id that does not exist is 404, a random model name 404, a random draft policy 400; a
schema cannot say "must exist"); `ignored_auth` (the document declares no security scheme; keys are tested
in test_auth.py and test_bad_input.py); the stateful checks `use_after_free` and
`ensure_resource_availability` (no create/delete pair of routes to chain). The console is not in the
document (`include_in_schema=False`); its forms are covered by hand in test_bad_input.py.

Bounded and deterministic: a fixed number of examples per route, derandomized, no example database, and
`max_tokens_limit` 4 so every generation is a few forward passes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fw_testing import make_settings, policy_text, rule, running
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES = 8  # per route and generation mode; ~17 routes
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@pytest.fixture(scope="module")
def sidecar(
    tiny_model_dir: Path, tiny_sae_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    from monitor.runtime import load_runtime
    from monitor.server import create_app

    tmp = tmp_path_factory.mktemp("fuzz")
    policy = tmp / "policy.yaml"
    policy.write_text(policy_text(rule("flag-all", "always", "flag")))
    settings_ = make_settings(
        tiny_model_dir,
        tiny_sae_dir,
        policy,
        max_tokens_limit=4,
        default_max_tokens=2,
        max_prompt_tokens=200,
        policy_source="redis",  # PUT /v1/admin/policy parses what it gets (with `file` it is a 409)
        otel_exporter="none",
        request_timeout_s=60,
    )
    rt = load_runtime(settings_)
    app = create_app(settings_, rt, close_runtime=True)
    with running(app) as url:
        key = app.state.keys.create("admin", ["*"], "fuzzer")[0]
        yield type("Fuzzed", (), {"base": url.removesuffix("/v1"), "key": key, "app": app})


def fuzz(operation: Any, mode: Any, key: str) -> None:
    """EXAMPLES generated requests for one route, each sent and checked."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,  # a generation takes a few forward passes; the request timeout bounds it instead
        derandomize=True,  # the same examples on every run: CI is never flaky
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        case.call_and_validate(headers={"authorization": f"Bearer {key}"}, checks=CHECKS, timeout=60)

    run()


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_api_conforms_to_its_schema(sidecar: Any, mode: str) -> None:
    schema = schemathesis.openapi.from_url(f"{sidecar.base}/openapi.json", timeout=30)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    fuzzed = []
    for operation in operations:
        try:
            fuzz(operation, schemathesis.GenerationMode(mode), sidecar.key)
        except Unsatisfiable:  # e.g. a route whose only input is a string path parameter: nothing to violate
            assert mode == "negative", operation.label
            continue
        except Exception as e:
            e.add_note(f"{mode} {operation.label}")
            raise
        fuzzed.append(operation.label)
    assert len(fuzzed) >= (15 if mode == "positive" else 8), fuzzed
