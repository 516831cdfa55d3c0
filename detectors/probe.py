"""`probe` detectors: logistic regression on residual activations (or SAE latents), one score per token.

Weights file (safetensors, beside the YAML): `W` (D,), `b` (1,), `mean` (D,), `std` (D,) with
D = n_points · d_in for a residual probe (hook points concatenated in spec order) or D = n_latents for a
latent probe. score_t = sigmoid(((x_t − mean) / std) · W + b). The file's metadata records the hook points
/ latent ids it was trained on, and loading refuses a spec that disagrees.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor, nn

from detectors.attribution import decoder_attribution, token_weights, top_contributions
from detectors.base import TokenFeatures
from detectors.errors import DetectorError
from detectors.extract import sae_hook_point
from detectors.linear import LinearFit, fit_logistic
from detectors.registry import register_kind
from detectors.sae_features import check_latent_range
from detectors.spec import BaseSpec, ProbeSpec
from sae_assets.hooks import HookPointError, resolve_module
from sae_assets.sae import SAE

WEIGHT_KEYS = ("W", "b", "mean", "std")


def train_probe(
    x_pos: Tensor | np.ndarray,
    x_neg: Tensor | np.ndarray,
    C: float = 1.0,
    max_iter: int = 2000,
    *,
    w_pos: Tensor | np.ndarray | None = None,
    w_neg: Tensor | np.ndarray | None = None,
) -> LinearFit:
    """Balanced logistic regression on standardised features (rows = tokens or pooled examples), with
    optional per-row weights."""
    return fit_logistic(x_pos, x_neg, C=C, standardise=True, max_iter=max_iter, w_pos=w_pos, w_neg=w_neg)


def save_probe(
    fit: LinearFit,
    path: str | Path,
    *,
    hook_points: list[str] | None = None,
    latent_ids: list[int] | None = None,
) -> Path:
    """Write W/b/mean/std; the inputs it was trained on go into the file's metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "W": fit.weight.float().contiguous(),
        "b": fit.bias.float().reshape(1).contiguous(),
        "mean": fit.mean.float().contiguous(),
        "std": fit.std.float().contiguous(),
    }
    meta = {"format": "featurewatch-probe/1"}
    if hook_points is not None:
        meta["hook_points"] = json.dumps(hook_points)
    if latent_ids is not None:
        meta["latent_ids"] = json.dumps(latent_ids)
    save_file(tensors, str(path), metadata=meta)
    return path


