"""Proxy mode over real HTTP on loopback: client (openai) -> proxy sidecar -> upstream, all uvicorn servers.

Two upstreams: a second featurewatch app (tiny model, monitoring off) for exact pass-through, and a small
OpenAI-compatible stub that streams a fixed text in 3-character deltas (so words arrive split), counts
what it sent and notices when the proxy hangs up. The proxy's tiny SAE has the deterministic detectors of
conftest (`always` fires on every token) plus two whose scores vary per token, for the shadow-score check.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fw_testing import ALLOW_POLICY, free_port, make_settings, policy_text, rule, running, wait_until
from pydantic import SecretStr

from monitor.events import DecisionEvent
from monitor.proxy_tokens import IncrementalTokenizer

CHAT: Any = [{"role": "user", "content": "Write a haiku about the moon."}]
TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France, Berlin of Germany."
STUB_USAGE = {"prompt_tokens": 7, "completion_tokens": 19, "total_tokens": 26}
BLOCK_AT_3 = rule(
    "third-token", "always", "block", 3, aggregation="{kind: count_over, threshold: 0.5}", message="stopped"
)


# ---- the stub upstream -------------------------------------------------------------------------------------
@dataclass
class Stub:
    text: str = TEXT
    step: int = 3  # characters per delta: words arrive split
    delay_s: float = 0.005
    fail_after: int | None = None  # send an error event after this many deltas
    sent: int = 0
    total: int = 0
    ended: str | None = None  # "finished" | "closed" (the client hung up)
    requests: list[tuple[str, dict[str, Any], dict[str, str]]] = field(default_factory=list)

    def reset(self, **kw: Any) -> None:
        self.__dict__.update(Stub(**kw).__dict__)


def stub_app(stub: Stub) -> FastAPI:
    app = FastAPI()

    async def serve(request: Request, kind: str) -> Any:
        body = await request.json()
        stub.requests.append((kind, body, dict(request.headers)))
        if body.get("model") == "missing":
            err = {"message": "model 'missing' does not exist", "type": "invalid_request_error"}
            return JSONResponse({"error": {**err, "param": "model", "code": "model_not_found"}}, 404)
        return StreamingResponse(_events(stub, kind), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await serve(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await serve(request, "text")

    return app


async def _events(stub: Stub, kind: str) -> AsyncIterator[str]:
    pieces = [stub.text[i : i + stub.step] for i in range(0, len(stub.text), stub.step)]
    stub.sent, stub.total, stub.ended = 0, len(pieces), None

    def event(text: str | None, finish: str | None = None) -> str:
        if kind == "chat":
            choice: dict[str, Any] = {"index": 0, "delta": {} if text is None else {"content": text}}
        else:
            choice = {"index": 0, "text": text or ""}
        return (
            "data: "
            + json.dumps({"object": "chunk", "choices": [{**choice, "finish_reason": finish}]})
            + "\n\n"
        )

    try:
        for i, piece in enumerate(pieces):
            if stub.fail_after is not None and i == stub.fail_after:
                yield 'data: {"error": {"message": "upstream exploded"}}\n\n'
                stub.ended = "finished"
                return
            yield event(piece)
            stub.sent += 1
            await asyncio.sleep(stub.delay_s)
        yield event(None, "stop")
        yield "data: " + json.dumps({"object": "chunk", "choices": [], "usage": STUB_USAGE}) + "\n\n"
        yield "data: [DONE]\n\n"
        stub.ended = "finished"
    finally:
        stub.ended = stub.ended or "closed"


# ---- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sae_dir(tiny_sae_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SAE plus `lat` (SAE latents) and `probe` (layer-1 residual) whose scores vary per token."""
    from detectors.linear import LinearFit
    from detectors.probe import save_probe

    folder = tmp_path_factory.mktemp("proxy-sae") / "sae"
    shutil.copytree(tiny_sae_dir, folder)
    dets = folder / "detectors"
    # The tiny SAE's latents are ~0.05-0.3 and the layer-1 residual's entries ~0.03: weights and scale
    # put both detectors' logits at about ±2, so token scores spread over (0.1, 0.9).
    latents = [{"id": i, "weight": 10.0, "label": f"l{i}"} for i in (3, 9, 11, 14)]
    lat = {"name": "lat", "kind": "sae_features", "threshold": 0.5, "latents": latents, "bias": -1.0}
    (dets / "lat.yaml").write_text(yaml.safe_dump(lat))
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, generator=g) * 0.3
    fit = LinearFit(w, torch.tensor(0.0), torch.zeros(32), torch.full((32,), 0.03))
    save_probe(fit, dets / "probe.safetensors", hook_points=["model.layers.1"])
    probe = {"name": "probe", "kind": "probe", "threshold": 0.5, "hook_points": ["model.layers.1"]}
    (dets / "probe.yaml").write_text(yaml.safe_dump({**probe, "weights_file": "probe.safetensors"}))
    # `pushy` reads the SAE's own layer, so the audit trail names the latents behind it (monitor.evidence).
    fit = LinearFit(torch.randn(32, generator=g), torch.tensor(0.0), torch.zeros(32), torch.full((32,), 0.05))
    save_probe(fit, dets / "pushy.safetensors", hook_points=["model.layers.2"])
    pushy = {"name": "pushy", "kind": "probe", "threshold": 0.5, "hook_points": ["model.layers.2"]}
    (dets / "pushy.yaml").write_text(yaml.safe_dump({**pushy, "weights_file": "pushy.safetensors"}))
    return folder


