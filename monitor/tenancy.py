"""Who is calling an inference route, and under which tenant its request is recorded.

While no API key exists (no static `api_keys`, none in Redis), inference is open and the tenant comes
from the tenant header. Once one exists, every inference request needs `Authorization: Bearer KEY` with a
role that may `infer`: a client key's requests are recorded under its one tenant (a tenant header is
ignored); an admin key may name a tenant it sees with the header (default: none); a reviewer key gets 403.

Cost: key lookups and "does any key exist" are cached in-process for `KEY_CACHE_S` (monitor.redis_conn),
so most requests make no Redis round trip; a cache miss makes one (~0.1 ms on the embedded server's unix
socket) on the event loop. A key created or revoked by another process (the CLI) takes effect here within
that time.
"""

from __future__ import annotations

from fastapi import Request

from monitor.auth import Principal, bearer_token, keys_configured, principal_for_key, unauthorized
from monitor.http_errors import APIError
from monitor.keystore import TENANT_RE, TENANT_RULE

__all__ = ["TENANT_RE", "caller", "tenant_of"]


def tenant_of(request: Request) -> str | None:
    """The request's tenant; raises 401/403 (OpenAI error shape) when keys exist and this one may not
    infer, 400 for a malformed tenant header, 503 when keys cannot be checked."""
    p = caller(request)
    if p is not None and p.role == "client":
        return p.tenants[0]
    tenant = _header_tenant(request)
    if p is not None and tenant is not None and not p.sees(tenant):
        raise APIError(403, f"this key may not act for tenant {tenant!r}", code="forbidden")
    return tenant


def caller(request: Request) -> Principal | None:
    """The inference caller's principal; None while no key exists (open mode). Cached per request."""
    if "fw_caller" in request.scope:
        return request.scope["fw_caller"]
    p = _resolve(request)
    request.scope["fw_caller"] = p
    return p


def _resolve(request: Request) -> Principal | None:
    if not keys_configured(request):
        return None  # clients may still send a Bearer token (the openai client always does): ignored
    token = bearer_token(request)
    if token is None:
        raise unauthorized("missing API key (send Authorization: Bearer KEY)")
    p = principal_for_key(request, token)
    if p is None:
        raise unauthorized("invalid API key")
    if not p.can("infer"):
        raise APIError(403, f"a {p.role} key may not call inference", code="forbidden")
    return p


def _header_tenant(request: Request) -> str | None:
    header = request.app.state.settings.tenant_header
    raw = request.headers.get(header)
    if raw is None:
        return None
    if not TENANT_RE.match(raw):
        raise APIError(400, f"{header}: {TENANT_RULE}", param=header)
    return raw