def load_probe(path: str | Path) -> tuple[LinearFit, dict[str, Any]]:
    """(weights, metadata) from a probe file; shapes are checked, errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise DetectorError(f"probe weights file {path} does not exist")
    try:
        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            raw_meta = fh.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise DetectorError(f"{path}: not a readable safetensors file: {e}") from None
    missing = [k for k in WEIGHT_KEYS if k not in state]
    if missing:
        raise DetectorError(f"{path}: missing tensor(s) {', '.join(missing)} (need {', '.join(WEIGHT_KEYS)})")
    w, b, mean, std = (state[k].float() for k in WEIGHT_KEYS)
    d = w.numel()
    if w.dim() != 1 or mean.shape != (d,) or std.shape != (d,) or b.numel() != 1:
        shapes = {k: tuple(state[k].shape) for k in WEIGHT_KEYS}
        raise DetectorError(f"{path}: need W (D,), b (1,), mean (D,), std (D,); got {shapes}")
    if not bool((std > 0).all()):
        raise DetectorError(f"{path}: std must be positive everywhere")
    meta = {k: json.loads(v) for k, v in raw_meta.items() if k in ("hook_points", "latent_ids")}
    return LinearFit(weight=w, bias=b.reshape(()), mean=mean, std=std), meta


@register_kind("probe", ProbeSpec)
class ProbeDetector:
    def __init__(
        self, spec: ProbeSpec, fit: LinearFit, latent_ids: list[int], sae: SAE | None = None
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.fit = fit
        self._latent_ids = latent_ids  # the probe's inputs when spec.on_latents, else []
        # Attribution (detectors.attribution): the logit per unit activation of each latent, (d_sae,) for a
        # residual probe read through the SAE's decoder, (n_inputs,) for a latent probe; None without an
        # SAE at one of the probe's hook points.
        self._sae: SAE | None = None
        self._u: Tensor | None = None
        self._every: list[int] = []  # 0..d_sae−1 once attributing
        self._u_copies: dict[torch.device, Tensor] = {}
        self._point = ""
        w_tilde = fit.weight.float() / fit.std.float()
        if spec.on_latents:
            self._u = w_tilde
        elif sae is not None and _sae_point(sae) in spec.hook_points:
            self._point = _sae_point(sae)
            d_in = w_tilde.numel() // len(spec.hook_points)
            block = spec.hook_points.index(self._point)
            self._sae, self._u = sae, decoder_attribution(sae, w_tilde[block * d_in : (block + 1) * d_in])
            self._every = list(range(sae.d_sae))

    @classmethod
    def from_spec(
        cls,
        spec: BaseSpec,
        *,
        sae: SAE | None = None,
        base_dir: Path = Path("."),
        model: nn.Module | None = None,
    ) -> ProbeDetector:
        if not isinstance(spec, ProbeSpec):
            raise DetectorError(f"detector {spec.name!r}: expected a probe spec, got {spec.kind}")
        fit, meta = load_probe(Path(base_dir) / spec.weights_file)
        if spec.on_latents:
            ids = _latent_inputs(spec, fit, meta, sae)
            return cls(spec, fit, ids)
        _check_residual_inputs(spec, fit, meta, sae, model)
        return cls(spec, fit, [], sae)

    def hook_points(self) -> list[str]:
        return list(self.spec.hook_points)

    def latent_ids(self) -> list[int]:
        return list(self._latent_ids)

    def inputs(self, feats: TokenFeatures) -> Tensor:
        """(T, D): the probe's input rows (latent columns, or residuals concatenated in spec order)."""
        if self.spec.on_latents:
            return feats.latent_columns(self._latent_ids)
        return torch.cat([feats.resid_at(p).float() for p in self.spec.hook_points], dim=1)

    def score_tokens(self, feats: TokenFeatures) -> Tensor:
        x = self.inputs(feats)
        fit = self.fit
        if fit.weight.device != x.device:  # follow the activations' device (GPU serving)
            fit = LinearFit(*(t.to(x.device) for t in (fit.weight, fit.bias, fit.mean, fit.std)))
            self.fit = fit
        return torch.sigmoid(fit.logits(x))

    def attributes_latents(self) -> bool:
        """True when `top_features` reads every SAE latent (a residual probe at the SAE's hook point)."""
        return self._sae is not None

    def top_features(self, feats: TokenFeatures, k: int = 5) -> list[dict[str, Any]]:
        """The latents that pushed the score up most (detectors.attribution), weighted over the tokens the
        spec's aggregation reads. A residual probe at a layer without an SAE names none: the most active
        latents elsewhere would not be what drove it."""
        if self._u is None or feats.latents is None or feats.n_tokens == 0:
            return []
        weights = token_weights(self.score_tokens(feats), self.spec.aggregation)
        if self.spec.on_latents:
            cols = self._u.to(feats.latents.device)
            latents = feats.latent_columns(self._latent_ids)
            gain = torch.ones(feats.n_tokens)
            return top_contributions(latents, self._latent_ids, cols, gain, weights, k)
        assert self._sae is not None
        gain = self._sae.decode_gain(feats.resid_at(self._point))  # on the residual's device: no weights
        dev = feats.latents.device
        # A full encode lists 0..d_sae−1 in order: then u needs no gather (list equality runs in C, ~40 µs;
        # building a tensor of 9,216 ids per token cost more than the rest of the attribution).
        every = len(feats.latent_ids) == len(self._every) and feats.latent_ids == self._every
        u_cols = self._u_on(dev) if every else self._gather(feats.latent_ids).to(dev)
        return top_contributions(feats.latents, feats.latent_ids, u_cols, gain, weights, k)

    def _u_on(self, device: torch.device) -> Tensor:
        """u on `device`, copied once (served latents arrive on the CPU while the SAE may sit on a GPU)."""
        assert self._u is not None
        if device not in self._u_copies:
            self._u_copies[device] = self._u.to(device)
        return self._u_copies[device]

    def _gather(self, ids: list[int]) -> Tensor:
        assert self._u is not None
        return self._u.index_select(0, torch.as_tensor(ids, dtype=torch.long, device=self._u.device))

    def clamp_for_steering(self) -> dict[int, float]:
        return {}  # a residual direction is not an SAE latent: probes cannot steer


def _sae_point(sae: SAE) -> str:
    """The SAE's hook point, or "" when its cfg.json names none (it then attributes no residual probe)."""
    try:
        return sae_hook_point(sae)
    except DetectorError:
        return ""


def _latent_inputs(spec: ProbeSpec, fit: LinearFit, meta: dict[str, Any], sae: SAE | None) -> list[int]:
    d = fit.weight.numel()
    if spec.latent_ids is not None:
        ids = list(spec.latent_ids)
    elif sae is not None:
        ids = list(range(sae.d_sae))
    else:
        ids = list(range(d))
    if len(ids) != d:
        raise DetectorError(
            f"detector {spec.name!r}: weights have {d} inputs but the probe reads {len(ids)} latents"
        )
    if "latent_ids" in meta and list(meta["latent_ids"]) != ids:
        raise DetectorError(
            f"detector {spec.name!r}: weights were trained on other latent ids than the spec lists"
        )
    check_latent_range(spec.name, ids, sae)
    return ids


def _check_residual_inputs(
    spec: ProbeSpec, fit: LinearFit, meta: dict[str, Any], sae: SAE | None, model: nn.Module | None
) -> None:
    n_points, d = len(spec.hook_points), fit.weight.numel()
    if d % n_points:
        raise DetectorError(f"detector {spec.name!r}: {d} weights do not split over {n_points} hook points")
    d_in = d // n_points
    if "hook_points" in meta and list(meta["hook_points"]) != spec.hook_points:
        raise DetectorError(
            f"detector {spec.name!r}: weights were trained on hook points {meta['hook_points']}, "
            f"the spec lists {spec.hook_points}"
        )
    if sae is not None and sae.d_in != d_in:
        raise DetectorError(
            f"detector {spec.name!r}: probe d_in {d_in} per hook point does not match the SAE/model width "
            f"{sae.d_in}"
        )
    if model is None:
        return
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if hidden is not None and int(hidden) != d_in:
        raise DetectorError(
            f"detector {spec.name!r}: probe d_in {d_in} does not match the model width {hidden}"
        )
    for point in spec.hook_points:
        try:
            resolve_module(model, point)
        except HookPointError as e:
            raise DetectorError(f"detector {spec.name!r}: {e}") from None
