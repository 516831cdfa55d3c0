"""Hooks on a Hugging Face causal LM: read activations, steer through an SAE, and exit early.

Hook points are Hugging Face module paths (e.g. `model.layers.15`, the residual stream after decoder block
15). SAELens names the same point `blocks.15.hook_resid_post`; `saelens_hook_name` / `hf_hook_point`
convert between them. Every hook is attached by a context manager that removes it on exit, error or not.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sae_assets.sae import SAE

_HF_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)$")
_SAELENS_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")


# A residual whose norm exceeds this multiple of the median is a "massive activation" (Sun et al. 2024):
# attention-sink positions early in a context. Measured on SmolLM2-135M layer 15: typical norms 150-250,
# sink tokens (e.g. a "\n" at position 1) 9,000-24,000. An SAE cannot reconstruct them and a JumpReLU encode
# fires thousands of latents on them, so they are not trained on, scored, or steered.
MASSIVE_NORM_RATIO = 10.0


def ordinary_positions(hidden: torch.Tensor, ratio: float = MASSIVE_NORM_RATIO) -> torch.Tensor:
    """(..., T, d) -> (..., T) bool: False at massive-activation positions (norm > ratio × median of the
    last axis' positions). With a single position there is nothing to compare with: it counts as ordinary."""
    norms = hidden.float().norm(dim=-1)  # (..., T)
    return norms <= ratio * norms.median(dim=-1, keepdim=True).values


class HookPointError(ValueError):
    """A hook point that does not name a module of the model."""


def hf_hook_point(name: str) -> str:
    """`blocks.15.hook_resid_post` -> `model.layers.15`; HF paths pass through unchanged."""
    m = _SAELENS_RESID.match(name)
    return f"model.layers.{m.group(1)}" if m else name


def saelens_hook_name(point: str) -> str:
    """`model.layers.15` -> `blocks.15.hook_resid_post` (the name SAELens uses for the same tensor)."""
    m = _HF_LAYER.match(point)
    return f"blocks.{m.group(1)}.hook_resid_post" if m else point


def layer_index(point: str) -> int | None:
    m = _HF_LAYER.match(hf_hook_point(point))
    return int(m.group(1)) if m else None


def resolve_module(model: nn.Module, point: str) -> nn.Module:
    path = hf_hook_point(point)
    try:
        return model.get_submodule(path)
    except AttributeError:
        n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        valid = f"model.layers.0 … model.layers.{n - 1}" if n else "a module path of the model"
        raise HookPointError(f"hook point {point!r} is not in the model; valid: {valid}") from None


def _hidden(output: Any) -> torch.Tensor:
    """Decoder layers return a tensor (transformers ≥5) or a tuple whose first item is the tensor."""
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class EarlyExit(Exception):
    """Raised inside the deepest hook to stop the forward pass once the wanted activations exist."""


@dataclass
class Capture:
    """Activations of the latest forward pass, per hook point, each (B, T, d_model)."""

    acts: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, point: str) -> torch.Tensor:
        return self.acts[hf_hook_point(point)]


@contextmanager
def capture(model: nn.Module, points: Sequence[str], *, early_exit: bool = False) -> Iterator[Capture]:
    """Read-only hooks at `points`. With `early_exit`, the deepest point raises EarlyExit; wrap the
    forward call in `run_to_hooks` (or catch EarlyExit) to use it."""
    cap = Capture()
    paths = [hf_hook_point(p) for p in points]
    modules = [resolve_module(model, p) for p in paths]
    deepest = max(range(len(paths)), key=lambda i: layer_index(paths[i]) or -1) if early_exit else -1
    with ExitStack() as stack:
        for i, (path, mod) in enumerate(zip(paths, modules, strict=True)):

            def hook(
                _m: nn.Module, _inp: Any, out: Any, _path: str = path, _stop: bool = i == deepest
            ) -> None:
                cap.acts[_path] = _hidden(out).detach()
                if _stop:
                    raise EarlyExit

            stack.callback(mod.register_forward_hook(hook).remove)
        yield cap


