"""`featurewatch serve` as a user runs it: a real process on a loopback port, and start-up failures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import yaml
from fw_testing import ALLOW_POLICY, free_port
from typer.testing import CliRunner

from monitor.cli import app

runner = CliRunner()


def _serve(*args: str) -> tuple[int, str]:
    res = runner.invoke(app, ["serve", *args])
    return res.exit_code, res.output


def test_bad_settings_exit_2_naming_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "fw.yaml"
    cfg.write_text("max_batch_size: 0\n")
    code, out = _serve("--config", str(cfg))
    assert code == 2 and "max_batch_size" in out


def test_start_up_failures_exit_1_naming_the_setting(
    tiny_model_dir: Path, tiny_sae_dir: Path, tmp_path: Path
) -> None:
    base = ["--model", str(tiny_model_dir), "--device", "cpu"]
    code, out = _serve(*base, "--sae", str(tmp_path / "nope"))
    assert code == 1 and "sae:" in out

    bad_policy = tmp_path / "p.yaml"
    bad_policy.write_text(ALLOW_POLICY.replace("detector: never", "detector: nevr"))
    code, out = _serve(*base, "--sae", str(tiny_sae_dir), "--policy", str(bad_policy))
    assert code == 1 and "policy:" in out and "unknown detector 'nevr'" in " ".join(out.split())

    steer = tmp_path / "steer.yaml"
    steer.write_text(
        "name: s\nrules:\n  - {id: s, detector: resid, threshold: 0.5, action: steer, "
        "steer: {latents: detector}}\n"
    )
    code, out = _serve(*base, "--sae", str(tiny_sae_dir), "--policy", str(steer))
    assert code == 1 and "cannot steer" in " ".join(out.split())

    from sae_assets.sae import SAE, SAEConfig, SAEMetadata

    narrow = tmp_path / "narrow-sae"
    meta = SAEMetadata(hook_name="blocks.2.hook_resid_post", extra={"hf_hook_point": "model.layers.2"})
    SAE(SAEConfig(architecture="standard", d_in=16, d_sae=8, metadata=meta)).save(narrow)
    code, out = _serve(*base, "--sae", str(narrow))
    assert code == 1 and "reads width 16" in " ".join(out.split())


def test_serve_process_answers_the_openai_client(
    tiny_model_dir: Path, tiny_sae_dir: Path, tmp_path: Path
) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(ALLOW_POLICY)
    cfg = tmp_path / "fw.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"served_model_name": "tiny", "sae": str(tiny_sae_dir), "policy": str(policy), "device": "cpu"}
        )
    )
    port = free_port()
    env = {**os.environ, "FEATUREWATCH_DATA_DIR": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "monitor.cli", "serve", "--config", str(cfg), "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--model", str(tiny_model_dir)], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0) as client:
            resp = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
            )
        assert resp.choices[0].finish_reason in ("length", "stop")
        assert resp.model_extra is not None and resp.model_extra["featurewatch"]["verdict"] == "allow"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal: exit status -SIGTERM
    assert proc.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in err, err
    assert "featurewatch settings:" in err and '"api_keys": "<0 key(s)>"' in err
    assert "hi" not in err.split("featurewatch settings:")[1].replace("http", "")  # no content in logs
