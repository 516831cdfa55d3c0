"""The shadow-scoring streams: key names, what a request entry and a result entry hold, and the producer
(`submit`) and reader (`read_results`) sides. No model here: producers and readers import only this.

A request is one entry on `featurewatch:score:requests` with string fields: `id` (the caller's id),
exactly one of `messages` (OpenAI chat messages as JSON) and `text`, and optionally `tenant`, `route`
(rules may be scoped to routes; default /v1/chat/completions) and `detectors` (a JSON list or
comma-separated names; default: the worker's). A result is one entry on `featurewatch:score:results`:
`id`, `request` (the request's entry id), `worker`, `deliveries` (how many times the request was handed
to a worker), then either `scope`, `tokens`, `scores`, `fired`, `top_features` (JSON, as `featurewatch
score` writes them) and `verdict` (JSON, when the worker has a policy), or `error`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

GROUP = "featurewatch-scorers"  # the consumer group every worker joins
DEFAULT_ROUTE = "/v1/chat/completions"  # as POST /v1/monitor/score
SUBMIT_CHUNK = 500  # XADDs per pipeline round trip
JSON_FIELDS = ("scores", "fired", "top_features", "verdict")


@dataclass(frozen=True)
class StreamKeys:
    """The Redis keys of shadow scoring (under the same `featurewatch:` prefix as the audit trail)."""

    prefix: str = "featurewatch:"

    @property
    def requests(self) -> str:
        return f"{self.prefix}score:requests"

    @property
    def results(self) -> str:
        return f"{self.prefix}score:results"


@dataclass(frozen=True)
class Request:
    """A request entry that can be scored."""

    entry_id: str
    id: str
    record: dict[str, Any]  # the scoring contract's record: {"id", "messages" | "text"}
    tenant: str | None = None
    route: str = DEFAULT_ROUTE
    detectors: tuple[str, ...] | None = None  # None: the worker's default set


@dataclass(frozen=True)
class Rejected:
    """A request entry that cannot be scored; it gets an error result with `error`."""

    entry_id: str
    id: str | None
    error: str


# ---- producer side --------------------------------------------------------------------------------
def encode_request(rec: Mapping[str, Any]) -> dict[str, str]:
    """The stream fields for a record in the `featurewatch score` input format; ValueError says why not."""
    from detectors.scoring import check_record  # here: it imports torch, which readers never need

    problem = check_record(dict(rec)) if isinstance(rec, Mapping) else "expected a JSON object"
    if problem:
        raise ValueError(problem)
    rid = rec["id"]
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        raise ValueError(f"`id` must be a string or an integer, got {type(rid).__name__}")
    fields = {"id": str(rid)}
    if rec.get("messages") is not None:
        fields["messages"] = json.dumps(rec["messages"], ensure_ascii=False)
    else:
        fields["text"] = rec["text"]
    for name in ("tenant", "route"):
        if rec.get(name) is not None:
            fields[name] = str(rec[name])
    dets = rec.get("detectors")
    if dets is not None:
        if not isinstance(dets, list) or not all(isinstance(d, str) for d in dets):
            raise ValueError("`detectors` must be a list of names")
        fields["detectors"] = json.dumps(dets)
    return fields


def submit(
    client: redis.Redis, records: Iterable[Mapping[str, Any]], keys: StreamKeys | None = None
) -> list[str]:
    """XADD each record to the requests stream; the entry ids, in order. Every record is checked first:
    a bad one raises ValueError (naming its index) before anything is sent."""
    encoded = []
    for i, rec in enumerate(records):
        try:
            encoded.append(encode_request(rec))
        except ValueError as e:
            raise ValueError(f"record {i}: {e}") from None
    return add_encoded(client, encoded, keys)


def add_encoded(
    client: redis.Redis, encoded: Sequence[Mapping[str, str]], keys: StreamKeys | None = None
) -> list[str]:
    """XADD already encoded requests (`encode_request`), SUBMIT_CHUNK per round trip; the entry ids."""
    stream = (keys or StreamKeys()).requests
    ids: list[str] = []
    for start in range(0, len(encoded), SUBMIT_CHUNK):
        with client.pipeline(transaction=False) as pipe:
            for fields in encoded[start : start + SUBMIT_CHUNK]:
                pipe.xadd(stream, dict(fields))  # type: ignore[arg-type]
            ids += [str(i) for i in pipe.execute()]
    return ids


# ---- worker side ------------------------------------------------------------------------------------
def decode_request(entry_id: str, fields: Mapping[str, str]) -> Request | Rejected:
    """A request entry as written by any producer; a Rejected names what is wrong (never its content)."""
    from detectors.scoring import check_record

    rid = fields.get("id") or None
    if rid is None:
        return Rejected(entry_id, None, "missing field `id`")
    if ("messages" in fields) == ("text" in fields):
        return Rejected(entry_id, rid, "give exactly one of `messages` (JSON) and `text`")
    record: dict[str, Any] = {"id": rid}
    if "messages" in fields:
        try:
            record["messages"] = json.loads(fields["messages"])
        except json.JSONDecodeError as e:
            return Rejected(entry_id, rid, f"`messages` is not valid JSON: {e.msg} (column {e.colno})")
    else:
        record["text"] = fields["text"]
    problem = check_record(record)
    if problem:
        return Rejected(entry_id, rid, problem)
    try:
        dets = _detector_names(fields.get("detectors"))
    except ValueError as e:
        return Rejected(entry_id, rid, str(e))
    tenant = fields.get("tenant") or None
    return Request(entry_id, rid, record, tenant, fields.get("route") or DEFAULT_ROUTE, dets)


def _detector_names(raw: str | None) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if raw.lstrip().startswith("["):
        try:
            names = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"`detectors` is not valid JSON: {e.msg}") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("`detectors` must be a list of names")
    else:
        names = raw.split(",")
    out = tuple(n.strip() for n in names if n.strip())
    if not out:
        raise ValueError("`detectors` names no detector")
    return out


def error_fields(rid: str | None, error: str) -> dict[str, str]:
    """The result fields of a request that could not be scored (besides request, worker, deliveries)."""
    return {"id": rid or "", "error": error[:500]}


# ---- reader side ------------------------------------------------------------------------------------
def parse_result(stream_id: str, fields: Mapping[str, str]) -> dict[str, Any]:
    """A result entry as a JSON-ready dict (JSON fields decoded, counts as ints), `stream_id` last."""
    out: dict[str, Any] = {}
    for k, v in fields.items():
        if k in JSON_FIELDS:
            out[k] = json.loads(v)
        elif k in ("tokens", "deliveries"):
            out[k] = int(v)
        else:
            out[k] = v
    out["stream_id"] = stream_id
    return out


def read_results(
    client: redis.Redis, after: str = "0-0", keys: StreamKeys | None = None, page: int = 1000
) -> Iterator[dict[str, Any]]:
    """Every result after stream id `after` (exclusive), oldest first, read in pages."""
    stream = (keys or StreamKeys()).results
    while True:
        entries: Any = client.xrange(stream, min=f"({after}", count=page)
        for sid, fields in entries:
            yield parse_result(sid, fields)
            after = sid
        if len(entries) < page:
            return
