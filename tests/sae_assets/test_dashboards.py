"""Feature dashboards on a tiny random Llama with a planted latent (fires only on token 'w74')."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

from monitor.cli_features import PEAK_CLOSE, PEAK_OPEN, register
from sae_assets import dashboards_search, dashboards_stats
from sae_assets.dashboards import Dashboards, DashboardsError, write_label
from sae_assets.dashboards_build import build_dashboards
from sae_assets.dashboards_search import search_labels, top_latents_for_text
from sae_assets.sae import SAE, SAEConfig, SAEMetadata

POINT = "model.layers.1"


@pytest.fixture(autouse=True, scope="module")
def _no_norm_outlier_filter() -> Iterator[None]:
    """The planted token is deliberately a residual-norm outlier in this tiny model (its embedding gets a
    10·u boost); the massive-activation filter would drop it. That filter is tested in test_collect_mask."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dashboards_stats, "MASSIVE_RATIO", float("inf"))  # read by the build's scan
        mp.setattr(dashboards_search, "MASSIVE_RATIO", float("inf"))  # read by top_latents_for_text
        yield


PLANT_TOKEN = 77  # "w74": words are offset by the 3 special tokens
PROMOTED_TOKEN = 99  # "w96"
PLANTED, COPY_SRC, COPY_DST, DEAD = 7, 10, 11, 20
T, N_CTX, K = 24, 10, 4
# (context, position) of the planted token; (0, 0) is never scored, (3, 2) and (9, 23) clip the window.
PLANTS = [(0, 0), (1, 5), (1, 15), (3, 2), (6, 20), (9, 23)]
SPECIAL_AT = (2, 10)  # an EOS inside a context: not scored


def _tokenizer() -> PreTrainedTokenizerFast:
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(125)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(cfg).eval()
    u = torch.nn.functional.normalize(torch.randn(32), dim=0)
    with torch.no_grad():
        # Token 77's residual gets a big component along u that no other token has.
        model.model.embed_tokens.weight[PLANT_TOKEN] += 10 * u
        model.lm_head.weight[PROMOTED_TOKEN] *= 10
    sae = SAE(
        SAEConfig(
            "standard",
            d_in=32,
            d_sae=64,
            metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post", extra={"hf_hook_point": POINT}),
        )
    )
    with torch.no_grad():
        w_enc = torch.randn(32, 64) * 0.3
        w_enc -= u[:, None] * (u @ w_enc)  # other latents are blind to u, so only PLANTED peaks on token 77
        w_enc[:, PLANTED] = u
        sae.W_enc.copy_(w_enc)
        sae.b_enc[PLANTED] = -5.0
        sae.b_enc[DEAD] = -100.0
        w_dec = torch.nn.functional.normalize(torch.randn(64, 32), dim=1)
        w_dec[PLANTED] = torch.nn.functional.normalize(model.lm_head.weight[PROMOTED_TOKEN], dim=0)
        w_dec[COPY_DST] = w_dec[COPY_SRC]
        sae.W_dec.copy_(w_dec)
    gen = torch.Generator().manual_seed(1)
    ctxs = torch.randint(3, 128, (N_CTX, T), generator=gen)
    ctxs[ctxs == PLANT_TOKEN] = 3
    for c, p in PLANTS:
        ctxs[c, p] = PLANT_TOKEN
    ctxs[SPECIAL_AT] = 2
    return {"model": model, "tok": _tokenizer(), "sae": sae, "contexts": ctxs.tolist()}


@pytest.fixture(scope="module")
def dash(setup: dict[str, Any]) -> Dashboards:
    mp = pytest.MonkeyPatch()
    # one context per encode chunk: exercises the streaming merge
    mp.setattr(dashboards_stats, "ENCODE_BUDGET", 1)
    try:
        return build_dashboards(
            setup["model"],
            setup["tok"],
            setup["sae"],
            None,
            POINT,
            contexts=setup["contexts"],
            max_tokens=10_000,
            batch_size=3,
            top_k_examples=K,
            n_promoted=5,
            n_neighbours=3,
            progress=False,
            sources=["unit-test"],
        )
    finally:
        mp.undo()


def _reference(setup: dict[str, Any]) -> torch.Tensor:
    """Brute force over all contexts at once: activations (N, T, d_sae), zero where not scored."""
    ids = torch.tensor(setup["contexts"])
    with torch.inference_mode():
        h = setup["model"](input_ids=ids, output_hidden_states=True).hidden_states[2]  # after layer 1
        mask = torch.ones_like(ids, dtype=torch.bool)
        mask[:, 0] = False
        mask &= ids != 2
        return setup["sae"].encode(h) * mask[..., None]


