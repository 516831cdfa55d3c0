"""Train a TopK or BatchTopK sparse autoencoder on residual activations.

TopK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): every token keeps its k largest
pre-activations. BatchTopK (Bussmann et al. 2024): the batch keeps its batch_size·k largest, so the number
of active latents varies per token; at inference a single threshold θ (a running estimate of the smallest
activation the batch kept) replaces the batch, and the SAE is saved as an ordinary JumpReLU SAE.

Training recipe, following Gao et al. and EleutherAI's `sparsify`:
- decoder rows are unit norm (gradient parallel to each row removed before the step, rows renormalised
  after it); the encoder starts as the decoder's transpose; b_dec starts at the geometric median (or mean)
  of a sample of activations;
- loss = FVU + aux_coef · AuxK, where FVU is the fraction of variance unexplained and AuxK reconstructs the
  residual error from the top-aux_k *dead* latents (not fired for `dead_tokens` tokens), which revives them;
- Adam with linear warm-up and linear decay to zero over the last `decay_frac` of the steps.

The output folder holds the SAE in SAELens format (`cfg.json`, `sae_weights.safetensors`), the config
(`train_cfg.json`), per-step metrics (`train_log.jsonl`) and a resumable checkpoint (`checkpoint/`).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from tqdm import tqdm

from sae_assets.collect import ActivationStore
from sae_assets.hooks import hf_hook_point, saelens_hook_name
from sae_assets.sae import DTYPES, SAE, SAEConfig, SAEMetadata

TRAIN_ARCHITECTURES = ("topk", "batchtopk")
B_DEC_INITS = ("geometric_median", "mean")
TRAIN_CFG_FILENAME = "train_cfg.json"
LOG_FILENAME = "train_log.jsonl"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILENAME = "trainer.pt"
# sparsify's default: lr = 2e-4 / sqrt(d_sae / 2**14), i.e. 2e-4 at 16384 latents, scaled as 1/sqrt(d_sae)
# (Gao et al. 2024 fit the optimal lr to fall roughly with the square root of the number of latents).
BASE_LR = 2e-4
BASE_LR_LATENTS = 16_384
# Gao et al.: a latent is dead when it has not fired in 10M tokens. Short runs cap the window (see below).
DEFAULT_DEAD_TOKENS = 10_000_000
DEAD_WINDOW_RUN_FRACTION = 0.1  # default window is at most 10% of the run, so short runs still revive latents
# EMA factor of the BatchTopK threshold estimate: ~100-step memory, short enough to forget early training.
THRESHOLD_BETA = 0.99
# Fields that may change when resuming (the rest must match the checkpoint exactly).
_RESUME_MUTABLE = ("total_tokens", "epochs", "checkpoint_every", "device", "dtype")


class TrainConfigError(ValueError):
    """A bad training-config field; `.field` names it and the message says what is valid."""

    def __init__(self, field_name: str, problem: str) -> None:
        self.field = field_name
        super().__init__(f"train config field {field_name!r}: {problem}")


@dataclass(frozen=True)
class TrainConfig:
    """Every training knob. Drives `featurewatch sae train` options and is saved as `train_cfg.json`."""

    architecture: str = "topk"  # topk | batchtopk (batchtopk is saved as jumprelu)
    d_sae: int = 9216  # 16 × 576, SmolLM2-135M's d_model
    k: int = 32  # active latents per token (batchtopk: on average)
    lr: float | None = None  # None: BASE_LR / sqrt(d_sae / BASE_LR_LATENTS)
    batch_size: int = 4096  # tokens per step
    total_tokens: int | None = None  # None: `epochs` passes over the activation store
    epochs: float = 1.0
    warmup_steps: int = 100  # linear lr warm-up from 0
    decay_frac: float = 0.2  # lr decays linearly to 0 over this final fraction of the steps
    aux_k: int = 512  # dead latents used by the AuxK loss (Gao et al.)
    aux_coef: float = 1 / 32  # AuxK loss coefficient (Gao et al.)
    dead_tokens: int | None = None  # None: min(10M, 10% of the run's tokens)
    b_dec_init: str = "geometric_median"  # geometric_median | mean
    b_dec_init_tokens: int = 32_768  # sample size for the b_dec initialisation
    seed: int = 0
    device: str = "auto"  # auto = cuda when available
    dtype: str = "float32"  # dtype of the saved weights; training keeps fp32 weights
    checkpoint_every: int = 1000  # steps; 0 = only at the end
    hook_point: str = "model.layers.15"  # Hugging Face module path (SAELens names are accepted)
    model_name: str = "smollm2-135m-instruct"

    def __post_init__(self) -> None:
        for name, ok, problem in self._checks():
            if not ok:
                raise TrainConfigError(name, f"{problem} (got {getattr(self, name)!r})")

    def _checks(self) -> list[tuple[str, bool, str]]:
        return [
            (
                "architecture",
                self.architecture in TRAIN_ARCHITECTURES,
                f"must be one of {TRAIN_ARCHITECTURES}",
            ),
            ("d_sae", self.d_sae > 0, "must be > 0"),
            ("k", 0 < self.k <= self.d_sae, "must satisfy 0 < k <= d_sae"),
            ("lr", self.lr is None or self.lr > 0, "must be > 0 (or null for the d_sae-scaled default)"),
            ("batch_size", self.batch_size > 0, "must be > 0"),
            (
                "total_tokens",
                self.total_tokens is None or self.total_tokens >= self.batch_size,
                ">= batch_size",
            ),
            ("epochs", self.epochs > 0, "must be > 0"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
            ("decay_frac", 0 <= self.decay_frac <= 1, "must be in [0, 1]"),
            ("aux_k", self.aux_k >= 0, "must be >= 0 (0 disables AuxK)"),
            ("aux_coef", self.aux_coef >= 0, "must be >= 0"),
            ("dead_tokens", self.dead_tokens is None or self.dead_tokens > 0, "must be > 0 or null"),
            ("b_dec_init", self.b_dec_init in B_DEC_INITS, f"must be one of {B_DEC_INITS}"),
            ("b_dec_init_tokens", self.b_dec_init_tokens > 0, "must be > 0"),
            (
                "device",
                self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
                "auto|cpu|cuda",
            ),
            ("dtype", self.dtype in DTYPES, f"must be one of {tuple(DTYPES)}"),
            ("checkpoint_every", self.checkpoint_every >= 0, "must be >= 0"),
            ("hook_point", bool(self.hook_point), "must not be empty"),
            ("model_name", bool(self.model_name), "must not be empty"),
        ]

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else BASE_LR / math.sqrt(self.d_sae / BASE_LR_LATENTS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TrainConfig:
        """Build from a JSON/YAML mapping; unknown fields and wrong types raise TrainConfigError."""
        known = {f.name: str(f.type) for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, value in raw.items():
            if name not in known:
                raise TrainConfigError(str(name), f"unknown field; valid: {', '.join(known)}")
            values[name] = _coerce(name, known[name], value)
        return cls(**values)


def _coerce(name: str, type_name: str, value: Any) -> Any:
    """YAML reads `2e-4` as a string and JSON has no int/float split; convert to the field's type."""
    if value is None:
        if "None" in type_name:
            return None
        raise TrainConfigError(name, "must not be null")
    base = type_name.replace(" | None", "")
    try:
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(str(value).replace("_", "")) if isinstance(value, str) else int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
    except ValueError:
        raise TrainConfigError(name, f"expected {base}, got {value!r}") from None
    if not isinstance(value, str):
        raise TrainConfigError(name, f"expected a string, got {value!r}")
    return value


