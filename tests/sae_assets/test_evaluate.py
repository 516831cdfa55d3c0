"""SAE evaluation: hand-computable metrics, spliced CE on a tiny Llama, and the collect → train → eval CLI."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from monitor.cli_sae import sae_app
from sae_assets.evaluate import (
    METRIC_KEYS,
    ReconstructionStats,
    ce_loss_recovered,
    evaluate_sae,
    pack_eval_contexts,
    reconstruction_metrics,
    replace_residual,
)
from sae_assets.sae import SAE, SAEConfig

D_MODEL = 32
POINT = "model.layers.1"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    """Random-init 4-layer Llama (d_model 32, vocab 128) and a whitespace WordLevel tokenizer over w3…w127."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=D_MODEL,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.5,  # large weights: confident logits, so zero-ablation moves the loss a lot
    )
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    return model, fast


def records(n: int, seed: int = 0) -> list[dict[str, str]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "text": " ".join(
                f"w{int(i)}" for i in torch.randint(3, 128, (int(torch.randint(5, 30, (1,))),), generator=gen)
            )
        }
        for _ in range(n)
    ]


def identity_sae(d: int = D_MODEL) -> SAE:
    """ReLU SAE with W_enc = [I, −I], W_dec = [I; −I]: relu(x) − relu(−x) = x, a perfect reconstruction."""
    sae = SAE(SAEConfig(architecture="standard", d_in=d, d_sae=2 * d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae


# ---- pure metrics ----------------------------------------------------------------------------------------
def test_reconstruction_metrics_hand_case() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])  # mean (.5, .5); Σ‖x − mean‖² = 2
    x_hat = x.clone()
    x_hat[2] = torch.tensor([1.0, 0.0])  # Σ‖x − x̂‖² = 1
    f = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [3.0, 0, 0], [0, 0, 0]])  # fires: latent 0 ×2, 1 ×1, 2 never
    m = reconstruction_metrics(x, x_hat, f)
    assert m["explained_variance"] == pytest.approx(0.5)
    assert m["l0"] == pytest.approx(3 / 4)
    assert m["dead_fraction"] == pytest.approx(1 / 3)
    assert m["dense_fraction"] == pytest.approx(2 / 3)  # latents 0 (50%) and 1 (25%) fire on >10%
    assert reconstruction_metrics(x, x.mean(0).expand_as(x), f)["explained_variance"] == pytest.approx(0.0)
    assert reconstruction_metrics(x, x, f)["explained_variance"] == pytest.approx(1.0)


def test_streaming_stats_equal_one_shot() -> None:
    x, x_hat, f = torch.randn(50, 4), torch.randn(50, 4), torch.relu(torch.randn(50, 6))
    stats = ReconstructionStats(d_sae=6)
    for sl in (slice(0, 17), slice(17, 50)):
        stats.update(x[sl], x_hat[sl], f[sl])
    one = reconstruction_metrics(x, x_hat, f)
    for key, value in stats.result().items():
        assert value == pytest.approx(one[key]), key


def test_ce_loss_recovered_formula() -> None:
    assert ce_loss_recovered(clean=2.0, spliced=2.5, zero_ablated=4.0) == pytest.approx(0.75)
    assert ce_loss_recovered(clean=2.0, spliced=2.0, zero_ablated=4.0) == 1.0
    assert ce_loss_recovered(clean=2.0, spliced=4.0, zero_ablated=4.0) == 0.0
    assert math.isnan(ce_loss_recovered(clean=2.0, spliced=2.0, zero_ablated=2.0))


def test_eval_contexts_keep_the_tail(tiny: tuple[Any, Any]) -> None:
    _, tok = tiny
    ctxs = list(pack_eval_contexts(tok, [{"text": "w3 w4 w5"}, {"text": "w6 w7"}], context_size=4))
    assert ctxs == [[3, 4, 5, 1], [6, 7, 1]]  # records joined by <eos>=1, tail kept


