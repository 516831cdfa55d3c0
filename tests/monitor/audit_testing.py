"""Helpers for the audit tests: requests monitored by the real `RequestMonitor` over chosen token scores.

A scripted detector's token score is the activation of its one watched latent (clamped to [0, 1]), so a
test chooses every token's score and feeds it as that latent. `monitored` drives the monitor the way
`monitor.engine` does (stop at a block, steer from the next token, `finish()` at the end) and returns the
`DecisionEvent` the server would emit; `build_record` (or a real `AuditStore`) turns it into a record.
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from detectors.aggregate import Aggregation
from detectors.base import TokenFeatures
from detectors.spec import LatentSpec, SaeFeaturesSpec
from monitor.events import DecisionEvent
from monitor.monitoring import DetectorSet, RequestMonitor
from policies import Policy

Scores = list[tuple[float, ...]]  # per token, one score per detector (in the set's latent order)


class Scripted:
    """A detector whose token score is the activation of its one watched latent."""

    def __init__(self, name: str, latent: int, aggregation: str = "max") -> None:
        self._spec = SaeFeaturesSpec(
            name=name,
            threshold=0.5,
            operating_points={"0.05": 0.25},
            aggregation=Aggregation(kind=aggregation),  # type: ignore[arg-type]
            latents=[LatentSpec(id=latent, weight=1.0)],
        )
        self.latent = latent

    @property
    def name(self) -> str:
        return self._spec.name

    @property
    def spec(self) -> SaeFeaturesSpec:
        return self._spec

    def hook_points(self) -> list[str]:
        return []

    def latent_ids(self) -> list[int]:
        return [self.latent]

    def score_tokens(self, feats: TokenFeatures) -> torch.Tensor:
        return feats.latent_columns([self.latent])[:, 0].clamp(0, 1)

    def top_features(self, feats: TokenFeatures, k: int = 5) -> list[dict[str, Any]]:
        return []

    def clamp_for_steering(self) -> dict[int, float]:
        return {self.latent: 0.0}


def scripted_set(*specs: tuple[str, str]) -> DetectorSet:
    """Detectors (name, own aggregation) reading latents 0, 1, … in that order; all reported."""
    dets = {name: Scripted(name, i, agg) for i, (name, agg) in enumerate(specs)}
    return DetectorSet.build(dets, [n for n, _ in specs])


def monitored(
    dset: DetectorSet,
    policy: Policy,
    prompt: Scores,
    completion: Scores,
    tenant: str | None = "acme",
    created: int | None = None,
) -> DecisionEvent:
    """One request as the engine monitors it: prompt tokens, then completion tokens until a block."""
    m = RequestMonitor(dset, policy, tenant=tenant, route="/v1/chat/completions")
    width = len(dset.latent_ids)
    rows = torch.tensor([(0.0,) * width, *prompt])  # position 0 is skipped, as for a real prompt
    stopped = m.observe_prompt(list(range(len(rows))), rows, {}, special=set()).blocked
    for i, scores in enumerate(completion):
        if stopped:
            break
        v = m.observe_token(i, f"t{i}", torch.tensor(scores), {})
        stopped = v.blocked
        if v.action == "steer" and m.steered_at is None:
            m.steered_at = i + 1  # clamps act from the next token on (engine)
    if m.finish().blocked and m.blocked_at is None and not stopped:
        m.blocked_at = len(m.tokens)  # judged on the whole message (engine._finish)
    summary = m.summary()
    return DecisionEvent(
        request_id=f"chatcmpl-{random.getrandbits(48):012x}",
        route="/v1/chat/completions",
        tenant=tenant,
        model="tiny",
        created=int(time.time()) if created is None else created,
        finish_reason="content_filter" if stopped or summary["verdict"] == "block" else "length",
        verdict=summary["verdict"],
        summary=summary,
        evidence=m.evidence(),
        messages=[{"role": "user", "content": f"prompt for {tenant}"}],
        completion="".join(t.text for t in m.tokens),
        usage={"prompt_tokens": len(prompt), "completion_tokens": len(m.tokens)},
    )