def load_train_config(path: str | Path) -> dict[str, Any]:
    """Raw fields of a `.json`, `.yaml` or `.yml` config file (validated later by `TrainConfig.from_dict`)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from e
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise TrainConfigError("<file>", f"{path} must hold a mapping of field: value")
    return raw


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---- building blocks -----------------------------------------------------------------------------
def geometric_median(x: torch.Tensor, iters: int = 30, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm on (n, d) rows: the point minimising the sum of Euclidean distances.

    Less pulled by the heavy-norm outlier tokens than the mean, which is why Gao et al. start b_dec there.
    """
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=-1).clamp_min(1e-8)  # (n,)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        done = (y_new - y).norm() <= tol * y.norm().clamp_min(1e-8)
        y = y_new
        if done:
            break
    return y.float()


def unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def remove_parallel_grad(W_dec: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gradient minus its component along each (unit) decoder row: a step then only rotates the rows."""
    return grad - (grad * W_dec).sum(-1, keepdim=True) * W_dec


def topk_activation(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Per-token TopK: keep each row's k largest pre-activations (ReLU'd). (B, d_sae) -> (B, d_sae)."""
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))


def batch_topk_activation(pre: torch.Tensor, k: int) -> torch.Tensor:
    """BatchTopK: keep the B·k largest ReLU'd pre-activations of the whole batch. (B, d_sae) -> (B, d_sae)."""
    flat = torch.relu(pre).flatten()  # (B·d_sae,)
    top = flat.topk(min(pre.shape[0] * k, flat.numel()))
    return torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(pre)


