"""Discovery ranks a planted latent first and builds a working sae_features spec from the top latents."""

from __future__ import annotations

from pathlib import Path

import torch

from detectors.base import TokenFeatures, score_message
from detectors.discover import discover, make_sae_features_spec, rank_latents
from detectors.registry import load_detectors

IDS = list(range(100, 120))
PLANTED = 113


def _examples(n: int, positive: bool, gen: torch.Generator) -> list[TokenFeatures]:
    """Per example 8 tokens of 20 sparse latents; on positives latent 113 fires strongly on one token."""
    out = []
    for _ in range(n):
        lat = torch.rand(8, 20, generator=gen) * (torch.rand(8, 20, generator=gen) < 0.2)
        if positive:
            lat[int(torch.randint(0, 8, (1,), generator=gen)), IDS.index(PLANTED)] = 3.0
        out.append(TokenFeatures(latents=lat, latent_ids=IDS))
    return out


def test_rank_latents_by_hand() -> None:
    pos = torch.tensor([[1.0, 0.0], [2.0, 0.5]])
    neg = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    ranked = rank_latents(pos, neg, [7, 8], labels={7: "good"})
    assert [r.latent_id for r in ranked] == [7, 8]
    top = ranked[0]
    assert (top.auroc, top.mean_pos, top.mean_neg, top.fire_pos, top.fire_neg) == (1.0, 1.5, 0.0, 1.0, 0.0)
    assert top.label == "good" and ranked[1].auroc == 0.375
    by_diff = rank_latents(pos, neg, [7, 8], by="mean_diff")
    assert by_diff[0].mean_diff == 1.5


def test_discover_ranks_planted_latent_first_and_builds_spec(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    pos_feats, neg_feats = _examples(40, True, gen), _examples(60, False, gen)
    ranked, pos, neg, ids = discover(pos_feats, neg_feats, pool="max", labels={PLANTED: "planted"})
    assert ranked[0].latent_id == PLANTED and ranked[0].label == "planted"
    assert ranked[0].auroc > 0.99 and ranked[0].fire_pos == 1.0
    assert pos.shape == (40, 20) and ids == IDS

    spec = make_sae_features_spec(
        ranked, 3, pos, neg, name="planted", latent_ids=ids, target_fpr=0.05, out=tmp_path / "planted.yaml"
    )
    assert spec.latents[0].id == PLANTED and spec.latents[0].weight > 0
    assert 0.0 <= spec.threshold <= 1.0 and spec.eval["fpr"] <= 0.05
    det = load_detectors(["planted"], tmp_path)["planted"]
    assert det.latent_ids()[0] == PLANTED and PLANTED in det.clamp_for_steering()
    pos_scores = [score_message(det, f) for f in pos_feats]
    neg_scores = [score_message(det, f) for f in neg_feats]
    assert min(pos_scores) > max(neg_scores)
