"""The audit trail's JSON API (`/v1/audit/…`): records, reviews, a per-detector summary, alerts, export
and draft-policy replay. Every route needs a key (`monitor.auth.require`): reading needs `audit:read`
(reviewer, admin), labelling `audit:label`. A reviewer sees only its tenants' records; a record of another
tenant answers 404 exactly like a missing one, so ids leak nothing across tenants.

Filters (query parameters) on records, export, summary, replay and alerts: `tenant` (repeatable; default
every tenant the key sees), `start`/`end` (unix seconds or ISO 8601, UTC when no offset is given),
`detector`, `action`, `review` (unreviewed|tp|fp|escalate), `limit`, `offset`. A bad value is a 400 whose
`param` names it. Redis calls block, so the routes are sync (FastAPI runs them on its thread pool).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import yaml
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import Field

from monitor.api_models import StrictBody
from monitor.audit_query import MAX_LIMIT, AuditFilter, FilterError, Scan, alerts, parse_time, query
from monitor.auth import Principal, require
from monitor.http_errors import APIError, content, raw_body
from monitor.replay import AUDITED_ONLY, ReplayContext, replay
from monitor.reviews import MAX_COMMENT_CHARS, Reviews, UnknownRecord, summary
from policies.loader import PolicyIssue, check_policy
from policies.schema import Policy

router = APIRouter(prefix="/v1/audit", tags=["audit"])
PRECISION_NOTE = (
    "precision = tp / (tp + fp) over reviewed records only: an estimate, since reviewed records are "
    "rarely a random sample of what fired"
)
REPLAY_DEFAULT = 200  # records one replay call re-judges by default (newest first); at most MAX_LIMIT

Reader = Annotated[Principal, Depends(require("audit:read"))]
Labeller = Annotated[Principal, Depends(require("audit:label"))]


class ReviewBody(StrictBody):
    verdict: Literal["tp", "fp", "escalate"]
    comment: str = Field(default="", max_length=MAX_COMMENT_CHARS)


class Params:
    """The shared filter query parameters, parsed and scoped to the caller's tenants."""

    def __init__(
        self,
        tenant: Annotated[list[str] | None, Query(description="repeatable; default: all you see")] = None,
        start: Annotated[str | None, Query(description="unix seconds or ISO 8601")] = None,
        end: Annotated[str | None, Query(description="unix seconds or ISO 8601")] = None,
        detector: Annotated[str | None, Query(max_length=128)] = None,
        action: str | None = None,
        review: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> None:
        self.tenant, self.detector, self.action, self.review = tenant, detector, action, review
        self.start, self.end = _time("start", start), _time("end", end)
        self.limit, self.offset = limit, offset

    def filter(self, p: Principal, **override: Any) -> AuditFilter:
        values: dict[str, Any] = {
            "tenants": _scope(p, self.tenant),
            "start": self.start,
            "end": self.end,
            "detector": self.detector,
            "action": self.action,
            "review": self.review,
            "limit": self.limit,
            "offset": self.offset,
        }
        try:
            return AuditFilter(**{**values, **override})
        except FilterError as e:
            raise APIError(400, str(e), param=e.field) from None


Filters = Annotated[Params, Depends()]


def _time(name: str, raw: str | None) -> float | None:
    try:
        return parse_time(raw)
    except ValueError as e:
        raise APIError(400, f"{name}: {e}", param=name) from None


def _scope(p: Principal, asked: list[str] | None) -> tuple[str, ...] | None:
    """The tenants a query reads: those asked for (each must be visible) or all the caller sees."""
    if not asked:
        return p.tenant_filter()
    names = tuple(dict.fromkeys(t for raw in asked for t in raw.split(",") if t))
    hidden = [t for t in names if not p.sees(t)]
    if hidden:
        raise APIError(403, f"tenant: this key may not read tenant {hidden[0]!r}", param="tenant")
    return names or p.tenant_filter()


def _redis(request: Request) -> tuple[Any, Any]:
    audit = getattr(request.app.state, "audit", None)
    if audit is None:
        raise APIError(503, "the audit trail is off (FEATUREWATCH_AUDIT_ENABLED=false)")
    return audit.backend.client(), audit.keys


def _visible_record(request: Request, p: Principal, record_id: str) -> dict[str, Any]:
    client, keys = _redis(request)
    raw: Any = client.get(keys.record(record_id))
    rec = json.loads(raw) if raw else None
    if rec is None or not p.sees(rec.get("tenant")):
        raise APIError(404, f"no audit record {record_id!r}", param="id")
    return rec


# ---- records and reviews -------------------------------------------------------------------------
@router.get("/records")
def list_records(request: Request, params: Filters, p: Reader, evidence: bool = False) -> dict[str, Any]:
    """Records newest first, one page; per-token `evidence` only with `evidence=true` (it is large)."""
    client, keys = _redis(request)
    page = query(client, keys, params.filter(p), Reviews(client, keys))
    data = (
        page.records if evidence else [{k: v for k, v in r.items() if k != "evidence"} for r in page.records]
    )
    return {
        "object": "list",
        "data": data,
        "scanned": page.scanned,
        "has_more": page.has_more,
        "truncated": page.truncated,
    }


@router.get("/records/{record_id}")
def get_record(request: Request, record_id: str, p: Reader) -> dict[str, Any]:
    rec = _visible_record(request, p, record_id)
    review = Reviews(*_redis(request)).get(record_id)
    return {**rec, "review": review.as_dict() if review else None}


@router.post("/records/{record_id}/review", status_code=201)
def label_record(request: Request, record_id: str, body: ReviewBody, p: Labeller) -> dict[str, Any]:
    try:
        review = Reviews(*_redis(request)).label(record_id, body.verdict, body.comment, p)
    except UnknownRecord:
        raise APIError(404, f"no audit record {record_id!r}", param="id") from None
    except ValueError as e:
        raise APIError(400, str(e), param="verdict") from None
    return review.as_dict()


@router.get("/records/{record_id}/reviews")
def record_reviews(request: Request, record_id: str, p: Reader) -> dict[str, Any]:
    """Every review of the record, oldest first."""
    _visible_record(request, p, record_id)
    history = Reviews(*_redis(request)).history(record_id)
    return {"object": "list", "data": [r.as_dict() for r in history]}


# ---- summary, alerts, export -------------------------------------------------------------------------
@router.get("/summary")
def detector_summary(request: Request, params: Filters, p: Reader) -> dict[str, Any]:
    """Per detector: flags, blocks, reviews, estimated precision and a per-day series."""
    client, keys = _redis(request)
    f = params.filter(p)
    rows = summary(client, keys, f.tenants, f.start, f.end, Reviews(client, keys))
    return {"object": "list", "data": [r.as_dict() for r in rows], "note": PRECISION_NOTE}


@router.get("/alerts")
def list_alerts(
    request: Request,
    p: Reader,
    tenant: Annotated[list[str] | None, Query()] = None,
    count: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> dict[str, Any]:
    """The latest flag/block alerts of the caller's tenants, oldest first (no content)."""
    client, keys = _redis(request)
    return {"object": "list", "data": alerts(client, keys, _scope(p, tenant), count)}


@router.get("/export", responses={200: {"content": content("application/x-ndjson")}})
def export(request: Request, params: Filters, p: Reader) -> StreamingResponse:
    """Every matching record (limit and offset ignored) as JSON Lines, newest first, streamed."""
    client, keys = _redis(request)
    scan = Scan(client, keys, params.filter(p, limit=1, offset=0), Reviews(client, keys), max_scan=None)

    def lines() -> Iterator[bytes]:  # a sync iterator: Starlette runs it on the thread pool
        for rec in scan:
            yield json.dumps(rec, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"

    headers = {"content-disposition": 'attachment; filename="featurewatch-audit.jsonl"'}
    return StreamingResponse(lines(), media_type="application/x-ndjson", headers=headers)


# ---- replay --------------------------------------------------------------------------------------
@router.post("/replay", openapi_extra=raw_body("text/plain", "application/yaml", "application/json"))
async def replay_draft(request: Request, params: Filters, p: Reader) -> Any:
    """Replay a draft policy over the matching records (default the latest 200). Body: the policy as
    YAML text, or JSON: `{"policy": "<yaml text>" | {…policy…}}` or the policy object itself."""
    from starlette.concurrency import run_in_threadpool

    text = await _draft_text(request)
    return await run_in_threadpool(_replay, request, params, p, text)


async def _draft_text(request: Request) -> str:
    raw = (await request.body()).decode("utf-8", "replace")
    if "json" not in request.headers.get("content-type", ""):
        return raw
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise APIError(400, f"invalid JSON: {e}", param="body") from None
    if not isinstance(body, dict):
        raise APIError(400, "policy: send the policy as YAML text or a JSON object", param="policy")
    draft = body.get("policy", body if "rules" in body else None)  # wrapped, or the policy itself
    if isinstance(draft, dict):
        return yaml.safe_dump(draft, sort_keys=False)
    if not isinstance(draft, str):
        raise APIError(400, "policy: a policy as YAML text or as a JSON object is required", param="policy")
    return draft


def _replay(request: Request, params: Params, p: Principal, text: str) -> dict[str, Any]:
    rt = getattr(request.app.state, "runtime", None)
    dset = getattr(rt, "dset", None)
    policy = _validated(text, dset)
    client, keys = _redis(request)
    limit = params.limit if "limit" in request.query_params else REPLAY_DEFAULT
    page = query(client, keys, params.filter(p, limit=limit), Reviews(client, keys))
    ctx = ReplayContext.from_detector_set(dset) if dset is not None else ReplayContext()
    report = replay(policy, page.records, ctx)
    return {
        "policy": f"{policy.name}@{policy.version}",
        "note": AUDITED_ONLY,
        "records": len(report.rows),
        "scanned": page.scanned,
        "has_more": page.has_more,
        "changed": len(report.changed),
        "counts": report.counts,
        "rows": [r.as_dict() for r in report.rows],
    }


def _validated(text: str, dset: Any) -> Policy:
    """The draft, checked like a policy file and against the running detectors; 400 naming the field."""
    from monitor.policy_checks import policy_issues

    known = set(dset.detectors) if dset is not None else None
    policy, issues = check_policy(text, "draft", known)
    if policy is not None and dset is not None:
        issues = policy_issues(dset)(policy, "draft")
    if policy is None or issues:
        raise _draft_error(issues)
    return policy


def _draft_error(issues: list[PolicyIssue]) -> APIError:
    first = issues[0] if issues else None
    param = f"policy.{first.path}" if first is not None and first.path else "policy"
    message = "invalid draft policy: " + "; ".join(str(i) for i in issues)
    return APIError(400, message, param=param, code="invalid_policy")