@pytest.fixture(scope="module")
def stub() -> Iterator[Any]:
    state = Stub()
    with running(stub_app(state)) as url:
        yield type("U", (), {"url": url, "state": state})


@pytest.fixture(scope="module")
def upstream(
    tiny_model_dir: Path, tiny_sae_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A second featurewatch, generating with the tiny model (no monitoring: a plain OpenAI server)."""
    from monitor.runtime import load_runtime
    from monitor.server import create_app

    policy = tmp_path_factory.mktemp("upstream") / "policy.yaml"
    policy.write_text(ALLOW_POLICY)
    settings = make_settings(tiny_model_dir, tiny_sae_dir, policy, monitoring=False)
    rt = load_runtime(settings)
    rt.engine.gen.eos_ids = set()  # full lengths: the random model may pick EOS any time
    with running(create_app(settings, rt, sinks=[])) as url:
        yield url
    rt.close()


@pytest.fixture(scope="module")
def proxy(
    tiny_model_dir: Path, sae_dir: Path, stub: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    from monitor.runtime import load_runtime
    from monitor.server import create_app

    policy = tmp_path_factory.mktemp("proxy") / "policy.yaml"
    policy.write_text(ALLOW_POLICY)
    dets = ["always", "never", "resid", "lat", "probe", "pushy"]
    settings = make_settings(tiny_model_dir, sae_dir, policy, detectors=dets, upstream_url=stub.url)
    rt = load_runtime(settings)
    events: list[DecisionEvent] = []
    with running(create_app(settings, rt, sinks=[events.append])) as url:
        yield type("P", (), {"url": url, "rt": rt, "events": events, "policy": policy})
    rt.close()


@pytest.fixture
def setup(proxy: Any, stub: Any) -> Iterator[Any]:
    """Per test: a policy (file + reload), the upstream, hold-back; restored afterwards."""
    s = proxy.rt.settings

    def apply(policy: str = ALLOW_POLICY, *, upstream: str | None = None, hold_back: int | None = 0) -> None:
        proxy.policy.write_text(policy)
        assert proxy.rt.holder.reload() == []
        s.hold_back_tokens, s.upstream_url = hold_back, upstream or stub.url

    stub.state.reset()
    apply()
    timeout_s = s.request_timeout_s
    yield apply
    apply()
    s.upstream_model = s.upstream_api_key = None
    s.request_timeout_s = timeout_s


@pytest.fixture
def client(proxy: Any) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=proxy.url, api_key="unused", max_retries=0) as c:
        yield c


def _chat(client: openai.OpenAI, model: str = "tiny", **kw: Any) -> Any:
    return client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0, **kw)


def _streamed(client: openai.OpenAI, **kw: Any) -> tuple[str, list[Any]]:
    chunks = list(_chat(client, stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def _local_prefix(proxy: Any, text: str, n_tokens: int) -> str:
    """The text covered by the first `n_tokens` tokens of the local tokenization of `text`."""
    enc = proxy.rt.lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return text[: enc["offset_mapping"][n_tokens][0]] if n_tokens else ""


# ---- tokenization at chunk boundaries ----------------------------------------------------------------------
SPLIT_TEXTS = [TEXT, "It's  they're'll \n\n  x 12345 ünïcödé 😀👍🏽 日本語, don't", "a'r'e'l'l've  \t tabs  "]


def _check_incremental(tokenizer: Any) -> None:
    """Random 1-5 character deltas: the settled tokens are the whole text's tokens, their texts the text."""
    for text in SPLIT_TEXTS:
        ref = tokenizer(text, add_special_tokens=False)["input_ids"]
        for seed in range(40):
            rng, inc, got = random.Random(seed), IncrementalTokenizer(tokenizer), []
            i = 0
            while i < len(text):
                j = min(len(text), i + rng.randint(1, 5))
                got += inc.push(text[i:j])
                assert text.startswith("".join(s.text for s in got))  # settled text is what arrived
                i = j
            early = len(got)
            got += inc.finish()
            assert [s.token_id for s in got] == ref and "".join(s.text for s in got) == text
            assert early >= len(ref) - 8  # tokens settle while the text streams, not only at its end


def test_incremental_tokens_equal_the_whole_texts_tokens(tiny_lm: Any) -> None:
    _check_incremental(tiny_lm.tokenizer)


@pytest.mark.real_model
def test_incremental_tokens_with_the_default_models_tokenizer(real_lm: Any) -> None:
    _check_incremental(real_lm.tokenizer)


# ---- pass-through ------------------------------------------------------------------------------------------
def test_allowed_answers_equal_the_upstreams(client: openai.OpenAI, upstream: str, setup: Any) -> None:
    setup(upstream=upstream)
    with openai.OpenAI(base_url=upstream, api_key="unused", max_retries=0) as direct:
        ref = _chat(direct)
        ref_text = ref.choices[0].message.content
        resp = _chat(client)
        assert resp.choices[0].message.content == ref_text and resp.choices[0].finish_reason == "length"
        assert resp.usage == ref.usage  # the upstream's own count
        fw = resp.model_extra["featurewatch"]
        assert fw["verdict"] == "allow" and fw["proxy"] == {"upstream": upstream, "model": "tiny"}
        assert len(fw["peak_token_scores"]) == 6
        text, chunks = _streamed(client, stream_options={"include_usage": True})
        assert text == ref_text and chunks[-1].usage == ref.usage
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        kw: dict[str, Any] = {"model": "tiny", "prompt": "The quick brown", "max_tokens": 9, "temperature": 0}
        ref_c = direct.completions.create(**kw).choices[0].text
        assert client.completions.create(**kw).choices[0].text == ref_c
        assert "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True)) == ref_c


def test_upstream_4xx_passes_through(client: openai.OpenAI, upstream: str, setup: Any) -> None:
    setup(upstream=upstream)
    with pytest.raises(openai.NotFoundError, match=r"answered 404: model 'gpt-4' does not exist") as e:
        _chat(client, model="gpt-4")
    assert e.value.code == "model_not_found" and upstream in str(e.value)


def test_request_forwarded_with_upstream_model_and_key(
    client: openai.OpenAI, stub: Any, setup: Any, proxy: Any
) -> None:
    proxy.rt.settings.upstream_model = "upstream-llm"
    proxy.rt.settings.upstream_api_key = SecretStr("sk-upstream-0123456789")
    resp = _chat(client, model="whatever", stop=["zzz"], seed=3)
    assert resp.choices[0].message.content == TEXT and resp.model == "upstream-llm"
    kind, body, headers = stub.state.requests[-1]
    assert kind == "chat" and headers["authorization"] == "Bearer sk-upstream-0123456789"
    assert (
        body["model"] == "upstream-llm" and body["stream"] is True and body["stream_options"]["include_usage"]
    )
    assert (
        body["messages"] == CHAT
        and body["max_tokens"] == 12
        and body["stop"] == ["zzz"]
        and body["seed"] == 3
    )
    assert resp.usage is not None and resp.usage.completion_tokens == STUB_USAGE["completion_tokens"]


# ---- blocking ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_block_stops_the_upstream_and_withholds_the_rest(
    client: openai.OpenAI, stub: Any, setup: Any, proxy: Any, stream: bool
) -> None:
    setup(policy_text(BLOCK_AT_3))
    stub.state.delay_s = 0.03  # ~1 s of stream: the block lands long before its end
    if stream:
        text, chunks = _streamed(client)
        last = chunks[-1].choices[0]
        finish, refusal, fw = last.finish_reason, last.delta.refusal, chunks[-1].model_extra["featurewatch"]
    else:
        resp = _chat(client)
        text, finish = resp.choices[0].message.content, resp.choices[0].finish_reason
        refusal, fw = resp.choices[0].message.refusal, resp.model_extra["featurewatch"]
    assert text == _local_prefix(proxy, TEXT, 2)  # the two tokens before the trigger, nothing after
    assert finish == "content_filter" and refusal == "stopped"
    assert fw["verdict"] == "block" and fw["blocked_at"] == 2 and fw["rules"][0]["id"] == "third-token"
    wait_until(lambda: stub.state.ended is not None)
    assert stub.state.ended == "closed" and stub.state.sent < stub.state.total // 2  # hung up early
    ev = proxy.events[-1]
    assert (
        ev.finish_reason == "content_filter" and ev.completion == text and ev.usage["completion_tokens"] == 2
    )


