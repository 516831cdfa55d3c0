"""Building blocks of SAE training (`sae_assets.trainer`): TopK / BatchTopK activations, the sparse
(token, latent) pair kernels the training step runs on, unit-norm decoder rows, the geometric median that
initialises b_dec, and the lr schedule.
"""

from __future__ import annotations

from typing import Any

import torch


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


class PairEncode(torch.autograd.Function):
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


class PairDecode(torch.autograd.Function):
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


def topk_pairs(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of each row's k largest pre-activations (ReLU later drops the non-positive ones)."""
    top = pre.topk(k, dim=-1)
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
    return rows, top.indices.flatten()


def batch_topk_pairs(pre: torch.Tensor, k: int, cap: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
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