def run_to_hooks(model: nn.Module, points: Sequence[str], **inputs: Any) -> dict[str, torch.Tensor]:
    """One forward pass that stops after the deepest hook point; returns {point: (B, T, d_model)}."""
    with torch.inference_mode(), capture(model, points, early_exit=True) as cap, suppress(EarlyExit):
        model(**inputs, use_cache=False)
    return dict(cap.acts)


# ---- watched latents ---------------------------------------------------------------------------------
@dataclass
class LatentWatch:
    """Watched-latents readout at one hook point: after each forward, `latest` is (B, T_new, n_watched)."""

    sae: SAE
    latent_ids: list[int]
    full: bool = False  # True: encode all latents (for top-k evidence) into `latest_full`
    latest: torch.Tensor | None = None
    latest_full: torch.Tensor | None = None

    def __post_init__(self) -> None:
        bad = [i for i in self.latent_ids if not 0 <= i < self.sae.d_sae]
        if bad:
            raise ValueError(f"latent id(s) {bad} out of range 0..{self.sae.d_sae - 1}")
        self._ids = torch.tensor(self.latent_ids, dtype=torch.long, device=self.sae.W_enc.device)

    def read(self, hidden: torch.Tensor) -> None:
        if self.full:
            self.latest_full = self.sae.encode(hidden)  # (B, T, d_sae)
            self.latest = self.latest_full.index_select(-1, self._ids)
        elif self.latent_ids:
            self.latest = self.sae.encode_watched(hidden, self._ids)  # (B, T, n_watched)
        else:
            self.latest = hidden.new_zeros((*hidden.shape[:-1], 0))


# ---- steering ------------------------------------------------------------------------------------------
@dataclass
class Steering:
    """Per-row clamps: `clamps[row] = {latent_id: value}`; rows without clamps pass through untouched.

    The residual becomes h + Σ_i (v_i − f_i(h)) · W_dec[i]: only the clamped latents change, and the SAE's
    reconstruction error stays in h, so an un-clamped SAE leaves the model's outputs bit-identical.
    """

    sae: SAE
    clamps: dict[int, dict[int, float]] = field(default_factory=dict)

    def set_all(self, batch: int, clamp: dict[int, float]) -> None:
        self.clamps = {row: dict(clamp) for row in range(batch)}

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        if not any(self.clamps.values()):
            return hidden
        out = hidden.clone()
        for row, clamp in self.clamps.items():
            if not clamp or row >= hidden.shape[0]:
                continue
            ids = torch.tensor(list(clamp), dtype=torch.long, device=hidden.device)
            target = torch.tensor(list(clamp.values()), dtype=self.sae.W_dec.dtype, device=hidden.device)
            h = hidden[row]  # (T, d_in)
            f = self.sae.encode_watched(h, ids)  # (T, n_clamped)
            delta = (target - f) @ self.sae.W_dec.index_select(0, ids)  # (T, d_in)
            delta = delta * ordinary_positions(h)[:, None]  # never steer attention sinks
            out[row] = (h.to(delta.dtype) + delta).to(hidden.dtype)
        return out


@contextmanager
def sae_hooks(
    model: nn.Module,
    point: str,
    *,
    watch: LatentWatch | None = None,
    steering: Steering | None = None,
    on_hidden: Callable[[torch.Tensor], None] | None = None,
) -> Iterator[None]:
    """One hook at `point` that first steers (if any clamps), then reads watched latents from the
    steered residual, and passes it on. Removed on exit."""
    module = resolve_module(model, point)

    def hook(_m: nn.Module, _inp: Any, out: Any) -> Any:
        hidden = _hidden(out)
        new = steering.apply(hidden) if steering is not None else hidden
        if watch is not None:
            watch.read(new)
        if on_hidden is not None:
            on_hidden(new)
        return _replace_hidden(out, new) if new is not hidden else None

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
