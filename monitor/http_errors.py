"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with a fitting status.

Validation errors become 400 (not FastAPI's 422) naming the field at fault, as OpenAI's API does, so the
`openai` client raises `BadRequestError` with a readable message.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",  # proxy mode: the upstream failed or is unreachable
    503: "server_error",
    504: "timeout_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": TYPES.get(status, "error"), "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param, err.code), err.status, err.headers)


def _loc(loc: tuple[Any, ...]) -> str:
    parts = [str(x) for x in loc if x != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    parts = []
    for e in errors[:5]:
        where = _loc(tuple(e.get("loc", ())))
        msg = str(e.get("msg", "invalid"))
        if e.get("type") == "json_invalid":
            msg = f"invalid JSON: {e.get('ctx', {}).get('error', msg)}"
            where = "body"  # its loc is a character offset, not a field
        elif e.get("type") == "extra_forbidden":
            msg = "unknown field"
        elif e.get("type") == "missing":
            msg = "field required"
        parts.append(f"{where}: {msg}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    first = errors[0]
    param = "body" if first.get("type") == "json_invalid" else _loc(tuple(first.get("loc", ())))
    return "; ".join(parts) + more, param


ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_ERROR_RESPONSES = {
    "4XX": "Invalid request (400, `param` names the field), key missing or wrong (401, 403), not found "
    "(404), body too large (413), busy (429)",
    "5XX": "The key store or audit trail unavailable (503), the upstream failed (502) or timed out (504)",
}


def content(*media_types: str) -> dict[str, Any]:
    """An OpenAPI `content` map: these media types, each a string (a stream, YAML, Prometheus text)."""
    return {t: {"schema": {"type": "string"}} for t in media_types}


def raw_body(*media_types: str) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its body itself: documents it for clients and fuzzers."""
    return {"requestBody": {"required": True, "content": content(*media_types)}}


def document_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document as the API answers: FastAPI lists 422 with its own validation body, but every
    error here is OpenAI-shaped and invalid input is a 400 (see `install`)."""
    schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for ops in schema.get("paths", {}).values():
        for op in ops.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            for status, text in _ERROR_RESPONSES.items():
                responses.setdefault(status, {"description": text, "content": ref})
    for unused in ("HTTPValidationError", "ValidationError"):
        schema["components"]["schemas"].pop(unused, None)
    return schema


def install(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_errors(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(APIError)
    async def _api_error(_r: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_r: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return JSONResponse(error_body(400, message, param, "invalid_request"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_r: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's body parse
            body = error_body(
                400, f"invalid JSON: the body is not UTF-8 ({exc.__cause__})", "body", "invalid_request"
            )
            return JSONResponse(body, 400)
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), exc.status_code, exc.headers)
