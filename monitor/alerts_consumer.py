"""The consumer of the alerts stream (`featurewatch:alerts`): one consumer group per handler kind, so the
webhook and the log sink each see every alert, while replicas sharing one Redis split each group's work.

Per entry: the shared dedup window decides (`monitor.alerts_dedup`; a suppressed alert is acked and
counted), the handler runs (`monitor.alerts_handlers`), and success is acked. A failure leaves the entry
pending: its idle clock is restarted and it is claimed again (XCLAIM, which counts the delivery) once
`backoff_s * 2^(n-1)` has passed after the n-th failure. The delivery count Redis keeps per pending entry
is the attempt counter, so retries survive restarts and move between replicas with the entry. After
`max_attempts`, or at once for a permanent failure (a 4xx), the entry goes to `featurewatch:alerts:dead`
with the error and attempt count, and is acked. Entries that stay pending longer than `reclaim_idle_s`
belong to a consumer that died (a live one retries within `backoff_max_s`); any consumer takes them over
with XAUTOCLAIM. Delivery is at least once: a consumer killed between a delivery and its XACK delivers
again, so receivers deduplicate by `stream_id`. Needs Redis ≥ 6.2 (XAUTOCLAIM, XPENDING IDLE).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import redis

from monitor.alerts_config import ConsumerConfig
from monitor.alerts_dedup import Dedup
from monitor.alerts_handlers import DeliveryError, Handler, alert_payload, rule_ids
from monitor.audit_record import Keys

log = logging.getLogger("featurewatch.alerts")
RETRY_SCAN = 100  # own pending entries looked at per poll for due retries
FORGET_CONSUMER_MS = 86400 * 1000  # consumers idle this long with nothing pending are removed from the group
ClientSource = redis.Redis | Callable[[], redis.Redis]


class AlertConsumer:
    """One handler's consumer thread: `start()`, `stop()`; `stats` counts delivered, suppressed, failed
    (attempts that will be retried), retried (re-attempts made), dead, reclaimed, trimmed (entries the
    stream's MAXLEN dropped before delivery), redis_errors."""

    def __init__(
        self, client: ClientSource, handler: Handler, config: ConsumerConfig, keys: Keys | None = None
    ) -> None:
        self._client_fn: Callable[[], redis.Redis] = client if callable(client) else (lambda: client)
        self.handler, self.config = handler, config
        self.keys = keys or Keys()
        self.stream, self.dead_stream = self.keys.alerts, f"{self.keys.alerts}:dead"
        self.stats: Counter[str] = Counter()
        self._dedup = Dedup(config.group, config.dedup_window_s, self.keys)
        self._stop = threading.Event()
        self._group_ready = False
        self._down = False
        self._cursor = "0-0"  # XAUTOCLAIM scan position
        self._next_reclaim = 0.0  # monotonic
        self._thread = threading.Thread(target=self._run, name=f"alerts-{handler.kind}", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> AlertConsumer:
        self._thread.start()
        return self

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self, timeout_s: float | None = None) -> bool:
        """Stop after the entry in hand (at most block_s + one handler call); True if the thread ended."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout_s if timeout_s is not None else self.config.block_s + 30.0)
        if self._thread.is_alive():  # still inside a handler call: closing its client under it would crash it
            return False
        self.handler.close()
        return True

    # ---- the loop -----------------------------------------------------------------------------------
    def _run(self) -> None:
        delay = self.config.backoff_s
        while not self._stop.is_set():
            try:
                self._poll()
            except redis.ResponseError as e:
                self._group_ready = False  # NOGROUP: the stream was deleted; recreate the group at once
                if "NOGROUP" not in str(e):
                    delay = self._redis_failed(e, delay)
            except redis.RedisError as e:
                delay = self._redis_failed(e, delay)
            except Exception:  # a bug must not end the thread: log and go on after a pause
                log.exception("alerts: %s consumer %s failed", self.handler.kind, self.config.consumer)
                self._stop.wait(delay)
            else:
                if self._down:
                    log.info("alerts: %s consumer: Redis is reachable again", self.handler.kind)
                self._down, delay = False, self.config.backoff_s

    def _redis_failed(self, e: redis.RedisError, delay: float) -> float:
        self.stats["redis_errors"] += 1
        if not self._down:
            log.warning(
                "alerts: %s consumer: Redis failed (%s: %s); retrying", self.handler.kind, type(e).__name__, e
            )
        self._down = True
        self._stop.wait(delay)
        return min(delay * 2, self.config.backoff_max_s)

    def _poll(self) -> None:
        c, cfg = self._client_fn(), self.config
        if not self._group_ready:
            self._ensure_group(c)
        if time.monotonic() >= self._next_reclaim:
            self._reclaim(c)
        self._retry_due(c)
        if self._stop.is_set():
            return
        resp: Any = c.xreadgroup(
            cfg.group, cfg.consumer, {self.stream: ">"}, count=cfg.batch, block=int(cfg.block_s * 1000)
        )
        for _stream, entries in resp or []:
            for sid, fields in entries:
                if self._stop.is_set():  # the rest stays pending: retried after a restart or reclaimed
                    return
                self._process(c, sid, fields, attempts=1)

    def _ensure_group(self, c: redis.Redis) -> None:
        try:
            c.xgroup_create(self.stream, self.config.group, id=self.config.start_id, mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):  # BUSYGROUP: another replica (or an earlier run) made it
                raise
        self._group_ready = True

    # ---- one entry ------------------------------------------------------------------------------------
    def _process(self, c: redis.Redis, sid: str, fields: dict[str, str], attempts: int) -> None:
        try:
            alert = alert_payload(sid, fields)
        except ValueError as e:  # not written by the audit store: no retry can fix it
            self._dead_letter(c, sid, fields, attempts, f"malformed alert entry: {e}")
            return
        adm = self._dedup.admit(c, sid, str(alert.get("tenant") or ""), rule_ids(alert))
        if not adm.admitted:
            c.xack(self.stream, self.config.group, sid)
            self.stats["suppressed"] += 1
            return
        alert["suppressed"] = adm.suppressed
        try:
            self.handler(alert)
        except DeliveryError as e:
            self._failed(c, sid, fields, attempts, str(e), permanent=e.permanent)
            return
        except Exception as e:  # a handler bug: retried like any failure, then dead-lettered
            log.exception("alerts: %s handler raised on %s", self.handler.kind, sid)
            self._failed(c, sid, fields, attempts, f"{type(e).__name__}: {e}", permanent=False)
            return
        with c.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.config.group, sid)
            self._dedup.settle(pipe, c, adm)
            pipe.execute()
        self.stats["delivered"] += 1

    def _failed(
        self, c: redis.Redis, sid: str, fields: dict[str, str], attempts: int, error: str, *, permanent: bool
    ) -> None:
        cfg = self.config
        if permanent or attempts >= cfg.max_attempts:
            self._dead_letter(c, sid, fields, attempts, error)
            return
        # Restart the entry's idle clock (JUSTID: without counting a delivery): the backoff runs from now.
        c.xclaim(self.stream, cfg.group, cfg.consumer, 0, [sid], justid=True)
        self.stats["failed"] += 1
        log.warning(
            "alerts: %s delivery of %s failed (attempt %d of %d): %s; next try in %.1f s",
            self.handler.kind,
            sid,
            attempts,
            cfg.max_attempts,
            error,
            self._delay_s(attempts),
        )

    def _dead_letter(
        self, c: redis.Redis, sid: str, fields: dict[str, str], attempts: int, error: str
    ) -> None:
        cfg = self.config
        entry = {
            **fields,
            "stream_id": sid,
            "error": error[:500],
            "attempts": str(attempts),
            "group": cfg.group,
            "consumer": cfg.consumer,
            "dead_at": str(round(time.time(), 3)),
        }
        with c.pipeline(transaction=True) as pipe:  # both or neither: never lost, never dead twice
            pipe.xadd(self.dead_stream, entry, maxlen=cfg.dead_maxlen, approximate=True)  # type: ignore[arg-type]
            pipe.xack(self.stream, cfg.group, sid)
            pipe.execute()
        self.stats["dead"] += 1
        log.error(
            "alerts: %s gave up on %s (request %s) after %d attempt(s): %s; moved to %s",
            self.handler.kind,
            sid,
            fields.get("id"),
            attempts,
            error,
            self.dead_stream,
        )

    # ---- retries and reclaiming ---------------------------------------------------------------------
    def _delay_s(self, failures: int) -> float:
        return min(self.config.backoff_s * 2 ** (failures - 1), self.config.backoff_max_s)

    def _retry_due(self, c: redis.Redis) -> None:
        """Claim again (counting a delivery) this consumer's failed entries whose backoff has passed."""
        cfg = self.config
        pending: Any = c.xpending_range(
            self.stream, cfg.group, min="-", max="+", count=RETRY_SCAN,
            consumername=cfg.consumer, idle=int(cfg.backoff_s * 1000),
        )  # fmt: skip
        for p in pending:
            if self._stop.is_set():
                return
            failures, due_ms = int(p["times_delivered"]), int(self._delay_s(int(p["times_delivered"])) * 1000)
            if int(p["time_since_delivered"]) < due_ms:
                continue
            got: Any = c.xclaim(self.stream, cfg.group, cfg.consumer, due_ms, [p["message_id"]])
            if not got:  # claimed by another consumer meanwhile
                continue
            sid, fields = got[0]
            if fields is None:  # trimmed off the stream by MAXLEN before it could be delivered
                c.xack(self.stream, cfg.group, p["message_id"])
                self.stats["trimmed"] += 1
                continue
            self.stats["retried"] += 1
            self._process(c, sid, fields, attempts=failures + 1)

    def _reclaim(self, c: redis.Redis) -> None:
        """Take over entries left pending by consumers that died (idle longer than reclaim_idle_s)."""
        cfg = self.config
        self._next_reclaim = time.monotonic() + min(max(cfg.reclaim_idle_s / 2, cfg.block_s), 30.0)
        idle_ms = int(cfg.reclaim_idle_s * 1000)
        resp: Any = c.xautoclaim(
            self.stream, cfg.group, cfg.consumer, idle_ms, start_id=self._cursor, count=cfg.batch
        )
        self._cursor = str(resp[0])
        live = [(sid, fields) for sid, fields in resp[1] if sid is not None and fields is not None]
        if len(live) < len(resp[1]):  # Redis 6.2 hands over trimmed entries as (None, None), ids unknown
            self._drop_trimmed(c)
        if self._cursor == "0-0":
            self._forget_consumers(c)
        if not live:
            return
        with c.pipeline(transaction=False) as pipe:
            for sid, _ in live:
                pipe.xpending_range(self.stream, cfg.group, min=sid, max=sid, count=1)
            counts = [int(p[0]["times_delivered"]) if p else 1 for p in pipe.execute()]
        self.stats["reclaimed"] += len(live)
        log.info("alerts: %s consumer %s reclaimed %d alert(s)", self.handler.kind, cfg.consumer, len(live))
        for (sid, fields), delivered in zip(live, counts, strict=True):
            if self._stop.is_set():
                return
            if delivered > cfg.max_attempts:  # it kept killing consumers (or they kept dying): stop trying
                self._dead_letter(c, sid, fields, delivered - 1, "abandoned: its consumers kept dying")
            else:
                self._process(c, sid, fields, attempts=delivered)

    def _drop_trimmed(self, c: redis.Redis) -> None:
        """Ack this consumer's pending entries that are no longer on the stream (MAXLEN dropped them)."""
        cfg = self.config
        pending: Any = c.xpending_range(
            self.stream, cfg.group, min="-", max="+", count=RETRY_SCAN, consumername=cfg.consumer
        )
        with c.pipeline(transaction=False) as pipe:
            for p in pending:
                pipe.xrange(self.stream, p["message_id"], p["message_id"], count=1)
            found = pipe.execute()
        gone = [p["message_id"] for p, f in zip(pending, found, strict=True) if not f]
        if gone:
            c.xack(self.stream, cfg.group, *gone)
            self.stats["trimmed"] += len(gone)

    def _forget_consumers(self, c: redis.Redis) -> None:
        """Remove long-gone consumers (nothing pending) so the group does not collect one per restart."""
        consumers: Any = c.xinfo_consumers(self.stream, self.config.group)
        for info in consumers:
            name = str(info["name"])
            if name != self.config.consumer and not info["pending"] and info["idle"] > FORGET_CONSUMER_MS:
                c.xgroup_delconsumer(self.stream, self.config.group, name)
