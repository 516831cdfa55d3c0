"""Audited conversations: the filtered list, one conversation with per-token evidence, the reviewer's
verdict form, and the JSON Lines export. Handlers are plain functions: FastAPI runs them on its thread
pool, so Redis round trips never block the event loop that streams generations."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse

from monitor.audit_query import Scan, query
from monitor.auth import Principal
from monitor.console import data, session
from monitor.console.views import Filters, bucket, record_view, review_of
from monitor.console.web import SECURITY_HEADERS, ConsoleError, form_data, json_line, render
from monitor.reviews import MAX_COMMENT_CHARS, REVIEW_VERDICTS, UnknownRecord

router = APIRouter()
EXPORT_MAX = 100_000  # index entries one export reads: bounds one download's time
VERDICT_TEXT = {"tp": "true positive", "fp": "false positive", "escalate": "needs escalation"}


def _common(request: Request, principal: Principal) -> dict[str, Any]:
    return {
        "tenants": data.tenants(request, principal),
        "detectors": data.detectors(request),
        "bucket_of": bucket,
        "review_of": review_of,
    }


@router.get("/audit", response_class=HTMLResponse)
def list_page(request: Request, principal: session.Reader) -> HTMLResponse:
    f = Filters.from_query(request.query_params)
    client, keys = data.redis_and_keys(request)
    page = query(client, keys, data.audit_filter(principal, f), reviews=data.reviews(request))
    return render(
        request,
        "list.html",
        f=f,
        records=page.records,
        has_more=page.has_more,
        **_common(request, principal),
    )


@router.get("/audit/records/{record_id}", response_class=HTMLResponse)
def record_page(
    request: Request,
    record_id: str,
    principal: session.Reader,
    detector: str | None = None,
) -> HTMLResponse:
    rec = data.record_for(request, principal, record_id)
    return render(
        request,
        "record.html",
        v=record_view(rec, detector),
        history=data.reviews(request).history(record_id),
        can_label=principal.can("audit:label"),
        comment_max=MAX_COMMENT_CHARS,
        verdict_choices=[(v, VERDICT_TEXT.get(v, v)) for v in REVIEW_VERDICTS],
        **_common(request, principal),
    )


@router.post("/audit/records/{record_id}/review")
async def review(request: Request, record_id: str, principal: session.Labeller) -> RedirectResponse:
    form = await form_data(request)
    verdict, comment = _review_input(form)
    try:  # label() itself refuses records the principal cannot see: the same 404 as the page
        data.reviews(request).label(record_id, verdict, comment, principal)
    except UnknownRecord:
        raise ConsoleError(404, "no such record") from None
    return RedirectResponse(f"/audit/records/{quote(record_id, safe='')}#review", 303, SECURITY_HEADERS)


def _review_input(form: dict[str, str]) -> tuple[str, str]:
    verdict, comment = form.get("verdict", ""), form.get("comment", "")
    if verdict not in REVIEW_VERDICTS:
        raise ConsoleError(400, f"choose a verdict: {', '.join(REVIEW_VERDICTS)}")
    if len(comment) > MAX_COMMENT_CHARS:
        raise ConsoleError(400, f"the comment must be text of at most {MAX_COMMENT_CHARS} characters")
    return verdict, comment.strip()


@router.get("/audit/export")
def export(request: Request, principal: session.Reader) -> StreamingResponse:
    """Every record of the filter as JSON Lines, newest first (at most EXPORT_MAX), with its review."""
    f = Filters.from_query(request.query_params)
    client, keys = data.redis_and_keys(request)
    flt = data.audit_filter(principal, f)  # checks the filter and tenant before streaming starts
    scan = Scan(client, keys, flt, data.reviews(request), max_scan=EXPORT_MAX)

    def lines() -> Iterator[str]:
        for rec in scan:
            yield json_line(rec)

    name = time.strftime("featurewatch-audit-%Y%m%dT%H%M%SZ.jsonl", time.gmtime())
    headers = {**SECURITY_HEADERS, "content-disposition": f'attachment; filename="{name}"'}
    return StreamingResponse(lines(), media_type="application/x-ndjson", headers=headers)
