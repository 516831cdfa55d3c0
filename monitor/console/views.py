"""View helpers: audit records and query strings turned into what the templates show.

Nothing here touches Redis or the request; every function is pure so the pages stay thin. Unknown
filter values (an action or review status that does not exist, a page that is not a number) are dropped
rather than refused: a hand-edited URL shows the unfiltered list instead of an error. Token scores
are detector probabilities in [0, 1]; they are drawn in `SCORE_BUCKETS` colour steps (CSS classes
`s0`..`s10`) so the pages need no inline styles (the console's CSP forbids them).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from monitor.audit_query import ACTIONS, LATEST_TS, REVIEW_FILTERS
from monitor.audit_query import parse_time as _parse_time

SCORE_BUCKETS = 10  # colour steps: class s0 (score < 0.05) .. s10 (score >= 0.95)
REVIEW_TEXT = {
    "unreviewed": "not reviewed",
    "tp": "true positive",
    "fp": "false positive",
    "escalate": "escalated",
}
REVIEW_CHOICES = [(r, REVIEW_TEXT.get(r, r)) for r in REVIEW_FILTERS]
PAGE_SIZE = 50  # records per list page (default of `per_page`)
MAX_PER_PAGE = 200
MAX_PAGE = 1000  # deeper pages cost a scan past every record before them: narrow the time range instead
TIME_INPUT = "%Y-%m-%dT%H:%M"  # <input type="datetime-local"> value; the console works in UTC


def bucket(score: float | None) -> int:
    """Colour step of a score (None, NaN: 0); scores are clamped to [0, 1]."""
    if score is None or math.isnan(score):
        return 0
    return round(min(max(score, 0.0), 1.0) * SCORE_BUCKETS)


def fmt_time(ts: float | None) -> str:
    if ts is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def parse_time(raw: str | None) -> float | None:
    """A datetime-local value (UTC) or unix seconds -> unix seconds; empty or invalid (also NaN, infinite,
    negative or past year 5138, which no page could show) -> None."""
    try:
        ts = _parse_time(raw)
    except (ValueError, OverflowError):
        return None
    return ts if ts is not None and math.isfinite(ts) and 0 <= ts < LATEST_TS else None


def _count(raw: str, default: int, most: int) -> int:
    """A page number or size from the query string, within [1, most]; anything else -> default."""
    if not (raw.isascii() and raw.isdigit()):  # str.isdigit() is true for "²", which int() refuses
        return default
    return most if len(raw) > 9 else min(max(1, int(raw)), most)  # int() refuses > 4300 digits


def time_input(ts: float | None) -> str:
    return "" if ts is None else time.strftime(TIME_INPUT, time.gmtime(ts))


def fmt_score(x: Any) -> str:
    return "–" if x is None else f"{float(x):.3f}"


def fmt_number(x: Any) -> str:
    """A rule's value or threshold: a score (0.7312) or a token count (3) alike, 4 significant digits."""
    return f"{float(x):.4g}"


# ---- filters ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Filters:
    """The list/summary/replay/export filters as the query string carries them."""

    start: float | None = None
    end: float | None = None
    tenant: str | None = None
    detector: str | None = None
    action: str | None = None
    review: str | None = None
    page: int = 1
    per_page: int = PAGE_SIZE

    @classmethod
    def from_query(cls, q: Any) -> Filters:
        """From request.query_params (or form data): unknown actions and bad pages are ignored."""

        def text(name: str) -> str | None:
            raw = q.get(name)
            return str(raw).strip() or None if raw is not None else None

        action, review = text("action"), text("review")
        page, per_page = text("page") or "1", text("per_page") or ""
        return cls(
            start=parse_time(text("start")),
            end=parse_time(text("end")),
            tenant=text("tenant"),
            detector=text("detector"),
            action=action if action in ACTIONS else None,
            review=review if review in REVIEW_FILTERS else None,
            page=_count(page, 1, MAX_PAGE),
            per_page=_count(per_page, PAGE_SIZE, MAX_PER_PAGE),
        )

    def params(self, **override: Any) -> dict[str, str]:
        """Non-empty filters as query parameters (page only beyond the first)."""
        values = {
            "start": time_input(self.start),
            "end": time_input(self.end),
            "tenant": self.tenant,
            "detector": self.detector,
            "action": self.action,
            "review": self.review,
            "page": str(self.page) if self.page > 1 else None,
            "per_page": str(self.per_page) if self.per_page != PAGE_SIZE else None,
        }
        values.update(override)
        return {k: str(v) for k, v in values.items() if v}

    def query(self, **override: Any) -> str:
        return urlencode(self.params(**override))

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.per_page


