"""Token-by-token generation on the tiny model: parity with transformers, batching, stops, monitoring."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from monitor.generate import (
    Generator,
    PromptFeatures,
    SamplingParams,
    SequenceResult,
    TokenEvent,
    generate_text,
)
from sae_assets.hooks import Steering
from sae_assets.sae import SAE, SAEConfig

PROMPTS = ["Write a haiku about the moon", "Paris is the capital of", "def add(a, b):"]


@pytest.fixture(scope="module")
def sae(tiny_lm: Any) -> SAE:
    torch.manual_seed(3)
    d = tiny_lm.hidden_size
    s = SAE(SAEConfig(architecture="standard", d_in=d, d_sae=64))
    with torch.no_grad():
        s.W_enc.normal_(0, 1 / d**0.5)
        s.W_dec.copy_(s.W_enc.T)
        s.b_enc.fill_(-0.05)
    return s.to(tiny_lm.device)


def _ids(lm: Any, text: str) -> list[int]:
    return lm.chat_ids([{"role": "user", "content": text}])


def _hf_greedy(lm: Any, ids: list[int], n: int) -> list[int]:
    out = lm.model.generate(
        torch.tensor([ids], device=lm.device),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=lm.device),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()


def test_greedy_matches_transformers_generate(tiny_lm: Any) -> None:
    gen = Generator(tiny_lm.model, tiny_lm.tokenizer)
    gen.eos_ids = set()  # random weights: compare the raw token stream without EOS cut-offs
    for text in PROMPTS:
        ids = _ids(tiny_lm, text)
        res = generate_text(gen, ids, SamplingParams(max_tokens=12))
        assert res.token_ids == _hf_greedy(tiny_lm, ids, 12)
        assert res.finish_reason == "length"


def test_batched_left_padding_matches_single(tiny_lm: Any) -> None:
    gen = Generator(tiny_lm.model, tiny_lm.tokenizer)
    gen.eos_ids = set()
    prompts = [_ids(tiny_lm, t) for t in PROMPTS]
    assert len({len(p) for p in prompts}) > 1, "prompts of different lengths exercise the padding"
    singles = [generate_text(gen, p, SamplingParams(max_tokens=10)).token_ids for p in prompts]
    results: list[SequenceResult] = []
    list(gen.stream(prompts, SamplingParams(max_tokens=10), results=results))
    assert [r.token_ids for r in results] == singles


def test_per_sequence_max_tokens_and_sampling_seed(tiny_lm: Any) -> None:
    gen = Generator(tiny_lm.model, tiny_lm.tokenizer)
    gen.eos_ids = set()
    prompts = [_ids(tiny_lm, t) for t in PROMPTS[:2]]
    params = [SamplingParams(max_tokens=3), SamplingParams(max_tokens=7, temperature=1.0, top_p=0.9, seed=5)]
    r1: list[SequenceResult] = []
    r2: list[SequenceResult] = []
    list(gen.stream(prompts, params, results=r1))
    list(gen.stream(prompts, params, results=r2))
    assert [len(r.token_ids) for r in r1] == [3, 7]
    assert r1[1].token_ids == r2[1].token_ids, "same seed, same sample"


def test_stop_string_truncates(tiny_lm: Any) -> None:
    gen = Generator(tiny_lm.model, tiny_lm.tokenizer)
    gen.eos_ids = set()
    ids = _ids(tiny_lm, PROMPTS[0])
    full = generate_text(gen, ids, SamplingParams(max_tokens=15)).text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop
    cut = generate_text(gen, ids, SamplingParams(max_tokens=15, stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]


def test_eos_ends_with_stop(tiny_lm: Any) -> None:
    gen = Generator(tiny_lm.model, tiny_lm.tokenizer)
    ids = _ids(tiny_lm, PROMPTS[1])
    first = generate_text(gen, ids, SamplingParams(max_tokens=1))
    gen.eos_ids = {first.token_ids[0]}  # make the first greedy token the EOS
    res = generate_text(gen, ids, SamplingParams(max_tokens=5))
    assert res.finish_reason == "stop" and res.token_ids == []


def test_watched_latents_per_token_and_stop_callback(tiny_lm: Any, sae: SAE) -> None:
    gen = Generator(tiny_lm.model, tiny_lm.tokenizer, sae, "model.layers.2")
    gen.eos_ids = set()
    ids = _ids(tiny_lm, PROMPTS[0])
    events: list[TokenEvent] = list(gen.stream([ids], SamplingParams(max_tokens=8), watch=[1, 2, 3]))
    assert len(events) == 8 and all(ev.latents.shape == (3,) for ev in events)
    # The monitor sees each token's activations before it is emitted: stop on the 4th token.
    emitted: list[int] = []
    results: list[SequenceResult] = []

    def on_token(ev: TokenEvent) -> str:
        return "stop" if ev.index == 3 else "continue"

    for ev in gen.stream(
        [ids], SamplingParams(max_tokens=8), watch=[1, 2, 3], on_token=on_token, results=results
    ):
        emitted.append(ev.token_id)
    assert emitted == [ev.token_id for ev in events[:3]]
    assert results[0].finish_reason == "content_filter"
    assert results[0].token_ids == emitted


def test_watched_latents_equal_full_encode_of_token(tiny_lm: Any, sae: SAE) -> None:
    """Latents yielded for a token equal the SAE encode of that token's residual in a plain forward."""
    from sae_assets.hooks import capture

    gen = Generator(tiny_lm.model, tiny_lm.tokenizer, sae, "model.layers.2")
    gen.eos_ids = set()
    ids = _ids(tiny_lm, PROMPTS[2])
    events = list(gen.stream([ids], SamplingParams(max_tokens=5), watch=list(range(64))))
    seq = torch.tensor([ids + [ev.token_id for ev in events]], device=tiny_lm.device)
    with torch.no_grad(), capture(tiny_lm.model, ["model.layers.2"]) as cap:
        tiny_lm.model(input_ids=seq)
    ref = sae.encode(cap["model.layers.2"][0, len(ids) :])  # (5, d_sae)
    got = torch.stack([ev.latents for ev in events])
    torch.testing.assert_close(got, ref.cpu(), atol=1e-4, rtol=1e-4)  # events carry CPU copies


