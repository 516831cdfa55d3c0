"""What a shadow-scoring worker scores with: model, SAE, detectors and (optionally) a policy, loaded once
from the same settings as `featurewatch serve`, and `BatchScorer`, which turns a batch of requests into
result fields with the scoring contract of `featurewatch score` (`detectors.scoring.Scorer`).

Unlike the sidecar, a worker has no policy unless one is configured (`--policy`, FEATUREWATCH_POLICY or
the YAML file): results then carry scores only, and a custom SAE needs no policy naming its detectors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detectors.scoring import Scorer
from monitor.monitoring import DetectorSet
from monitor.policy_checks import policy_issues
from monitor.runtime import StartupError
from monitor.settings import Settings
from monitor.worker_protocol import Request, error_fields
from policies.evaluate import Finding, Phase, Verdict, evaluate
from policies.reload import PolicyHolder, PolicyWatcher
from policies.schema import Policy

MAX_SCORERS = 64  # cached Scorers (one per distinct detector set requested); cleared beyond this
_LINE = re.compile(r"^line \d+: ")  # Scorer numbers errors by input line; a stream entry has no line


@dataclass(frozen=True)
class ScoringSetup:
    lm: Any  # monitor.model.LoadedModel
    sae: Any  # sae_assets.sae.SAE
    folder: Path
    dset: DetectorSet  # every detector of the SAE folder; `report` = the default set
    holder: PolicyHolder | None  # None: no policy configured, no verdicts
    watcher: PolicyWatcher | None = None

    def default_detectors(self) -> list[str]:
        if self.holder is None:
            return list(self.dset.report)
        return self.dset.scored_for(self.holder.policy)

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()


def load_setup(settings: Settings) -> ScoringSetup:
    """Load and check everything once; StartupError names the setting at fault (as `serve` does)."""
    from monitor.runtime import load_parts
    from policies.loader import PolicyError

    parts = load_parts(settings)
    lm, sae, folder, dset, valid = parts.lm, parts.sae, parts.folder, parts.dset, parts.valid
    if settings.policy is None:
        return ScoringSetup(lm, sae, folder, dset, None)
    try:
        holder = PolicyHolder(settings.policy_path(), set(valid), validate=policy_issues(dset))
    except PolicyError as e:
        raise StartupError("policy: " + "; ".join(str(i) for i in e.issues)) from None
    watcher = holder.watch(settings.policy_poll_s) if settings.policy_poll_s > 0 else None
    return ScoringSetup(lm, sae, folder, dset, holder, watcher)


class BatchScorer:
    """`scorer(requests)` -> one dict of result fields (strings) per request, in order. Requests naming
    the same detectors share one forward pass; a request that cannot be scored gets an `error` field."""

    def __init__(self, setup: ScoringSetup, top_k: int = 5) -> None:
        self.setup, self.top_k = setup, top_k
        self._scorers: dict[tuple[str, ...], Scorer] = {}

    def __call__(self, requests: Sequence[Request]) -> list[dict[str, str]]:
        policy = self.setup.holder.policy if self.setup.holder is not None else None
        default = tuple(self.setup.default_detectors())
        groups: dict[tuple[str, ...], list[int]] = {}
        out: list[dict[str, str]] = [{} for _ in requests]
        for i, req in enumerate(requests):
            names = req.detectors or default
            unknown = [n for n in names if n not in self.setup.dset.detectors]
            if unknown:
                valid = ", ".join(sorted(self.setup.dset.detectors))
                out[i] = error_fields(req.id, f"unknown detector(s) {', '.join(unknown)}; valid: {valid}")
            else:
                groups.setdefault(names, []).append(i)
        for names, idx in groups.items():
            scorer = self._scorer(names, with_tokens=policy is not None)
            records = [requests[i].record for i in idx]
            for i, res in zip(idx, scorer.score_records(records, batch_size=len(records)), strict=True):
                out[i] = self._fields(requests[i], res, policy)
        for req, fields in zip(requests, out, strict=True):
            if req.tenant is not None:
                fields["tenant"] = req.tenant
        return out

    def _scorer(self, names: tuple[str, ...], *, with_tokens: bool) -> Scorer:
        key = (*names, "+tokens") if with_tokens else names
        if key not in self._scorers:
            if len(self._scorers) >= MAX_SCORERS:
                self._scorers.clear()
            dset = self.setup.dset
            dets = {n: dset.detectors[n] for n in names}
            self._scorers[key] = Scorer(
                self.setup.lm.model, self.setup.lm.tokenizer, self.setup.sae, dets, dset.labels,
                top_k=self.top_k, token_scores=with_tokens,
            )  # fmt: skip
        return self._scorers[key]

    def _fields(self, req: Request, res: dict[str, Any], policy: Policy | None) -> dict[str, str]:
        if "error" in res:
            return error_fields(req.id, _LINE.sub("", res["error"]))
        fields = {
            "id": req.id,
            "scope": res["scope"],
            "tokens": str(res["tokens"]),
            "scores": _dumps(res["scores"]),
            "fired": _dumps(res["fired"]),
            "top_features": _dumps(res["top_features"]),
        }
        if policy is not None:
            verdict = verdict_for(self.setup.dset, policy, res, req.tenant, req.route)
            fields["verdict"] = _dumps(verdict_json(verdict, policy))
        return fields


def verdict_for(
    dset: DetectorSet, policy: Policy, res: dict[str, Any], tenant: str | None, route: str
) -> Verdict:
    """As POST /v1/monitor/score: token scores split at the completion boundary, then the pure evaluate."""
    n_prompt, kind = int(res["n_prompt"]), res["scope"]
    phase: Phase = "prompt" if kind == "prompt" else "completion"
    findings = []
    for name, scores in res["token_scores"].items():
        if kind == "prompt":
            findings.append(Finding(name, "prompt", scores=scores))
            continue
        findings.append(Finding(name, "prompt", scores=scores[:n_prompt]))
        findings.append(Finding(name, "completion", scores=scores[n_prompt:]))
    return evaluate(
        policy, findings, tenant=tenant, route=route, phase=phase, thresholds=dset.thresholds,
        clamps=dset.clamps, aggregations=dset.aggregations,
    )  # fmt: skip


def verdict_json(verdict: Verdict, policy: Policy) -> dict[str, Any]:
    rules = [
        {
            "id": f.rule_id,
            "detector": f.detector,
            "action": f.action,
            "value": f.value,
            "threshold": f.threshold,
        }
        | ({"error": f.error} if f.error else {})
        for f in verdict.fired
    ]
    return {"action": verdict.action, "policy": f"{policy.name}@{policy.version}", "rules": rules}


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
