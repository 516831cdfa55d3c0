"""The audit console at /audit: server-rendered pages (Jinja2, autoescaped) over the audit trail.

Pages: login/logout, the conversation list (filters, paging, JSON Lines export), one conversation with
per-token detector highlighting and the SAE latents behind each token, feature dashboards, the reviewer
workflow, a per-detector summary with an inline SVG chart, and policy replay. Every page needs a
reviewer or admin key (session cookie or Bearer) and shows only that key's tenants. Assets ship in the
package (templates/, static/); nothing is loaded from elsewhere.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from monitor.console.web import ConsoleError, LoginRequired, error_page, login_redirect, static_file


def _router() -> APIRouter:
    from monitor.console import routes_auth, routes_insight, routes_records

    router = APIRouter(include_in_schema=False)
    router.include_router(routes_auth.router)
    router.include_router(routes_records.router)
    router.include_router(routes_insight.router)

    @router.get("/audit/static/{name}")
    def static(name: str) -> Response:
        return static_file(name)

    return router


def install(app: FastAPI) -> None:
    """Add the console's routes and its two error handlers (redirect to login, HTML error page)."""
    app.include_router(_router())

    @app.exception_handler(LoginRequired)
    async def _login(_r: Request, exc: LoginRequired) -> Response:
        return login_redirect(exc)

    @app.exception_handler(ConsoleError)
    async def _error(request: Request, exc: ConsoleError) -> Response:
        return error_page(request, exc)
