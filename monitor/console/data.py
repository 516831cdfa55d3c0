"""What the console pages read: the audit store, its Redis client and keys, the principal's tenants, the
detectors the runtime knows, and the SAE's feature dashboards (loaded once per app)."""

from __future__ import annotations

import threading
from typing import Any

from fastapi import Request

from monitor.audit_query import AuditFilter, FilterError
from monitor.auth import Principal
from monitor.console.views import Filters
from monitor.console.web import ConsoleError
from monitor.reviews import Reviews

DASH_LOCK = threading.Lock()  # page handlers run on a thread pool; load the dashboards once


def store(request: Request) -> Any:
    audit = getattr(request.app.state, "audit", None)
    if audit is None:
        raise ConsoleError(503, "the audit trail is off (FEATUREWATCH_AUDIT_ENABLED=false): nothing to show")
    return audit


def redis_and_keys(request: Request) -> tuple[Any, Any]:
    audit = store(request)
    return audit.backend.client(), audit.keys


def reviews(request: Request) -> Reviews:
    return Reviews(*redis_and_keys(request))


def tenants(request: Request, principal: Principal) -> list[str]:
    """Tenants in the audit trail that this principal may see (the filter's choices)."""
    return [t for t in store(request).tenants() if principal.sees(t)]


def tenant_scope(principal: Principal, f: Filters) -> tuple[str, ...] | None:
    """The tenants a query may read: the chosen one (if the principal sees it) or all of the principal's."""
    if f.tenant is None:
        return principal.tenant_filter()
    if not principal.sees(f.tenant):
        raise ConsoleError(404, "no such tenant")
    return (f.tenant,)


def audit_filter(
    principal: Principal, f: Filters, limit: int | None = None, offset: int | None = None
) -> Any:
    """The query for these filters within the principal's tenants; a bad value is a 400 page."""
    try:
        return AuditFilter(
            tenants=tenant_scope(principal, f),
            start=f.start,
            end=f.end,
            detector=f.detector,
            action=f.action,
            review=f.review,
            limit=f.per_page if limit is None else limit,
            offset=f.offset if offset is None else offset,
        )
    except FilterError as e:
        raise ConsoleError(400, f"invalid filter: {e}") from None


def record_for(request: Request, principal: Principal, record_id: str) -> dict[str, Any]:
    """The record, or a 404 page when it does not exist or belongs to a tenant the principal cannot see
    (the same answer, so ids of other tenants' records leak nothing)."""
    rec: dict[str, Any] | None = store(request).get(record_id)
    if rec is None or not principal.sees(rec.get("tenant")):
        raise ConsoleError(404, "no such record")
    return rec


def detectors(request: Request) -> list[str]:
    rt = getattr(request.app.state, "runtime", None)
    dset = getattr(rt, "dset", None)
    return sorted(getattr(dset, "detectors", {}) or {})


def dashboards(request: Request) -> Any:
    """The runtime SAE's Dashboards (lazy: only summary.json is read here), or a 404 page without them."""
    from sae_assets.dashboards import Dashboards, DashboardsError

    state = request.app.state
    with DASH_LOCK:
        cached = getattr(state, "console_dashboards", None)
        if cached is None:
            rt = getattr(state, "runtime", None)
            folder = getattr(rt, "sae_folder", None)
            if folder is None:
                raise ConsoleError(404, "this sidecar has no SAE loaded, so there are no feature pages")
            try:
                cached = Dashboards.load(folder)
            except DashboardsError as e:
                raise ConsoleError(404, str(e)) from None
            state.console_dashboards = cached
    return cached
