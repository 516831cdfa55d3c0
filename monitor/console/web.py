"""Rendering for the console: the Jinja2 environment (autoescape on), security headers, static assets,
and the two exceptions pages raise (`LoginRequired` -> redirect, `ConsoleError` -> an error page)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from monitor.console import charts, views

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
# Only our own files: no inline script or style, no framing, forms post back to us.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "cache-control": "no-store",  # pages hold audit content: never cached by browsers or proxies
}

ENV = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(["html"], default_for_string=True, default=True),
    undefined=StrictUndefined,  # a typo in a template is an error, not an empty string
    trim_blocks=True,
    lstrip_blocks=True,
)
ENV.filters.update(
    time=views.fmt_time, score=views.fmt_score, time_input=views.time_input, day=charts.day_label
)
ENV.globals.update(buckets=views.SCORE_BUCKETS, actions=views.ACTIONS, review_choices=views.REVIEW_CHOICES)


class LoginRequired(Exception):
    """No valid session: the page redirects to the login form (and back afterwards)."""

    def __init__(self, next_url: str) -> None:
        super().__init__("login required")
        self.next_url = next_url


class ConsoleError(Exception):
    """An error page with a status (403 wrong role or CSRF, 404 not found or not yours, 400 bad input)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def render(request: Request, template: str, code: int = 200, **ctx: Any) -> HTMLResponse:
    """A page; `principal` and `csrf` come from request.state (set by the session dependency)."""
    base = {
        "request": request,
        "principal": getattr(request.state, "console_principal", None),
        "csrf": getattr(request.state, "console_csrf", None),
        "path": request.url.path,
    }
    html = ENV.get_template(template).render(**base, **ctx)
    return HTMLResponse(html, code, headers=SECURITY_HEADERS)


def with_headers(resp: Response) -> Response:
    resp.headers.update(SECURITY_HEADERS)
    return resp


def login_redirect(exc: LoginRequired) -> RedirectResponse:
    return RedirectResponse(f"/audit/login?next={quote(exc.next_url, safe='/')}", 303, SECURITY_HEADERS)


def error_page(request: Request, exc: ConsoleError) -> HTMLResponse:
    return render(request, "error.html", exc.status, status=exc.status, message=exc.message)


def safe_next(raw: str | None) -> str:
    """Where to go after login: only a console path (never another site: no open redirect)."""
    if raw and raw.startswith("/audit") and not raw.startswith("//") and "\\" not in raw:
        return raw
    return "/audit"


def static_file(name: str) -> Response:
    """A file from static/ by plain name (no paths); unknown names are 404."""
    if len(name) > 100 or "/" in name or "\x00" in name or name.startswith("."):  # long: stat() fails
        raise ConsoleError(404, "no such file")
    path = STATIC_DIR / name
    kind = STATIC_TYPES.get(path.suffix)
    if kind is None or not path.is_file():
        raise ConsoleError(404, "no such file")
    headers = {"cache-control": "max-age=300", "x-content-type-options": "nosniff"}
    return Response(path.read_bytes(), media_type=kind, headers=headers)


def json_line(rec: dict[str, Any]) -> str:
    return json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n"


async def form_data(request: Request) -> dict[str, str]:
    """A urlencoded form's fields (first value of each). Parsed here rather than with Starlette's
    `request.form()`, which needs the python-multipart package; the console's forms post no files."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        raise ConsoleError(400, "expected a form (application/x-www-form-urlencoded)")
    fields = parse_qs((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in fields.items()}