def test_hold_back_window_is_withheld_then_flushed(client: openai.OpenAI, setup: Any) -> None:
    setup(policy_text(BLOCK_AT_3), hold_back=None)  # derived: count 3 -> hold back 2
    text, chunks = _streamed(client)
    assert text == "" and chunks[-1].choices[0].finish_reason == "content_filter"
    late = rule("late", "always", "block", 200, aggregation="{kind: count_over, threshold: 0.5}")
    setup(policy_text(late), hold_back=None)  # holds back 8 but never fires: all text flushed at the end
    assert _streamed(client)[0] == TEXT


def test_prompt_block_never_calls_the_upstream(client: openai.OpenAI, stub: Any, setup: Any) -> None:
    setup(policy_text(rule("prompt-block", "always", "block", scope="prompt", message="not this")))
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=CHAT, max_tokens=6, temperature=0, stream=True
    )
    assert raw.headers["x-featurewatch-verdict"] == "block"
    chunks: list[Any] = list(raw.parse())
    assert (
        chunks[-1].choices[0].finish_reason == "content_filter"
        and chunks[-1].choices[0].delta.refusal == "not this"
    )
    assert stub.state.requests == []


def test_steer_rules_act_as_flags(client: openai.OpenAI, setup: Any) -> None:
    setup(policy_text(rule("steer-it", "always", "steer", steer="{latents: {3: 40.0}}")))
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=CHAT, max_tokens=6)
    resp: Any = raw.parse()
    fw = resp.model_extra["featurewatch"]
    assert (
        raw.headers["x-featurewatch-verdict"] == "flag" and fw["verdict"] == "flag" and fw["steered"] is False
    )
    assert [(r["id"], r["action"]) for r in fw["rules"]] == [("steer-it", "flag")]
    assert fw["proxy"]["steer_as_flag"] == ["steer-it"] and resp.choices[0].message.content == TEXT


