"""Proxy mode: the upstream OpenAI-compatible server, always asked for a stream.

Streaming upstream even when the client wants one JSON body lets the sidecar stop reading (and close the
connection, which stops a well-behaved server generating) the moment a block rule fires. Errors are
mapped for the client: unreachable → 502, no answer in `upstream_timeout_s` → 504, an upstream 4xx →
the same status with the upstream's message, an upstream 5xx → 502 with its message. Messages name the
upstream by its URL with any password masked.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from monitor.http_errors import APIError
from monitor.settings import Settings, mask_url

ERROR_BODY_CHARS = 500  # of a non-JSON upstream error body, quoted in the message


@dataclass(frozen=True)
class Delta:
    """One upstream stream event: new completion text, and the finish reason / usage when it has them."""

    text: str
    finish_reason: str | None = None
    usage: dict[str, int] | None = None


class UpstreamFailed(RuntimeError):
    """The upstream broke off mid-stream (connection lost, timeout, an error event, malformed data)."""


class Upstream:
    """Where and how to forward; one per request (its connection closes with the request)."""

    def __init__(self, settings: Settings) -> None:
        if settings.upstream_url is None:
            raise ValueError("proxy mode needs upstream_url")
        self.base = settings.upstream_url.rstrip("/")
        self.name = mask_url(self.base)
        self.model = settings.upstream_model
        self.key = settings.upstream_api_key
        self.timeout_s = settings.upstream_timeout_s

    def payload(self, kind: str, body: Any, budget: int) -> dict[str, Any]:
        """The client's request as sent upstream: its own fields, streamed, with usage, the budget made
        explicit (the sidecar's default, not the upstream's) and `upstream_model` when configured."""
        out: dict[str, Any] = body.model_dump(mode="json", exclude_unset=True)
        out["model"] = self.model or body.model
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
        if not (kind == "chat" and "max_completion_tokens" in out):
            out["max_tokens"] = budget
        return out

    async def open(self, kind: str, payload: dict[str, Any]) -> UpstreamStream:
        """Send the request; returns once the upstream answered 200 (else raises APIError)."""
        path = "chat/completions" if kind == "chat" else "completions"
        headers = {"accept": "text/event-stream"}
        if self.key is not None:
            headers["authorization"] = f"Bearer {self.key.get_secret_value()}"
        client = httpx.AsyncClient(timeout=self.timeout_s)
        try:
            resp = await client.send(
                client.build_request("POST", f"{self.base}/{path}", json=payload, headers=headers),
                stream=True,
            )
        except BaseException as e:  # also a cancelled request: the client must not leak its pool
            await client.aclose()
            if isinstance(e, httpx.TimeoutException):
                message = f"upstream {self.name} did not answer within {self.timeout_s} s"
                raise APIError(504, message, code="upstream_timeout") from None
            if isinstance(e, httpx.HTTPError):
                message = f"upstream {self.name} is unreachable: {_reason(e)}"
                raise APIError(502, message, code="upstream_unreachable") from None
            raise
        if resp.status_code != 200:
            raw = await _read_quietly(resp)
            await resp.aclose()
            await client.aclose()
            raise self._refused(resp.status_code, raw)
        return UpstreamStream(client, resp, kind, self.name)

    def _refused(self, status: int, raw: bytes) -> APIError:
        message, param, code = _error_fields(raw)
        text = f"upstream {self.name} answered {status}: {message}"
        if 400 <= status < 500:  # the request's own fault: the client sees the upstream's status
            return APIError(status, text, param=param, code=code)
        return APIError(502, text, code="upstream_error")


class UpstreamStream:
    def __init__(self, client: httpx.AsyncClient, resp: httpx.Response, kind: str, name: str) -> None:
        self.client, self.resp, self.kind, self.name = client, resp, kind, name
        self.events = 0  # SSE data events read (tests check the stream stopped early)

    async def deltas(self) -> AsyncIterator[Delta]:
        """The stream's events until `[DONE]` (or the end of the body); UpstreamFailed on any breakage."""
        try:
            async for line in self.resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # comments, `event:` lines, blank separators
                raw = line[5:].strip()
                if raw == "[DONE]":
                    return
                self.events += 1
                for delta in self._parse(raw):
                    yield delta
        except httpx.TimeoutException:
            raise UpstreamFailed(
                f"upstream {self.name} stalled mid-stream (no data in the timeout)"
            ) from None
        except httpx.HTTPError as e:
            raise UpstreamFailed(f"upstream {self.name} broke off mid-stream: {_reason(e)}") from None

    def _parse(self, raw: str) -> list[Delta]:
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            raise UpstreamFailed(f"upstream {self.name} sent malformed data (not JSON)") from None
        if not isinstance(obj, dict):
            raise UpstreamFailed(f"upstream {self.name} sent malformed data (not an object)")
        if "error" in obj:
            message = _message_of(obj["error"])
            raise UpstreamFailed(f"upstream {self.name} failed mid-stream: {message}")
        usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else None
        choices = [c for c in obj.get("choices") or [] if isinstance(c, dict) and c.get("index", 0) == 0]
        out = [Delta(self._text(c), c.get("finish_reason"), usage) for c in choices]
        return out or ([Delta("", None, usage)] if usage else [])

    def _text(self, choice: dict[str, Any]) -> str:
        if self.kind == "chat":
            return str((choice.get("delta") or {}).get("content") or "")
        return str(choice.get("text") or "")

    async def close(self) -> None:
        """Stop reading: closing an unfinished response drops the connection, so the upstream stops."""
        try:
            await self.resp.aclose()
        finally:
            await self.client.aclose()


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


async def _read_quietly(resp: httpx.Response) -> bytes:
    try:
        return await resp.aread()
    except httpx.HTTPError:
        return b""


def _message_of(err: Any) -> str:
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err)


def _error_fields(raw: bytes) -> tuple[str, str | None, str | None]:
    """(message, param, code) from an OpenAI-shaped error body, else the body's start."""
    try:
        obj = json.loads(raw)
    except ValueError:
        obj = None
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        param, code = err.get("param"), err.get("code")
        return _message_of(err), None if param is None else str(param), None if code is None else str(code)
    text = raw.decode("utf-8", "replace").strip()[:ERROR_BODY_CHARS]
    return text or "(no body)", None, None