class _PairEncode(torch.autograd.Function):
    """Pre-activations of chosen (row, col) pairs, read from the already computed dense `pre`.

    Backward builds the sparse (B, d_sae) gradient and multiplies sparsely: O(n_pairs · d_in) instead of the
    dense O(B · d_sae · d_in) encoder backward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        sae_in: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        pre: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(sae_in, W_enc, rows, cols)
        return pre[rows, cols]

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        sae_in, W_enc, rows, cols = ctx.saved_tensors
        B, d_sae = sae_in.shape[0], W_enc.shape[1]
        g_t = torch.sparse_coo_tensor(torch.stack([cols, rows]), g, (d_sae, B), check_invariants=False)
        grad_W = torch.sparse.mm(g_t, sae_in).t()  # (d_in, d_sae)
        grad_b = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        g_s = torch.sparse_coo_tensor(torch.stack([rows, cols]), g, (B, d_sae), check_invariants=False)
        grad_in = torch.sparse.mm(g_s, W_enc.t())  # (B, d_in)
        return grad_in, grad_W, grad_b, None, None, None


class _PairDecode(torch.autograd.Function):
    """x̂ = Σ_pairs val · W_dec[col] into row; sparse forward and backward."""

    @staticmethod
    def forward(
        ctx: Any, vals: torch.Tensor, W_dec: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, batch: int
    ) -> torch.Tensor:
        ctx.save_for_backward(vals, W_dec, rows, cols)
        f = torch.sparse_coo_tensor(
            torch.stack([rows, cols]), vals, (batch, W_dec.shape[0]), check_invariants=False
        )
        return torch.sparse.mm(f, W_dec)  # (batch, d_in)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        vals, W_dec, rows, cols = ctx.saved_tensors
        f_t = torch.sparse_coo_tensor(
            torch.stack([cols, rows]), vals, (W_dec.shape[0], g.shape[0]), check_invariants=False
        )
        grad_W = torch.sparse.mm(f_t, g)  # (d_sae, d_in)
        grad_vals = (g.index_select(0, rows) * W_dec.index_select(0, cols)).sum(-1)  # (n_pairs,)
        return grad_vals, grad_W, None, None, None


def _topk_pairs(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of each row's k largest pre-activations (ReLU later drops the non-positive ones)."""
    top = pre.topk(k, dim=-1)
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
    return rows, top.indices.flatten()


