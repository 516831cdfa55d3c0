"""Shared by bench_load.py and bench_faults.py: a real `featurewatch serve` process, tiny random assets
for quick runs, a redis-server that can be killed, RSS and /metrics sampling, percentiles.

The sidecar runs as its own process (`python -m monitor.cli serve`), as in production, so its memory is
measured apart from the load generator, and it is stopped with SIGTERM (its drain is part of the run).
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from monitor.paths import data_dir as default_data_dir

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Write a short note thanking a colleague for their help with a report.",
    "Explain in two sentences why the sky is blue.",
    "Give three tips for keeping a small garden healthy.",
    "Describe a quiet morning in a small coastal town.",
    "What should I pack for a weekend hiking trip?",
    "Write a friendly reminder about a team meeting on Friday.",
]
FLAG_ALL = {"name": "bench-flag-all", "version": 1, "rules": []}  # rules filled by flag_all_policy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


# ---- assets -------------------------------------------------------------------------------------------
def tiny_assets(folder: Path) -> dict[str, Any]:
    """A random tiny Llama (4 layers, width 32, byte-level BPE), an SAE on its layer 2 and two
    deterministic detectors (`always` ~1, `never` ~0): settings for a quick run, not for real figures."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from sae_assets.sae import SAE, SAEConfig, SAEMetadata

    torch.manual_seed(0)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        PROMPTS * 4, vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=2, pad_token_id=2, bos_token_id=1,
    )  # fmt: skip
    model_dir, sae_dir = folder / "tiny-model", folder / "tiny-sae"
    LlamaForCausalLM(cfg).eval().save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    meta = SAEMetadata(hook_name="blocks.2.hook_resid_post", extra={"hf_hook_point": "model.layers.2"})
    SAE(SAEConfig(architecture="standard", d_in=32, d_sae=16, metadata=meta)).save(sae_dir)
    (sae_dir / "detectors").mkdir()
    for name, bias in (("always", 10.0), ("never", -10.0)):
        latents = [{"id": 3, "weight": 0.001}, {"id": 9, "weight": 0.001}]
        spec = {"name": name, "kind": "sae_features", "threshold": 0.5, "latents": latents, "bias": bias}
        (sae_dir / "detectors" / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return {"model": str(model_dir), "sae": str(sae_dir), "served_model_name": "tiny"}


def flag_all_policy(path: Path, detector: str) -> Path:
    """A policy whose one rule flags every request at its prompt (so each gets a record and an alert)."""
    rule = {"id": "flag-all", "detector": detector, "scope": "prompt", "threshold": 0.0, "action": "flag"}
    path.write_text(yaml.safe_dump({**FLAG_ALL, "rules": [rule]}))
    return path


# ---- the sidecar process ----------------------------------------------------------------------------------
class Sidecar:
    def __init__(self, folder: Path, settings: dict[str, Any], log_name: str = "serve.log") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data = folder / "data"
        data.mkdir(exist_ok=True)
        cache = default_data_dir() / "models"  # the converted default model: reuse it, as the image does
        if cache.is_dir():
            (data / "models").symlink_to(cache, target_is_directory=True)
        cfg = folder / "fw.yaml"
        cfg.write_text(yaml.safe_dump({"data_dir": str(data), "policy_poll_s": 0, **settings}))
        self.log = folder / log_name
        cmd = [sys.executable, "-m", "monitor.cli", "serve", "--config", str(cfg), "--port", str(self.port)]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=out)
        self.started = time.monotonic()

    def wait_ready(self, timeout_s: float = 600) -> float:
        """Seconds from launch to a 200 from /readyz."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the sidecar exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the sidecar did not become ready")
            time.sleep(0.5)

    def terminate(self, timeout_s: float = 120) -> tuple[int | None, float]:
        """SIGTERM (a drain), then (exit status, seconds until the process ended)."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s), time.monotonic() - t0
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None, time.monotonic() - t0


def metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


# ---- samplers ------------------------------------------------------------------------------------------
@dataclass
class Sampler:
    """Calls `sample()` every `every_s` seconds on a thread until stopped; keeps (monotonic time, value)."""

    sample: Callable[[], Any]
    every_s: float = 0.5
    points: list[tuple[float, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # the process may be gone at the very end
                self.points.append((time.monotonic(), self.sample()))
            self._stop.wait(self.every_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def between(self, t0: float, t1: float) -> list[Any]:
        return [v for t, v in self.points if t0 <= t <= t1]


def rss_mb(pid: int, data_dir: Path) -> dict[str, float]:
    """Resident memory (MB) of the sidecar process and of its embedded redis-server (daemonised, so not
    its child: found through the endpoint file the sidecar writes; 0 with an external Redis)."""
    import psutil

    out = {"sidecar": psutil.Process(pid).memory_info().rss / 2**20, "redis": 0.0}
    try:
        info = json.loads((data_dir / "audit.rdb.endpoint").read_text())
        out["redis"] = psutil.Process(int(info["server_pid"])).memory_info().rss / 2**20
    except (OSError, ValueError, KeyError, psutil.Error):
        pass
    return out
