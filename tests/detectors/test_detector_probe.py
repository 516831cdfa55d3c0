"""Probes: training separates a separable set, weights round-trip through safetensors and the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from detectors.base import TokenFeatures
from detectors.calibrate import auroc
from detectors.errors import DetectorError
from detectors.extract import iter_token_features, pooled_resid
from detectors.probe import ProbeDetector, load_probe, save_probe, train_probe
from detectors.registry import load_detectors
from sae_assets.sae import SAE, SAEConfig

POINTS = ["model.layers.1", "model.layers.3"]
D_IN = 32


def _separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes in 2·D_IN dims, shifted apart along one random direction, with unequal feature scales."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(2 * D_IN, generator=torch.Generator().manual_seed(99))
    scales = torch.linspace(0.1, 10.0, 2 * D_IN)
    neg = torch.randn(n, 2 * D_IN, generator=gen) * scales
    pos = torch.randn(n, 2 * D_IN, generator=gen) * scales + 4.0 * direction / direction.norm() * scales
    return pos, neg


def _feats(x: torch.Tensor) -> TokenFeatures:
    return TokenFeatures(resid={POINTS[0]: x[:, :D_IN], POINTS[1]: x[:, D_IN:]})


def _write_probe(folder: Path, fit: Any, **spec: Any) -> None:
    save_probe(fit, folder / "probe1.safetensors", hook_points=spec.get("hook_points"))
    body = {"name": "probe1", "kind": "probe", "threshold": 0.5, "weights_file": "probe1.safetensors", **spec}
    (folder / "probe1.yaml").write_text(yaml.safe_dump(body))


def test_probe_separates_and_round_trips(tmp_path: Path) -> None:
    pos, neg = _separable(200, seed=0)
    fit = train_probe(pos, neg, C=1.0)
    _write_probe(tmp_path, fit, hook_points=POINTS)
    det = load_detectors(["probe1"], tmp_path, SAE(SAEConfig(architecture="standard", d_in=D_IN, d_sae=8)))[
        "probe1"
    ]
    assert isinstance(det, ProbeDetector) and det.hook_points() == POINTS
    test_pos, test_neg = _separable(200, seed=1)
    sp, sn = det.score_tokens(_feats(test_pos)), det.score_tokens(_feats(test_neg))
    assert auroc(sp, sn) > 0.95
    assert bool(((sp >= 0) & (sp <= 1)).all())
    # Saved and loaded weights give the in-memory probe's scores.
    loaded, meta = load_probe(tmp_path / "probe1.safetensors")
    assert meta == {"hook_points": POINTS}
    assert torch.allclose(torch.sigmoid(fit.logits(test_pos)), sp, atol=1e-6)
    for a, b in zip(
        (loaded.weight, loaded.bias, loaded.mean, loaded.std),
        (fit.weight, fit.bias, fit.mean, fit.std),
        strict=True,
    ):
        assert torch.equal(a, b)
    assert det.top_features(_feats(test_pos)) == []  # no latents given: no evidence


def test_latent_probe(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    neg = torch.relu(torch.randn(100, 3, generator=gen))
    pos = neg.clone()
    pos[:, 1] += 2.0
    _write_probe(tmp_path, train_probe(pos, neg), on_latents=True, latent_ids=[4, 9, 2])
    det = load_detectors(["probe1"], tmp_path, SAE(SAEConfig(architecture="standard", d_in=D_IN, d_sae=16)))[
        "probe1"
    ]
    assert det.hook_points() == [] and det.latent_ids() == [4, 9, 2]
    feats = TokenFeatures(
        latents=torch.cat([pos[:, [2]], pos, neg[:, :1]], dim=1), latent_ids=[7, 4, 9, 2, 5]
    )
    assert float(det.score_tokens(feats).mean()) > 0.8
    top = det.top_features(feats, k=2)
    # The latent the probe keys on pushes the score up most; latents with negative weights never show.
    assert top[0]["latent_id"] == 9 and all(t["contribution"] > 0 for t in top)
    with pytest.raises(DetectorError, match=r"\[9\] out of range"):
        load_detectors(["probe1"], tmp_path, SAE(SAEConfig(architecture="standard", d_in=D_IN, d_sae=8)))


def test_probe_on_extracted_features(tiny_lm: Any) -> None:
    """The extraction -> pooled features -> probe path runs end to end on the tiny model."""
    model, tok = tiny_lm.model, tiny_lm.tokenizer
    pos_recs = [{"text": "Please verify your bank account password at this link."}] * 3
    neg_recs = [{"text": "Write a haiku about the moon and the sea."}] * 3
    xp = pooled_resid(iter_token_features(model, tok, pos_recs, POINTS), POINTS)
    xn = pooled_resid(iter_token_features(model, tok, neg_recs, POINTS), POINTS)
    assert xp.shape == xn.shape == (3, 2 * D_IN)
    fit = train_probe(xp, xn)
    assert bool((torch.sigmoid(fit.logits(xp)) > torch.sigmoid(fit.logits(xn)).max()).all())
