"""Which SAE latents drove a residual probe's score: the probe direction read through the SAE decoder.

A residual probe's logit at token t is z_t = w̃ · x_t + c, where w̃ = W / std is its weight block at the
SAE's hook point (the other blocks and the mean and bias fold into c). The SAE writes that residual as
x_t = g_t · (a_t @ W_dec + b_dec) + e_t (g_t = 1 unless the SAE normalises its input per token; e_t is
the reconstruction error), so

    z_t = Σ_i a_ti · g_t · u_i + (terms no latent explains),     u = W_dec @ w̃   (d_sae,)

u_i is latent i's push on the probe's logit per unit of activation. A latent's contribution to a message
is Σ_t ω_t · a_ti · g_t · u_i, with ω the token weights of the detector's aggregation (`token_weights`):
exact for the logit of a `mix` (and of a mean-pooled fit, which is linear in the pooled residual), a
first-order reading for the others, which aggregate probabilities. Units: logits.

Why this and not "the most active latents": a probe's direction is not any one latent, and the most
active latents of a text (punctuation, formatting) are rarely what it reads. `docs/benchmarks.md`
("Probe attribution", session 20) measures how much of the probe's logit the latents explain.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from detectors.aggregate import Aggregation
from sae_assets.sae import SAE


def decoder_attribution(sae: SAE, w_tilde: Tensor) -> Tensor:
    """u = W_dec @ w̃: (d_sae,) logit per unit activation of each latent (float32, on the SAE's device)."""
    if w_tilde.shape != (sae.d_in,):
        got = tuple(w_tilde.shape)
        raise ValueError(f"probe weights at the SAE's hook point must be ({sae.d_in},), got {got}")
    return (sae.W_dec.float() @ w_tilde.float().to(sae.W_dec.device)).detach()  # (d_sae,)


def token_weights(scores: Tensor, agg: Aggregation) -> Tensor:
    """(T,) float64 weights summing to 1: how much each token's score counts in the message value."""
    s = scores.detach().double().flatten().cpu()
    n = s.numel()
    w = torch.zeros(n, dtype=torch.float64)
    if n == 0:
        return w
    kind = agg.kind
    if kind == "mean":
        w[:] = 1.0 / n
    elif kind == "max":
        w = _one_hot(s)
    elif kind in ("topk_mean", "last_mean"):
        assert agg.k is not None
        k = min(agg.k, n)
        idx = s.topk(k).indices if kind == "topk_mean" else torch.arange(n - k, n)
        w[idx] = 1.0 / k
    elif kind == "mix":
        assert agg.k is not None and agg.alpha is not None
        k = min(agg.k, n)
        w[:] = agg.alpha / n
        w[n - k :] += (1.0 - agg.alpha) / k
    elif kind == "ema":
        assert agg.window is not None
        w = _ema_weights(s, agg.window)
    elif kind == "count_over":
        assert agg.threshold is not None
        over = s >= agg.threshold
        w = over.double() / int(over.sum()) if bool(over.any()) else _one_hot(s)
    else:  # sustained: the best window of n consecutive tokens (all tokens while T < n)
        assert agg.n is not None
        if n < agg.n:
            w[:] = 1.0 / n
        else:
            mins = s.unfold(0, agg.n, 1).min(dim=1).values  # (T − n + 1,)
            start = int(mins.argmax())
            w[start : start + agg.n] = 1.0 / agg.n
    return w


def _one_hot(s: Tensor) -> Tensor:
    w = torch.zeros_like(s)
    w[int(s.argmax())] = 1.0
    return w


def _ema_weights(s: Tensor, window: int) -> Tensor:
    """The EMA's value at its peak token t* is Σ_{t≤t*} α(1−α)^{t*−t} s_t: those weights, normalised."""
    alpha = 2.0 / (window + 1)
    e = torch.zeros_like(s)
    prev = 0.0
    for t in range(s.numel()):
        prev = alpha * float(s[t]) + (1.0 - alpha) * prev
        e[t] = prev
    peak = int(e.argmax())
    w = torch.zeros_like(s)
    w[: peak + 1] = alpha * (1.0 - alpha) ** torch.arange(peak, -1, -1, dtype=torch.float64)
    return w / w.sum()


def top_contributions(
    latents: Tensor, latent_ids: list[int], u_cols: Tensor, gain: Tensor, weights: Tensor, k: int
) -> list[dict[str, Any]]:
    """The k latents with the largest positive weighted contribution, strongest first.

    latents (T, n) activations of `latent_ids`; u_cols (n,) their logit per unit activation; gain (T,) the
    decoder's per-token factor g_t; weights (T,) token weights. Each item: latent_id, activation and
    token_index at the token where its weighted push was largest, contribution (its weighted logit share).
    """
    if k <= 0 or latents.numel() == 0:
        return []
    dev = latents.device
    per_token = latents.float() * u_cols.float().to(dev) * gain.float().to(dev).reshape(-1, 1)  # (T, n)
    weighted = weights.to(dev, torch.float32).reshape(-1, 1) * per_token  # (T, n)
    total = weighted.sum(dim=0)  # (n,)
    where = weighted.argmax(dim=0)  # per latent: the token where its push counted most
    out: list[dict[str, Any]] = []
    for j in total.topk(min(k, total.numel())).indices.tolist():
        if float(total[j]) <= 0.0:
            break
        t = int(where[j])
        out.append(
            {
                "latent_id": int(latent_ids[j]),
                "label": "",
                "activation": float(latents[t, j]),
                "contribution": float(total[j]),
                "token_index": t,
            }
        )
    return out
