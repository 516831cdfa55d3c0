"""Filter and page the audit trail, newest first, over its time indexes.

Ids come from the sorted sets the store keeps (score = creation time, unix s): all tenants, or one set per
tenant, merged when several tenants are asked for; `review: tp|fp|escalate` reads the review verdict
index instead (monitor.reviews), which holds only labelled records. The time range is applied by Redis;
detector, action, review status (and tenant, on the review index) are checked in Python on the records,
fetched in chunks. A query reads at most `max_scan` index entries, so a filter that matches rarely cannot
make one request read the whole trail: `QueryPage.scanned` says how many were read and `truncated` that
the bound stopped the scan (narrow the time range to see further).

Reading by offset while records are written is safe: a new record only pushes entries down (the seen-set
drops the ones read twice), and TTL trimming removes entries from the old end only.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from monitor.audit_record import NO_TENANT, Keys
from monitor.reviews import REVIEW_VERDICTS, Reviews, verdict_index

ACTIONS = ("allow", "log", "flag", "steer", "block")  # verdicts; allow is stored only with AUDIT_ALLOWED
REVIEW_FILTERS = ("unreviewed", *REVIEW_VERDICTS)
MAX_LIMIT = 1000  # records per page
MAX_SCAN = 5000  # index entries one query may read
CHUNK = 200  # ids per Redis round trip
LATEST_TS = 1e11  # unix s (year 5138): anything beyond is a unit mistake (ms), refused


class FilterError(ValueError):
    """An invalid filter value; `field` names it (the HTTP layer turns it into a 400 with that param)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class AuditFilter:
    tenants: tuple[str, ...] | None = None  # None = all; else only these tenants ("-": no tenant)
    start: float | None = None  # unix s, inclusive
    end: float | None = None  # unix s, inclusive
    detector: str | None = None  # records where a fired rule has this detector
    action: str | None = None  # records whose verdict (or a fired rule's action) is this
    review: str | None = None  # "unreviewed" | "tp" | "fp" | "escalate" (the latest review)
    limit: int = 50
    offset: int = 0

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and 0 <= v < LATEST_TS):
                raise FilterError(name, f"must be a time in unix seconds, got {v!r}")
        if self.start is not None and self.end is not None and self.start > self.end:
            raise FilterError("start", "is after end")
        if self.action is not None and self.action not in ACTIONS:
            raise FilterError("action", f"must be one of {', '.join(ACTIONS)}, got {self.action!r}")
        if self.review is not None and self.review not in REVIEW_FILTERS:
            raise FilterError("review", f"must be one of {', '.join(REVIEW_FILTERS)}, got {self.review!r}")
        if not 1 <= self.limit <= MAX_LIMIT:
            raise FilterError("limit", f"must be between 1 and {MAX_LIMIT}, got {self.limit}")
        if self.offset < 0:
            raise FilterError("offset", f"must be >= 0, got {self.offset}")
        if self.tenants is not None and not self.tenants:
            raise FilterError("tenant", "no tenant to read")

    def matches(self, rec: dict[str, Any], review: dict[str, Any] | None) -> bool:
        """The checks Redis does not make (tenant too: the review index spans all tenants)."""
        if self.tenants is not None and (rec.get("tenant") or NO_TENANT) not in self.tenants:
            return False
        rules = [r for r in rec.get("rules") or [] if isinstance(r, dict)]
        if self.detector is not None and not any(r.get("detector") == self.detector for r in rules):
            return False
        if self.action is not None and not (
            rec.get("verdict") == self.action or any(r.get("action") == self.action for r in rules)
        ):
            return False
        if self.review == "unreviewed":
            return review is None
        return self.review is None or (review is not None and review.get("verdict") == self.review)


@dataclass(frozen=True)
class QueryPage:
    records: list[dict[str, Any]]  # newest first, each with "review" (the latest, as a dict, or None)
    scanned: int  # index entries read
    has_more: bool  # another page exists (or, when truncated, may exist)
    truncated: bool = False  # the scan stopped at max_scan before the time range was exhausted


