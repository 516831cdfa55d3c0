"""What replicas share through Redis on the request path: conversation state and rate limits.

`open_shared` (the server's lifespan) builds one `SharedState` on the audit store's Redis connection
(its own when the audit trail is off); the generation routes call `admit` (rate limits), `history`
(conversation turns, before generating) and `finished` (append the turn, charge the tokens, before the
response's last bytes leave, so the client's next turn on any replica sees this one). Redis work runs
off the event loop. After a connection failure Redis is left alone for `BACKOFF_S` (requests meanwhile
take the failure path at once instead of each waiting for a timeout), then tried again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from fastapi import Request

from monitor.conversation import ConversationStore, History
from monitor.http_errors import APIError
from monitor.ratelimit import Quota, RateLimiter
from monitor.settings import Settings
from monitor.tenancy import caller

log = logging.getLogger("featurewatch.shared")
BACKOFF_S = 1.0  # after a failed Redis call, this long without trying
T = TypeVar("T")


class SharedState:
    def __init__(
        self,
        settings: Settings,
        client: Callable[[], redis.Redis],
        recover: Callable[[], None] = lambda: None,
        close: Callable[[], None] = lambda: None,
    ) -> None:
        self.conversations = (
            ConversationStore(client, settings.conversation_ttl_s, settings.conversation_max_turns)
            if settings.conversation_state
            else None
        )
        tenants = {t: lim.model_dump() for t, lim in settings.rate_limit_tenants.items()}
        quota = Quota(
            settings.rate_limit_rpm,
            settings.rate_limit_tpm,
            settings.rate_limit_key_rpm,
            settings.rate_limit_key_tpm,
            tenants,
        )
        self.limiter = RateLimiter(client, quota) if quota.any else None
        self.fail_closed = settings.rate_limit_fail == "closed"
        self._recover, self.close = recover, close
        self._down_until = 0.0  # time.monotonic() until which Redis is not tried
        self._warned_until = 0.0  # fail-open warnings: at most one per BACKOFF_S

    # ---- the request path (event loop) -------------------------------------------------------------
    async def admit(self, request: Request, tenant: str | None) -> None:
        """429 (with Retry-After) when a rate limit refuses; 503 when Redis is down and limits fail closed."""
        limiter = self.limiter
        if limiter is None:
            return
        limits = limiter.quota.limits(tenant, _key_id(request))
        try:
            refusal = await asyncio.to_thread(self._call, lambda: limiter.admit(limits))
        except redis.RedisError as e:
            if self.fail_closed:
                raise APIError(503, "rate limits cannot be checked: Redis is unavailable") from None
            if time.monotonic() >= self._warned_until:  # once per back-off, not once per request
                self._warned_until = time.monotonic() + BACKOFF_S
                log.warning("rate limits not checked (%s): admitting requests (rate_limit_fail: open)", e)
            return
        if refusal is not None:
            lim = refusal.limit
            unit = "requests" if lim.unit == "rpm" else "tokens"
            raise APIError(
                429,
                f"rate limit reached: {lim.describe()}; retry after {refusal.retry_after_s} s",
                code="rate_limit_exceeded",
                headers={
                    "Retry-After": str(refusal.retry_after_s),
                    f"x-ratelimit-limit-{unit}": str(lim.per_minute),
                },
            )

    async def history(self, tenant: str | None, conv_id: str | None) -> History | None:
        """The conversation's earlier turns (None when the request names none, or state is off); a
        History with `error` when Redis cannot be reached (conversation rules then fail closed)."""
        if conv_id is None or self.conversations is None:
            return None
        store = self.conversations
        try:
            return await asyncio.to_thread(self._call, lambda: store.load(tenant, conv_id))
        except redis.RedisError as e:
            log.warning(
                "conversation state unavailable (%s): conversation rules fail closed", type(e).__name__
            )
            return History(conv_id, error=f"conversation state unavailable: {type(e).__name__}")

    async def finished(
        self,
        request: Request,
        tenant: str | None,
        request_id: str,
        monitor: Any,
        tokens: int,
    ) -> None:
        """Store the turn (when the request named a conversation and scored tokens) and charge the tokens.
        Never raises: a failure is logged, the response goes out."""
        conv: History | None = getattr(monitor, "conversation", None)
        scores = monitor.turn_scores() if conv is not None and self.conversations is not None else None
        limits = self.limiter.quota.limits(tenant, _key_id(request)) if self.limiter is not None else []
        if not scores and not limits:
            return

        def work() -> None:
            if scores and conv is not None and self.conversations is not None:
                self.conversations.append(tenant, conv.id, request_id, scores)
            if limits and self.limiter is not None:
                self.limiter.charge(limits, tokens)

        try:
            await asyncio.to_thread(self._call, work)
        except redis.RedisError as e:
            log.warning("request %s: conversation turn or token charge not stored (%s)", request_id, e)

    # ---- internals ------------------------------------------------------------------------------------
    def _call(self, fn: Callable[[], T]) -> T:
        """Run one Redis operation (worker thread), unless Redis failed less than BACKOFF_S ago."""
        if time.monotonic() < self._down_until:
            raise redis.ConnectionError("Redis failed moments ago; not retried yet")
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            self._down_until = time.monotonic() + BACKOFF_S
            log.warning("shared state: Redis unreachable (%s); retrying in %.0f s", e, BACKOFF_S)
            with contextlib.suppress(redis.RedisError):
                self._recover()
            raise


def _key_id(request: Request) -> str | None:
    p = caller(request)
    return p.key_id if p is not None else None


def open_shared(
    settings: Settings, audit: Any, close_after: Callable[[], None]
) -> tuple[SharedState, Callable[[], None]]:
    """The sidecar's SharedState (on the audit store's Redis backend when there is one) and a function
    that closes what it opened and then calls `close_after` (the server chains its key store's close)."""
    from monitor.redis_conn import backend_for

    shared = getattr(audit, "backend", None)
    backend = shared if shared is not None else backend_for(settings)
    state = SharedState(
        settings, backend.client, backend.recover, (lambda: None) if shared is not None else backend.close
    )

    def close() -> None:
        try:
            state.close()
        finally:
            close_after()

    return state, close


def shared_of(request: Request) -> SharedState | None:
    return getattr(request.app.state, "shared", None)
