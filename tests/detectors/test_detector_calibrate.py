"""Calibration: FPR thresholds on hand-made scores (ties, tiny samples, float32), metrics, AUROC."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from detectors.base import TokenFeatures
from detectors.calibrate import auroc, auroc_columns, calibrate_detector, metrics, threshold_for_fpr
from detectors.registry import build_detector
from detectors.spec import SaeFeaturesSpec


def _count_at_or_above(scores: torch.Tensor, thr: float) -> int:
    return int((scores >= thr).sum())


def test_threshold_for_one_percent_of_100_negatives() -> None:
    neg = torch.arange(100, dtype=torch.float32) / 100  # 0.00 … 0.99
    thr = threshold_for_fpr(neg, 0.01)
    assert _count_at_or_above(neg, thr) == 1  # only 0.99 fires
    assert 0.98 < thr <= 0.99  # and it is the smallest such threshold
    assert _count_at_or_above(neg.double(), thr) == 1  # same answer compared in float64
    assert _count_at_or_above(neg, threshold_for_fpr(neg, 0.05)) == 5
    assert _count_at_or_above(neg, threshold_for_fpr(neg, 0.29)) == 29  # 0.29·100 is 28.999… in floats


def test_threshold_ties_and_tiny_samples() -> None:
    tied = torch.full((100,), 0.5)
    thr = threshold_for_fpr(tied, 0.01)
    assert thr > 0.5 and _count_at_or_above(tied, thr) == 0  # ties cannot be split: none may fire
    few = torch.tensor([0.2, 0.7, 0.4])
    thr = threshold_for_fpr(few, 0.01)  # N < 1/target: no negative may fire
    assert _count_at_or_above(few, thr) == 0 and thr == pytest.approx(0.7)
    with pytest.raises(ValueError, match="at least one"):
        threshold_for_fpr(torch.zeros(0))
    with pytest.raises(ValueError, match="target_fpr"):
        threshold_for_fpr(few, 0.0)


def test_metrics_by_hand() -> None:
    m = metrics([0.9, 0.8, 0.3], [0.1, 0.2, 0.85], threshold=0.5)
    assert m["recall_at_fpr"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["fpr"] == pytest.approx(1 / 3)
    assert m["auroc"] == pytest.approx(7 / 9)  # 9 pairs, 7 ordered correctly
    assert metrics([0.1], [0.2], threshold=0.5)["precision"] == 0.0  # nothing fires


def test_auroc_matches_sklearn_with_ties() -> None:
    gen = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 5, (40, 3), generator=gen).float()  # many ties
    neg = torch.randint(0, 4, (30, 3), generator=gen).float()
    y = [1] * 40 + [0] * 30
    ours = auroc_columns(pos, neg)
    for j in range(3):
        ref = roc_auc_score(y, torch.cat([pos[:, j], neg[:, j]]).numpy())
        assert float(ours[j]) == pytest.approx(ref)
    assert auroc([1.0, 1.0], [1.0]) == 0.5


def test_calibrate_detector_sets_threshold_and_eval() -> None:
    spec = SaeFeaturesSpec.model_validate(
        {"name": "d", "threshold": 0.5, "latents": [{"id": 0, "weight": 1.0}], "bias": -1.0}
    )
    det = build_detector(spec)
    gen = torch.Generator().manual_seed(0)

    def feats(shift: float) -> TokenFeatures:
        return TokenFeatures(latents=torch.rand(6, 1, generator=gen) + shift, latent_ids=[0])

    pos = [feats(2.0) for _ in range(20)]
    neg = [feats(0.0) for _ in range(200)]
    new = calibrate_detector(det, pos, neg, target_fpr=0.02)
    assert new.target_fpr == 0.02 and 0 <= new.threshold <= 1
    assert new.eval["fpr"] <= 0.02 and new.eval["recall_at_fpr"] == 1.0 and new.eval["n_neg"] == 200
    assert new.name == spec.name and spec.threshold == 0.5  # the original spec is untouched
