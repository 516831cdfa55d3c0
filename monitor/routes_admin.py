"""Admin API: the running policy, and publishing a new one to every replica (admin keys only).

GET /v1/admin/policy  — this replica's policy, the published one, and every replica's status.
PUT /v1/admin/policy  — body: the policy YAML (any text content type) or JSON {"policy": "<yaml>"}.
  Checked in full against this replica's detectors first (400 listing the issues); then published through
  Redis (`policy_source: redis`, monitor.policy_sync) so every replica applies it. With
  `policy_source: file` the file is the source of truth: 409, edit the file instead.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from monitor.auth import Principal, require
from monitor.http_errors import APIError, raw_body
from monitor.runtime import Runtime

router = APIRouter()
Admin = Annotated[Principal, Depends(require("policy:write"))]
MAX_POLICY_BYTES = 256_000  # a policy is a few kB; anything this large is a mistake


@router.get("/v1/admin/policy")
async def get_policy(request: Request, p: Admin) -> dict[str, Any]:
    from monitor.policy_sync import current, replica_status

    rt: Runtime = request.app.state.runtime
    pol = rt.holder.policy
    out: dict[str, Any] = {
        "source": rt.settings.policy_source,
        "running": {"name": pol.name, "version": pol.version, "generation": rt.holder.generation},
        "last_issues": [str(i) for i in rt.holder.last_issues],
    }
    sub = getattr(request.app.state, "policy_sync", None)
    if sub is not None:
        client = sub._client()
        cur = await run_in_threadpool(current, client)
        out["published"] = None if cur is None else {k: v for k, v in cur.items() if k != "text"}
        out["replicas"] = await run_in_threadpool(replica_status, client)
    return out


@router.put("/v1/admin/policy", openapi_extra=raw_body("text/plain", "application/yaml", "application/json"))
async def put_policy(request: Request, p: Admin) -> dict[str, Any]:
    from monitor.policy_sync import PolicyPublishError, publish_policy

    rt: Runtime = request.app.state.runtime
    sub = getattr(request.app.state, "policy_sync", None)
    if sub is None:
        raise APIError(
            409,
            "policy_source is 'file': edit the policy file (it is watched) or run with "
            "policy_source: redis to publish policies to every replica",
        )
    text = _policy_text(await request.body(), request.headers.get("content-type", ""))
    issues = rt.holder.validate(*_parse(text, rt)) if rt.holder.validate is not None else []
    if issues:
        raise APIError(400, "policy: " + "; ".join(str(i) for i in issues))
    try:
        pub = await run_in_threadpool(
            publish_policy,
            sub._client(),
            text,
            source="api",
            by=f"{p.name} ({p.key_id})",
            known_detectors=rt.holder.known_detectors,
        )
    except PolicyPublishError as e:
        raise APIError(400, "policy: " + "; ".join(str(i) for i in e.issues)) from None
    return {"published": {"name": pub.name, "version": pub.version, "digest": pub.digest}}


def _policy_text(body: bytes, content_type: str) -> str:
    if len(body) > MAX_POLICY_BYTES:
        raise APIError(413, f"policy over {MAX_POLICY_BYTES} bytes")
    try:
        raw = body.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "policy: body is not UTF-8") from None
    if content_type.startswith("application/json"):
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError as e:
            raise APIError(400, f"policy: invalid JSON ({e.msg})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("policy"), str):
            raise APIError(400, 'policy: JSON body must be {"policy": "<YAML text>"}')
        raw = doc["policy"]
    if not raw.strip():
        raise APIError(400, "policy: empty body")
    return raw


def _parse(text: str, rt: Runtime) -> tuple[Any, str]:
    """The parsed policy for the runtime's own validator (400 with the issues when it does not parse)."""
    from policies.loader import check_policy

    policy, issues = check_policy(text, "api", rt.holder.known_detectors)
    if issues or policy is None:
        raise APIError(400, "policy: " + "; ".join(str(i) for i in issues))
    return policy, "api"
