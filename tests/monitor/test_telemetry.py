"""Traces and metrics of real requests (real HTTP, tiny model), captured with the SDK's in-memory exporter
and reader: GenAI attribute names, one evaluation event per detector, the guardrail decision, no content
unless capture is on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fw_testing import make_settings, policy_text, rule, running
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from monitor import otel_names as N
from monitor.telemetry import Telemetry

PROMPT = "Write a haiku about the moon."


@pytest.fixture(scope="module")
def traced(
    tiny_model_dir: Path, tiny_sae_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    from monitor.runtime import load_runtime
    from monitor.server import create_app

    policy = tmp_path_factory.mktemp("tp") / "p.yaml"
    policy.write_text(policy_text(rule("flag-it", "always", "flag"), rule("never-block", "never", "block")))
    settings = make_settings(tiny_model_dir, tiny_sae_dir, policy)
    rt = load_runtime(settings)
    rt.engine.gen.eos_ids = set()  # full length: the tiny random model may pick EOS any time
    spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tel = Telemetry(span_exporter=spans, metric_reader=reader, batch=False)
    captured = InMemorySpanExporter()
    tel_content = Telemetry(span_exporter=captured, capture_content=True, batch=False)
    with running(create_app(settings, rt, sinks=[tel.sink, tel_content.sink])) as url:
        with openai.OpenAI(base_url=url, api_key="x", max_retries=0) as client:
            resp = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=5, temperature=0
            )
        yield type("T", (), {"spans": spans, "reader": reader, "captured": captured, "resp": resp})
    tel.shutdown()
    tel_content.shutdown()
    rt.close()


def test_request_span_carries_genai_attributes(traced: Any) -> None:
    spans = {s.name: s for s in traced.spans.get_finished_spans()}
    root = spans["chat tiny"]
    a = root.attributes
    assert a[N.OPERATION_NAME] == "chat" and a[N.PROVIDER_NAME] == "featurewatch"
    assert a[N.REQUEST_MODEL] == "tiny" and a[N.RESPONSE_ID] == traced.resp.id
    assert a[N.USAGE_OUTPUT_TOKENS] == 5 and a[N.USAGE_INPUT_TOKENS] == traced.resp.usage.prompt_tokens
    assert tuple(a[N.RESPONSE_FINISH_REASONS]) == ("length",)
    assert a[N.GUARDRAIL_ACTION] == "flag" and tuple(a[N.GUARDRAIL_RULES]) == ("flag-it",)
    for child in (N.SPAN_QUEUE, N.SPAN_PREFILL, N.SPAN_DECODE, N.SPAN_MONITORING, N.SPAN_POLICY):
        assert spans[child].parent is not None and spans[child].parent.span_id == root.context.span_id
        assert root.start_time <= spans[child].start_time <= spans[child].end_time <= root.end_time
    events = {e.attributes[N.EVALUATION_NAME]: e for e in root.events if e.name == N.EVALUATION_EVENT}
    assert set(events) == {"always", "never", "resid"}
    assert events["always"].attributes[N.EVALUATION_SCORE_LABEL] == "fired"
    assert events["never"].attributes[N.EVALUATION_SCORE_LABEL] == "pass"
    assert events["always"].attributes[N.EVALUATION_SCORE_VALUE] > 0.99


def test_no_content_in_spans_unless_capture_is_on(traced: Any) -> None:
    def text_of(exporter: InMemorySpanExporter) -> str:
        return " ".join(str(dict(s.attributes or {})) for s in exporter.get_finished_spans())

    assert PROMPT not in text_of(traced.spans) and N.INPUT_MESSAGES not in text_of(traced.spans)
    assert PROMPT in text_of(traced.captured)


def test_metrics_count_requests_and_detections(traced: Any) -> None:
    data = traced.reader.get_metrics_data()
    metrics = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert {N.METRIC_REQUEST_DURATION, N.METRIC_TIME_TO_FIRST_TOKEN, N.METRIC_DETECTIONS} <= set(metrics)
    det = metrics[N.METRIC_DETECTIONS].data.data_points
    assert [(p.attributes[N.DETECTOR], p.attributes[N.ACTION], p.value) for p in det] == [
        ("always", "flag", 1)
    ]
    assert metrics[N.METRIC_TIME_PER_OUTPUT_TOKEN].data.data_points[0].count == 1


def test_metrics_endpoint_exposes_the_counters(
    tiny_model_dir: Path, tiny_sae_dir: Path, tmp_path: Path
) -> None:
    """The production wiring (no sinks given): file traces in the data dir, Prometheus at /metrics."""
    import httpx

    from monitor.server import create_app

    policy = tmp_path / "p.yaml"
    policy.write_text(policy_text(rule("flag-it", "always", "flag")))
    settings = make_settings(tiny_model_dir, tiny_sae_dir, policy)
    with running(create_app(settings)) as url:
        r = httpx.post(
            f"{url}/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3},
        )
        assert r.status_code == 200 and r.json()["featurewatch"]["verdict"] == "flag"
        text = httpx.get(url.removesuffix("/v1") + "/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("featurewatch_detections_total{"))
    assert 'featurewatch_action="flag"' in line and 'featurewatch_detector="always"' in line
    assert line.endswith(" 1.0")
    assert "gen_ai_server_request_duration_seconds_count" in text
    traces = (tmp_path / "data" / "traces.jsonl").read_text().splitlines()
    assert any('"chat tiny"' in line for line in traces) and PROMPT not in "".join(traces)
