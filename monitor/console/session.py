"""Who is looking: the console's view of `monitor.auth` (session cookie or Bearer key), with HTML
answers instead of JSON ones, and the login form's own CSRF protection.

Pages depend on `page(permission)`: no key and no valid session -> `LoginRequired` (a redirect to the
login form); a key whose role lacks the permission, or a cookie POST without the session's CSRF token
(checked by `monitor.auth.authenticate`) -> a 403 page. The login form has no session yet, so it carries
a double-submit token (`LOGIN_CSRF_COOKIE`, scoped to the login path).
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import Response

from monitor.auth import SESSION_COOKIE, Principal, authenticate, bearer_token
from monitor.console.web import ConsoleError, LoginRequired
from monitor.http_errors import APIError
from monitor.keystore import KeyStore

COOKIE_PATH = "/audit"  # the session cookie goes to the console only, never to /v1
LOGIN_CSRF_COOKIE = "fw_login_csrf"
LOGIN_CSRF_TTL_S = 3600  # a login form stays usable this long


def keystore(request: Request) -> KeyStore:
    keys: KeyStore | None = getattr(request.app.state, "keys", None)
    if keys is None:
        raise ConsoleError(503, "the audit console needs the audit trail (its Redis holds keys and sessions)")
    return keys


async def identify(request: Request) -> Principal:
    """The caller; LoginRequired when it sent no key and has no live session, ConsoleError otherwise."""
    keystore(request)
    try:
        return await authenticate(request)
    except APIError as e:
        if e.status == 401 and bearer_token(request) is None:
            here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise LoginRequired(here if request.method == "GET" else "/audit") from None
        raise ConsoleError(e.status, e.message) from None


def page(permission: str) -> Callable[[Request], Awaitable[Principal]]:
    """Dependency: the principal, allowed `permission`; request.state carries it (and the session's
    CSRF token, None for a Bearer key) to the templates."""

    async def dependency(request: Request) -> Principal:
        principal = await identify(request)
        request.state.console_principal = principal
        request.state.console_csrf = getattr(request.state, "csrf", None)
        if not principal.can(permission):
            raise ConsoleError(403, f"a {principal.role} key may not do this (needs {permission})")
        return principal

    return dependency


# ---- cookies -------------------------------------------------------------------------------------------
def _secure(request: Request) -> bool:
    """Secure cookies over HTTPS (behind TLS); plain http on loopback would never send them back."""
    return request.url.scheme == "https"


def set_session_cookie(request: Request, resp: Response, token: str, ttl_s: int) -> None:
    resp.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=ttl_s,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )


def clear_session_cookie(request: Request, resp: Response) -> None:
    resp.delete_cookie(
        SESSION_COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict", secure=_secure(request)
    )


def login_csrf(request: Request) -> str:
    """The login form's token: the one in the browser's cookie, or a new one."""
    return request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(24)


def remember_login_csrf(request: Request, resp: Response, token: str) -> None:
    resp.set_cookie(
        LOGIN_CSRF_COOKIE,
        token,
        max_age=LOGIN_CSRF_TTL_S,
        path=COOKIE_PATH + "/login",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )


def login_csrf_ok(request: Request, sent: Any) -> bool:
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE)
    return bool(cookie and isinstance(sent, str) and hmac.compare_digest(cookie.encode(), sent.encode()))


# Route parameters: `principal: Reader` (may read the audit trail), `principal: Labeller` (may label).
Reader = Annotated[Principal, Depends(page("audit:read"))]
Labeller = Annotated[Principal, Depends(page("audit:label"))]
