"""The sidecar over real HTTP (uvicorn on loopback) with the official `openai` client, on the tiny model.

Detectors and rules are built to fire at known tokens (see conftest), so every assertion is exact: what
was sent before a block equals the unmonitored greedy output up to the trigger, and nothing after it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fw_testing import ALLOW_POLICY, make_settings, policy_text, rule, running

from monitor.events import DecisionEvent

CHAT = [{"role": "user", "content": "Write a haiku about the moon."}]
BLOCK_AT_3 = rule(
    "third-token",
    "always",
    "block",
    3,
    aggregation="{kind: count_over, threshold: 0.5}",
    message="stopped here",
)


@pytest.fixture(scope="module")
def server(
    tiny_model_dir: Path, tiny_sae_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    from monitor.runtime import load_runtime
    from monitor.server import create_app

    policy = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy.write_text(ALLOW_POLICY)
    settings = make_settings(tiny_model_dir, tiny_sae_dir, policy)
    rt = load_runtime(settings)
    rt.engine.gen.eos_ids = set()  # the random model may pick EOS any time; tests want full lengths
    events: list[DecisionEvent] = []
    app = create_app(settings, rt, sinks=[events.append])
    with running(app) as url:
        yield type("S", (), {"url": url, "rt": rt, "events": events, "policy": policy})
    rt.close()


@pytest.fixture
def client(server: Any) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture
def use_policy(server: Any) -> Iterator[Any]:
    """Apply a policy text for one test (through the file + reload path), restore allow-all after."""

    def apply(text: str, hold_back: int | None = 0) -> None:
        server.policy.write_text(text)
        assert server.rt.holder.reload() == []
        server.rt.settings.hold_back_tokens = hold_back

    yield apply
    apply(ALLOW_POLICY)


def _chat(client: openai.OpenAI, tokens: int = 6, **kw: Any) -> Any:
    return client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=tokens, temperature=0, **kw)


def _reference(client: openai.OpenAI, n: int) -> str:
    return str(_chat(client, n).choices[0].message.content)


def _stream(client: openai.OpenAI, n: int = 6, **kw: Any) -> tuple[str, list[Any]]:
    chunks = list(_chat(client, n, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_benign_chat_is_allowed(client: openai.OpenAI, server: Any) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=CHAT, max_tokens=6, temperature=0
    )
    resp = raw.parse()
    assert raw.headers["x-featurewatch-verdict"] == "allow"
    choice = resp.choices[0]
    assert choice.finish_reason == "length" and choice.message.content
    fw = resp.model_extra["featurewatch"]
    assert fw["verdict"] == "allow" and fw["rules"] == [] and fw["policy"] == "allow-all@1"
    assert fw["scores"]["always"] > 0.99 and fw["scores"]["never"] < 0.01 and fw["scores"]["resid"] < 0.01
    assert resp.usage is not None and resp.usage.completion_tokens == 6
    ev = server.events[-1]
    assert ev.request_id == resp.id and ev.verdict == "allow" and len(ev.evidence) == 6
    assert ev.completion == choice.message.content and ev.evidence[0]["top"][0]["label"] in ("three", "nine")


def test_stream_matches_non_stream(client: openai.OpenAI) -> None:
    text, chunks = _stream(client, 6, stream_options={"include_usage": True})
    assert text == _reference(client, 6)
    assert chunks[0].choices[0].delta.role == "assistant"
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert (
        final.choices[0].finish_reason == "length" and final.model_extra["featurewatch"]["verdict"] == "allow"
    )
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].choices == []


def test_mid_stream_block_sends_nothing_from_the_trigger_on(client: openai.OpenAI, use_policy: Any) -> None:
    before = _reference(client, 2)  # greedy: the two tokens before the trigger
    use_policy(policy_text(BLOCK_AT_3))
    resp = _chat(client, 8)
    choice = resp.choices[0]
    assert choice.finish_reason == "content_filter"
    assert choice.message.content == before and choice.message.refusal == "stopped here"
    fw = resp.model_extra["featurewatch"]
    assert fw["verdict"] == "block" and fw["blocked_at"] == 2 and fw["rules"][0]["id"] == "third-token"
    assert resp.usage.completion_tokens == 2

    text, chunks = _stream(client, 8)
    assert text == before
    final = chunks[-1]
    assert (
        final.choices[0].finish_reason == "content_filter"
        and final.choices[0].delta.refusal == "stopped here"
    )
    assert final.model_extra["featurewatch"]["verdict"] == "block"


def test_hold_back_withholds_the_window_before_a_block(client: openai.OpenAI, use_policy: Any) -> None:
    use_policy(policy_text(BLOCK_AT_3), hold_back=None)  # derived from the rule: count 3 -> hold back 2
    text, chunks = _stream(client, 8)
    assert text == "" and chunks[-1].choices[0].finish_reason == "content_filter"
    use_policy(
        policy_text(rule("late", "always", "block", 20, aggregation="{kind: count_over, threshold: 0.5}"))
    )
    assert _stream(client, 6)[0] == _reference(client, 6)  # never fires within 6 tokens: held text flushed


def test_prompt_side_block(client: openai.OpenAI, use_policy: Any) -> None:
    use_policy(policy_text(rule("prompt-block", "always", "block", scope="prompt", message="not this")))
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=CHAT, max_tokens=6, temperature=0, stream=True
    )
    assert raw.headers["x-featurewatch-verdict"] == "block"  # known before the stream starts
    chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    fw = chunks[-1].model_extra["featurewatch"]
    assert fw["prompt_verdict"] == "block" and fw["message"] == "not this" and fw["scores"] == {}


def test_steering_changes_the_output(client: openai.OpenAI, use_policy: Any) -> None:
    plain = _reference(client, 8)
    use_policy(policy_text(rule("steer", "always", "steer", steer="{latents: {3: 40.0, 9: 40.0}}")))
    resp = _chat(client, 8)
    fw = resp.model_extra["featurewatch"]
    assert fw["verdict"] == "steer" and fw["steered"] is True
    assert resp.choices[0].finish_reason == "length" and resp.choices[0].message.content != plain


def test_completions_endpoint(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=5, temperature=0)
    assert (
        resp.choices[0].finish_reason == "length" and resp.model_extra["featurewatch"]["verdict"] == "allow"
    )
    streamed = client.completions.create(
        model="tiny", prompt="The quick brown fox", max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == resp.choices[0].text


def test_models_and_health(client: openai.OpenAI, server: Any) -> None:
    assert [m.id for m in client.models.list()] == ["tiny"]
    base = server.url.removesuffix("/v1")
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{base}/readyz")
    assert ready.status_code == 200 and ready.json()["policy"] == "allow-all@1"


def test_bad_requests_get_clear_errors(client: openai.OpenAI, server: Any) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=CHAT)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        _chat(client, 100_000)
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.role"):
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "hi"}])  # type: ignore[list-item, misc]
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        _chat(client, 4, n=2)
    url = f"{server.url}/chat/completions"
    bad_json = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]
    huge = httpx.post(url, json={"model": "tiny", "messages": [{"role": "user", "content": "x" * 2_000_000}]})
    assert huge.status_code == 413 and "limit" in huge.json()["error"]["message"]


def test_score_endpoint(server: Any, use_policy: Any) -> None:
    use_policy(policy_text(rule("flag-it", "always", "flag"), rule("b", "never", "block")))
    convo = [*CHAT, {"role": "assistant", "content": "The moon is bright."}]
    r = httpx.post(f"{server.url}/monitor/score", json={"messages": convo})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["scores"]["always"] > 0.99 and body["scores"]["never"] < 0.01
    assert body["verdict"]["action"] == "flag" and [f["id"] for f in body["verdict"]["rules"]] == ["flag-it"]
    ev = body["evidence"]
    assert len(ev["tokens"]) == len(ev["scores"]["always"]) == ev["n_prompt"] + body["tokens"]
    bad = httpx.post(f"{server.url}/monitor/score", json={"text": "x", "detectors": ["nope"]})
    assert bad.status_code == 400 and "valid: always, never, resid" in bad.json()["error"]["message"]
    both = httpx.post(f"{server.url}/monitor/score", json={"text": "x", "messages": convo})
    assert both.status_code == 400 and "exactly one" in both.json()["error"]["message"]


def test_bad_policy_is_refused_and_the_old_one_stays(
    client: openai.OpenAI, server: Any, use_policy: Any
) -> None:
    use_policy(policy_text(rule("flag-it", "always", "flag"), name="good", version=2))
    server.policy.write_text(policy_text(rule("oops", "alwayz", "block")))
    issues = server.rt.holder.reload()
    assert [str(i) for i in issues] == [
        f"{server.policy}:5: rules[0].detector: unknown detector 'alwayz' (valid: always, never, resid)"
    ]
    fw = _chat(client, 3).model_extra["featurewatch"]
    assert fw["policy"] == "good@2" and fw["verdict"] == "flag"


def test_policy_file_change_applies_without_restart(
    server: Any, client: openai.OpenAI, use_policy: Any
) -> None:
    use_policy(ALLOW_POLICY)
    gen = server.rt.holder.generation
    with server.rt.holder.watch(0.05):
        server.policy.write_text(policy_text(rule("flag-it", "always", "flag"), name="live"))
        deadline = time.monotonic() + 10
        while server.rt.holder.generation == gen and time.monotonic() < deadline:
            time.sleep(0.02)
    assert _chat(client, 2).model_extra["featurewatch"]["policy"] == "live@1"


def test_concurrent_requests_share_batches(client: openai.OpenAI, server: Any) -> None:
    first = threading.Thread(target=_chat, args=(client, 150))  # keeps the engine busy while the rest queue
    first.start()
    time.sleep(0.1)
    outs: list[str] = []
    threads = [threading.Thread(target=lambda: outs.append(_reference(client, 5))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in [first, *threads]:
        t.join(60)
    assert len(outs) == 4 and len(set(outs)) == 1  # same prompt, greedy: batching changes nothing
    sizes = [ev.timings["batch_size"] for ev in server.events[-5:]]
    assert max(sizes) >= 2


def test_client_disconnect_cancels_generation(server: Any) -> None:
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 1500, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/chat/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
    assert any(line.startswith("data: ") for line in got)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (
        server.events and server.events[-1].finish_reason == "cancelled"
    ):
        time.sleep(0.05)
    ev = server.events[-1]
    assert ev.finish_reason == "cancelled" and ev.usage["completion_tokens"] < 1500


def test_queue_full_answers_429(tiny_model_dir: Path, tiny_sae_dir: Path, tmp_path: Path) -> None:
    from monitor.runtime import load_runtime
    from monitor.server import create_app

    policy = tmp_path / "p.yaml"
    policy.write_text(ALLOW_POLICY)
    settings = make_settings(tiny_model_dir, tiny_sae_dir, policy, max_queue=1, max_batch_size=1)
    rt = load_runtime(settings)
    rt.engine.gen.eos_ids = set()
    statuses: list[tuple[int, str | None]] = []
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 400, "temperature": 0}
    with running(create_app(settings, rt, sinks=[])) as url:

        def call() -> None:
            r = httpx.post(f"{url}/chat/completions", json=body, timeout=120)
            statuses.append((r.status_code, r.headers.get("retry-after")))

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(120)
    rt.close()
    assert (429, "1") in statuses and (200, None) in statuses
    assert all(code in (200, 429) for code, _ in statuses)


def test_events_never_log_content(
    server: Any, client: openai.OpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    from monitor.events import log_sink

    caplog.set_level("INFO")
    _chat(client, 3)
    ev = server.events[-1]
    log_sink(DecisionEvent(**{**ev.__dict__, "verdict": "flag"}))
    assert ev.request_id in caplog.text
    assert CHAT[0]["content"] not in caplog.text and ev.completion not in caplog.text
    assert json.dumps(ev.summary)  # the summary is JSON-ready for the audit store
