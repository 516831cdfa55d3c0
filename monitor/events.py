"""Decision events: one per monitored request, the seam the audit store and tracer consume ([5/7]).

Sinks are called on the server's event loop after the request ends (never on the engine thread, so a
slow sink cannot stall generation). A sink that raises is logged and the others still run. The default
sink logs the decision without any prompt or completion text: content never goes to logs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("featurewatch.decisions")


@dataclass(frozen=True)
class DecisionEvent:
    request_id: str
    route: str
    tenant: str | None
    model: str
    created: int  # unix seconds
    finish_reason: str
    verdict: str  # the final action
    summary: dict[str, Any]  # the response's `featurewatch` field
    evidence: list[dict[str, Any]]  # per completion token: scores and top latents (with its text)
    messages: list[dict[str, str]]  # the prompt conversation (content)
    completion: str  # what was sent to the client (content)
    usage: dict[str, int]
    timings: dict[str, float | None] = field(default_factory=dict)
    # model/SAE/policy names and sha256 digests (monitor.versions): which artefacts made the decision
    versions: dict[str, str] = field(default_factory=dict)
    started: float | None = None  # unix s, sub-second: orders the audit indexes (None: `created`)


Sink = Callable[[DecisionEvent], None]


def log_sink(ev: DecisionEvent) -> None:
    """Logs ids, verdict, fired rules and peak scores: never content."""
    if ev.verdict == "allow":
        return
    rules = ",".join(f"{r['id']}={r['action']}" for r in ev.summary.get("rules", []))
    log.info(
        "request %s tenant=%s route=%s verdict=%s finish=%s rules=[%s] scores=%s",
        ev.request_id,
        ev.tenant,
        ev.route,
        ev.verdict,
        ev.finish_reason,
        rules,
        ev.summary.get("scores"),
    )


def emit(sinks: list[Sink], ev: DecisionEvent) -> None:
    for sink in sinks:
        try:
            sink(ev)
        except Exception:
            log.exception("decision sink %r failed for request %s", sink, ev.request_id)
