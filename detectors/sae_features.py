"""`sae_features` detectors: a weighted sum of a few SAE latents through a calibrated sigmoid link.

score_t = sigmoid(scale · (Σ_i w_i · f_i(t) + bias)), f_i(t) the activation of latent i at token t. The
latents come from discovery (detectors.discover); `fit_link` recalibrates scale/bias on raw sums.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detectors.base import TokenFeatures
from detectors.errors import DetectorError
from detectors.linear import fit_logistic
from detectors.registry import register_kind
from detectors.spec import BaseSpec, SaeFeaturesSpec
from sae_assets.sae import SAE


def check_latent_range(name: str, ids: list[int], sae: SAE | None) -> None:
    if sae is None:
        return
    bad = [i for i in ids if not 0 <= i < sae.d_sae]
    if bad:
        raise DetectorError(
            f"detector {name!r}: latent id(s) {bad} out of range for the SAE (valid: 0..{sae.d_sae - 1})"
        )


@register_kind("sae_features", SaeFeaturesSpec)
class SaeFeaturesDetector:
    def __init__(self, spec: SaeFeaturesSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self._ids = [lat.id for lat in spec.latents]
        self._labels = {lat.id: lat.label for lat in spec.latents}
        self._w = torch.tensor([lat.weight for lat in spec.latents], dtype=torch.float32)  # (n,)

    @classmethod
    def from_spec(
        cls,
        spec: BaseSpec,
        *,
        sae: SAE | None = None,
        base_dir: Path = Path("."),
        model: nn.Module | None = None,
    ) -> SaeFeaturesDetector:
        if not isinstance(spec, SaeFeaturesSpec):
            raise DetectorError(f"detector {spec.name!r}: expected an sae_features spec, got {spec.kind}")
        check_latent_range(spec.name, [lat.id for lat in spec.latents], sae)
        return cls(spec)

    def hook_points(self) -> list[str]:
        return []  # reads only latents, which the monitor computes at the SAE's own hook point

    def latent_ids(self) -> list[int]:
        return list(self._ids)

    def _contributions(self, feats: TokenFeatures) -> Tensor:
        """(T, n): w_i · f_i(t)."""
        f = feats.latent_columns(self._ids).float()
        return f * self._w.to(f.device)

    def linear_scores(self, feats: TokenFeatures) -> Tensor:
        """(T,) raw Σ_i w_i f_i(t), before bias and link (the input `fit_link` calibrates)."""
        return self._contributions(feats).sum(dim=1)

    def score_tokens(self, feats: TokenFeatures) -> Tensor:
        return torch.sigmoid(self.spec.scale * (self.linear_scores(feats) + self.spec.bias))

    def top_features(self, feats: TokenFeatures, k: int = 5) -> list[dict[str, Any]]:
        """Latents with the largest positive w·f at any token (what pushed the score up), strongest first."""
        if feats.n_tokens == 0:
            return []
        contrib = self._contributions(feats)  # (T, n)
        peak, where = contrib.max(dim=0)
        acts = feats.latent_columns(self._ids).float()
        out = []
        for j in torch.argsort(peak, descending=True)[:k].tolist():
            if float(peak[j]) <= 0.0:
                break
            t = int(where[j])
            lat = self._ids[j]
            out.append(
                {
                    "latent_id": lat,
                    "label": self._labels[lat],
                    "activation": float(acts[t, j]),
                    "contribution": float(peak[j]),
                    "token_index": t,
                }
            )
        return out

    def clamp_for_steering(self) -> dict[int, float]:
        # Suppress the concept: zero every latent that raises the score; negative-weight latents stay.
        return {lat.id: 0.0 for lat in self.spec.latents if lat.weight > 0}


def fit_link(pos_scores: Tensor, neg_scores: Tensor, C: float = 1e4) -> tuple[float, float]:
    """(scale, bias) such that sigmoid(scale · (s + bias)) is a calibrated probability for raw sums s.

    1-D balanced logistic regression on positive vs negative raw scores (per token or per example, the
    caller's choice); weakly regularised because it only sets a slope and an offset.
    """
    fit = fit_logistic(pos_scores.reshape(-1), neg_scores.reshape(-1), C=C, standardise=False)
    slope, intercept = float(fit.weight[0]), float(fit.bias)
    if slope <= 0:
        raise DetectorError(
            f"fit_link: slope {slope:.3g} ≤ 0 — positives do not score higher than negatives on these weights"
        )
    return slope, intercept / slope
