"""Reviewer verdicts on audit records, and the per-detector summary built from them.

A reviewer labels a record `tp` (the rule was right), `fp` (it was wrong) or `escalate` (needs someone
else). Per record Redis keeps the latest review (a JSON string) and every review in order (a list), so a
relabel never loses who said what before. A sorted set per verdict (member = record id, score = the
record's creation time) indexes the latest verdicts, so "show me the false positives of last week" reads
only those records. Review keys take the record's remaining TTL: they expire with the record they describe.
Verdict-index entries of expired records stay until the record id is relabelled (never, once it is gone);
readers skip them like the time indexes' stale entries. Growth is one entry per labelled record.

`summary()` counts flags and blocks per detector from the records' fired rules and the reviewers' verdicts
on those records. Its `precision` is an ESTIMATE: tp / (tp + fp) over the records someone reviewed, which
are rarely a random sample of everything that fired (reviewers pick the interesting ones).
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol

import redis

from monitor.audit_record import Keys

REVIEW_VERDICTS = ("tp", "fp", "escalate")
MAX_COMMENT_CHARS = 4000  # a review comment is a note, not a document
MAX_SERIES_DAYS = 366  # the summary's day series is cut to the latest this many days


class Labeller(Protocol):
    """Who labels: `monitor.auth.Principal` (the CLI builds a local admin one)."""

    @property
    def key_id(self) -> str: ...

    @property
    def name(self) -> str: ...

    def sees(self, tenant: str | None) -> bool: ...


class UnknownRecord(ValueError):
    """No such record, or one the labeller may not see (the two are not told apart)."""


@dataclass(frozen=True)
class Review:
    record_id: str
    verdict: str  # one of REVIEW_VERDICTS
    comment: str
    reviewer: str  # the principal's name
    key_id: str  # the key it used ("cli" for the local command line)
    at: float  # unix s

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def review_key(keys: Keys, record_id: str) -> str:  # string: the latest review's JSON
    return f"{keys.prefix}audit:review:{record_id}"


def history_key(keys: Keys, record_id: str) -> str:  # list: every review's JSON, oldest first
    return f"{keys.prefix}audit:review:{record_id}:history"


def verdict_index(keys: Keys, verdict: str) -> str:  # sorted set: record id -> record created (unix s)
    return f"{keys.prefix}audit:review:by_verdict:{verdict}"


class Reviews:
    """Read and write reviews in the audit Redis (`client` decodes responses to str)."""

    def __init__(self, client: redis.Redis, keys: Keys | None = None) -> None:
        self.client, self.keys = client, keys or Keys()

    def label(self, record_id: str, verdict: str, comment: str, principal: Labeller) -> Review:
        """Store a review. ValueError on a bad verdict or comment; UnknownRecord (a ValueError) when the
        record does not exist or belongs to a tenant `principal` does not see."""
        if verdict not in REVIEW_VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(REVIEW_VERDICTS)}, got {verdict!r}")
        if len(comment) > MAX_COMMENT_CHARS:
            raise ValueError(f"comment is longer than {MAX_COMMENT_CHARS} characters")
        rkey = self.keys.record(record_id)
        raw: Any = self.client.get(rkey)
        rec = json.loads(raw) if raw else None
        if rec is None or not principal.sees(rec.get("tenant")):
            raise UnknownRecord(f"no audit record {record_id!r}")
        review = Review(record_id, verdict, comment, principal.name, principal.key_id, round(time.time(), 3))
        doc = json.dumps(review.as_dict(), separators=(",", ":"), ensure_ascii=False)
        ttl: Any = self.client.ttl(rkey)  # -1: the record never expires
        latest, hist = review_key(self.keys, record_id), history_key(self.keys, record_id)
        with self.client.pipeline(transaction=True) as pipe:  # MULTI: readers never see half a relabel
            pipe.set(latest, doc)
            pipe.rpush(hist, doc)
            for v in REVIEW_VERDICTS:
                pipe.zrem(verdict_index(self.keys, v), record_id)
            pipe.zadd(verdict_index(self.keys, verdict), {record_id: float(rec["created"])})
            if isinstance(ttl, int) and ttl > 0:
                pipe.expire(latest, ttl)
                pipe.expire(hist, ttl)
            pipe.execute()
        return review

    def get(self, record_id: str) -> Review | None:
        return self.get_many([record_id]).get(record_id)

    def get_many(self, ids: list[str]) -> dict[str, Review]:
        """The latest review of each id that has one."""
        if not ids:
            return {}
        raws: Any = self.client.mget([review_key(self.keys, i) for i in ids])
        return {i: _review(r) for i, r in zip(ids, raws, strict=True) if r}

    def history(self, record_id: str) -> list[Review]:
        """Every review of the record, oldest first."""
        raws: Any = self.client.lrange(history_key(self.keys, record_id), 0, -1)
        return [_review(r) for r in raws]


def _review(raw: str) -> Review:
    return Review(**json.loads(raw))


# ---- the summary -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DetectorSummary:
    """One detector over a time range. `precision` = tp / (tp + fp) among REVIEWED records: an estimate
    (reviewed records are not a random sample), None when nobody said tp or fp."""

    detector: str
    flags: int  # records where a rule on this detector fired with action flag
    blocks: int  # ... with action block
    reviewed: int  # records with a fired rule on this detector that have a review
    tp: int
    fp: int
    escalate: int
    precision: float | None
    series: list[tuple[str, int, int]]  # (day 'YYYY-MM-DD' UTC, flags, blocks), every day in the range

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Tally:
    flags: int = 0
    blocks: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)  # latest review verdict -> records
    days: dict[str, list[int]] = field(default_factory=dict)  # day -> [flags, blocks]


def summary(
    client: redis.Redis,
    keys: Keys,
    tenants: tuple[str, ...] | None,
    start: float | None,
    end: float | None,
    reviews: Reviews,
    *,
    max_scan: int | None = 100_000,
) -> list[DetectorSummary]:
    """Per detector (sorted by name): flags, blocks, reviews and the day series, over the records of
    `tenants` (None = all) created in [start, end] (unix s). Reads at most `max_scan` records, newest
    first. Precision is an estimate from the reviewed records only (see DetectorSummary)."""
    from monitor.audit_query import AuditFilter, Scan  # audit_query imports this module

    tallies: dict[str, _Tally] = defaultdict(_Tally)
    days: set[str] = set()
    scan = Scan(client, keys, AuditFilter(tenants=tenants, start=start, end=end), reviews, max_scan)
    for rec in scan:
        day = datetime.fromtimestamp(float(rec["created"]), UTC).date().isoformat()
        days.add(day)
        review = rec.get("review")
        for det, actions in _fired_by_detector(rec).items():
            _count(tallies[det], day, actions, review["verdict"] if review else None)
    axis = _day_axis(days, start, end)
    return [_summarise(det, tallies[det], axis) for det in sorted(tallies)]


def _fired_by_detector(rec: dict[str, Any]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for rule in rec.get("rules") or []:
        if isinstance(rule, dict) and rule.get("detector"):
            out[str(rule["detector"])].add(str(rule.get("action")))
    return out


def _count(t: _Tally, day: str, actions: set[str], verdict: str | None) -> None:
    per_day = t.days.setdefault(day, [0, 0])
    if "flag" in actions:
        t.flags += 1
        per_day[0] += 1
    if "block" in actions:
        t.blocks += 1
        per_day[1] += 1
    if verdict is not None:
        t.verdicts[verdict] += 1


def _summarise(det: str, t: _Tally, axis: list[str]) -> DetectorSummary:
    tp, fp, esc = t.verdicts["tp"], t.verdicts["fp"], t.verdicts["escalate"]
    series = [(d, *_pair(t.days.get(d))) for d in axis]
    precision = tp / (tp + fp) if tp + fp else None
    return DetectorSummary(det, t.flags, t.blocks, tp + fp + esc, tp, fp, esc, precision, series)


def _pair(counts: list[int] | None) -> tuple[int, int]:
    return (counts[0], counts[1]) if counts else (0, 0)


def _day_axis(seen: set[str], start: float | None, end: float | None) -> list[str]:
    """Every UTC day from the range's start (else the first record's day) to its end (else today), so a
    chart has no gaps; the latest MAX_SERIES_DAYS only."""
    if start is not None:
        first = _day(start)
    elif seen:
        first = min(seen)
    else:
        return []
    last = _day(end if end is not None else time.time())
    lo, hi = date.fromisoformat(first), date.fromisoformat(last)
    lo = max(lo, hi - timedelta(days=MAX_SERIES_DAYS - 1))
    return [(lo + timedelta(days=i)).isoformat() for i in range((hi - lo).days + 1)]


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).date().isoformat()