def _batch_topk_pairs(pre: torch.Tensor, k: int, cap: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the B·k largest positive pre-activations of the batch.

    Candidates are each row's top cap·k (a token may use up to 4× the mean budget); selecting among them is
    exact unless one token would take more than cap·k of the batch's picks, and ~8× faster than a topk
    over all B·d_sae entries on CPU.
    """
    m = min(cap * k, pre.shape[1])
    cand = pre.topk(m, dim=-1)  # (B, m)
    flat = torch.relu(cand.values).flatten()
    keep = flat.topk(min(pre.shape[0] * k, flat.numel())).indices
    keep = keep[flat[keep] > 0]
    return keep // m, cand.indices.flatten()[keep]


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_frac: float) -> float:
    """Linear warm-up over `warmup_steps`, flat, then linear decay to 0 over the last `decay_frac`."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    decay_steps = int(total_steps * decay_frac)
    decay_start = total_steps - decay_steps
    decay = 1.0 if step < decay_start or decay_steps == 0 else max(0.0, (total_steps - step) / decay_steps)
    return warm * decay


# ---- trainer -------------------------------------------------------------------------------------
class Trainer:
    """One TopK/BatchTopK SAE, its Adam state and the dead-latent / threshold bookkeeping."""

    def __init__(self, cfg: TrainConfig, d_in: int, total_steps: int) -> None:
        self.cfg = cfg
        self.d_in = d_in
        self.total_steps = total_steps
        self.device = resolve_device(cfg.device)
        self.sae = SAE(SAEConfig(architecture="topk", d_in=d_in, d_sae=cfg.d_sae, k=cfg.k)).to(self.device)
        gen = torch.Generator().manual_seed(cfg.seed)  # CPU generator: same init on every device
        W_dec = unit_rows(torch.randn(cfg.d_sae, d_in, generator=gen))  # (d_sae, d_in)
        with torch.no_grad():
            self.sae.W_dec.copy_(W_dec)
            self.sae.W_enc.copy_(W_dec.T)  # Gao et al.: encoder starts as the decoder transpose
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg.effective_lr)
        self.step = 0
        self.tokens = 0
        self.steps_since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=self.device)
        self.threshold = float("nan")  # BatchTopK θ estimate; nan until the first batch
        run_tokens = total_steps * cfg.batch_size
        dead_tokens = cfg.dead_tokens or min(DEFAULT_DEAD_TOKENS, int(run_tokens * DEAD_WINDOW_RUN_FRACTION))
        self.dead_steps = max(1, math.ceil(dead_tokens / cfg.batch_size))

    # -- initialisation --
    def init_b_dec(self, sample: torch.Tensor) -> None:
        sample = sample.to(self.device, torch.float32)
        b = geometric_median(sample) if self.cfg.b_dec_init == "geometric_median" else sample.mean(0)
        with torch.no_grad():
            self.sae.b_dec.copy_(b)

    # -- one step --
    # The step works on the selected (token, latent) pairs only. The dense encode runs without autograd just
    # to choose them; their activations are then recomputed with autograd from gathered encoder columns, and
    # the decode is a sparse matmul. Same loss and gradients as the dense formulation, but the backward pass
    # touches B·k pairs instead of B·d_sae (measured on 2 CPU cores, B=4096, d_sae=9216: ~5 s → ~1 s/step).
    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dense pre-activations (no grad) -> chosen (rows, cols) and the pre tensor (B, d_sae)."""
        with torch.no_grad():
            pre = self.sae.hidden_pre(x)  # (B, d_sae)
            if self.cfg.architecture == "topk":
                rows, cols = _topk_pairs(pre, self.cfg.k)
            else:
                rows, cols = _batch_topk_pairs(pre, self.cfg.k)
        return rows, cols, pre

    def pair_acts(
        self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, pre: torch.Tensor
    ) -> torch.Tensor:
        """ReLU'd activations of the chosen pairs, with autograd to W_enc, b_enc and b_dec. (n_pairs,)"""
        sae_in = x - self.sae.b_dec  # (B, d_in)
        return torch.relu(_PairEncode.apply(sae_in, self.sae.W_enc, self.sae.b_enc, rows, cols, pre))

    def sparse_decode(
        self, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, batch: int
    ) -> torch.Tensor:
        """Σ vals · W_dec[cols] per row, without b_dec. (batch, d_in)"""
        return _PairDecode.apply(vals, self.sae.W_dec, rows, cols, batch)

    def auxk_loss(
        self, x: torch.Tensor, pre: torch.Tensor, err: torch.Tensor, dead: torch.Tensor
    ) -> torch.Tensor:
        """Normalised MSE of reconstructing the residual `err` (B, d_in) from the top-aux_k dead latents."""
        n_dead = int(dead.sum())
        if n_dead == 0 or self.cfg.aux_k == 0:
            return err.new_zeros(())
        k_aux = min(self.cfg.aux_k, n_dead)
        with torch.no_grad():
            masked = pre.masked_fill(~dead[None, :], float("-inf"))  # (B, d_sae): only dead latents compete
            rows, cols = _topk_pairs(masked, k_aux)
        vals = self.pair_acts(x, rows, cols, pre)
        err_hat = self.sparse_decode(rows, cols, vals, x.shape[0])  # no b_dec: the residual has no offset
        err_var = (err - err.mean(0)).pow(2).sum().clamp_min(1e-12)
        # sparsify: scale down while few latents are dead, so a handful of them cannot dominate the loss.
        scale = min(n_dead / self.cfg.aux_k, 1.0)
        return scale * (err_hat - err).pow(2).sum() / err_var

    def train_step(self, x: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg
        x = x.to(self.device, torch.float32)
        lr = cfg.effective_lr * lr_factor(self.step, self.total_steps, cfg.warmup_steps, cfg.decay_frac)
        for group in self.opt.param_groups:
            group["lr"] = lr
        dead = self.steps_since_fired >= self.dead_steps  # (d_sae,)
        rows, cols, pre = self.select(x)
        vals = self.pair_acts(x, rows, cols, pre)  # (n_pairs,)
        x_hat = self.sparse_decode(rows, cols, vals, x.shape[0]) + self.sae.b_dec  # (B, d_in)
        err = x - x_hat
        total_var = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
        fvu = err.pow(2).sum() / total_var
        aux = self.auxk_loss(x, pre, err.detach(), dead)
        loss = fvu + cfg.aux_coef * aux
        loss.backward()
        W_dec = self.sae.W_dec
        assert W_dec.grad is not None
        W_dec.grad.copy_(remove_parallel_grad(W_dec.detach(), W_dec.grad))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            W_dec.copy_(unit_rows(W_dec))
            fired = vals.detach() > 0  # (n_pairs,)
            self.steps_since_fired += 1
            self.steps_since_fired[cols[fired].unique()] = 0
            if cfg.architecture == "batchtopk":
                self._update_threshold(vals.detach()[fired])
        self.step += 1
        self.tokens += x.shape[0]
        return {
            "step": self.step,
            "tokens": self.tokens,
            "loss": loss.item(),
            "fvu": fvu.item(),
            "explained_variance": 1.0 - fvu.item(),
            "auxk_loss": aux.item(),
            "l0": float(fired.sum()) / x.shape[0],
            "dead_fraction": float(dead.float().mean()),
            "lr": lr,
            **({"threshold": self.threshold} if cfg.architecture == "batchtopk" else {}),
        }

    def _update_threshold(self, kept: torch.Tensor) -> None:
        """θ ← EMA of the smallest activation the batch kept (Bussmann et al.), once warm-up is over."""
        if kept.numel() == 0:
            return
        low = float(kept.min())
        if math.isnan(self.threshold) or self.step < self.cfg.warmup_steps:
            self.threshold = low
        else:
            self.threshold = THRESHOLD_BETA * self.threshold + (1 - THRESHOLD_BETA) * low

    # -- checkpoints --
    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "d_in": self.d_in,
            "cfg": self.cfg.to_dict(),
            "sae": {k: v.detach().cpu() for k, v in self.sae.state_dict().items()},
            "opt": self.opt.state_dict(),
            "steps_since_fired": self.steps_since_fired.cpu(),
            "threshold": self.threshold,
            "torch_rng": torch.get_rng_state(),
        }

    def save_checkpoint(self, out_dir: Path) -> Path:
        """Atomic write of everything needed to continue: weights, Adam moments, step, dead counters, RNG."""
        folder = out_dir / CHECKPOINT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (CHECKPOINT_FILENAME + ".tmp")
        torch.save(self.state(), tmp)
        tmp.replace(folder / CHECKPOINT_FILENAME)
        return folder / CHECKPOINT_FILENAME

    def load_state(self, state: dict[str, Any]) -> None:
        if int(state["d_in"]) != self.d_in:
            raise TrainConfigError(
                "d_in", f"activations have d_in={self.d_in}, the checkpoint {state['d_in']}"
            )
        saved = TrainConfig.from_dict(state["cfg"])
        for name in saved.to_dict():
            if name not in _RESUME_MUTABLE and getattr(saved, name) != getattr(self.cfg, name):
                raise TrainConfigError(
                    name,
                    f"{getattr(self.cfg, name)!r} differs from the checkpoint's {getattr(saved, name)!r}",
                )
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["opt"])
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.steps_since_fired = state["steps_since_fired"].to(self.device)
        self.threshold = float(state["threshold"])
        torch.set_rng_state(state["torch_rng"])

    # -- export --
    def export(self, metadata: Mapping[str, Any] | None = None) -> SAE:
        """The trained SAE on CPU: `topk` with k, or (BatchTopK) `jumprelu` with θ in every latent."""
        cfg = self.cfg
        extra: dict[str, Any] = {
            "hf_hook_point": hf_hook_point(cfg.hook_point),
            "trained_architecture": cfg.architecture,
            "training_tokens": self.tokens,
            "training_steps": self.step,
        }
        meta_raw: dict[str, Any] = {
            "model_name": cfg.model_name,
            "hook_name": saelens_hook_name(cfg.hook_point),
        }
        meta_raw.update(metadata or {})
        meta_raw.update(extra)
        meta = SAEMetadata.from_dict(meta_raw)
        state = {k: v.detach().cpu().float() for k, v in self.sae.state_dict().items()}
        if cfg.architecture == "topk":
            sae_cfg = SAEConfig(architecture="topk", d_in=self.d_in, d_sae=cfg.d_sae, k=cfg.k, metadata=meta)
        else:
            theta = 0.0 if math.isnan(self.threshold) else self.threshold
            extra_meta = {**meta.extra, "batchtopk_threshold": theta, "batchtopk_k": cfg.k}
            meta = SAEMetadata.from_dict({**meta.to_dict(), **extra_meta})
            sae_cfg = SAEConfig(architecture="jumprelu", d_in=self.d_in, d_sae=cfg.d_sae, metadata=meta)
            # One global θ (Bussmann et al.) stored per latent, the shape JumpReLU readers expect.
            state["threshold"] = torch.full((cfg.d_sae,), theta)
        sae = SAE(sae_cfg)
        sae.load_state_dict(state)
        return sae.requires_grad_(False)  # an inference copy; the trainer keeps its own weights


