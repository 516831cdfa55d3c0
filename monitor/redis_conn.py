"""How everything other than the audit writer reaches the audit trail's Redis: CLI commands and the
sidecar's key store.

`REDIS_URL` when set; otherwise the embedded server on `<data_dir>/audit.rdb`. An embedded server is
private to the process that starts it, and two servers on one append-only file would corrupt it, so its
ownership is explicit (`monitor.store_backends.EmbeddedServer`): the process that starts it holds
`audit.rdb.lock` (flock) for the server's lifetime and writes its unix socket to `audit.rdb.endpoint`;
everyone else connects to that socket.

- A CLI command (`open_redis`) owns the server only while no sidecar runs (then it starts one for the
  command's duration and stops it at the end), and otherwise uses the sidecar's at once.
- A sidecar starting while a CLI command owns the server waits up to `CLI_WAIT_S` (5 s) for it to finish,
  then owns the server itself; if the command is still running, it connects to the command's server and
  takes over when that one stops (the audit store spools the few records in between; key checks retry
  once).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from monitor.keystore import KeyStore
from monitor.settings import Settings
from monitor.store_backends import Backend, EmbeddedBackend, UrlBackend

log = logging.getLogger("featurewatch.auth")
KEY_CACHE_S = 1.0  # the sidecar keeps key lookups this long: a key revoked elsewhere works ≤ 1 s more


def embedded_path(settings: Settings) -> Path:
    return settings.resolved_data_dir() / "audit.rdb"


def backend_for(settings: Settings, *, cli: bool = False) -> Backend:
    """A backend for the settings' Redis (not started until its first command)."""
    if settings.redis_url is not None:
        return UrlBackend(settings.redis_url.get_secret_value())
    return EmbeddedBackend(embedded_path(settings), cli=cli)


@contextmanager
def open_redis(settings: Settings) -> Iterator[redis.Redis]:
    """A client (decode_responses=True) for CLI commands; the embedded server, if this command had to
    start it, stops when the block ends."""
    backend = backend_for(settings, cli=True)
    try:
        yield backend.client()
    finally:
        backend.close()


def open_keys(settings: Settings, audit: Any = None) -> tuple[KeyStore, Callable[[], None]]:
    """The sidecar's key store and the function that closes what it opened. It shares the audit store's
    backend (one client, one embedded server) when there is one, else opens its own."""
    shared: Backend | None = getattr(audit, "backend", None)
    backend = shared if shared is not None else backend_for(settings)
    store = KeyStore(backend.client, recover=backend.recover, cache_s=KEY_CACHE_S)
    return store, (lambda: None) if shared is not None else backend.close


def warm_up(store: KeyStore, settings: Settings) -> None:
    """Start the Redis connection (and the embedded server) now rather than on the first request, and
    learn whether keys exist. Logs, never raises: the audit trail spools while Redis is down, and key
    checks answer 503 until it is back."""
    try:
        n = len(store.list()) if store.any_keys() else 0
    except redis.RedisError as e:
        log.warning("API keys cannot be checked yet: %s", e)
        return
    if n or settings.api_keys:
        log.info("access control: %d API key(s), %d static; inference needs one", n, len(settings.api_keys))
    else:
        log.warning(
            "access control: no API keys yet, inference is open; create one with "
            "`featurewatch keys create --role admin --tenant '*'`"
        )


async def start_keys(settings: Settings, audit: Any = None) -> tuple[KeyStore, Callable[[], None]]:
    """`open_keys` plus `warm_up` off the event loop: what the sidecar's lifespan calls."""
    import asyncio

    store, close = open_keys(settings, audit)
    await asyncio.to_thread(warm_up, store, settings)
    return store, close
