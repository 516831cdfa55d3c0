"""Helpers for the sidecar tests: policies, settings, and a real uvicorn server on loopback.

The tiny SAE folder (conftest `tiny_sae_dir`) has deterministic detectors, because detectors on the tiny
random model cannot recognise concepts: `always` scores ~1 on every token (sigmoid(10)), `never` ~0
(sigmoid(-10)), `resid` is a residual probe at model.layers.1 (it exercises the capture path; its weights
are zero, so it scores sigmoid(b)). Rules then fire at a known token, e.g. `count_over` ≥ 3 fires on the
third completion token.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monitor.background import free_port, serve_in_thread

__all__ = ["free_port", "running"]

ALLOW_POLICY = """
name: allow-all
rules:
  - id: never-block
    detector: never
    threshold: 0.5
    action: block
"""


def policy_text(*rules: str, name: str = "test", version: int = 1) -> str:
    body = "\n".join(rules)
    return f"name: {name}\nversion: {version}\nrules:\n{body}\n"


def rule(rid: str, detector: str, action: str, threshold: float | int = 0.5, **extra: str) -> str:
    lines = [
        f"  - id: {rid}",
        f"    detector: {detector}",
        f"    threshold: {threshold}",
        f"    action: {action}",
    ]
    lines += [f"    {k}: {v}" for k, v in extra.items()]
    return "\n".join(lines)


def running(app: Any) -> Any:
    """Serve `app` with uvicorn on a loopback port in a thread; yields the base URL (…/v1)."""
    return serve_in_thread(app)


def make_settings(tiny_model_dir: Path, tiny_sae_dir: Path, policy: Path, **kw: Any) -> Any:
    from monitor.settings import Settings

    base: dict[str, Any] = {
        "model": str(tiny_model_dir),
        "served_model_name": "tiny",
        "sae": str(tiny_sae_dir),
        "detectors": ["always", "never", "resid"],
        "policy": policy,
        "data_dir": policy.parent / "data",  # never the user's ~/.cache
        "policy_poll_s": 0,
        "device": os.environ.get("FEATUREWATCH_TEST_DEVICE", "cpu"),  # cuda on a GPU machine
        "batch_wait_ms": 20,
    }
    return Settings(**{**base, **kw})


def redis_servers(data: Path) -> list[int]:
    """pids of redis-server processes serving a database in `data` (redis runs in its `dir`)."""
    import psutil

    return [
        p.pid
        for p in psutil.process_iter(["name", "cwd"])
        if p.info["name"] == "redis-server" and p.info["cwd"] == str(data)
    ]


def wait_until(cond: Callable[[], Any], timeout_s: float = 15.0, what: str = "condition") -> None:
    """Poll `cond` until it holds; fail the test after `timeout_s` seconds (the one wait the tests share)."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