# ---- failures ----------------------------------------------------------------------------------------------
def test_upstream_down_is_a_502_naming_it(client: openai.OpenAI, setup: Any) -> None:
    port = free_port()
    setup(upstream=f"http://user:secret@127.0.0.1:{port}/v1")
    with pytest.raises(openai.InternalServerError) as e:
        _chat(client)
    assert e.value.status_code == 502
    body = e.value.response.json()["error"]
    assert body["code"] == "upstream_unreachable" and set(body) == {"message", "type", "param", "code"}
    assert f"upstream http://user:***@127.0.0.1:{port}/v1 is unreachable" in body["message"]
    assert "secret" not in body["message"]


def test_upstream_error_mid_stream(client: openai.OpenAI, stub: Any, setup: Any, proxy: Any) -> None:
    stub.state.fail_after = 6
    with pytest.raises(openai.APIError, match="upstream exploded"):
        _streamed(client)
    ev = proxy.events[-1]
    assert ev.finish_reason == "upstream_error" and TEXT.startswith(ev.completion)
    stub.state.reset(fail_after=6)
    with pytest.raises(openai.InternalServerError, match="failed mid-stream: upstream exploded"):
        _chat(client)


def test_request_timeout_is_a_504(client: openai.OpenAI, proxy: Any, stub: Any, setup: Any) -> None:
    proxy.rt.settings.request_timeout_s = 0.3
    stub.state.delay_s = 0.05  # 32 deltas: 1.6 s
    with pytest.raises(openai.InternalServerError, match=r"longer than 0\.3 s") as e:
        _chat(client)
    assert e.value.status_code == 504 and proxy.events[-1].finish_reason == "timeout"
    wait_until(lambda: stub.state.ended is not None)
    assert stub.state.ended == "closed"


