"""The trainer of a TopK or BatchTopK sparse autoencoder on residual activations, and its checkpoints.

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

The config is `sae_assets.train_config`, the building blocks `sae_assets.train_kernels`; the drivers that
feed batches, log and save are in `sae_assets.train`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sae_assets.hooks import hf_hook_point, saelens_hook_name
from sae_assets.sae import SAE, SAEConfig, SAEMetadata
from sae_assets.train_config import TrainConfig, TrainConfigError
from sae_assets.train_kernels import (
    PairDecode,
    PairEncode,
    batch_topk_pairs,
    geometric_median,
    lr_factor,
    remove_parallel_grad,
    topk_pairs,
    unit_rows,
)

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILENAME = "trainer.pt"
# Gao et al.: a latent is dead when it has not fired in 10M tokens. Short runs cap the window (see below).
DEFAULT_DEAD_TOKENS = 10_000_000
DEAD_WINDOW_RUN_FRACTION = 0.1  # default window is at most 10% of the run, so short runs still revive latents
# EMA factor of the BatchTopK threshold estimate: ~100-step memory, short enough to forget early training.
THRESHOLD_BETA = 0.99
# Fields that may change when resuming (the rest must match the checkpoint exactly).
_RESUME_MUTABLE = ("total_tokens", "epochs", "checkpoint_every", "device", "dtype")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
                rows, cols = topk_pairs(pre, self.cfg.k)
            else:
                rows, cols = batch_topk_pairs(pre, self.cfg.k)
        return rows, cols, pre

    def pair_acts(
        self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, pre: torch.Tensor
    ) -> torch.Tensor:
        """ReLU'd activations of the chosen pairs, with autograd to W_enc, b_enc and b_dec. (n_pairs,)"""
        sae_in = x - self.sae.b_dec  # (B, d_in)
        return torch.relu(PairEncode.apply(sae_in, self.sae.W_enc, self.sae.b_enc, rows, cols, pre))

    def sparse_decode(
        self, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, batch: int
    ) -> torch.Tensor:
        """Σ vals · W_dec[cols] per row, without b_dec. (batch, d_in)"""
        return PairDecode.apply(vals, self.sae.W_dec, rows, cols, batch)

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
            rows, cols = topk_pairs(masked, k_aux)
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
