"""The sidecar's HTTP app: OpenAI-compatible inference with per-token monitoring (FastAPI).

Routes: POST /v1/chat/completions, POST /v1/completions (streaming and not), GET /v1/models,
POST /v1/monitor/score (shadow mode), GET /healthz (process up), GET /readyz (model loaded, engine alive).
The generation and scoring routes live in monitor.routes_generate and monitor.routes_score.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from monitor.alerts import start_sidecar_alerts, stop_alert_consumers
from monitor.events import Sink, log_sink
from monitor.http_errors import APIError, content, error_body, install
from monitor.redis_conn import start_keys
from monitor.runtime import Runtime, load_runtime
from monitor.settings import Settings
from monitor.shared_state import open_shared
from monitor.tenancy import tenant_of

log = logging.getLogger("featurewatch.server")


class BodyLimit:
    """413 for bodies over `limit` bytes: by Content-Length up front, else while the body streams in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._reject(send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(self.limit)
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send: Send) -> None:
        resp = JSONResponse(error_body(413, _too_large(self.limit)), 413)
        await resp({"type": "http"}, _no_receive, send)


def _too_large(limit: int) -> str:
    return f"request body over the limit of {limit} bytes"


class _TooLarge(StarletteHTTPException):
    """Raised while a body without Content-Length streams in. An HTTPException, so the route's body
    parsing (which turns other exceptions into "error parsing the body") lets it through as the 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, _too_large(limit))


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def create_app(
    settings: Settings,
    runtime: Runtime | None = None,
    *,
    sinks: list[Sink] | None = None,
    loader: Callable[[Settings], Runtime] = load_runtime,
    close_runtime: bool = False,
) -> FastAPI:
    """The app. `runtime` is loaded at start-up unless given (tests share one across apps); one the app
    loaded, or one given with `close_runtime`, is closed at shutdown (the running batch finishes).
    Decision sinks: `sinks` when given, else the log sink and the audit store (`monitor.store`, opened at
    start-up from the settings, closed at shutdown; `app.state.audit`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = runtime is None or close_runtime
        rt = runtime if runtime is not None else loader(settings)
        app.state.runtime = rt
        audit = _open_audit(settings) if sinks is None else None  # given sinks (tests) replace it
        if audit is not None:
            app.state.sinks.append(audit)
        app.state.audit = audit
        app.state.alerts = start_sidecar_alerts(settings, audit)  # alert consumers (monitor.alerts)
        app.state.keys, close_keys = await start_keys(settings, audit)  # API keys (monitor.auth)
        app.state.shared, close_keys = open_shared(settings, audit, close_keys)  # conversations, rate limits
        app.state.policy_sync = await _policy_sync(settings, rt, audit)  # policy_source: redis
        tel, reader = _telemetry(settings) if sinks is None else (None, None)
        if tel is not None:
            app.state.sinks.append(tel.sink)
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False
            try:
                if owned:
                    rt.close()
            finally:
                if app.state.policy_sync is not None:
                    app.state.policy_sync.stop()
                stop_alert_consumers(app.state.alerts)  # before the store closes the Redis they read
                if audit is not None:  # after the engine: the last decisions are written (or spooled)
                    audit.close()  # stays a sink: a decision arriving later goes to the spool
                if tel is not None:
                    _close_telemetry(tel, reader)
                close_keys()

    app = FastAPI(title="featurewatch", version=_version(), lifespan=lifespan)
    app.state.settings = settings
    app.state.sinks = [log_sink] if sinks is None else list(sinks)
    app.state.ready = False
    install(app)
    from monitor.lifecycle import install as install_lifecycle  # drain on SIGTERM, audit fail-closed

    install_lifecycle(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        # Browsers preflight a JSON POST with a key (content-type, authorization): allow the headers asked
        # for, and let scripts read the verdict. No credentials (cookies): the console is same-origin only.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["x-featurewatch-verdict", "retry-after"],
        )

    from monitor.routes_audit import router as audit_router
    from monitor.routes_generate import router as generate_router
    from monitor.routes_score import router as score_router

    app.include_router(generate_router)
    app.include_router(score_router)
    app.include_router(audit_router)  # /v1/audit/... (monitor.routes_audit)
    from monitor.routes_admin import router as admin_router

    app.include_router(admin_router)  # /v1/admin/policy (monitor.routes_admin)
    if settings.console_enabled:  # the audit console at /audit (monitor.console)
        from monitor.console import install as install_console

        install_console(app)

    @app.get("/metrics", responses={200: {"content": content("text/plain")}})
    async def metrics() -> Response:
        """Prometheus text format: request duration, time to first token and per output token,
        detections by detector and action, monitoring overhead (see monitor.otel_names)."""
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

        if not settings.metrics_enabled:
            raise APIError(404, "metrics are off (FEATUREWATCH_METRICS_ENABLED=false)")
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        rt: Runtime | None = getattr(request.app.state, "runtime", None)
        ok = bool(request.app.state.ready and rt is not None and rt.engine.alive)
        body: dict[str, Any] = {"status": "ready" if ok else "not ready"}
        if rt is not None:
            body.update(queued=rt.engine.queued, policy=f"{rt.policy.name}@{rt.policy.version}")
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        tenant_of(request)
        rt: Runtime = request.app.state.runtime
        return {
            "object": "list",
            "data": [
                {
                    "id": rt.settings.model_name,
                    "object": "model",
                    "created": int(app.state.started),
                    "owned_by": "featurewatch",
                }
            ],
        }

    app.state.started = time.time()
    return app


async def _policy_sync(settings: Settings, rt: Runtime, audit: Any) -> Any:
    import asyncio

    from monitor.policy_sync import start_policy_sync

    return await asyncio.to_thread(start_policy_sync, settings, rt.holder, audit)


def _open_audit(settings: Settings) -> Any:
    from monitor.store import open_audit_store

    return open_audit_store(settings)


def _telemetry(settings: Settings) -> tuple[Any, Any]:
    from monitor.telemetry import from_settings

    return from_settings(settings)


def _close_telemetry(tel: Any, reader: Any) -> None:
    from monitor.telemetry import unregister_prometheus

    tel.shutdown()
    if reader is not None:
        unregister_prometheus(reader)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("featurewatch")
    except PackageNotFoundError:
        return "0"