def test_planted_latent_examples_and_density(dash: Dashboards, setup: dict[str, Any]) -> None:
    feat = dash.feature(PLANTED)
    scored = N_CTX * (T - 1) - 1
    assert dash.summary["tokens_scored"] == scored
    assert feat["n_fired"] == len(PLANTS) - 1  # position 0 is not scored
    assert feat["density"] == pytest.approx((len(PLANTS) - 1) / scored, rel=1e-3)
    assert feat["max_act"] > 4.0
    examples = feat["examples"]
    assert {(ex["ctx"]) for ex in examples} == {1, 3, 6, 9}  # top-k by context: ctx 1 appears once
    for ex in examples:
        assert ex["tokens"][ex["peak"]] == "w74"
        assert ex["acts"][ex["peak"]] == ex["act"] == max(ex["acts"])
        assert (ex["ctx"], ex["pos"]) in PLANTS
    by_ctx = {ex["ctx"]: ex for ex in examples}
    assert (by_ctx[3]["peak"], len(by_ctx[3]["tokens"])) == (2, 2 + 1 + 4)  # clipped at the context start
    assert (by_ctx[9]["peak"], len(by_ctx[9]["tokens"])) == (12, 13)  # clipped at the context end
    assert by_ctx[6]["tokens"] == [f"w{t - 3}" for t in setup["contexts"][6][8:25]]
    assert examples == sorted(examples, key=lambda e: -e["act"])
    assert feat["top_tokens"][0] == {"token": "w74", "count": 4}
    assert feat["promoted"][0]["token"] == "w96"
    assert feat["label"].startswith("tokens: 'w74' | promotes: 'w96'")
    assert feat["label_source"] == "auto:top-tokens"


def test_streaming_matches_brute_force(dash: Dashboards, setup: dict[str, Any]) -> None:
    f = _reference(setup)  # (N, T, d_sae)
    n_fired = (f > 0).sum((0, 1))
    ctx_max = f.amax(1)  # (N, d_sae)
    for i in range(64):
        feat = dash.feature(i)
        assert feat["n_fired"] == int(n_fired[i])
        assert feat["max_act"] == pytest.approx(float(f[..., i].max()), rel=5e-3, abs=1e-6)
        if n_fired[i]:
            assert feat["mean_act"] == pytest.approx(float(f[..., i].sum() / n_fired[i]), rel=5e-3)
        want = [c for c in ctx_max[:, i].argsort(descending=True)[:K].tolist() if ctx_max[c, i] > 0]
        assert [ex["ctx"] for ex in feat["examples"]] == want


def test_dead_latent_and_neighbours(dash: Dashboards) -> None:
    dead = dash.feature(DEAD)
    assert dead["examples"] == [] and dead["n_fired"] == 0
    assert dead["label"] == f"dead (never fired on {dash.summary['tokens_scored']} tokens)"
    assert dead["label_source"] == "auto:dead"
    for a, b in ((COPY_SRC, COPY_DST), (COPY_DST, COPY_SRC)):
        top = dash.feature(a)["neighbours"][0]
        assert top["id"] == b and top["cos"] == pytest.approx(1.0, abs=1e-3)
        assert top["label"] == dash.label(b)[0]
    assert all(n["id"] != 5 for n in dash.feature(5)["neighbours"])


def test_save_load_round_trip_and_manual_labels(dash: Dashboards, tmp_path: Path) -> None:
    out = dash.save(tmp_path)
    assert out == tmp_path / "dashboards" and (out / "features" / "00000.jsonl.gz").is_file()
    back = Dashboards.load(tmp_path)
    assert back._index is None and back._neighbours is None  # lazy until needed
    assert back.feature(PLANTED) == dash.feature(PLANTED)
    assert [back.feature(i) for i in range(64)] == [dash.feature(i) for i in range(64)]
    assert back.summary == dash.summary and back.index == dash.index
    write_label(tmp_path, PLANTED, "planted w74 detector")
    labelled = Dashboards.load(tmp_path / "dashboards")
    feat = labelled.feature(PLANTED)
    assert (feat["label"], feat["label_source"]) == ("planted w74 detector", "manual")
    assert feat["auto_label"] == dash.feature(PLANTED)["label"]
    assert search_labels(labelled, "DETECTOR")[0].latent == PLANTED
    dash.save(tmp_path)  # a rebuild keeps manual labels
    assert Dashboards.load(tmp_path).label(PLANTED) == ("planted w74 detector", "manual")
    with pytest.raises(DashboardsError, match="out of range"):
        back.feature(64)
    with pytest.raises(DashboardsError, match="no dashboards"):
        Dashboards.load(tmp_path / "nowhere")


