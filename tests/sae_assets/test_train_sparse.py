"""The sparse training step computes the same loss and gradients as the dense formulation."""

from __future__ import annotations

import pytest
import torch

from sae_assets.train_config import TrainConfig
from sae_assets.train_kernels import batch_topk_pairs, topk_pairs
from sae_assets.trainer import Trainer


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_pairs_match_dense_reconstruction_and_grads(arch: str) -> None:
    torch.manual_seed(0)
    cfg = TrainConfig(architecture=arch, d_sae=48, k=4, batch_size=32, total_tokens=320, device="cpu")
    tr = Trainer(cfg, d_in=16, total_steps=10)
    with torch.no_grad():
        tr.sae.b_dec.normal_(0, 0.1)
        tr.sae.b_enc.normal_(0, 0.1)
    x = torch.randn(32, 16)
    rows, cols, pre = tr.select(x)
    vals = tr.pair_acts(x, rows, cols, pre)
    sparse = tr.sparse_decode(rows, cols, vals, 32) + tr.sae.b_dec
    sparse.pow(2).sum().backward()
    got = {n: p.grad.clone() for n, p in tr.sae.named_parameters() if p.grad is not None}
    tr.sae.zero_grad(set_to_none=True)
    # Dense reference: the same (row, col) selection as a 0/1 mask over the full pre-activations.
    mask = torch.zeros(32, 48)
    mask[rows, cols] = 1.0
    dense_pre = tr.sae.hidden_pre(x)
    f = torch.relu(dense_pre) * mask
    dense = f @ tr.sae.W_dec + tr.sae.b_dec
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    dense.pow(2).sum().backward()
    for name, p in tr.sae.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name], p.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_batch_topk_pairs_pick_the_batch_largest() -> None:
    torch.manual_seed(1)
    pre = torch.randn(16, 64)
    rows, cols = batch_topk_pairs(pre, k=3)
    picked = pre[rows, cols]
    assert picked.numel() == 48 and bool((picked > 0).all())
    assert torch.equal(picked.sort(descending=True).values, pre.flatten().topk(48).values)
    rows_t, cols_t = topk_pairs(pre, k=3)
    assert torch.equal(pre[rows_t, cols_t].view(16, 3), pre.topk(3, dim=-1).values)
    assert torch.equal(torch.bincount(rows_t, minlength=16), torch.full((16,), 3))
