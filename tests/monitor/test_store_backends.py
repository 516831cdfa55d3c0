"""Starting the embedded Redis when its first pings are refused.

redis-server creates its socket file when it binds it, a moment before it listens; a ping in that window is
refused. The window lasts microseconds and cannot be provoked on purpose, so the refusals are injected into
`ping` here; the server, its socket and its process are real.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from fw_testing import redis_servers, wait_until

from monitor.store_backends import embedded_redis_class, start_embedded, stop_embedded


def _refuse_first(monkeypatch: pytest.MonkeyPatch, n: int) -> list[int]:
    cls = embedded_redis_class()
    real_ping = cls.ping
    calls = [0]

    def ping(self: Any, **kw: Any) -> Any:
        calls[0] += 1
        if calls[0] <= n:
            raise redis.ConnectionError("Error 111 connecting to redis.socket. Connection refused.")
        return real_ping(self, **kw)

    monkeypatch.setattr(cls, "ping", ping)
    return calls


def test_a_refused_first_ping_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _refuse_first(monkeypatch, 2)
    client = start_embedded(tmp_path / "audit.rdb")
    try:
        assert calls[0] == 3 and client.set("k", "v") and client.get("k") == "v"
        assert redis_servers(tmp_path) == [client.pid]
    finally:
        stop_embedded(client)
    assert redis_servers(tmp_path) == []


def test_a_server_that_never_answers_is_stopped_not_left_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _refuse_first(monkeypatch, 10**6)
    monkeypatch.setattr(embedded_redis_class(), "start_timeout", 1)  # seconds
    with pytest.raises(redis.ConnectionError, match="embedded Redis did not start"):
        start_embedded(tmp_path / "audit.rdb")
    assert calls[0] > 1
    assert redis_servers(tmp_path) == []


def test_a_server_that_exits_during_start_up_fails_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused ping while the socket file exists means "still starting"; once the server has exited (it
    removes its socket) the wait gives up instead of pinging until start_timeout."""
    cls = embedded_redis_class()

    def ping(self: Any, **kw: Any) -> Any:
        if redis_servers(tmp_path):  # the first refusal: the server shuts down cleanly (SIGTERM)
            os.kill(self.pid, signal.SIGTERM)
            wait_until(lambda: not os.path.exists(self.socket_file))
        raise redis.ConnectionError("Error 111 connecting to redis.socket. Connection refused.")

    monkeypatch.setattr(cls, "ping", ping)
    monkeypatch.setattr(cls, "start_timeout", 60)  # seconds: far beyond what failing at once takes
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError, match="embedded Redis did not start"):
        start_embedded(tmp_path / "audit.rdb")
    assert time.monotonic() - started < 30
    assert redis_servers(tmp_path) == []