def test_search(dash: Dashboards, setup: dict[str, Any]) -> None:
    hits = search_labels(dash, " W74 ", limit=5)
    assert hits[0].latent == PLANTED and "top token 'w74'" in hits[0].matched
    promoted = {h.latent: h for h in search_labels(dash, "w96", limit=64)}
    assert "promotes 'w96'" in promoted[PLANTED].matched
    assert search_labels(dash, "") == []
    text = top_latents_for_text(setup["model"], setup["tok"], setup["sae"], POINT, "w1 w74 w2", limit=5)
    assert (text[0].latent, text[0].position, text[0].token) == (PLANTED, 2, "w74")  # BOS prepended
    assert text[0].act == pytest.approx(dash.feature(PLANTED)["max_act"], rel=0.1)


def test_max_tokens_stops_early(setup: dict[str, Any]) -> None:
    small = build_dashboards(
        setup["model"], setup["tok"], setup["sae"], None, POINT, contexts=setup["contexts"],
        max_tokens=30, batch_size=2, top_k_examples=2, n_neighbours=2, progress=False,
    )  # fmt: skip
    assert small.summary["contexts"] == 2 and small.summary["tokens_scored"] == 2 * (T - 1)


@pytest.fixture(scope="module")
def saved(dash: Dashboards, setup: dict[str, Any], tmp_path_factory: Any) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    setup["sae"].save(root / "sae")
    dash.save(root / "sae")
    setup["model"].save_pretrained(root / "model")
    setup["tok"].save_pretrained(root / "model")
    return {"sae": root / "sae", "model": root / "model", "root": root}


def _app() -> typer.Typer:
    app = typer.Typer()
    sae_app = typer.Typer()
    register(sae_app)
    app.add_typer(sae_app, name="sae")
    return app


def test_cli_feature(saved: dict[str, Path]) -> None:
    runner = CliRunner()
    res = runner.invoke(_app(), ["sae", "feature", str(saved["sae"]), str(PLANTED)])
    assert res.exit_code == 0, res.output
    assert f"{PEAK_OPEN}w74{PEAK_CLOSE}" in res.output and "'w96'" in res.output
    assert "auto:top-tokens" in res.output and "neighbours" in res.output
    res = runner.invoke(_app(), ["sae", "feature", str(saved["sae"]), str(COPY_SRC), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["neighbours"][0]["id"] == COPY_DST
    res = runner.invoke(_app(), ["sae", "feature", str(saved["sae"]), "999"])
    assert res.exit_code == 2


def test_cli_search_and_build(saved: dict[str, Path]) -> None:
    runner = CliRunner()
    args = ["sae", "search", str(saved["sae"]), "w74", "--labels-only", "--json"]
    res = runner.invoke(_app(), args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["label_matches"][0]["latent"] == PLANTED
    args = ["sae", "search", str(saved["sae"]), "w3 w74 w5", "--model", str(saved["model"]), "--json"]
    res = runner.invoke(_app(), [*args, "--device", "cpu"])
    assert res.exit_code == 0, res.output
    top = json.loads(res.output)["text_matches"][0]
    assert (top["latent"], top["token"], top["label_source"]) == (PLANTED, "w74", "auto:top-tokens")
    corpus = saved["root"] / "corpus.jsonl"
    lines = [{"text": " ".join(f"w{(7 * i + j) % 125}" for j in range(30))} for i in range(12)]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in lines))
    fresh = saved["root"] / "fresh"
    SAE.load(saved["sae"]).save(fresh)
    build = ["sae", "dashboards", str(fresh), "--data", str(corpus), "--model", str(saved["model"])]
    res = runner.invoke(_app(), [*build, "--max-tokens", "100", "--context-size", "16", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    built = Dashboards.load(fresh)
    assert built.summary["tokens_scored"] >= 100 and built.summary["sources"] == [str(corpus)]
    assert built.feature(PLANTED)["label_source"] == "auto:top-tokens"
