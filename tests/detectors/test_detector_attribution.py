"""Probe attribution: token weights match each aggregation, the decoder identity holds, and a latent planted
along the probe's direction is the one reported, through the Scorer on the tiny model too."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from sae_testing import tiny_sae

from detectors.aggregate import Aggregation, aggregate
from detectors.attribution import decoder_attribution, token_weights, top_contributions
from detectors.base import TokenFeatures, wants_all_latents
from detectors.linear import LinearFit
from detectors.probe import ProbeDetector, save_probe
from detectors.registry import load_detectors
from detectors.scoring import Scorer
from sae_assets.sae import SAE, SAEConfig, SAEMetadata

SCORES = torch.tensor([0.2, 0.9, 0.4, 0.7, 0.95, 0.1, 0.6])


def _logit(s: float) -> float:
    return math.log(s / (1 - s))


@pytest.mark.parametrize(
    "agg",
    [
        "mean",
        "max",
        {"kind": "topk_mean", "k": 3},
        {"kind": "last_mean", "k": 2},
        {"kind": "ema", "window": 3},
        {"kind": "count_over", "threshold": 0.65},
        {"kind": "sustained", "threshold": 0.99, "n": 2},
    ],
)
def test_token_weights_reproduce_linear_aggregations(agg: Any) -> None:
    a = Aggregation.model_validate(agg)
    w = token_weights(SCORES, a)
    assert w.shape == SCORES.shape and float(w.sum()) == pytest.approx(1.0) and bool((w >= 0).all())
    value = float((w * SCORES.double()).sum())
    if a.kind == "ema":  # the EMA at its peak is the weighted sum times the weights' mass 1 − (1 − α)^(t*+1)
        alpha, peak = 2 / (3 + 1), int(torch.nonzero(w).max())
        value *= 1 - (1 - alpha) ** (peak + 1)
    if a.kind == "count_over":  # the tokens counted, each weighted equally
        assert set(torch.nonzero(w).flatten().tolist()) == {1, 3, 4}
    elif a.kind == "sustained":  # the best 2-token window, whose min is the value (below the threshold)
        assert torch.nonzero(w).flatten().tolist() == [3, 4]
        assert float(SCORES[[3, 4]].min()) == pytest.approx(aggregate(SCORES, a))
    else:
        assert value == pytest.approx(aggregate(SCORES, a), abs=1e-9)


def test_mix_weights_give_the_aggregate_logit() -> None:
    a = Aggregation(kind="mix", k=2, alpha=0.25)
    w = token_weights(SCORES, a)
    z = torch.tensor([_logit(float(s)) for s in SCORES], dtype=torch.float64)
    assert float((w * z).sum()) == pytest.approx(_logit(aggregate(SCORES, a)), abs=1e-9)


def test_token_weights_of_an_empty_message() -> None:
    assert token_weights(torch.zeros(0), Aggregation(kind="mean")).numel() == 0


def test_decoder_attribution_is_the_probe_read_through_the_decoder() -> None:
    sae = tiny_sae(d_sae=24, decoder=True)
    w_tilde = torch.randn(32, generator=torch.Generator().manual_seed(1))
    u = decoder_attribution(sae, w_tilde)
    a = torch.relu(torch.randn(5, 24, generator=torch.Generator().manual_seed(2)))  # (T, d_sae)
    # Σ_i a_ti·u_i is the probe's reading of the reconstruction without its bias term b_dec.
    assert torch.allclose(a @ u, (sae.decode(a) - sae.b_dec) @ w_tilde, atol=1e-4)
    with pytest.raises(ValueError, match=r"must be \(32,\)"):
        decoder_attribution(sae, torch.zeros(31))


def test_decode_gain_undoes_per_token_normalisation() -> None:
    base = tiny_sae(d_sae=8, decoder=True)
    cfg = SAEConfig(architecture="standard", d_in=32, d_sae=8, normalize_activations="constant_norm_rescale")
    sae = SAE(cfg)
    sae.load_state_dict(base.state_dict())
    x = torch.randn(3, 32) * 7.0
    f = torch.relu(torch.randn(3, 8))
    g = sae.decode_gain(x)  # (T,)
    assert torch.allclose(sae.decode(f, x_for_norm=x), g[:, None] * (f @ sae.W_dec + sae.b_dec), atol=1e-5)
    assert torch.equal(base.decode_gain(x), torch.ones(3))


def test_top_contributions_rank_by_weighted_push() -> None:
    latents = torch.tensor([[5.0, 0.0, 1.0], [0.0, 2.0, 1.0]])  # (T=2, n=3)
    u = torch.tensor([0.1, 1.0, -3.0])
    top = top_contributions(latents, [10, 11, 12], u, torch.ones(2), torch.tensor([0.5, 0.5]), k=5)
    # 11 pushes 2·1.0·0.5 = 1.0, 10 pushes 5·0.1·0.5 = 0.25; 12 pulls the score down and is not reported.
    assert [t["latent_id"] for t in top] == [11, 10]
    assert top[0]["contribution"] == pytest.approx(1.0) and top[0]["token_index"] == 1
    assert top[1]["activation"] == 5.0 and top[1]["token_index"] == 0
    assert top_contributions(latents, [10, 11, 12], u, torch.ones(2), torch.tensor([0.5, 0.5]), k=0) == []


def _planted_probe(folder: Path, sae: SAE, latent: int, point: str) -> None:
    """A residual probe whose direction is latent `latent`'s decoder row (standardisation is identity)."""
    w = sae.W_dec[latent].detach().clone()
    fit = LinearFit(weight=w / w.norm(), bias=torch.tensor(-1.0), mean=torch.zeros(32), std=torch.ones(32))
    save_probe(fit, folder / "planted.safetensors", hook_points=[point])
    body = {
        "name": "planted",
        "kind": "probe",
        "threshold": 0.5,
        "weights_file": "planted.safetensors",
        "hook_points": [point],
        "aggregation": "mean",
    }
    (folder / "planted.yaml").write_text(yaml.safe_dump(body))


