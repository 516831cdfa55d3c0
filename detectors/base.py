"""The detector interface: what a detector reads (`TokenFeatures`) and what it must answer (`Detector`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from detectors.aggregate import Aggregation, aggregate
from detectors.errors import DetectorError
from detectors.spec import BaseSpec
from sae_assets.hooks import hf_hook_point


@dataclass(frozen=True)
class TokenFeatures:
    """Everything a detector may read for a span of T tokens.

    resid: {hook_point: (T, d_in)} residual-stream activations (keys normalised to HF paths).
    latents: (T, n_watched) SAE latent activations, column j being latent `latent_ids[j]`; or None.
    """

    resid: dict[str, Tensor] = field(default_factory=dict)
    latents: Tensor | None = None
    latent_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        object.__setattr__(self, "resid", {hf_hook_point(k): v for k, v in self.resid.items()})
        lengths = {k: v.shape[0] for k, v in self.resid.items()}
        if self.latents is not None:
            if self.latents.dim() != 2 or self.latents.shape[1] != len(self.latent_ids):
                raise DetectorError(
                    f"latents must be (T, {len(self.latent_ids)}) for {len(self.latent_ids)} latent ids, "
                    f"got {tuple(self.latents.shape)}"
                )
            lengths["latents"] = self.latents.shape[0]
        if len(set(lengths.values())) > 1:
            raise DetectorError(f"token counts differ between inputs: {lengths}")
        if any(v.dim() != 2 for v in self.resid.values()):
            raise DetectorError("every resid tensor must be (T, d_in)")

    @property
    def n_tokens(self) -> int:
        if self.latents is not None:
            return int(self.latents.shape[0])
        return int(next(iter(self.resid.values())).shape[0]) if self.resid else 0

    def resid_at(self, point: str) -> Tensor:
        key = hf_hook_point(point)
        if key not in self.resid:
            have = ", ".join(sorted(self.resid)) or "none"
            raise DetectorError(f"no residuals captured at {key}; captured: {have}")
        return self.resid[key]

    def latent_columns(self, ids: Sequence[int]) -> Tensor:
        """(T, len(ids)) activations of the SAE latents `ids`, in that order."""
        if self.latents is None:
            raise DetectorError(f"no SAE latents captured; this detector needs latents {list(ids)}")
        col = {lat: j for j, lat in enumerate(self.latent_ids)}
        missing = [i for i in ids if i not in col]
        if missing:
            raise DetectorError(f"latents {missing} were not watched (watched: {len(self.latent_ids)})")
        index = torch.tensor([col[i] for i in ids], dtype=torch.long, device=self.latents.device)
        return self.latents.index_select(1, index)

    def slice(self, start: int, stop: int) -> TokenFeatures:
        """Tokens [start, stop) only (e.g. to restrict a record to its scope)."""
        return TokenFeatures(
            resid={k: v[start:stop] for k, v in self.resid.items()},
            latents=None if self.latents is None else self.latents[start:stop],
            latent_ids=list(self.latent_ids),
        )


@runtime_checkable
class Detector(Protocol):
    """A concept detector built from a spec (see detectors.registry.build_detector)."""

    @property
    def name(self) -> str: ...

    @property
    def spec(self) -> BaseSpec: ...

    def hook_points(self) -> list[str]:
        """Residual-stream hook points (HF paths) whose activations `score_tokens` reads; may be empty."""
        ...

    def latent_ids(self) -> list[int]:
        """SAE latents `score_tokens` reads (the watched-latents fast path); may be empty."""
        ...

    def score_tokens(self, feats: TokenFeatures) -> Tensor:
        """(T,) float32 scores in [0, 1], one per token."""
        ...

    def top_features(self, feats: TokenFeatures, k: int = 5) -> list[dict[str, Any]]:
        """Up to k SAE latents that drove the score, strongest first:
        {"latent_id", "label", "activation", "contribution", "token_index"}."""
        ...

    def clamp_for_steering(self) -> dict[int, float]:
        """{latent_id: value} clamps that suppress the concept when steering; {} if it cannot steer."""
        ...


@runtime_checkable
class AttributesLatents(Protocol):
    """Optional for a detector: its `top_features` reads every SAE latent, not only watched ones (a residual
    probe read through the SAE's decoder, detectors.attribution), so a scorer should encode them all."""

    def attributes_latents(self) -> bool: ...


def wants_all_latents(det: Detector) -> bool:
    return isinstance(det, AttributesLatents) and det.attributes_latents()


def score_message(det: Detector, feats: TokenFeatures, aggregation: Aggregation | None = None) -> float:
    """Message-level value: the detector's token scores aggregated (its spec's default aggregation)."""
    return aggregate(det.score_tokens(feats), aggregation or det.spec.aggregation)


def fires(det: Detector, value: float) -> bool:
    return value >= det.spec.threshold


def top_latents_by_activation(
    feats: TokenFeatures, k: int, labels: dict[int, str] | None = None
) -> list[dict[str, Any]]:
    """The k watched latents with the largest activation over the span (evidence for any detector)."""
    if feats.latents is None or feats.n_tokens == 0 or not feats.latent_ids:
        return []
    peak, where = feats.latents.float().max(dim=0)  # per latent: max activation and its token index
    order = torch.argsort(peak, descending=True)[:k].tolist()
    labels = labels or {}
    out = []
    for j in order:
        if float(peak[j]) <= 0.0:
            break
        lat = feats.latent_ids[j]
        act = float(peak[j])
        out.append(
            {
                "latent_id": lat,
                "label": labels.get(lat, ""),
                "activation": act,
                "contribution": act,
                "token_index": int(where[j]),
            }
        )
    return out
