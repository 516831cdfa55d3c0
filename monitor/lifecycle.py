"""Graceful shutdown and fail-closed audit: what the sidecar does when told to stop, or unable to record.

SIGTERM (or a first Ctrl-C) starts a drain rather than uvicorn's own shutdown, which would close the
listener at once (new clients: connection refused) and wait without bound for open streams:

1. `/readyz` answers 503 `draining`, and every new request other than `/healthz`, `/readyz` and
   `/metrics` gets 503 (`code: shutting_down`, `Connection: close`). The listener stays open, so a client
   that still reaches this replica is told why instead of being refused.
2. Generation and scoring requests in flight (streams included, queued ones too) run to their end, for
   at most `shutdown_grace_s`.
3. Past that, the engine stops every generation at its next token (`Engine.halt`): the client gets a 503
   error naming the shutdown (a stream ends with an error event) and the decision is recorded with
   `finish_reason: shutdown`. Requests not ended `HALT_WAIT_S` later (proxied streams) are left to
   uvicorn, which cancels them after another `HALT_WAIT_S`.
4. uvicorn's shutdown: the listener closes; the lifespan (`monitor.server`) stops the engine, the policy
   subscriber and the alert consumers, and closes the audit store, which writes what is queued to Redis
   or the spool. The process exits 0. A second signal skips the wait (generations halted, uvicorn's
   immediate shutdown, exit by that signal).

With `audit_failure_mode: closed`, the generation routes answer 503 (`code: audit_unavailable`) and
`/readyz` 503 while the audit store cannot keep records (`AuditStore.persisting`: Redis down and the
spool unwritable); `open` (the default) keeps serving and counts the lost records.

Prometheus metrics (at `/metrics`, summed over the apps of this process): `featurewatch_inflight_requests`,
`featurewatch_draining`, `featurewatch_refused_requests_total{reason}`,
`featurewatch_audit_records_total{outcome}`, `featurewatch_audit_persisting`,
`featurewatch_audit_spool_bytes`, `featurewatch_audit_spool_high_water_bytes`.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterator
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from monitor.http_errors import error_body

log = logging.getLogger("featurewatch.lifecycle")
GENERATION = frozenset({"/v1/chat/completions", "/v1/completions"})
INFERENCE = GENERATION | {"/v1/monitor/score"}  # what a drain waits for
ALWAYS_OPEN = frozenset({"/healthz", "/readyz", "/metrics"})  # answered while draining
HALT_WAIT_S = 5.0  # after halting the engine: how long halted requests get to end, then uvicorn's bound
AUDIT_OUTCOMES = ("written", "duplicates", "spooled", "replayed", "overflow", "lost")
_live: weakref.WeakSet[Lifecycle] = weakref.WeakSet()  # started and not yet shut down (for /metrics)


class Lifecycle:
    """One app's serving state: in-flight requests, drain, and whether the audit trail refuses work."""

    def __init__(self, app: FastAPI) -> None:
        self.state, self.settings = app.state, app.state.settings
        self.in_flight = 0  # inference requests being answered (changed on the event loop only)
        self.refused: Counter[str] = Counter()  # draining | audit
        self.draining = False
        self._drain_started = 0.0
        self._halted_at: float | None = None

    # ---- audit ----------------------------------------------------------------------------------------
    @property
    def audit(self) -> Any:
        return getattr(self.state, "audit", None)

    def audit_refuses(self) -> bool:
        """Closed mode and records cannot be kept: generation must wait until they can."""
        audit = self.audit
        return self.settings.audit_failure_mode == "closed" and audit is not None and not audit.persisting

    # ---- drain --------------------------------------------------------------------------------------
    def begin_drain(self, why: str) -> None:
        if self.draining:
            return
        self.draining, self._drain_started = True, time.monotonic()
        log.info(
            "%s: draining %d request(s) in flight for up to %g s (shutdown_grace_s); new requests get 503",
            why,
            self.in_flight,
            self.settings.shutdown_grace_s,
        )

    def halt(self) -> None:
        """Stop running generations now (their clients get a 503 naming the shutdown)."""
        if self._halted_at is None:
            self._halted_at = time.monotonic()
        runtime = getattr(self.state, "runtime", None)
        if runtime is not None:
            runtime.engine.halt()

    def drain_finished(self) -> bool:
        """Called every tick while draining: True once nothing is in flight (or halting did not help)."""
        now = time.monotonic()
        waited = now - self._drain_started
        if self.in_flight == 0:
            log.info("drain finished after %.1f s; shutting down", waited)
            return True
        if self._halted_at is None and waited >= self.settings.shutdown_grace_s:
            log.warning(
                "drain: %d request(s) still running after %g s (shutdown_grace_s): stopping them",
                self.in_flight,
                self.settings.shutdown_grace_s,
            )
            self.halt()
        if self._halted_at is not None and now - self._halted_at >= HALT_WAIT_S:
            log.error("drain: %d request(s) did not end after being stopped; shutting down", self.in_flight)
            return True
        return False

    # ---- what the gate answers instead of the app ------------------------------------------------------
    def refusal(self, path: str) -> JSONResponse | None:
        if path == "/readyz":
            return self._readyz()
        if self.draining and path not in ALWAYS_OPEN:
            self.refused["draining"] += 1
            msg = "the server is shutting down and takes no new requests; retry on another replica"
            headers = {"Connection": "close", "Retry-After": str(self.settings.retry_after_s)}
            return JSONResponse(error_body(503, msg, code="shutting_down"), 503, headers)
        if path in GENERATION and self.audit_refuses():
            self.refused["audit"] += 1
            msg = (
                "the audit trail cannot record decisions (Redis is unreachable and the audit spool cannot "
                "be written), and audit_failure_mode is closed: generation is refused until it can"
            )
            headers = {"Retry-After": str(self.settings.retry_after_s)}
            return JSONResponse(error_body(503, msg, code="audit_unavailable"), 503, headers)
        return None

    def _readyz(self) -> JSONResponse | None:
        if self.draining:
            return JSONResponse({"status": "draining", "in_flight": self.in_flight}, 503)
        if self.audit_refuses():
            return JSONResponse({"status": "audit unavailable", "audit_failure_mode": "closed"}, 503)
        return None  # the app's own readiness check