def test_the_planted_latent_is_reported_first(tmp_path: Path) -> None:
    sae = tiny_sae(d_sae=16, decoder=True)
    _planted_probe(tmp_path, sae, latent=6, point="model.layers.2")
    det = load_detectors(["planted"], tmp_path, sae)["planted"]
    assert isinstance(det, ProbeDetector) and wants_all_latents(det)
    a = torch.zeros(4, 16)
    a[:, 6], a[1, 3], a[2, 9] = 3.0, 1.0, 2.0  # latent 6 on every token, two others once each
    x = sae.decode(a).detach()  # (T, d_in): residuals the SAE explains exactly
    feats = TokenFeatures(resid={"model.layers.2": x}, latents=a, latent_ids=list(range(16)))
    top = det.top_features(feats, k=3)
    assert top[0]["latent_id"] == 6 and top[0]["activation"] == 3.0
    u6 = float(sae.W_dec[6].detach().norm())  # the probe's push per unit of latent 6
    assert top[0]["contribution"] == pytest.approx(3.0 * u6, rel=1e-4)


def test_no_attribution_without_an_sae_at_the_probe_point(tmp_path: Path) -> None:
    sae = tiny_sae(d_sae=16, decoder=True)
    _planted_probe(tmp_path, sae, latent=6, point="model.layers.1")  # the SAE reads layer 2
    det = load_detectors(["planted"], tmp_path, sae)["planted"]
    assert not wants_all_latents(det)
    nameless = SAE(SAEConfig(architecture="standard", d_in=32, d_sae=16, metadata=SAEMetadata()))
    _planted_probe(tmp_path, sae, latent=6, point="model.layers.2")
    assert not wants_all_latents(load_detectors(["planted"], tmp_path, nameless)["planted"])


def test_scorer_reports_a_probes_latents_on_the_tiny_model(tiny_lm: Any, tmp_path: Path) -> None:
    sae = tiny_sae(d_sae=16, decoder=True)
    _planted_probe(tmp_path, sae, latent=6, point="model.layers.2")
    dets = load_detectors(["planted"], tmp_path, sae)
    answer = "Hello there, friend."
    rec = {"id": 1, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}]}
    scorer = Scorer(tiny_lm.model, tiny_lm.tokenizer, sae, dets, labels=lambda i: f"L{i}")
    out = next(scorer.score_records([rec]))
    top = out["top_features"]["planted"]
    assert top, "a residual probe with an SAE at its hook point must name latents"
    for item in top:
        assert item["contribution"] > 0 and item["label"] == f"L{item['latent_id']}"
        assert item["token"] in answer and 0 <= item["token_index"] < out["tokens"]
    contribs = [t["contribution"] for t in top]
    assert contribs == sorted(contribs, reverse=True)
    # top_k=0 keeps the SAE out of the forward pass entirely (the throughput path).
    assert Scorer(tiny_lm.model, tiny_lm.tokenizer, sae, dets, top_k=0).sae is None
