"""POST /v1/monitor/score: shadow mode. Scores a conversation produced elsewhere, no generation.

One early-exit forward pass (it stops at the deepest layer a detector reads) on the engine thread, then
the same pure policy evaluation the live path uses. The answer has a top-level `scores` object
`{detector: value}` (each detector's own aggregation over its scope, as `featurewatch score` writes),
the verdict with the rules fired, per-token evidence and the top SAE features.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from detectors.scoring import Scorer
from monitor.api_models import ScoreRequest
from monitor.http_errors import APIError
from monitor.jobs import CallJob, EngineStopped, QueueFull
from monitor.runtime import Runtime
from monitor.tenancy import tenant_of
from policies.evaluate import Finding, Phase, Verdict, evaluate

router = APIRouter()


@router.post("/v1/monitor/score")
async def score(body: ScoreRequest, request: Request) -> dict[str, Any]:
    rt: Runtime = request.app.state.runtime
    tenant = tenant_of(request)
    if not rt.settings.monitoring:
        raise APIError(503, "monitoring is off on this server (FEATUREWATCH_MONITORING=false)")
    policy = rt.policy
    names = body.detectors if body.detectors is not None else rt.dset.scored_for(policy)
    unknown = [n for n in names if n not in rt.dset.detectors]
    if unknown or not names:
        valid = ", ".join(sorted(rt.dset.detectors))
        what = f"unknown detector(s) {', '.join(unknown)}" if unknown else "no detectors named"
        raise APIError(400, f"detectors: {what}; valid: {valid}", param="detectors")
    dets = {n: rt.dset.detectors[n] for n in names}
    scorer = Scorer(
        rt.lm.model,
        rt.lm.tokenizer,
        rt.sae,
        dets,
        rt.dset.labels,
        top_k=body.top_k,
        max_tokens=rt.max_prompt_tokens + rt.settings.max_tokens_limit,
        token_scores=True,
    )
    record = body.record()
    job = CallJob(lambda: next(scorer.score_records([record])))
    try:
        rt.engine.submit(job)
    except QueueFull as e:
        headers = {"Retry-After": str(rt.settings.retry_after_s)}
        raise APIError(429, f"server busy: {e}; retry later", code="queue_full", headers=headers) from None
    except EngineStopped as e:
        raise APIError(503, str(e)) from None
    try:
        result = await asyncio.wait_for(asyncio.wrap_future(job.future), rt.settings.request_timeout_s)
    except TimeoutError:
        job.future.cancel()
        raise APIError(504, f"scoring took longer than {rt.settings.request_timeout_s} s") from None
    if "error" in result:
        raise APIError(400, result["error"].removeprefix("line 1: "), param="messages")
    verdict = _verdict(rt, policy, result, tenant, body.route)
    return _body(result, verdict, policy)


def _verdict(rt: Runtime, policy: Any, result: dict[str, Any], tenant: str | None, route: str) -> Verdict:
    """Token scores split at the completion boundary -> prompt and completion findings -> evaluate."""
    n_prompt, kind = int(result["n_prompt"]), result["scope"]
    phase: Phase = "prompt" if kind == "prompt" else "completion"
    findings = []
    for name, scores in result["token_scores"].items():
        if kind == "prompt":
            findings.append(Finding(name, "prompt", scores=scores))
            continue
        findings.append(Finding(name, "prompt", scores=scores[:n_prompt]))  # a bare text has no prompt
        findings.append(Finding(name, "completion", scores=scores[n_prompt:]))
    # Rules reading detectors not scored here fail closed inside evaluate (no finding for them).
    return evaluate(
        policy,
        findings,
        tenant=tenant,
        route=route,
        phase=phase,
        thresholds=rt.dset.thresholds,
        clamps=rt.dset.clamps,
        aggregations=rt.dset.aggregations,
    )


def _body(result: dict[str, Any], verdict: Verdict, policy: Any) -> dict[str, Any]:
    return {
        "object": "featurewatch.score",
        "scope": result["scope"],
        "tokens": result["tokens"],
        "scores": result["scores"],
        "fired": result["fired"],
        "verdict": {
            "action": verdict.action,
            "policy": f"{policy.name}@{policy.version}",
            "message": verdict.message,
            "steer": {str(k): v for k, v in verdict.steer.items()},
            "rules": [
                {
                    "id": f.rule_id,
                    "detector": f.detector,
                    "action": f.action,
                    "value": f.value,
                    "threshold": f.threshold,
                    **({"error": f.error} if f.error else {}),
                }
                for f in verdict.fired
            ],
        },
        "evidence": {
            "n_prompt": result["n_prompt"],
            "tokens": result["token_texts"],
            "scores": {k: [round(x, 4) for x in v] for k, v in result["token_scores"].items()},
        },
        "top_features": result["top_features"],
    }
