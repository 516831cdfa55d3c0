"""The numbers behind each latent's dashboard (see `sae_assets.dashboards` for what is stored).

Streaming statistics over token contexts run through the model and the SAE: firing counts, activation
sums/maxima and each latent's top examples with their token windows. Then the weight-only parts: the
direct-path logit effect of each decoder row through the unembedding, and each row's nearest neighbours by
cosine.
`sae_assets.dashboards_build` turns them into per-latent records.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from sae_assets.collect import MASSIVE_NORM_RATIO, keep_mask
from sae_assets.hooks import run_to_hooks
from sae_assets.sae import SAE

MASSIVE_RATIO = MASSIVE_NORM_RATIO  # residual-norm outliers (attention sinks) are not scored; see keep_mask
ENCODE_BUDGET = 1 << 23  # floats per SAE-encode chunk (32 MB fp32): bounds (contexts, T, d_sae) memory
_ROW_CHUNK = 512  # latents per logit-effect / neighbour matmul chunk


@dataclass(frozen=True)
class DashboardConfig:
    max_tokens: int
    context_size: int = 128
    batch_size: int = 8
    top_k_examples: int = 8
    window: tuple[int, int] = (-12, 4)  # token offsets around the peak, both ends inclusive
    n_promoted: int = 10
    n_neighbours: int = 8

    def __post_init__(self) -> None:
        lo, hi = self.window
        if lo > 0 or hi < 0:
            raise ValueError(f"window {self.window} must contain offset 0 (lo <= 0 <= hi)")
        if min(self.max_tokens, self.context_size, self.batch_size, self.top_k_examples) <= 0:
            raise ValueError("max_tokens, context_size, batch_size and top_k_examples must be positive")


# ---- streaming statistics -------------------------------------------------------------------------
class Accumulator:
    """Per-latent firing counts, activation sums/maxima and a (d_sae, k) top-k buffer of examples.

    Examples are ranked by each context's peak activation, so a latent's top examples come from k distinct
    contexts instead of k neighbouring tokens of one context.
    """

    def __init__(self, d_sae: int, k: int, window: tuple[int, int], device: torch.device) -> None:
        self.offsets = torch.arange(window[0], window[1] + 1, device=device)  # (W,)
        w = len(self.offsets)
        self.n_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.act_max = torch.zeros(d_sae, device=device)
        self.val = torch.zeros(d_sae, k, device=device)  # (d_sae, k), sorted descending
        self.ctx = torch.full((d_sae, k), -1, dtype=torch.long, device=device)
        self.pos = torch.zeros(d_sae, k, dtype=torch.long, device=device)
        self.win_act = torch.zeros(d_sae, k, w, device=device)
        self.win_ids = torch.full((d_sae, k, w), -1, dtype=torch.long, device=device)

    def add(self, f: Tensor, ids: Tensor, ctx0: int) -> None:
        """f: (c, T, d_sae) activations, zero where not scored; ids: (c, T); ctx0: global index of row 0."""
        c, t, d_sae = f.shape
        self.n_fired += (f > 0).sum((0, 1))
        self.act_sum += f.clamp_min(0).sum((0, 1)).double()
        self.act_max = torch.maximum(self.act_max, f.amax((0, 1)))
        seq_max, seq_pos = f.max(dim=1)  # (c, d_sae)
        pos = seq_pos[:, :, None] + self.offsets  # (c, d_sae, W)
        valid = (pos >= 0) & (pos < t)
        pos_c = pos.clamp(0, t - 1)
        win_act = f.gather(1, pos_c.transpose(1, 2)).transpose(1, 2) * valid  # (c, d_sae, W)
        win_ids = ids[:, None, :].expand(c, d_sae, t).gather(2, pos_c)  # (c, d_sae, W)
        win_ids = win_ids.masked_fill(~valid, -1)
        cand_ctx = (torch.arange(c, device=f.device) + ctx0)[None, :].expand(d_sae, c)  # (d_sae, c)
        self._merge(seq_max.T, cand_ctx, seq_pos.T, win_act.transpose(0, 1), win_ids.transpose(0, 1))

    def _merge(self, val: Tensor, ctx: Tensor, pos: Tensor, win_act: Tensor, win_ids: Tensor) -> None:
        """Candidates are (d_sae, c) / (d_sae, c, W); keeps the k best of buffer ∪ candidates per latent."""
        all_val = torch.cat([self.val, val], dim=1)  # (d_sae, k + c)
        self.val, keep = all_val.topk(self.val.shape[1], dim=1)  # (d_sae, k)
        self.ctx = torch.cat([self.ctx, ctx], dim=1).gather(1, keep)
        self.pos = torch.cat([self.pos, pos], dim=1).gather(1, keep)
        keep_w = keep[:, :, None].expand(-1, -1, self.win_act.shape[2])  # (d_sae, k, W)
        self.win_act = torch.cat([self.win_act, win_act], dim=1).gather(1, keep_w)
        self.win_ids = torch.cat([self.win_ids, win_ids], dim=1).gather(1, keep_w)


def _batched(items: Iterable[list[int]], n: int) -> Iterator[list[list[int]]]:
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch


def special_ids(tokenizer: Any | None) -> list[int]:
    return sorted(set(getattr(tokenizer, "all_special_ids", None) or []))


def scan(
    model: Any,
    sae: SAE,
    contexts: Iterable[list[int]],
    hook_point: str,
    cfg: DashboardConfig,
    special: Sequence[int],
    progress: bool,
) -> tuple[Accumulator, int, int]:
    """Runs contexts until `cfg.max_tokens` tokens are scored; returns (stats, tokens scored, contexts)."""
    device = sae.W_enc.device
    acc = Accumulator(sae.d_sae, cfg.top_k_examples, cfg.window, device)
    model_device = next(model.parameters()).device
    scored, n_ctx = 0, 0
    bar = tqdm(total=cfg.max_tokens, unit="tok", desc="dashboards", disable=not progress)
    for batch in _batched(contexts, cfg.batch_size):
        if len({len(c) for c in batch}) != 1:
            raise ValueError("contexts in a batch must all have the same length")
        ids = torch.tensor(batch, dtype=torch.long, device=model_device)  # (B, T)
        h = run_to_hooks(model, [hook_point], input_ids=ids)[hook_point].to(device)  # (B, T, d_in)
        ids, mask = ids.to(device), keep_mask(ids, special, h, MASSIVE_RATIO).to(device)
        per_chunk = max(1, ENCODE_BUDGET // (ids.shape[1] * sae.d_sae))
        with torch.inference_mode():
            for s in range(0, len(batch), per_chunk):
                rows = slice(s, s + per_chunk)
                f = sae.encode(h[rows]).float() * mask[rows, :, None]  # (c, T, d_sae)
                acc.add(f, ids[rows], n_ctx + s)
        n = int(mask.sum())
        scored += n
        n_ctx += len(batch)
        bar.update(n)
        if scored >= cfg.max_tokens:
            break
    bar.close()
    return acc, scored, n_ctx


# ---- logit effects and neighbours ---------------------------------------------------------------
@dataclass(frozen=True)
class LogitEffects:
    """Top tokens per latent through W_dec[i] · diag(g) · W_Uᵀ; each tensor is (d_sae, n)."""

    promoted_ids: Tensor
    promoted: Tensor
    suppressed_ids: Tensor
    suppressed: Tensor


def final_norm_weight(model: Any) -> Tensor | None:
    """The final norm's elementwise weight (Llama: model.model.norm.weight), if the model has one we know."""
    for path in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm"):
        try:
            weight = getattr(model.get_submodule(path), "weight", None)
        except AttributeError:
            continue
        if isinstance(weight, Tensor):
            return weight
    return None