def test_watch_all_carries_every_latent_of_each_token(tiny_lm: Any, sae: SAE) -> None:
    """watch_all (what a probe's evidence reads): each token event carries all d_sae latents of its own
    residual, and the watched ones are their columns."""
    from sae_assets.hooks import capture

    gen = Generator(tiny_lm.model, tiny_lm.tokenizer, sae, "model.layers.2")
    gen.eos_ids = set()
    ids = _ids(tiny_lm, PROMPTS[1])
    events = list(gen.stream([ids], SamplingParams(max_tokens=4), watch=[5, 2], watch_all=True))
    seq = torch.tensor([ids + [ev.token_id for ev in events]], device=tiny_lm.device)
    with torch.no_grad(), capture(tiny_lm.model, ["model.layers.2"]) as cap:
        tiny_lm.model(input_ids=seq)
    ref = sae.encode(cap["model.layers.2"][0, len(ids) :]).cpu()  # (4, d_sae)
    full = torch.stack([ev.full_latents for ev in events if ev.full_latents is not None])
    assert full.shape == ref.shape
    torch.testing.assert_close(full, ref, atol=1e-4, rtol=1e-4)
    watched = torch.stack([ev.latents for ev in events])
    torch.testing.assert_close(watched, ref[:, [5, 2]], atol=1e-4, rtol=1e-4)


def test_prompt_side_stop(tiny_lm: Any, sae: SAE) -> None:
    gen = Generator(tiny_lm.model, tiny_lm.tokenizer, sae, "model.layers.2")
    ids = [_ids(tiny_lm, t) for t in PROMPTS[:2]]
    seen: dict[int, tuple[tuple[int, ...], tuple[int, ...], list[int]]] = {}

    def on_prompt(row: int, feats: PromptFeatures) -> str:
        seen[row] = (tuple(feats.latents.shape), tuple(feats.resid["model.layers.1"].shape), feats.token_ids)
        return "stop" if row == 0 else "continue"

    results: list[SequenceResult] = []
    gen.eos_ids = set()
    list(
        gen.stream(
            ids,
            SamplingParams(max_tokens=4),
            watch=[0, 1],
            capture_points=["model.layers.1"],
            on_prompt=on_prompt,
            results=results,
        )
    )
    for row in (0, 1):  # each row sees its own tokens only, not the left padding
        assert seen[row] == ((len(ids[row]), 2), (len(ids[row]), 32), ids[row])
    assert results[0].finish_reason == "content_filter" and results[0].token_ids == []
    assert len(results[1].token_ids) == 4


def test_steering_changes_generation(tiny_lm: Any, sae: SAE) -> None:
    gen = Generator(tiny_lm.model, tiny_lm.tokenizer, sae, "model.layers.2")
    gen.eos_ids = set()
    ids = _ids(tiny_lm, PROMPTS[0])
    base = generate_text(gen, ids, SamplingParams(max_tokens=10))
    st = Steering(sae)
    st.set_all(1, {7: 40.0})
    steered = generate_text(gen, ids, SamplingParams(max_tokens=10), steering=st)
    assert steered.token_ids != base.token_ids


def test_bad_params() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_captured_residuals_match_a_teacher_forced_pass(tiny_lm: Any, sae: SAE) -> None:
    """Per-token residuals from the KV-cached loop equal one full forward over prompt + completion."""
    from sae_assets.hooks import run_to_hooks

    gen = Generator(tiny_lm.model, tiny_lm.tokenizer, sae, "model.layers.2")
    gen.eos_ids = set()
    ids = [_ids(tiny_lm, PROMPTS[0]), _ids(tiny_lm, PROMPTS[1])]  # different lengths: left padding
    events = list(gen.stream(ids, SamplingParams(max_tokens=5), capture_points=["model.layers.1"]))
    for row in (0, 1):
        mine = [e for e in events if e.row == row]
        full = ids[row] + [e.token_id for e in mine]
        seq = torch.tensor([full], device=tiny_lm.device)
        ref = run_to_hooks(tiny_lm.model, ["model.layers.1"], input_ids=seq)
        ref_rows = ref["model.layers.1"][0, len(ids[row]) : len(full)]  # the positions that read each token
        got = torch.stack([e.resid["model.layers.1"] for e in mine])
        torch.testing.assert_close(got, ref_rows.float().cpu(), atol=1e-4, rtol=1e-4)