# ---- on a tiny model --------------------------------------------------------------------------------------
def test_perfect_sae_splices_to_clean_loss(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    chat = {"messages": [{"role": "user", "content": "w3 w4 w5"}, {"role": "assistant", "content": "w6 w7"}]}
    recs: list[dict[str, Any]] = [chat, *records(20)]
    m = evaluate_sae(model, tok, identity_sae(), recs, POINT, max_tokens=200, context_size=16, batch_size=4)
    assert set(m) == set(METRIC_KEYS)
    assert m["tokens"] >= 200
    assert m["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert m["ce_loss_spliced"] == pytest.approx(m["ce_loss_clean"], rel=1e-5)
    # A random model's loss has no "better" direction (zero-ablation may even help), only a gap.
    assert abs(m["ce_loss_zero_ablated"] - m["ce_loss_clean"]) > 0.1
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert m["l0"] == pytest.approx(D_MODEL)  # each coordinate lights exactly one of its ±latents
    assert m["dead_fraction"] == 0.0 and m["dense_fraction"] == 1.0
    assert not model.model.layers[1]._forward_hooks  # every hook removed


def test_zero_sae_splices_to_zero_ablation(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    zero = SAE(SAEConfig(architecture="standard", d_in=D_MODEL, d_sae=8))
    m = evaluate_sae(model, tok, zero, records(20), POINT, max_tokens=100, context_size=16)
    assert m["ce_loss_spliced"] == pytest.approx(m["ce_loss_zero_ablated"], rel=1e-6)
    assert m["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert m["l0"] == 0.0 and m["dead_fraction"] == 1.0
    assert m["explained_variance"] < 0  # x̂ = 0 is worse than predicting the mean


def test_replace_residual_removes_hook_on_error(tiny: tuple[Any, Any]) -> None:
    model, _ = tiny

    def boom(h: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), replace_residual(model, POINT, boom):
        model(input_ids=torch.tensor([[3, 4, 5]]), use_cache=False)
    assert not model.model.layers[1]._forward_hooks


def test_d_in_mismatch_is_a_clear_error(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    with pytest.raises(ValueError, match=r"d_in=8 .* hidden size 32"):
        evaluate_sae(model, tok, identity_sae(8), records(2), POINT, max_tokens=10)


# ---- CLI end to end -------------------------------------------------------------------------------
def test_cli_collect_train_info_eval(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = tiny
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records(120)))
    acts, sae_dir = tmp_path / "acts", tmp_path / "sae"
    runner = CliRunner()

    collect = ["collect", "--corpus", str(corpus), "--out", str(acts), "--hook", POINT, "--max-tokens", "600"]
    res = runner.invoke(
        sae_app, [*collect, "--model", str(model_dir), "--context-size", "32", "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads((acts / "source.json").read_text())["model_name"] == str(model_dir)

    train = ["train", "--acts", str(acts), "--out", str(sae_dir), "--architecture", "batchtopk"]
    opts = [
        "--d-sae",
        "64",
        "--k",
        "4",
        "--batch-size",
        "64",
        "--steps",
        "5",
        "--device",
        "cpu",
        "--no-progress",
    ]
    res = runner.invoke(sae_app, [*train, *opts, "--set", "warmup_steps=1", "--set", "b_dec_init_tokens=64"])
    assert res.exit_code == 0, res.output

    res = runner.invoke(sae_app, ["info", str(sae_dir), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["ok"] and report["config"]["architecture"] == "jumprelu"
    assert report["config"]["metadata"]["model_name"] == str(model_dir)

    evaluate = ["eval", str(sae_dir), "--data", str(corpus), "--max-tokens", "100", "--context-size", "32"]
    res = runner.invoke(sae_app, [*evaluate, "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)  # one JSON object; the model comes from the SAE's metadata
    assert set(result) == set(METRIC_KEYS) and result["tokens"] >= 100

    res = runner.invoke(sae_app, ["eval", str(sae_dir), "--data", str(tmp_path / "nope.jsonl")])
    assert res.exit_code == 2 and "nope.jsonl" in res.output