def logit_effects(
    model: Any, sae: SAE, n: int, *, vocab_size: int | None = None, progress: bool = False
) -> LogitEffects | None:
    """Direct-path logit effect of each decoder row. The final norm's weight is applied, its division by the
    residual RMS is not (it depends on the token), so values are relative, not real logit changes.
    None when the model has no output embedding of the SAE's width."""
    emb = model.get_output_embeddings()
    w_u = getattr(emb, "weight", None)
    if w_u is None or w_u.shape[1] != sae.d_in or n <= 0:
        return None
    w_u = w_u[:vocab_size] if vocab_size else w_u  # (vocab, d_in); padded vocab rows are not real tokens
    n = min(n, w_u.shape[0])
    g = final_norm_weight(model)
    with torch.inference_mode():
        dirs = sae.W_dec.float() * (g.float().to(sae.W_dec.device) if g is not None else 1.0)  # (d_sae, d_in)
        out: list[list[Tensor]] = [[], [], [], []]
        chunks = range(0, sae.d_sae, _ROW_CHUNK)
        for s in tqdm(chunks, desc="logit effects", unit="chunk", disable=not progress):
            logits = (dirs[s : s + _ROW_CHUNK].to(w_u.device, w_u.dtype) @ w_u.T).float().cpu()  # (c, vocab)
            top, bottom = logits.topk(n, dim=1), (-logits).topk(n, dim=1)
            for buf, t in zip(out, (top.indices, top.values, bottom.indices, -bottom.values), strict=True):
                buf.append(t)
    return LogitEffects(*(torch.cat(buf) for buf in out))


def decoder_neighbours(sae: SAE, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-n cosine neighbours of each decoder row, self excluded: (ids int32, cos float16), (d_sae, n)."""
    n = min(n, sae.d_sae - 1)
    with torch.inference_mode():
        w = torch.nn.functional.normalize(sae.W_dec.float(), dim=1)  # (d_sae, d_in)
        ids, cos = [], []
        for s in range(0, sae.d_sae, _ROW_CHUNK):
            sims = w[s : s + _ROW_CHUNK] @ w.T  # (c, d_sae)
            rows = torch.arange(sims.shape[0], device=sims.device)
            sims[rows, rows + s] = -torch.inf
            top = sims.topk(n, dim=1)
            ids.append(top.indices.cpu())
            cos.append(top.values.cpu())
    return torch.cat(ids).numpy().astype(np.int32), torch.cat(cos).numpy().astype(np.float16)
