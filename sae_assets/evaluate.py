"""Evaluate an SAE on held-out text: reconstruction quality, sparsity, and the language-model loss when
the SAE's reconstruction replaces the residual stream ("spliced") versus clean and zero-ablated runs.

Metrics use the positions the SAE is trained on (not special tokens, not position 0, where attention-sink
norms are outliers) that also have a next token, so reconstruction and next-token loss count the same
tokens. Splicing and zero-ablation replace the residual at those trained-on positions only (special tokens
and position 0 keep their clean residual, which the SAE never learned to reconstruct).

- explained_variance = 1 − Σ‖x − x̂‖² / Σ‖x − mean(x)‖²
- l0 = mean number of active latents per token; dead_fraction = share of latents that never fired;
  dense_fraction = share firing on more than 10% of tokens
- ce_loss_recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean): 1 means the reconstruction loses
  nothing the model needs, 0 means it is as bad as deleting the residual.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sae_assets.collect import keep_mask
from sae_assets.hooks import _hidden, _replace_hidden, resolve_module
from sae_assets.sae import SAE
from sae_assets.text import record_token_ids

# A latent firing on more than 10% of tokens is "dense" (the usual cut in SAE evaluations, e.g. SAEBench).
DENSE_FIRING_RATE = 0.1
METRIC_KEYS = (
    "explained_variance",
    "l0",
    "dead_fraction",
    "dense_fraction",
    "ce_loss_clean",
    "ce_loss_spliced",
    "ce_loss_zero_ablated",
    "ce_loss_recovered",
    "tokens",
)


# ---- pure metric helpers -------------------------------------------------------------------------
@dataclass
class ReconstructionStats:
    """Streaming sums for explained variance, L0 and firing rates over (n, d_in) / (n, d_sae) batches."""

    d_sae: int
    n: int = 0
    sum_x: torch.Tensor | None = None  # (d_in,) float64
    sum_sq_x: float = 0.0
    sum_sq_err: float = 0.0
    sum_l0: float = 0.0
    fire_counts: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def __post_init__(self) -> None:
        if self.fire_counts.numel() == 0:
            self.fire_counts = torch.zeros(self.d_sae, dtype=torch.long)

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:
        x64 = x.detach().double().cpu()
        err = x64 - x_hat.detach().double().cpu()
        active = f.detach().cpu() > 0  # (n, d_sae)
        self.sum_x = x64.sum(0) if self.sum_x is None else self.sum_x + x64.sum(0)
        self.sum_sq_x += float(x64.pow(2).sum())
        self.sum_sq_err += float(err.pow(2).sum())
        self.sum_l0 += float(active.sum())
        self.fire_counts += active.sum(0)
        self.n += x.shape[0]

    def result(self) -> dict[str, float]:
        if self.n == 0 or self.sum_x is None:
            nan = float("nan")
            return {"explained_variance": nan, "l0": nan, "dead_fraction": nan, "dense_fraction": nan}
        # Σ‖x − mean‖² = Σ‖x‖² − ‖Σx‖²/n
        total_var = self.sum_sq_x - float(self.sum_x.pow(2).sum()) / self.n
        ev = 1.0 - self.sum_sq_err / total_var if total_var > 0 else float("nan")
        rate = self.fire_counts.double() / self.n  # (d_sae,) firing rate per latent
        return {
            "explained_variance": ev,
            "l0": self.sum_l0 / self.n,
            "dead_fraction": float((self.fire_counts == 0).double().mean()),
            "dense_fraction": float((rate > DENSE_FIRING_RATE).double().mean()),
        }


def reconstruction_metrics(x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> dict[str, float]:
    """explained_variance, l0, dead_fraction, dense_fraction of one (n, d_in) / (n, d_sae) batch."""
    stats = ReconstructionStats(d_sae=f.shape[-1])
    stats.update(x, x_hat, f)
    return stats.result()


def ce_loss_recovered(clean: float, spliced: float, zero_ablated: float) -> float:
    """(zero − spliced) / (zero − clean); nan when zero-ablation does not change the loss."""
    gap = zero_ablated - clean
    return (zero_ablated - spliced) / gap if gap != 0 else float("nan")


# ---- model plumbing ------------------------------------------------------------------------------
@contextmanager
def replace_residual(
    model: nn.Module, point: str, fn: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Forward hook that replaces the output hidden state (B, T, d) at `point` with fn(hidden). Removed on
    exit, error or not."""
    module = resolve_module(model, point)

    def hook(_m: nn.Module, _inp: Any, out: Any) -> Any:
        return _replace_hidden(out, fn(_hidden(out)))

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def pack_eval_contexts(
    tokenizer: Any, records: Iterable[dict[str, Any]], context_size: int
) -> Iterator[list[int]]:
    """Records' token streams joined by EOS (as `collect` does) and cut into contexts; unlike training,
    the final partial context is kept so small eval files still yield tokens."""
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    buf: list[int] = []
    for rec in records:
        buf.extend(record_token_ids(tokenizer, rec))
        buf.extend(sep)
        while len(buf) >= context_size:
            yield buf[:context_size]
            buf = buf[context_size:]
    if len(buf) >= 2:
        yield buf


