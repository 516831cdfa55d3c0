"""OpenAI response shapes for the generation routes: full bodies, SSE chunks and usage.

Every body carries the `featurewatch` extension field (the monitor's summary). A blocked chat answer has
the policy message in `refusal`, the field OpenAI uses for refusals.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from monitor.jobs import GenerationJob, JobResult


@dataclass
class Call:
    """One generation request, whichever endpoint it came through."""

    kind: str  # "chat" | "text"
    route: str
    request_id: str
    created: int
    model: str
    tenant: str | None
    messages: list[dict[str, str]]
    job: GenerationJob
    stream: bool
    include_usage: bool
    # When the request arrived, unix s with sub-second precision: orders the audit indexes (`created` is
    # OpenAI's whole seconds, so requests of one second would otherwise come back in id order).
    started: float = field(default_factory=time.time)


def data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _envelope(call: Call, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": call.request_id,
        "object": obj,
        "created": call.created,
        "model": call.model,
        "choices": choices,
    }


def chunk(call: Call, delta: dict[str, Any] | None, finish: str | None = None) -> dict[str, Any]:
    obj = "chat.completion.chunk" if call.kind == "chat" else "text_completion"
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if call.kind == "chat":
        choice["delta"] = delta or {}
    else:
        choice["text"] = (delta or {}).get("text", "")
    return _envelope(call, obj, [choice])


def finish(res: JobResult) -> str:
    return res.finish_reason if res.finish_reason in ("stop", "length", "content_filter") else "stop"


def monitor_summary(res: JobResult) -> dict[str, Any]:
    if res.monitor is None:
        return {"verdict": "allow", "monitoring": "off"}
    return res.monitor.summary()


def final_chunk(call: Call, res: JobResult) -> dict[str, Any]:
    summary = monitor_summary(res)
    delta: dict[str, Any] = {}
    if call.kind == "chat" and res.finish_reason == "content_filter":
        delta["refusal"] = summary.get("message")
    out = chunk(call, delta, finish(res))
    out["featurewatch"] = summary
    return out


def usage(res: JobResult) -> dict[str, int]:
    return {
        "prompt_tokens": res.prompt_tokens,
        "completion_tokens": res.completion_tokens,
        "total_tokens": res.prompt_tokens + res.completion_tokens,
    }


def full_body(call: Call, res: JobResult) -> dict[str, Any]:
    summary = monitor_summary(res)
    blocked = res.finish_reason == "content_filter"
    if call.kind == "chat":
        msg = {
            "role": "assistant",
            "content": res.text,
            "refusal": summary.get("message") if blocked else None,
        }
        choice: dict[str, Any] = {"index": 0, "message": msg, "finish_reason": finish(res), "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": res.text, "finish_reason": finish(res), "logprobs": None}
        obj = "text_completion"
    return {**_envelope(call, obj, [choice]), "usage": usage(res), "featurewatch": summary}
