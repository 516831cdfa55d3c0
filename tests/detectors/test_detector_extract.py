"""Scope spans on the tiny tokenizer's chat template, and per-token feature extraction with early exit."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from detectors.errors import DetectorError
from detectors.extract import (
    iter_token_features,
    pooled_latents,
    pooled_resid,
    scope_span,
    scoped_positions,
    token_rows,
)
from sae_assets.hooks import run_to_hooks
from sae_assets.sae import SAE, SAEConfig, SAEMetadata
from sae_assets.text import chat_token_ids

ANSWER = "Paris is the capital of France."
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Write a haiku about the moon."},
        {"role": "assistant", "content": "The quick brown fox."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": ANSWER},
    ]
}


def test_completion_span_is_exactly_the_last_assistant_message(tiny_lm: Any) -> None:
    tok = tiny_lm.tokenizer
    ids, start, stop = scope_span(tok, CHAT, "completion")
    assert tok.decode(ids[start:stop]) == ANSWER
    assert ids[:start] == chat_token_ids(tok, CHAT["messages"][:-1], add_generation_prompt=True)
    assert ids[stop] == tok.convert_tokens_to_ids("<|im_end|>")  # the end-of-turn suffix is left out
    assert scope_span(tok, CHAT, "prompt")[1:] == (0, start)
    assert scope_span(tok, CHAT, "both")[1:] == (0, stop)


def test_prompt_only_and_text_records(tiny_lm: Any) -> None:
    tok = tiny_lm.tokenizer
    prompt = {"messages": CHAT["messages"][:2]}
    with pytest.raises(DetectorError, match="no completion"):
        scope_span(tok, prompt, "completion")
    ids, start, stop = scope_span(tok, prompt, "prompt")
    assert ids == chat_token_ids(tok, prompt["messages"], add_generation_prompt=True)
    assert (start, stop) == (0, len(ids))
    ids, start, stop = scope_span(tok, {"text": ANSWER}, "completion")
    assert (start, stop) == (0, len(ids)) and tok.decode(ids) == ANSWER


def test_scoped_positions_drop_special_tokens(tiny_lm: Any) -> None:
    tok = tiny_lm.tokenizer
    ids, pos = scoped_positions(tok, CHAT, "both")
    special = set(tok.all_special_ids)
    assert 0 not in pos and all(ids[p] not in special for p in pos)
    _, kept = scoped_positions(tok, CHAT, "both", drop_special=False)
    assert len(kept) > len(pos)


def _sae(d: int = 32) -> SAE:
    meta = SAEMetadata(hook_name="blocks.2.hook_resid_post", extra={"hf_hook_point": "model.layers.2"})
    torch.manual_seed(0)
    sae = SAE(SAEConfig(architecture="standard", d_in=d, d_sae=8, metadata=meta))
    with torch.no_grad():
        sae.W_enc.normal_(0, 1.0)
    return sae


def test_batched_extraction_matches_single_records(tiny_lm: Any) -> None:
    model, tok = tiny_lm.model, tiny_lm.tokenizer
    records = [CHAT, {"text": "Write a haiku about the moon and the sea."}, {"text": "The lazy dog."}]
    points = ["model.layers.1"]
    sae = _sae()
    batched = list(iter_token_features(model, tok, records, points, sae=sae, batch_size=3))
    single = list(iter_token_features(model, tok, records, points, sae=sae, latent_ids=[2, 5], batch_size=1))
    for rec, b, s in zip(records, batched, single, strict=True):
        _, pos = scoped_positions(tok, rec, "completion")
        assert b.n_tokens == len(pos) and b.latent_ids == list(range(8))
        assert torch.allclose(b.resid_at("model.layers.1"), s.resid_at("model.layers.1"), atol=1e-5)
        assert s.latents is not None and torch.allclose(b.latent_columns([2, 5]), s.latents, atol=1e-5)
    # The completion of the chat record, read directly.
    ids, pos = scoped_positions(tok, CHAT, "completion")
    device = next(model.parameters()).device  # cuda under FEATUREWATCH_TEST_DEVICE=cuda
    direct = run_to_hooks(model, points, input_ids=torch.tensor([ids], device=device))["model.layers.1"][
        0, pos
    ]
    direct = direct.float().cpu()
    assert torch.allclose(batched[0].resid["model.layers.1"], direct, atol=1e-5)
    assert pooled_resid(batched, points).shape == (3, 32)
    assert pooled_latents(batched).shape == (3, 8)
    assert token_rows(batched, points).shape == (sum(f.n_tokens for f in batched), 32)
