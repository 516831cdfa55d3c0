"""Feature explorer (an SAE latent's dashboard), the per-detector summary, and policy replay."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from markupsafe import Markup

from monitor.audit_query import FilterError, query
from monitor.auth import Principal
from monitor.console import charts, data, session
from monitor.console.views import Filters, bucket
from monitor.console.web import ConsoleError, form_data, render
from monitor.reviews import summary
from policies.loader import PolicyError, parse_policy

router = APIRouter()
SUMMARY_DAYS = 14  # the summary's default range, whole UTC days ending today
REPLAY_MAX = 500  # records one replay re-judges (newest first): a page stays quick to render
REPLAY_EXAMPLE = """name: draft
version: 1
rules:
  - id: flag-something
    detector: DETECTOR
    threshold: 0.5
    action: flag
"""


@router.get("/audit/features/{latent}", response_class=HTMLResponse)
def feature_page(request: Request, latent: int, _p: session.Reader) -> HTMLResponse:
    from sae_assets.dashboards import DashboardsError

    dash = data.dashboards(request)
    with data.DASH_LOCK:  # the lazy shard cache is not thread-safe
        try:
            feat = dash.feature(latent)
        except DashboardsError as e:
            raise ConsoleError(404, str(e)) from None
    max_act = float(feat.get("max_act") or 0.0)

    def act_bucket(act: float, _top: Any = None) -> int:  # shade relative to the latent's max activation
        return bucket(act / max_act) if max_act > 0 else 0

    return render(
        request,
        "feature.html",
        latent=latent,
        f=feat,
        tokens_scored=int(dash.summary.get("tokens_scored", 0)),
        sae=str(getattr(request.app.state.runtime, "sae_folder", "")),
        act_bucket=act_bucket,
    )


@router.get("/audit/summary", response_class=HTMLResponse)
def summary_page(request: Request, principal: session.Reader) -> HTMLResponse:
    f = Filters.from_query(request.query_params)
    if "start" not in request.query_params:  # first visit: the last SUMMARY_DAYS (an empty start: all)
        f = dataclasses.replace(f, start=_days_ago(SUMMARY_DAYS))
    client, keys = data.redis_and_keys(request)
    try:
        stats = summary(client, keys, data.tenant_scope(principal, f), f.start, f.end, data.reviews(request))
    except FilterError as e:  # e.g. start after end
        raise ConsoleError(400, f"invalid filter: {e}") from None
    rows = [
        {"s": s, "chart": Markup(charts.series_svg(s.series, f"{s.detector}: flags and blocks per day"))}
        for s in stats
    ]
    return render(
        request,
        "summary.html",
        f=f,
        rows=rows,
        tenants=data.tenants(request, principal),
        detectors=data.detectors(request),
    )


def _days_ago(n: int) -> float:
    """Midnight UTC at the start of the day n-1 days before today (so the range holds n days)."""
    today = time.time() // 86400 * 86400
    return today - (n - 1) * 86400


def _replay_page(request: Request, principal: Principal, f: Filters, text: str, **extra: Any) -> HTMLResponse:
    return render(
        request,
        "replay.html",
        f=f,
        policy_text=text,
        limit=REPLAY_MAX,
        tenants=data.tenants(request, principal),
        detectors=data.detectors(request),
        issues=extra.get("issues", []),
        report=extra.get("report"),
        count_cols=("allow", "log", "flag", "steer", "block"),
    )


@router.get("/audit/replay", response_class=HTMLResponse)
def replay_form(request: Request, principal: session.Reader) -> HTMLResponse:
    f = Filters.from_query(request.query_params)
    rt = getattr(request.app.state, "runtime", None)
    text = _current_policy_text(rt) or REPLAY_EXAMPLE
    return _replay_page(request, principal, f, text)


@router.post("/audit/replay", response_class=HTMLResponse)
async def replay_run(request: Request, principal: session.Reader) -> HTMLResponse:
    form = await form_data(request)
    f = Filters.from_query(form)
    text = str(form.get("policy") or "")
    return await _run_in_pool(request, principal, f, text)


async def _run_in_pool(request: Request, principal: Principal, f: Filters, text: str) -> HTMLResponse:
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(_replay, request, principal, f, text)


def _replay(request: Request, principal: Principal, f: Filters, text: str) -> HTMLResponse:
    from monitor.replay import ReplayContext, replay

    try:
        policy = parse_policy(text, "draft", set(data.detectors(request)) or None)
    except PolicyError as e:
        return _replay_page(request, principal, f, text, issues=[str(i) for i in e.issues])
    client, keys = data.redis_and_keys(request)
    page = query(client, keys, data.audit_filter(principal, f, REPLAY_MAX, 0), reviews=data.reviews(request))
    dset = getattr(getattr(request.app.state, "runtime", None), "dset", None)
    ctx = ReplayContext.from_detector_set(dset) if dset is not None else None  # calibrated thresholds
    return _replay_page(request, principal, f, text, report=replay(policy, page.records, ctx))


def _current_policy_text(rt: Any) -> str | None:
    """The running policy's file, as a starting point for a draft."""
    try:
        return str(rt.settings.policy_path().read_text(encoding="utf-8"))
    except (AttributeError, OSError):
        return None