def test_client_disconnect_closes_the_upstream(proxy: Any, stub: Any, setup: Any) -> None:
    stub.state.reset(text=TEXT * 10, delay_s=0.02)
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 500, "stream": True}
    with httpx.stream("POST", f"{proxy.url}/chat/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the stream is running
    wait_until(
        lambda: (
            stub.state.ended is not None and proxy.events and proxy.events[-1].finish_reason == "cancelled"
        )
    )
    assert stub.state.ended == "closed" and stub.state.sent < stub.state.total // 2


# ---- what the monitor reads and records --------------------------------------------------------------------
def test_proxy_scores_equal_shadow_scores(client: openai.OpenAI, proxy: Any, setup: Any) -> None:
    resp = _chat(client)
    fw, ev = resp.model_extra["featurewatch"], proxy.events[-1]
    convo = [*CHAT, {"role": "assistant", "content": TEXT}]
    shadow = httpx.post(f"{proxy.url}/monitor/score", json={"messages": convo}).json()
    assert shadow["tokens"] == len(ev.evidence) > 10
    for name in ("lat", "probe"):  # scores that vary per token, so equal scores mean equal activations
        assert len({round(x, 2) for x in shadow["evidence"]["scores"][name]}) > 5, name
    for name in ("always", "never", "resid", "lat", "probe"):
        assert fw["scores"][name] == pytest.approx(shadow["scores"][name], abs=1e-3), name
        per_token = shadow["evidence"]["scores"][name][shadow["evidence"]["n_prompt"] :]
        assert [t["scores"][name] for t in ev.evidence] == pytest.approx(per_token, abs=1e-3), name


def test_proxy_evidence_names_the_latents_the_shadow_scorer_names(
    client: openai.OpenAI, proxy: Any, setup: Any
) -> None:
    """Teacher-forced tokens and one batched pass agree on the latents behind `pushy`: its aggregation is
    max, so the shadow scorer's message-level top features are the evidence at its peak token."""
    _chat(client)
    ev = proxy.events[-1]
    convo = [*CHAT, {"role": "assistant", "content": TEXT}]
    body = {"messages": convo, "detectors": ["pushy"]}
    shadow = httpx.post(f"{proxy.url}/monitor/score", json=body).json()
    named = shadow["top_features"]["pushy"]
    assert named and shadow["tokens"] == len(ev.evidence)
    assert all(t["pushes"] == "pushy" for t in ev.evidence)
    peak = ev.evidence[named[0]["token_index"]]
    assert [lat["latent_id"] for lat in peak["top"]] == [lat["latent_id"] for lat in named[:3]]
    for got, want in zip(peak["top"], named, strict=False):
        assert got["contribution"] == pytest.approx(want["contribution"], rel=1e-2, abs=1e-3)
        assert got["activation"] == pytest.approx(want["activation"], abs=1e-3)


def test_audit_record_marks_the_proxy(proxy: Any, stub: Any, setup: Any) -> None:
    from monitor.server import create_app

    setup(policy_text(rule("flag-it", "lat", "flag", 0.0)))
    app = create_app(proxy.rt.settings, proxy.rt)  # the real sinks: audit store in the tmp data dir
    with running(app) as url:
        r = httpx.post(
            f"{url}/chat/completions",
            json={"model": "tiny", "messages": CHAT},
            headers={"x-featurewatch-tenant": "acme"},
        )
        assert r.status_code == 200 and r.headers["x-featurewatch-verdict"] == "flag"
        assert app.state.audit.flush()
        resp = r.json()
        rec = app.state.audit.get(resp["id"])
    assert rec is not None and rec["verdict"] == "flag" and rec["tenant"] == "acme"
    assert rec["route"] == "/v1/chat/completions" and rec["model"] == "tiny"
    assert rec["featurewatch"]["proxy"] == {"upstream": stub.url, "model": "tiny"}
    assert rec["versions"]["upstream"] == stub.url and rec["versions"]["policy"] == "test@1"
    assert rec["completion"] == TEXT == resp["choices"][0]["message"]["content"] and rec["messages"] == CHAT
    assert rec["usage"] == STUB_USAGE == resp["usage"] and len(rec["evidence"]) > 10
