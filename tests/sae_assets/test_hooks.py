"""Hooks on a tiny random Llama: capture, early exit, steering, removal."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from sae_assets.hooks import (
    EarlyExit,
    HookPointError,
    LatentWatch,
    Steering,
    capture,
    hf_hook_point,
    run_to_hooks,
    sae_hooks,
    saelens_hook_name,
)
from sae_assets.sae import SAE, SAEConfig


def _n_hooks(model: Any) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def _sae_for(model: Any, arch: str = "jumprelu", seed: int = 0) -> SAE:
    d = model.config.hidden_size
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(architecture=arch, d_in=d, d_sae=4 * d, k=8 if arch == "topk" else None))
    with torch.no_grad():
        sae.W_enc.normal_(0, 1 / d**0.5)
        sae.W_dec.copy_(sae.W_enc.T)
        if arch == "jumprelu":
            sae.threshold.fill_(0.05)
    return sae.to(model.device)


def test_name_mapping() -> None:
    assert saelens_hook_name("model.layers.15") == "blocks.15.hook_resid_post"
    assert hf_hook_point("blocks.15.hook_resid_post") == "model.layers.15"
    assert hf_hook_point("model.layers.3") == "model.layers.3"


def test_capture_shapes_and_removal(tiny_lm: Any) -> None:
    model = tiny_lm.model
    ids = torch.randint(0, 200, (2, 7), device=model.device)
    before = _n_hooks(model)
    with torch.no_grad(), capture(model, ["model.layers.1", "blocks.2.hook_resid_post"]) as cap:
        model(input_ids=ids)
        assert _n_hooks(model) == before + 2
    assert _n_hooks(model) == before
    assert cap["model.layers.1"].shape == (2, 7, 32)
    assert cap["model.layers.2"].shape == (2, 7, 32)


def test_hooks_removed_on_error(tiny_lm: Any) -> None:
    model = tiny_lm.model
    before = _n_hooks(model)
    with pytest.raises(RuntimeError, match="boom"), capture(model, ["model.layers.0"]):
        raise RuntimeError("boom")
    assert _n_hooks(model) == before


def test_unknown_hook_point(tiny_lm: Any) -> None:
    with pytest.raises(HookPointError, match=r"model.layers.0 … model.layers.3"):
        ids = torch.tensor([[1, 2]], device=tiny_lm.device)
        run_to_hooks(tiny_lm.model, ["model.layers.9"], input_ids=ids)


def test_early_exit_matches_full_forward_and_skips_later_layers(tiny_lm: Any) -> None:
    model = tiny_lm.model
    ids = torch.randint(0, 200, (3, 11), device=model.device)
    with torch.no_grad(), capture(model, ["model.layers.1", "model.layers.3"]) as cap:
        model(input_ids=ids)
        full = dict(cap.acts)
    later_ran: list[bool] = []
    h = model.model.layers[2].register_forward_hook(lambda *_: later_ran.append(True))
    try:
        early = run_to_hooks(model, ["model.layers.1"], input_ids=ids)
    finally:
        h.remove()
    assert not later_ran, "layers after the deepest hook must not run"
    assert torch.equal(early["model.layers.1"], full["model.layers.1"])
    assert _n_hooks(model) == 0


def test_early_exit_outside_runner_raises(tiny_lm: Any) -> None:
    with (
        pytest.raises(EarlyExit),
        torch.no_grad(),
        capture(tiny_lm.model, ["model.layers.0"], early_exit=True),
    ):
        tiny_lm.model(input_ids=torch.tensor([[1, 2, 3]], device=tiny_lm.device))


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_steering_without_clamps_is_bit_identical(tiny_lm: Any) -> None:
    model = tiny_lm.model
    sae = _sae_for(model)
    ids = torch.randint(0, 200, (2, 9), device=model.device)
    clean = _logits(model, ids)
    with sae_hooks(model, "model.layers.1", steering=Steering(sae)):
        steered = _logits(model, ids)
    assert torch.equal(clean, steered)


def test_steering_to_current_value_is_bit_identical(tiny_lm: Any) -> None:
    """Clamping a latent that is zero at every position to 0 changes nothing: error term preserved."""
    model = tiny_lm.model
    sae = _sae_for(model)
    ids = torch.randint(0, 200, (1, 9), device=model.device)
    with torch.no_grad(), capture(model, ["model.layers.1"]) as cap:
        model(input_ids=ids)
    f = sae.encode(cap["model.layers.1"])[0]  # (T, d_sae)
    silent = int((f.abs().sum(0) == 0).nonzero()[0])
    st = Steering(sae)
    st.set_all(1, {silent: 0.0})
    clean = _logits(model, ids)
    with sae_hooks(model, "model.layers.1", steering=st):
        steered = _logits(model, ids)
    assert torch.equal(clean, steered)


def test_steering_changes_output_and_watch_sees_clamp(tiny_lm: Any) -> None:
    model = tiny_lm.model
    sae = _sae_for(model)
    ids = torch.randint(0, 200, (1, 6), device=model.device)
    st = Steering(sae)
    st.set_all(1, {5: 8.0})
    watch = LatentWatch(sae, [5, 6])
    clean = _logits(model, ids)
    with sae_hooks(model, "model.layers.1", steering=st, watch=watch):
        steered = _logits(model, ids)
    assert not torch.allclose(clean, steered)
    assert watch.latest is not None and watch.latest.shape == (1, 6, 2)
    # jumprelu with unit-ish decoder: the clamped latent reads back near its clamp value
    assert float(watch.latest[0, :, 0].min()) > 4.0
    assert _n_hooks(model) == 0
