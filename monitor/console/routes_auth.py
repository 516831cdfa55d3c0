"""Log in (an API key in a form -> a session cookie) and log out."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from monitor.auth import SESSION_COOKIE, Principal
from monitor.console import session
from monitor.console.web import SECURITY_HEADERS, ConsoleError, form_data, render, safe_next
from monitor.keystore import KeyStoreUnavailable

router = APIRouter()
CONSOLE_PERMISSION = "audit:read"  # what a key needs to open a session


def _login_form(request: Request, next_url: str, error: str | None = None, status: int = 200) -> HTMLResponse:
    token = session.login_csrf(request)
    resp = render(request, "login.html", status, login_csrf=token, next=safe_next(next_url), error=error)
    session.remember_login_csrf(request, resp, token)
    return resp


@router.get("/audit/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/audit") -> HTMLResponse:
    return _login_form(request, next)


@router.post("/audit/login")
async def login(request: Request) -> Response:
    form = await form_data(request)
    next_url = safe_next(str(form.get("next") or "/audit"))
    if not session.login_csrf_ok(request, form.get("csrf")):
        raise ConsoleError(403, "missing or invalid CSRF token: reload the login page and try again")
    key = form.get("key", "").strip()
    keys = session.keystore(request)
    try:
        info = await run_in_threadpool(keys.lookup, key) if key else None
    except KeyStoreUnavailable:
        raise ConsoleError(503, "the key store (Redis) is unavailable; try again shortly") from None
    if info is None:
        return _login_form(request, next_url, "Unknown or revoked API key.", 401)
    if not Principal.from_info(info).can(CONSOLE_PERMISSION):
        raise ConsoleError(403, f"a {info.role} key cannot use the audit console (reviewer and admin can)")
    ttl = int(request.app.state.settings.session_ttl_s)
    token, _csrf = await run_in_threadpool(keys.create_session, info, ttl)
    resp = RedirectResponse(next_url, 303, SECURITY_HEADERS)
    session.set_session_cookie(request, resp, token, ttl)
    resp.delete_cookie(session.LOGIN_CSRF_COOKIE, path=session.COOKIE_PATH + "/login")
    return resp


@router.post("/audit/logout")
def logout(request: Request, _p: session.Reader) -> Response:
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        session.keystore(request).end_session(token)
    resp = RedirectResponse("/audit/login", 303, SECURITY_HEADERS)
    session.clear_session_cookie(request, resp)
    return resp