def checkpoint_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR / CHECKPOINT_FILENAME


def checkpoint_step(out_dir: str | Path) -> int | None:
    """Steps done by the checkpoint in `out_dir`, or None when there is none."""
    path = checkpoint_path(out_dir)
    if not path.is_file():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


# ---- logging -------------------------------------------------------------------------------------
def _open_log(out_dir: Path, resume_step: int | None) -> TextIO:
    """train_log.jsonl for appending; on resume, drops lines logged after the checkpoint (redone next)."""
    path = out_dir / LOG_FILENAME
    if resume_step is None or not path.is_file():
        return open(path, "w", encoding="utf-8")
    kept = [
        ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step
    ]
    path.write_text("".join(ln + "\n" for ln in kept))
    return open(path, "a", encoding="utf-8")


# ---- entry points --------------------------------------------------------------------------------
def _resolve_steps(cfg: TrainConfig, total_steps: int | None, batches: Iterable[torch.Tensor]) -> int:
    if total_steps is not None:
        return total_steps
    if cfg.total_tokens is not None:
        return cfg.total_tokens // cfg.batch_size
    if hasattr(batches, "__len__"):
        return len(batches)  # type: ignore[arg-type]
    raise TrainConfigError("total_tokens", "must be set when training from an iterator of unknown length")


