"""`featurewatch serve` stopping as an orchestrator stops it: a real process, a real SIGTERM, real streams.

A drain lets a stream in flight finish while new requests get 503 and /readyz 503, then the process exits
0 with the stream's audit record in the (embedded) Redis; past `shutdown_grace_s` the stream is stopped
with an error naming the shutdown, and that decision is recorded too. Also the start-up checks that
refuse a model, SAE, detector or policy that cannot load or does not fit.

The tiny random model answers the prompt "hi" greedily without ever picking its end-of-sequence token,
so `max_tokens` decides how long a stream runs (several seconds here at 300 tokens).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fw_testing import free_port, policy_text, rule, wait_until
from typer.testing import CliRunner

from monitor.audit_record import Keys
from monitor.cli import app
from monitor.store_backends import EmbeddedBackend

HI = [{"role": "user", "content": "hi"}]


class Sidecar:
    """A `featurewatch serve` process on a loopback port; its log goes to a file (a pipe could fill)."""

    def __init__(self, root: Path, model: Path, sae: Path, **settings: Any) -> None:
        policy = root / "policy.yaml"
        policy.write_text(policy_text(rule("flag-it", "always", "flag")))  # every request is recorded
        cfg = root / "fw.yaml"
        base = {"served_model_name": "tiny", "sae": str(sae), "policy": str(policy), "device": "cpu"}
        cfg.write_text(yaml.safe_dump({**base, "policy_poll_s": 0, **settings}))
        self.data, self.port = root / "data", free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "serve.log"
        env = {**os.environ, "FEATUREWATCH_DATA_DIR": str(self.data), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "monitor.cli", "serve", "--config", str(cfg), "--port", str(self.port)]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen([*cmd, "--model", str(model)], env=env, stderr=out, stdout=out)
        wait_until(self._ready, 90, "the server to become ready")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()
        try:
            return httpx.get(f"{self.url}/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def record(self, request_id: str) -> dict[str, Any] | None:
        """The request's audit record from the embedded Redis the process left in its data dir."""
        backend = EmbeddedBackend(self.data / "audit.rdb", cli=True)
        try:
            raw: Any = backend.client().get(Keys().record(request_id))
        finally:
            backend.close()
        return json.loads(raw) if raw else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture
def sidecar(tiny_model_dir: Path, tiny_sae_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Sidecar]]:
    made: list[Sidecar] = []

    def start(**settings: Any) -> Sidecar:
        made.append(Sidecar(tmp_path, tiny_model_dir, tiny_sae_dir, **settings))
        return made[-1]

    yield start
    for s in made:
        s.stop()


def _events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def _open_stream(client: httpx.Client, url: str, max_tokens: int) -> Any:
    body = {"model": "tiny", "messages": HI, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    return client.stream("POST", f"{url}/v1/chat/completions", json=body)


def _first_text(events: Iterator[dict[str, Any]]) -> dict[str, Any]:
    for ev in events:
        if ev["choices"] and ev["choices"][0]["delta"].get("content"):
            return ev
    raise AssertionError("the stream ended before any text")


def test_sigterm_lets_the_stream_in_flight_finish_and_refuses_new_requests(sidecar: Any) -> None:
    s = sidecar(shutdown_grace_s=120)
    with httpx.Client(timeout=120) as client, _open_stream(client, s.url, 300) as r:
        events = _events(r.iter_lines())
        first = _first_text(events)
        s.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{s.url}/readyz").status_code == 503, 10, "/readyz to report the drain")
        ready = httpx.get(f"{s.url}/readyz").json()
        metrics = httpx.get(f"{s.url}/metrics").text  # still served while draining
        refused = httpx.post(
            f"{s.url}/v1/chat/completions", json={"model": "tiny", "messages": HI, "max_tokens": 2}
        )
        rest = list(events)  # the stream goes on while the new request is refused
    assert ready == {"status": "draining", "in_flight": 1}
    assert "featurewatch_draining 1.0" in metrics and "featurewatch_inflight_requests 1.0" in metrics
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert "shutting down" in refused.json()["error"]["message"]
    finals = [e for e in rest if e["choices"] and e["choices"][0]["finish_reason"]]
    assert finals[0]["choices"][0]["finish_reason"] == "length"
    assert rest[-1]["usage"]["completion_tokens"] == 300  # all of it, after the refusal
    assert s.proc.wait(60) == 0
    log = s.log.read_text()
    assert "SIGTERM: draining 1 request(s)" in log and "drain finished" in log
    rec = s.record(first["id"])
    assert rec is not None and rec["finish_reason"] == "length" and rec["usage"]["completion_tokens"] == 300


def test_sigterm_past_the_grace_period_stops_the_stream_with_a_clear_error(sidecar: Any) -> None:
    s = sidecar(shutdown_grace_s=0)
    with httpx.Client(timeout=120) as client, _open_stream(client, s.url, 450) as r:
        events = _events(r.iter_lines())
        first = _first_text(events)
        s.proc.send_signal(signal.SIGTERM)
        rest = list(events)
    errors = [e["error"] for e in rest if "error" in e]
    assert len(errors) == 1 and "shutting down" in errors[0]["message"], rest[-3:]
    assert not any(e.get("choices") and e["choices"][0]["finish_reason"] for e in rest)
    assert s.proc.wait(60) == 0
    assert "stopping them" in s.log.read_text()
    rec = s.record(first["id"])
    assert rec is not None and rec["finish_reason"] == "shutdown"
    assert 0 < rec["usage"]["completion_tokens"] < 450


# ---- start-up: refuse what cannot load or does not fit (exit 1, naming the setting) --------------------
def _serve(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["serve", *args], env=env)
    return res.exit_code, " ".join(res.output.split())


def test_start_up_refuses_models_saes_and_detectors_that_do_not_fit(
    tiny_model_dir: Path, tiny_sae_dir: Path, tmp_path: Path
) -> None:
    from sae_assets.sae import SAE, SAEConfig, SAEMetadata

    code, out = _serve("--model", str(tmp_path / "no-model"), "--sae", str(tiny_sae_dir), "--device", "cpu")
    assert code == 1 and "model:" in out

    deep = tmp_path / "deep-sae"  # the tiny model has 4 layers
    meta = SAEMetadata(hook_name="blocks.9.hook_resid_post", extra={"hf_hook_point": "model.layers.9"})
    SAE(SAEConfig(architecture="standard", d_in=32, d_sae=8, metadata=meta)).save(deep)
    base = ["--model", str(tiny_model_dir), "--device", "cpu"]
    code, out = _serve(*base, "--sae", str(deep))
    assert code == 1 and "model.layers.9 is out of range for a 4-layer model" in out

    code, out = _serve(*base, "--sae", str(tiny_sae_dir), env={"FEATUREWATCH_DETECTORS": '["alwayz"]'})
    assert code == 1 and "detectors: unknown detector(s) alwayz; valid: always, never, resid" in out

    broken = tmp_path / "broken-sae"
    SAE.load(tiny_sae_dir).save(broken)
    (broken / "detectors").mkdir()
    (broken / "detectors" / "odd.yaml").write_text("name: odd\nkind: sae_features\nthreshold: high\n")
    code, out = _serve(*base, "--sae", str(broken))
    assert code == 1 and "detectors:" in out and "odd" in out
