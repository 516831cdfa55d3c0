"""What the audit trail stores: Redis key names (all in one place) and the record built from a decision.

A record is one JSON document per request, keyed by its request id. `redact` keeps scores, rules and
per-token evidence but drops every piece of text the user or the model wrote (message contents, the
completion, each evidence token's text); role names and lengths stay so the shape of a conversation is
still visible.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from monitor.events import DecisionEvent

SCHEMA_VERSION = 1  # bump when a record's layout changes (the console reads older ones too)
ALERT_VERDICTS = frozenset({"flag", "block"})  # these also go to the alerts stream
NO_TENANT = "-"  # index key part for requests without a tenant


@dataclass(frozen=True)
class Keys:
    """Every Redis key featurewatch's audit trail uses."""

    prefix: str = "featurewatch:"

    def record(self, request_id: str) -> str:
        return f"{self.prefix}audit:record:{request_id}"

    @property
    def by_time(self) -> str:  # sorted set: request id -> created (unix s), every tenant
        return f"{self.prefix}audit:by_time"

    def tenant_by_time(self, tenant: str | None) -> str:  # the same, one tenant
        return f"{self.prefix}audit:tenant:{tenant or NO_TENANT}:by_time"

    @property
    def tenants(self) -> str:  # set of tenant names seen (the console's filter list)
        return f"{self.prefix}audit:tenants"

    @property
    def alerts(self) -> str:  # stream of flag/block alerts, no content
        return f"{self.prefix}alerts"


def build_record(ev: DecisionEvent, *, redact: bool) -> dict[str, Any]:
    """The stored document for one decision (JSON-ready)."""
    s = ev.summary
    return {
        "schema": SCHEMA_VERSION,
        "id": ev.request_id,
        "created": ev.created,
        "started_at": round(ev.started if ev.started is not None else float(ev.created), 6),
        "recorded_at": round(time.time(), 3),
        "tenant": ev.tenant,
        "route": ev.route,
        "model": ev.model,
        "finish_reason": ev.finish_reason,
        "verdict": ev.verdict,
        "rules": s.get("rules", []),
        "scores": s.get("scores", {}),
        "prompt_scores": s.get("prompt_scores", {}),
        "peak_token_scores": s.get("peak_token_scores", {}),
        "featurewatch": s,
        "messages": _redact_messages(ev.messages) if redact else ev.messages,
        "completion": None if redact else ev.completion,
        "evidence": [_drop_text(t) for t in ev.evidence] if redact else ev.evidence,
        "redacted": redact,
        "usage": ev.usage,
        "timings": ev.timings,
        "versions": ev.versions,
    }


def alert_fields(rec: dict[str, Any]) -> dict[str, str]:
    """The alerts stream entry for a record: ids, verdict, rules and scores; never content."""
    rules = [{k: r.get(k) for k in ("id", "detector", "action", "value")} for r in rec["rules"]]
    return {
        "id": rec["id"],
        "created": str(rec["created"]),
        "tenant": rec["tenant"] or "",
        "route": rec["route"],
        "model": rec["model"],
        "verdict": rec["verdict"],
        "policy": str(rec["featurewatch"].get("policy", "")),
        "rules": json.dumps(rules, separators=(",", ":")),
        "scores": json.dumps(rec["scores"], separators=(",", ":")),
    }


def _redact_messages(messages: list[dict[str, str]]) -> list[dict[str, Any]]:
    return [
        {"role": m.get("role", ""), "content": None, "chars": len(m.get("content") or "")} for m in messages
    ]


def _drop_text(token: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in token.items() if k != "text"}
