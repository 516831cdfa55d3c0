"""Who may do what: API keys with roles, checked on every audit route and API and on inference.

Roles: `client` calls inference only (its requests are recorded under its one tenant); `reviewer` reads
and labels the audit records of its tenants; `admin` does everything, including changing policies and
managing keys. Keys live hashed in Redis (`monitor.keystore`, `featurewatch keys create`); the static
`api_keys` setting (key -> tenant) adds client keys that live only in the settings.

A caller proves who it is with `Authorization: Bearer KEY`, or, in the audit console, with the session
cookie `fw_session` set by its login form; a cookie-authenticated request that changes something (POST,
PUT, PATCH, DELETE) must also carry the session's CSRF token (form field `csrf` or header `x-csrf-token`).
After `require` accepts a session, `request.state.csrf` holds that token (for the console's forms).

Failures use OpenAI's error shape: 401 no or unknown key (or expired session), 403 a role that may not do
this or a tenant it does not see, 503 the key store (Redis) cannot be reached — never "allowed".
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar, cast
from urllib.parse import parse_qs

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from monitor.http_errors import APIError
from monitor.keystore import ALL_TENANTS, KeyInfo, KeyStore, KeyStoreUnavailable, digest

Role = Literal["client", "reviewer", "admin"]
PERMISSIONS: dict[str, frozenset[str]] = {
    "client": frozenset({"infer"}),
    "reviewer": frozenset({"audit:read", "audit:label"}),
    "admin": frozenset({"infer", "audit:read", "audit:label", "policy:write", "keys:admin"}),
}
SESSION_COOKIE = "fw_session"
CSRF_FIELD, CSRF_HEADER = "csrf", "x-csrf-token"
NO_KEYS_YET = (
    "no API keys exist yet: create one with `featurewatch keys create --role admin --tenant '*'` "
    "and send it as Authorization: Bearer KEY"
)
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
T = TypeVar("T")


@dataclass(frozen=True)
class Principal:
    key_id: str  # public id of the key (first 12 hex of its sha256); safe to store and show
    name: str  # the name given at creation (shown as the reviewer)
    role: Role
    tenants: tuple[str, ...]  # ("*",) = every tenant

    def can(self, permission: str) -> bool:
        return permission in PERMISSIONS.get(self.role, frozenset())

    def sees(self, tenant: str | None) -> bool:
        """Whether records of `tenant` are visible; untenanted records (None) only to all-tenant keys."""
        return ALL_TENANTS in self.tenants or (tenant is not None and tenant in self.tenants)

    def tenant_filter(self) -> tuple[str, ...] | None:
        """The tenants to restrict queries to; None = all tenants."""
        return None if ALL_TENANTS in self.tenants else self.tenants

    @classmethod
    def from_info(cls, info: KeyInfo) -> Principal:
        return cls(info.key_id, info.name, cast(Role, info.role), info.tenants)


# ---- resolving the caller ---------------------------------------------------------------------------
def bearer_token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    return token or None


def key_store(request: Request) -> KeyStore | None:
    return cast(KeyStore | None, getattr(request.app.state, "keys", None))


def static_principal(api_keys: dict[str, str], token: str) -> Principal | None:
    """A static `api_keys` entry as a client key. Every key's hash is compared with the token's (constant
    time, equal lengths, no early exit), so timing tells neither which key matched nor any key's length."""
    h = digest(token)
    found: str | None = None
    for key, tenant in api_keys.items():
        if hmac.compare_digest(digest(key).encode(), h.encode()):
            found = tenant
    if found is None:
        return None
    key_id = h[:12]
    return Principal(key_id, f"static-{key_id}", "client", (found,))


def principal_for_key(request: Request, token: str) -> Principal | None:
    """The key's principal (static keys first, then Redis), None when unknown. Blocking on a cache miss."""
    p = static_principal(request.app.state.settings.api_keys, token)
    if p is not None:
        return p
    store = key_store(request)
    info = _guard(lambda: store.lookup(token)) if store is not None else None
    return Principal.from_info(info) if info is not None else None


def keys_configured(request: Request) -> bool:
    """Whether any key exists (static or in Redis); while none does, inference is open. Blocking, cached."""
    if request.app.state.settings.api_keys:
        return True
    store = key_store(request)
    return store is not None and _guard(store.any_keys)


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _guard(call: Callable[[], T]) -> T:
    try:
        return call()
    except KeyStoreUnavailable:
        raise APIError(503, "cannot check API keys: the key store (Redis) is unavailable") from None


# ---- the dependency -----------------------------------------------------------------------------------
def require(permission: str) -> Callable[[Request], Awaitable[Principal]]:
    """A FastAPI dependency: the caller's Principal when its key (or console session) may `permission`;
    401 / 403 / 503 otherwise. `p: Principal = Depends(require("audit:read"))`."""

    async def dependency(request: Request) -> Principal:
        p = await authenticate(request)
        if not p.can(permission):
            raise APIError(403, f"a {p.role} key may not do this (needs {permission})", code="forbidden")
        return p

    return dependency


async def authenticate(request: Request) -> Principal:
    """The caller from its Bearer key, else from its console session cookie (with CSRF on writes)."""
    token = bearer_token(request)
    if token is not None:
        p = await run_in_threadpool(principal_for_key, request, token)
        if p is not None:
            return p
        configured = await run_in_threadpool(keys_configured, request)
        raise unauthorized("invalid API key" if configured else NO_KEYS_YET)
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        return await _from_session(request, cookie)
    if not await run_in_threadpool(keys_configured, request):
        raise unauthorized(NO_KEYS_YET)
    raise unauthorized("missing API key (send Authorization: Bearer KEY)")


async def _from_session(request: Request, cookie: str) -> Principal:
    store = key_store(request)
    found = await run_in_threadpool(_guard, lambda: store.session(cookie)) if store is not None else None
    if found is None:
        raise unauthorized("session expired or ended; log in again")
    info, csrf = found
    if request.method in _UNSAFE and not hmac.compare_digest(
        (await _sent_csrf(request)).encode(), csrf.encode()
    ):
        raise APIError(403, "missing or invalid CSRF token", code="csrf")
    request.state.csrf = csrf
    return Principal.from_info(info)


async def _sent_csrf(request: Request) -> str:
    """The CSRF token from the header, else from a urlencoded form body (the body stays readable)."""
    header = request.headers.get(CSRF_HEADER)
    if header:
        return header
    if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        return (form.get(CSRF_FIELD) or [""])[0]
    return ""