def _batches(contexts: Iterator[list[int]], batch_size: int) -> Iterator[list[list[int]]]:
    """Groups of equal-length contexts (only the last context can be shorter; it gets its own batch)."""
    batch: list[list[int]] = []
    for ctx in contexts:
        if batch and (len(batch) == batch_size or len(ctx) != len(batch[0])):
            yield batch
            batch = []
        batch.append(ctx)
    if batch:
        yield batch


def _ce_sum(logits: torch.Tensor, ids: torch.Tensor, score: torch.Tensor) -> float:
    """Summed next-token CE at positions `score` (B, T); `score[:, -1]` is False, so the roll never wraps."""
    targets = ids.roll(-1, dims=1)[score]  # (n,)
    return float(F.cross_entropy(logits[score].float(), targets, reduction="sum"))


def _sae_reconstruct(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, d_in) -> (x̂ (n, d_in), f (n, d_sae)) on the SAE's device and dtype."""
    xs = x.to(sae.W_enc.device)
    f = sae.encode(xs)
    return sae.decode(f, x_for_norm=xs), f


def evaluate_sae(
    model: nn.Module,
    tokenizer: Any,
    sae: SAE,
    records: Iterable[dict[str, Any]],
    hook_point: str,
    max_tokens: int,
    context_size: int = 256,
    batch_size: int = 8,
    *,
    progress: bool = False,
) -> dict[str, float]:
    """Reconstruction and spliced-CE metrics (keys in METRIC_KEYS) over about `max_tokens` scored tokens
    (whole batches are run, so `tokens` may exceed it slightly)."""
    hidden_size = getattr(getattr(model, "config", None), "hidden_size", sae.d_in)
    if hidden_size != sae.d_in:
        raise ValueError(f"SAE d_in={sae.d_in} does not match the model's hidden size {hidden_size}")
    device = next(model.parameters()).device
    special = sorted(set(tokenizer.all_special_ids))
    stats = ReconstructionStats(d_sae=sae.d_sae)
    ce = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    bar = tqdm(total=max_tokens, unit="tok", desc="eval", disable=not progress)
    contexts = pack_eval_contexts(tokenizer, records, context_size)
    with torch.inference_mode():
        for batch in _batches(contexts, batch_size):
            if stats.n >= max_tokens:
                break
            ids = torch.tensor(batch, dtype=torch.long, device=device)  # (B, T)
            replace = keep_mask(ids, special)  # (B, T): positions the SAE is trained on
            score = replace.clone()
            score[:, -1] = False  # the last position has no next token
            n = _eval_batch(model, sae, hook_point, ids, replace, score, stats, ce)
            bar.update(n)
    bar.close()
    return _finish(stats, ce)


def _eval_batch(
    model: nn.Module,
    sae: SAE,
    point: str,
    ids: torch.Tensor,
    replace: torch.Tensor,
    score: torch.Tensor,
    stats: ReconstructionStats,
    ce: dict[str, float],
) -> int:
    captured: dict[str, torch.Tensor] = {}

    def keep(h: torch.Tensor) -> torch.Tensor:
        captured["h"] = h
        return h

    with replace_residual(model, point, keep):
        logits = model(input_ids=ids, use_cache=False).logits  # (B, T, vocab)
    ce["clean"] += _ce_sum(logits, ids, score)
    h = captured["h"]  # (B, T, d_in)
    # Massive-activation positions stay clean in every pass, like special tokens (see keep_mask).
    outlier = ~keep_mask(ids, [], h) & replace
    replace &= ~outlier
    score &= ~outlier
    x = h[score].float()  # (n, d_in)
    x_hat, f = _sae_reconstruct(sae, x)
    stats.update(x, x_hat, f)

    def splice(h: torch.Tensor) -> torch.Tensor:
        out = h.clone()
        out[replace] = _sae_reconstruct(sae, h[replace].float())[0].to(device=h.device, dtype=h.dtype)
        return out

    def zero(h: torch.Tensor) -> torch.Tensor:
        return h.masked_fill(replace[..., None], 0.0)

    for name, fn in (("spliced", splice), ("zero", zero)):
        with replace_residual(model, point, fn):
            logits = model(input_ids=ids, use_cache=False).logits
        ce[name] += _ce_sum(logits, ids, score)
    return int(score.sum())


def _finish(stats: ReconstructionStats, ce: dict[str, float]) -> dict[str, float]:
    n = stats.n
    clean, spliced, zero = (ce[k] / n if n else float("nan") for k in ("clean", "spliced", "zero"))
    return {
        **stats.result(),
        "ce_loss_clean": clean,
        "ce_loss_spliced": spliced,
        "ce_loss_zero_ablated": zero,
        "ce_loss_recovered": ce_loss_recovered(clean, spliced, zero) if n else float("nan"),
        "tokens": n,
    }
