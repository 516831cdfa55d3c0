"""sae_features detectors: scoring, evidence, steering clamps, and a planted latent in the tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from detectors.base import TokenFeatures, fires, score_message
from detectors.errors import DetectorError
from detectors.extract import iter_token_features, scoped_positions
from detectors.registry import build_detector, load_detectors
from detectors.sae_features import SaeFeaturesDetector, fit_link
from detectors.spec import SaeFeaturesSpec, dump_spec
from sae_assets.sae import SAE, SAEConfig, SAEMetadata

POINT = "model.layers.1"


def _spec(latents: list[dict[str, Any]], bias: float = -2.0, **kw: Any) -> SaeFeaturesSpec:
    body = {"name": "planted", "threshold": 0.5, "latents": latents, "bias": bias, **kw}
    return SaeFeaturesSpec.model_validate(body)


def test_scores_from_token_features() -> None:
    latents = torch.zeros(5, 3)  # columns: latents 3, 7, 11
    latents[2, 1] = 1.0  # latent 7 fires on token 2
    latents[:, 2] = 0.5  # latent 11 fires everywhere, but has a negative weight
    feats = TokenFeatures(latents=latents, latent_ids=[3, 7, 11])
    spec = _spec([{"id": 7, "weight": 4.0, "label": "planted"}, {"id": 11, "weight": -1.0}], bias=-1.5)
    det = build_detector(spec)
    assert isinstance(det, SaeFeaturesDetector)
    assert det.hook_points() == [] and det.latent_ids() == [7, 11]
    scores = det.score_tokens(feats)
    expected = torch.sigmoid(torch.tensor([-2.0, -2.0, 2.0, -2.0, -2.0]))
    assert torch.allclose(scores, expected)
    assert fires(det, score_message(det, feats)) and not fires(det, score_message(det, feats.slice(3, 5)))
    top = det.top_features(feats, k=3)
    assert top == [
        {"latent_id": 7, "label": "planted", "activation": 1.0, "contribution": 4.0, "token_index": 2}
    ]  # latent 11 only lowers the score, so it is not evidence
    assert det.clamp_for_steering() == {7: 0.0}
    with pytest.raises(DetectorError, match=r"latents \[7\] were not watched"):
        det.score_tokens(TokenFeatures(latents=torch.zeros(2, 1), latent_ids=[11]))
    assert det.score_tokens(TokenFeatures(latents=torch.zeros(0, 3), latent_ids=[3, 7, 11])).shape == (0,)


def test_fit_link_recovers_midpoint() -> None:
    gen = torch.Generator().manual_seed(0)
    pos = torch.randn(400, generator=gen) + 4.0
    neg = torch.randn(400, generator=gen)
    scale, bias = fit_link(pos, neg)
    assert scale > 0 and bias == pytest.approx(-2.0, abs=0.3)  # p = 0.5 halfway between the classes
    with pytest.raises(DetectorError, match="slope"):
        fit_link(neg, pos)


def _planted_sae(model: Any, tok: Any, record: dict[str, Any], latent: int) -> tuple[SAE, int]:
    """A relu SAE whose latent `latent` reads the direction of one token's residual at POINT, with a bias
    that makes it fire at that token only. Returns (sae, index of that token among the scoped tokens)."""
    feats = next(iter_token_features(model, tok, [record], [POINT]))
    h = feats.resid_at(POINT)  # (T, 32)
    u = h / h.norm(dim=1, keepdim=True)
    proj = h @ u.T  # proj[i, j]: token i on token j's direction
    margin = proj.diagonal() - (proj - torch.diag(torch.full((len(h),), 1e9))).max(dim=0).values
    target = int(margin.argmax())
    assert margin[target] > 0
    meta = SAEMetadata(hook_name="blocks.1.hook_resid_post", extra={"hf_hook_point": POINT})
    sae = SAE(
        SAEConfig(architecture="standard", d_in=32, d_sae=16, apply_b_dec_to_input=False, metadata=meta)
    )
    with torch.no_grad():
        sae.W_enc[:, latent] = u[target]
        sae.b_enc[latent] = -(proj[target, target] - margin[target] / 2)
    return sae, target


def test_planted_latent_fires_on_its_token(tiny_lm: Any, tmp_path: Path) -> None:
    model, tok = tiny_lm.model, tiny_lm.tokenizer
    record = {"text": "Please verify your bank account password at this link."}
    sae, target = _planted_sae(model, tok, record, latent=5)
    feats = next(iter_token_features(model, tok, [record], [], sae=sae, latent_ids=[5]))
    assert feats.latents is not None
    act = feats.latents[:, 0]
    assert int(act.argmax()) == target and int((act > 0).sum()) == 1
    # Written as YAML and loaded through the registry against the same SAE.
    spec = _spec([{"id": 5, "weight": 4.0 / float(act[target]), "label": "planted"}])
    dump_spec(spec, tmp_path / "planted.yaml")
    det = load_detectors(["planted"], tmp_path, sae)["planted"]
    scores = det.score_tokens(feats)
    assert int(scores.argmax()) == target and scores[target] > 0.85
    assert bool((scores[torch.arange(len(scores)) != target] < 0.15).all())
    assert fires(det, score_message(det, feats))
    ids, pos = scoped_positions(tok, record, "completion")
    top = det.top_features(feats, k=1)[0]
    assert top["latent_id"] == 5 and top["token_index"] == target
    assert tok.decode([ids[pos[top["token_index"]]]]).strip() != ""
