"""Per-token evidence for the audit trail: which SAE latents stood behind a completion token's scores.

Two sources, best first. When a detector scored at the token reads the residual stream through a probe the
SAE can attribute (detectors.attribution), the evidence is the latents that pushed such a detector up most,
with their contributions (logits) and that detector's name in `pushes`: the one nearest its threshold at
this token (highest score / threshold), so a detector with high scores everywhere does not crowd out the
one about to fire. Otherwise it is the most active watched latents (the latents of `sae_features`
detectors). One detector per token keeps a record's size what it was (~0.6 kB per token with 3 latents).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from detectors.base import Detector, TokenFeatures

Labels = Callable[[int], str]


@dataclass(frozen=True)
class Latent:
    latent_id: int
    activation: float
    contribution: float | None = None  # logits pushed toward `TokenEvidence.pushes`, when attributed


@dataclass
class TokenEvidence:
    """One scored completion token: its detector scores and the latents behind them."""

    index: int
    text: str
    scores: dict[str, float]
    top: list[Latent] = field(default_factory=list)  # strongest first
    pushes: str | None = None  # the detector whose score `top` drove (None: most active watched latents)

    def as_dict(self, labels: Labels | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "text": self.text,
            "scores": {k: round(v, 4) for k, v in self.scores.items()},
            "top": [_latent_dict(lat, labels) for lat in self.top],
        }
        if self.pushes is not None:
            out["pushes"] = self.pushes
        return out


def _latent_dict(lat: Latent, labels: Labels | None) -> dict[str, Any]:
    d: dict[str, Any] = {
        "latent_id": lat.latent_id,
        "activation": round(lat.activation, 3),
        "label": labels(lat.latent_id) if labels else "",
    }
    if lat.contribution is not None:
        d["contribution"] = round(lat.contribution, 4)
    return d


def most_active(latents: torch.Tensor, latent_ids: Sequence[int], k: int) -> list[Latent]:
    """The k most active watched latents at one token (latents (n_watched,))."""
    if k <= 0 or latents.numel() == 0:
        return []
    vals, idx = latents.float().topk(min(k, latents.numel()))
    return [Latent(latent_ids[int(j)], float(v)) for v, j in zip(vals, idx, strict=True) if v > 0]


def attributed(
    detectors: Mapping[str, Detector],
    scores: Mapping[str, float],
    full: torch.Tensor,
    resid: Mapping[str, torch.Tensor],
    all_ids: list[int],
    k: int,
    thresholds: Mapping[str, float] | None = None,
) -> tuple[list[Latent], str] | None:
    """The latents that pushed the one of `detectors` nearest its threshold at one token (full (d_sae,)
    latents, resid {point: (d_in,)}), or None when none of them scored here."""
    scored = [n for n in detectors if n in scores]
    if k <= 0 or not scored:
        return None
    limits = thresholds or {}
    name = max(scored, key=lambda n: scores[n] / max(limits.get(n, 1.0), 1e-6))
    one = {p: r[None] for p, r in resid.items()}  # T = 1
    items = detectors[name].top_features(TokenFeatures(resid=one, latents=full[None], latent_ids=all_ids), k)
    top = [Latent(int(t["latent_id"]), float(t["activation"]), float(t["contribution"])) for t in items]
    return top, name