def train_sae(
    batches: Iterable[torch.Tensor],
    cfg: TrainConfig,
    d_in: int,
    *,
    progress: bool = True,
    total_steps: int | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> SAE:
    """Train on (batch, d_in) float tensors; returns the exported SAE (on CPU, fp32).

    Steps: `total_steps`, else total_tokens // batch_size, else len(batches); training also stops when
    `batches` runs out. With `out_dir`, checkpoints every `cfg.checkpoint_every` steps and at the end, logs
    every step to train_log.jsonl, and saves the SAE + train_cfg.json. With `resume`, state comes from
    out_dir's checkpoint and `batches` must continue the stream from the checkpoint's step (see
    `store_batches(start_step=...)`). `metadata` adds SAEMetadata fields (context_size, dataset_path …).
    """
    steps = _resolve_steps(cfg, total_steps, batches)
    out = Path(out_dir) if out_dir is not None else None
    trainer = Trainer(cfg, d_in, steps)
    it: Iterator[torch.Tensor] = iter(batches)
    if resume:
        if out is None or not checkpoint_path(out).is_file():
            raise FileNotFoundError(f"nothing to resume: no {CHECKPOINT_DIR}/{CHECKPOINT_FILENAME} in {out}")
        trainer.load_state(torch.load(checkpoint_path(out), map_location="cpu", weights_only=True))
    else:
        it = _init_from_head(trainer, it)
    if out is None:
        _run_steps(trainer, it, steps, None, progress)
        return trainer.export(metadata)
    out.mkdir(parents=True, exist_ok=True)
    (out / TRAIN_CFG_FILENAME).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    with _open_log(out, trainer.step if resume else None) as log:
        try:
            _run_steps(trainer, it, steps, (out, log), progress)
        except KeyboardInterrupt:
            log.flush()
            trainer.save_checkpoint(out)  # Ctrl-C keeps the progress; `--resume` continues from here
            raise
    trainer.save_checkpoint(out)
    sae = trainer.export(metadata)
    sae.save(out, dtype=cfg.dtype)
    return sae


def _init_from_head(trainer: Trainer, it: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Initialise b_dec from the first batches (>= b_dec_init_tokens rows); they are trained on too."""
    cfg = trainer.cfg
    head = list(itertools.islice(it, max(1, math.ceil(cfg.b_dec_init_tokens / cfg.batch_size))))
    if not head:
        raise ValueError("no activation batches to train on")
    trainer.init_b_dec(torch.cat(head))
    return itertools.chain(head, it)


def _run_steps(
    trainer: Trainer,
    it: Iterator[torch.Tensor],
    steps: int,
    sink: tuple[Path, TextIO] | None,
    progress: bool,
) -> None:
    """Train until `steps` or the end of `it`; with `sink` = (out_dir, log), log and checkpoint."""
    every = trainer.cfg.checkpoint_every
    desc = f"train {trainer.cfg.architecture}"
    with tqdm(total=steps, initial=trainer.step, unit="step", desc=desc, disable=not progress) as bar:
        while trainer.step < steps and (x := next(it, None)) is not None:
            m = trainer.train_step(x)
            bar.update(1)
            bar.set_postfix(
                loss=f"{m['loss']:.4f}",
                ev=f"{m['explained_variance']:.3f}",
                l0=f"{m['l0']:.1f}",
                dead=f"{m['dead_fraction']:.3f}",
                refresh=False,
            )
            if sink is None:
                continue
            out, log = sink
            log.write(json.dumps(m) + "\n")
            if every and trainer.step % every == 0:
                log.flush()
                trainer.save_checkpoint(out)


def store_batches(
    store: ActivationStore, batch_size: int, *, seed: int = 0, start_step: int = 0
) -> Iterator[torch.Tensor]:
    """Endless shuffled (batch_size, d_in) float32 batches: a fresh permutation each epoch, its tail dropped
    (the order of `ActivationStore.batches`). The first `start_step` batches are skipped without being read,
    so a resumed run sees exactly the stream it would have seen."""
    per_epoch = store.n_tokens // batch_size
    if per_epoch == 0:
        raise ValueError(f"{store.folder}: {store.n_tokens} tokens is fewer than one batch of {batch_size}")
    rng = np.random.default_rng(seed)
    step = 0
    while True:
        perm = rng.permutation(store.n_tokens)
        for b in range(per_epoch):
            if step >= start_step:
                yield store.rows(perm[b * batch_size : (b + 1) * batch_size])
            step += 1


def train_from_store(
    acts_dir: str | Path,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
) -> SAE:
    """Train on an activation folder written by `collect` (total_tokens, else epochs × its tokens)."""
    store = ActivationStore(acts_dir)
    n_tokens = cfg.total_tokens if cfg.total_tokens is not None else int(store.n_tokens * cfg.epochs)
    steps = n_tokens // cfg.batch_size
    if steps == 0:
        raise TrainConfigError("batch_size", f"{cfg.batch_size} exceeds the {n_tokens} training tokens")
    start = 0
    if resume:
        done = checkpoint_step(out_dir)
        if done is None:
            raise FileNotFoundError(
                f"nothing to resume: no {CHECKPOINT_DIR}/{CHECKPOINT_FILENAME} in {out_dir}"
            )
        start = done
    collect_cfg = store.manifest.get("config", {})
    metadata = {
        "context_size": collect_cfg.get("context_size"),
        "exclude_special_tokens": True,  # collect drops special tokens and position 0
        "dataset_path": str(acts_dir),
    }
    batches = store_batches(store, cfg.batch_size, seed=cfg.seed, start_step=start)
    return train_sae(
        batches,
        cfg,
        store.d_in,
        progress=progress,
        total_steps=steps,
        out_dir=out_dir,
        resume=resume,
        metadata=metadata,
    )