class LifecycleGate:
    """ASGI middleware: answers refusals, counts inference requests in flight, and follows the lifespan
    (a lifecycle is reported in /metrics from start-up to shutdown)."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle) -> None:
        self.app, self.lifecycle = app, lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lc = self.lifecycle
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._lifespan_send(send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        refusal = lc.refusal(path)
        if refusal is not None:
            await refusal(scope, receive, send)
        elif path in INFERENCE:
            lc.in_flight += 1
            try:
                await self.app(scope, receive, send)
            finally:
                lc.in_flight -= 1
        else:
            await self.app(scope, receive, send)

    def _lifespan_send(self, send: Send) -> Send:
        async def watch(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                _live.add(self.lifecycle)
            elif message["type"].startswith("lifespan.shutdown"):
                _live.discard(self.lifecycle)
            await send(message)

        return watch


def install(app: FastAPI) -> None:
    """Add the gate to `app` (`app.state.lifecycle`) and the metrics to Prometheus' registry."""
    app.state.lifecycle = Lifecycle(app)
    app.add_middleware(LifecycleGate, lifecycle=app.state.lifecycle)
    _register_metrics()


# ---- uvicorn with a drain ------------------------------------------------------------------------------
class GracefulServer(uvicorn.Server):
    """uvicorn's server, except that the first SIGTERM/SIGINT drains (above) instead of stopping."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self._drain_signal: int | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: set flags only; the drain starts (and logs) on the next tick, within 0.1 s.
        if self.started and self._drain_signal is None:
            self._drain_signal = sig  # not recorded as captured: a completed drain exits 0
            return
        if self._drain_signal is not None:
            self.lifecycle.halt()  # a second signal: stop generations now
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        lc = self.lifecycle
        if self._drain_signal is not None and not lc.draining:
            lc.begin_drain(signal.Signals(self._drain_signal).name)
        if lc.draining and not self.should_exit and lc.drain_finished():
            self.should_exit = True
        return await super().on_tick(counter)


# ---- /metrics ------------------------------------------------------------------------------------------
_registered = threading.Lock()
_done = False


def _register_metrics() -> None:
    global _done
    from prometheus_client import REGISTRY

    with _registered:
        if not _done:
            REGISTRY.register(_Collector())
            _done = True


class _Collector:
    """Reads the live apps' lifecycles and audit stores at scrape time."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        live = list(_live)
        stores = [lc.audit for lc in live if lc.audit is not None]
        yield GaugeMetricFamily(
            "featurewatch_inflight_requests",
            "Generation and scoring requests being answered",
            value=sum(lc.in_flight for lc in live),
        )
        draining = float(any(lc.draining for lc in live))
        yield GaugeMetricFamily(
            "featurewatch_draining", "1 while shutting down (new requests get 503)", draining
        )
        refused = CounterMetricFamily(
            "featurewatch_refused_requests", "Requests answered 503 by the lifecycle gate", labels=["reason"]
        )
        for reason in ("draining", "audit"):
            refused.add_metric([reason], sum(lc.refused[reason] for lc in live))
        yield refused
        yield from _audit_metrics(stores)


def _audit_metrics(stores: list[Any]) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    records = CounterMetricFamily(
        "featurewatch_audit_records",
        "Audit records by outcome (lost: neither Redis nor the spool could take them)",
        labels=["outcome"],
    )
    for outcome in AUDIT_OUTCOMES:
        records.add_metric([outcome], sum(s.stats[outcome] for s in stores))
    yield records
    yield GaugeMetricFamily(
        "featurewatch_audit_persisting",
        "1 while audit records can be stored or spooled; 0 while they are being lost",
        value=float(all(s.persisting for s in stores)),
    )
    yield GaugeMetricFamily(
        "featurewatch_audit_spool_bytes",
        "Bytes of audit records in the disk spool waiting for Redis",
        value=sum(_pending(s) for s in stores),
    )
    yield GaugeMetricFamily(
        "featurewatch_audit_spool_high_water_bytes",
        "Most bytes the spool has held since start-up",
        value=sum(s.spool.high_water for s in stores),
    )


def _pending(store: Any) -> int:
    try:
        return int(store.spool.pending_bytes())
    except OSError:  # an unreadable spool: its size is unknown
        return 0