class Scan:
    """Iterate the matching records, newest first (offset and limit are the caller's business);
    `scanned` counts index entries read and `truncated` is set when `max_scan` (None: no bound) stopped
    it."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        f: AuditFilter,
        reviews: Reviews | None = None,
        max_scan: int | None = MAX_SCAN,
    ) -> None:
        self.client, self.keys, self.f = client, keys, f
        self.reviews = reviews or Reviews(client, keys)
        self.max_scan = max_scan
        self.scanned = 0
        self.truncated = False

    def sources(self) -> list[str]:
        if self.f.review in REVIEW_VERDICTS:
            return [verdict_index(self.keys, self.f.review)]
        if self.f.tenants is None:
            return [self.keys.by_time]
        return [self.keys.tenant_by_time(t) for t in dict.fromkeys(self.f.tenants)]

    def ids(self) -> Iterator[str]:
        """Record ids newest first (ties: larger id first), at most max_scan of them."""
        streams = [self._index(key) for key in self.sources()]
        merged = streams[0] if len(streams) == 1 else heapq.merge(*streams, reverse=True)
        seen: set[str] = set()
        for _, rid in merged:
            if rid in seen:
                continue
            if self.max_scan is not None and self.scanned >= self.max_scan:
                self.truncated = True
                return
            seen.add(rid)
            self.scanned += 1
            yield rid

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batch: list[str] = []
        for rid in self.ids():
            batch.append(rid)
            if len(batch) >= CHUNK:
                yield from self._records(batch)
                batch = []
        yield from self._records(batch)

    def _index(self, key: str) -> Iterator[tuple[float, str]]:
        hi = "+inf" if self.f.end is None else self.f.end
        lo = "-inf" if self.f.start is None else self.f.start
        pos = 0
        while True:
            got: Any = self.client.zrevrangebyscore(key, hi, lo, start=pos, num=CHUNK, withscores=True)
            for rid, score in got:
                yield float(score), str(rid)
            if len(got) < CHUNK:
                return
            pos += len(got)

    def _records(self, ids: list[str]) -> Iterator[dict[str, Any]]:
        if not ids:
            return
        raws: Any = self.client.mget([self.keys.record(i) for i in ids])
        reviews = self.reviews.get_many(ids)
        for rid, raw in zip(ids, raws, strict=True):
            if not raw:  # expired: its index entry outlives it until the next write trims
                continue
            rec = json.loads(raw)
            review = reviews[rid].as_dict() if rid in reviews else None
            if self.f.matches(rec, review):
                rec["review"] = review
                yield rec


def query(
    client: redis.Redis,
    keys: Keys,
    f: AuditFilter,
    reviews: Reviews | None = None,
    *,
    max_scan: int = MAX_SCAN,
) -> QueryPage:
    """One page of matching records, newest first; each record gets a "review" key (dict or None)."""
    scan = Scan(client, keys, f, reviews, max_scan + f.offset)  # the bound counts past the skipped ones
    out: list[dict[str, Any]] = []
    skipped, has_more = 0, False
    for rec in scan:
        if skipped < f.offset:
            skipped += 1
        elif len(out) < f.limit:
            out.append(rec)
        else:
            has_more = True
            break
    return QueryPage(out, scan.scanned, has_more or scan.truncated, scan.truncated)


def alerts(
    client: redis.Redis,
    keys: Keys,
    tenants: tuple[str, ...] | None,
    count: int = 100,
    *,
    max_scan: int = 10_000,
) -> list[dict[str, str]]:
    """The latest `count` alerts of `tenants` (None = all), oldest first, each with its `stream_id`. Reads
    the stream backwards in chunks, at most `max_scan` entries."""
    out: list[dict[str, str]] = []
    top, read = "+", 0
    while len(out) < count and read < max_scan:
        entries: Any = client.xrevrange(keys.alerts, max=top, count=CHUNK + (top != "+"))
        if top != "+" and entries and entries[0][0] == top:
            entries = entries[1:]  # `max` is inclusive (Redis < 6.2 has no exclusive ranges)
        if not entries:
            break
        for sid, fields in entries:
            read += 1
            if tenants is None or (fields.get("tenant") or NO_TENANT) in tenants:
                out.append({"stream_id": str(sid), **fields})
                if len(out) >= count:
                    break
        top = str(entries[-1][0])
    return list(reversed(out))


def parse_time(raw: str | None) -> float | None:
    """Unix seconds or an ISO 8601 time (no zone = UTC; the console's datetime-local value too) -> unix
    seconds; None or "" -> None. ValueError for anything else (callers name the field)."""
    from datetime import UTC, datetime

    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"not unix seconds or an ISO 8601 time: {raw!r}") from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
