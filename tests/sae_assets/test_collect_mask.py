"""Which positions the SAE is trained on and scored at."""

from __future__ import annotations

import torch

from sae_assets.collect import MASSIVE_NORM_RATIO, keep_mask


def test_special_tokens_and_position_zero_are_left_out() -> None:
    ids = torch.tensor([[5, 6, 1, 7], [1, 8, 9, 2]])
    assert keep_mask(ids, [1, 2]).tolist() == [[False, True, False, True], [False, True, True, False]]


def test_massive_activation_positions_are_left_out() -> None:
    torch.manual_seed(0)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    h = torch.randn(1, 6, 16)
    h[0, 1] *= 3 * MASSIVE_NORM_RATIO  # an attention-sink style outlier at position 1
    h[0, 3] *= 2  # large but ordinary
    mask = keep_mask(ids, [], h)
    assert mask.tolist() == [[False, False, True, True, True, True]]
    assert keep_mask(ids, []).tolist() == [[False, True, True, True, True, True]]
