"""Rate limits shared by two sidecar replicas through one real Redis (monitor.ratelimit, GCRA).

Limits are per minute, so within a test nothing refills noticeably: with 2 requests per minute the third
request, on either replica, is refused for 60/2 = 30 s. Token limits charge prompt + completion tokens
when a request ends, so the request after the one that crossed the limit is refused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from fw_testing import ALLOW_POLICY, make_settings, running

from monitor.keystore import KeyStore

CHAT = [{"role": "user", "content": "Write a haiku about the moon."}]


@pytest.fixture(scope="module")
def runtime(
    tiny_model_dir: Path, tiny_sae_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    from monitor.runtime import load_runtime

    policy = tmp_path_factory.mktemp("rl") / "policy.yaml"
    policy.write_text(ALLOW_POLICY)
    rt = load_runtime(make_settings(tiny_model_dir, tiny_sae_dir, policy))
    rt.engine.gen.eos_ids = set()  # known completion lengths
    yield rt
    rt.close()


@contextmanager
def _fleet(rt: Any, url: str, tmp_path: Path, n: int = 2, **kw: Any) -> Iterator[list[str]]:
    """`n` replicas on the Redis at `url` with settings `kw`."""
    from monitor.server import create_app

    with ExitStack() as stack:
        urls = []
        for i in range(n):
            model, sae = Path(rt.settings.model), Path(rt.settings.sae)
            s = make_settings(
                model, sae, rt.settings.policy, redis_url=url, data_dir=tmp_path / f"d{i}", **kw
            )
            urls.append(stack.enter_context(running(create_app(s, rt, sinks=[]))))
        yield urls


def _post(base: str, tenant: str | None = "acme", key: str | None = None, tokens: int = 3) -> httpx.Response:
    headers = {"x-featurewatch-tenant": tenant} if tenant else {}
    if key:
        headers["authorization"] = f"Bearer {key}"
    body = {"model": "tiny", "messages": CHAT, "max_tokens": tokens, "temperature": 0}
    return httpx.post(f"{base}/chat/completions", json=body, headers=headers, timeout=60)


def _retry_after(r: httpx.Response, full_s: float, since: float) -> None:
    """Retry-After is the refill time `full_s` counted from `since` (monotonic), in whole seconds."""
    assert r.status_code == 429
    elapsed = time.monotonic() - since
    assert full_s - elapsed - 1 <= int(r.headers["retry-after"]) <= full_s


def test_requests_per_minute_are_shared_by_the_replicas(
    runtime: Any, redis_server: tuple[str, redis.Redis], tmp_path: Path
) -> None:
    url, _ = redis_server
    over = {"globex": {"rpm": 1}}
    with _fleet(runtime, url, tmp_path, rate_limit_rpm=2, rate_limit_tenants=over) as (a, b):
        t0 = time.monotonic()
        assert _post(a).status_code == 200 and _post(b).status_code == 200
        r = _post(a)
        _retry_after(r, 30, t0)  # the first of the two requests leaves the bucket 30 s after it came
        err = r.json()["error"]
        assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
        assert "requests per minute (rpm) for tenant 'acme': 2" in err["message"]
        with (
            openai.OpenAI(base_url=b, api_key="unused", max_retries=0) as client,
            pytest.raises(openai.RateLimitError),
        ):
            client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=2,
                extra_headers={"x-featurewatch-tenant": "acme"},
            )
        # Another tenant has its own bucket, here with its override of 1 request per minute.
        t0 = time.monotonic()
        assert _post(b, "globex").status_code == 200
        _retry_after(_post(a, "globex"), 60, t0)
        assert _post(a, None).status_code == 200  # requests without a tenant share one more bucket


def test_tokens_per_minute_refuse_the_request_after_the_one_that_crossed(
    runtime: Any, redis_server: tuple[str, redis.Redis], tmp_path: Path
) -> None:
    url, _ = redis_server
    with _fleet(runtime, url, tmp_path, rate_limit_tpm=10) as (a, b):
        first = _post(a, tokens=4)  # admitted: the minute's 10 tokens are all left
        t0 = time.monotonic()  # just after its tokens were charged
        assert first.status_code == 200
        used = first.json()["usage"]["total_tokens"]  # prompt + completion, well over 10
        assert used > 10
        r = _post(b)
        assert "tokens per minute (tpm) for tenant 'acme': 10" in r.json()["error"]["message"]
        # `used` tokens at 6 s each; the next request needs one token of room in the 60 s window.
        _retry_after(r, (used - 9) * 6, t0)
        assert r.headers["x-ratelimit-limit-tokens"] == "10"
        assert _post(b, "globex").status_code == 200


def test_per_key_limits(runtime: Any, redis_server: tuple[str, redis.Redis], tmp_path: Path) -> None:
    url, client = redis_server
    keys = KeyStore(client)
    k1, info1 = keys.create("client", ["acme"], "app-1")
    k2, _ = keys.create("client", ["acme"], "app-2")
    with _fleet(runtime, url, tmp_path, rate_limit_key_rpm=1) as (a, b):
        assert _post(a, None, k1).status_code == 200
        r = _post(b, None, k1)
        assert r.status_code == 429 and f"API key {info1.key_id}: 1" in r.json()["error"]["message"]
        assert _post(b, None, k2).status_code == 200  # same tenant, its own key bucket


def test_redis_down_fails_open_by_default_or_closed(
    runtime: Any,
    redis_server: tuple[str, redis.Redis],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, client = redis_server
    caplog.set_level(logging.WARNING, "featurewatch.shared")
    with (
        _fleet(runtime, url, tmp_path, n=1, rate_limit_rpm=1) as (open_,),
        _fleet(runtime, url, tmp_path / "closed", n=1, rate_limit_rpm=100, rate_limit_fail="closed") as (
            closed,
        ),
    ):
        assert _post(open_).status_code == 200 and _post(open_).status_code == 429
        assert _post(closed, "globex").status_code == 200
        client.shutdown(save=False)
        assert [_post(open_).status_code for _ in range(2)] == [200, 200]  # over the limit, but admitted
        assert "admitting requests (rate_limit_fail: open)" in caplog.text
        r = _post(closed, "globex")
        assert r.status_code == 503 and "rate limits cannot be checked" in r.json()["error"]["message"]