# ---- one record -------------------------------------------------------------------------------------
@dataclass
class TokenView:
    index: int
    text: str | None  # None when the record is redacted
    scores: dict[str, float]
    top: list[dict[str, Any]]
    bucket: int
    withheld: bool  # the token a block rule stopped: generated, scored, never sent
    pushes: str | None = None  # the detector `top` pushed up (attributed evidence), else most active latents


@dataclass
class RecordView:
    rec: dict[str, Any]
    detectors: list[str]
    detector: str | None  # the one colouring the tokens
    tokens: list[TokenView]
    rules: list[dict[str, Any]]
    versions: list[tuple[str, str]]
    messages: list[dict[str, Any]] = field(default_factory=list)


def record_view(rec: dict[str, Any], detector: str | None) -> RecordView:
    """Tokens coloured by `detector` (default: the first fired rule's, else the first scored)."""
    evidence = rec.get("evidence") or []
    names = list(dict.fromkeys(n for t in evidence for n in t.get("scores", {})))
    names += [n for n in rec.get("scores", {}) if n not in names]
    if detector not in names:
        fired = [r.get("detector") for r in rec.get("rules", []) if r.get("detector") in names]
        detector = fired[0] if fired else (names[0] if names else None)
    blocked_at = (rec.get("featurewatch") or {}).get("blocked_at")
    tokens = [
        TokenView(
            index=int(t.get("index", i)),
            text=t.get("text"),
            scores=dict(t.get("scores", {})),
            top=list(t.get("top", [])),
            pushes=t.get("pushes"),
            bucket=bucket(t.get("scores", {}).get(detector)) if detector else 0,
            withheld=blocked_at is not None and int(t.get("index", i)) == blocked_at,
        )
        for i, t in enumerate(evidence)
    ]
    return RecordView(
        rec=rec,
        detectors=names,
        detector=detector,
        tokens=tokens,
        rules=[explain_rule(r) for r in rec.get("rules", [])],
        versions=versions(rec),
        messages=list(rec.get("messages") or []),
    )


def explain_rule(rule: dict[str, Any]) -> dict[str, Any]:
    """A fired rule with a sentence saying why (value vs threshold)."""
    value, threshold = rule.get("value"), rule.get("threshold")
    if rule.get("error"):
        why = f"detector error: {rule['error']}"
    elif value is not None and threshold is not None:
        why = f"value {fmt_number(value)} ≥ threshold {fmt_number(threshold)}"
    elif value is not None:
        why = f"value {fmt_number(value)}"
    else:
        why = "fired"
    return {**rule, "why": why}


def versions(rec: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, name + short digest) for the model, SAE and policy that made the decision."""
    v = dict(rec.get("versions") or {})
    policy = v.get("policy") or (rec.get("featurewatch") or {}).get("policy") or ""
    parts = (
        ("model", v.get("model", rec.get("model", "")), "model_sha256"),
        ("SAE", v.get("sae", ""), "sae_sha256"),
        ("policy", policy, "policy_sha256"),
    )
    out = []
    for what, name, key in parts:
        digest = str(v.get(key) or "")
        out.append((what, f"{name} (sha256 {digest[:12]}…)" if digest else str(name)))
    return out


def detectors_of(rec: dict[str, Any]) -> list[str]:
    return sorted(rec.get("scores", {}))


def review_of(rec: dict[str, Any]) -> str:
    """The record's latest review verdict ('' when unreviewed); records from query() carry `review`."""
    r = rec.get("review")
    if isinstance(r, dict):
        return str(r.get("verdict") or "")
    return str(getattr(r, "verdict", "") or "")
