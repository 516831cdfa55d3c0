"""Thresholds and figures: calibrate a detector's threshold to a target false-positive rate.

Convention everywhere: a value v fires when v ≥ threshold.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detectors.aggregate import Aggregation
from detectors.base import Detector, TokenFeatures, score_message
from detectors.errors import DetectorError
from detectors.spec import BaseSpec

Values = Tensor | Sequence[float]


def _vec(x: Values) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64).reshape(-1)


def auroc_columns(pos: Tensor, neg: Tensor) -> Tensor:
    """(n,) AUROC of every column of pos (Np, n) vs neg (Nn, n): P(pos > neg) + ½ P(pos = neg) (ties
    count half, as in the Mann–Whitney U statistic). 0.5 = no separation; < 0.5 = higher on negatives."""
    pos, neg = pos.double(), neg.double()
    if pos.shape[0] == 0 or neg.shape[0] == 0:
        raise ValueError("AUROC needs at least one positive and one negative")
    neg_sorted = neg.T.contiguous().sort(dim=1).values  # (n, Nn)
    p = pos.T.contiguous()  # (n, Np)
    below = torch.searchsorted(neg_sorted, p, right=False)  # negatives strictly below each positive
    at_or_below = torch.searchsorted(neg_sorted, p, right=True)
    wins = (below + at_or_below).double().sum(dim=1) / 2
    return wins / (pos.shape[0] * neg.shape[0])


def auroc(pos: Values, neg: Values) -> float:
    return float(auroc_columns(_vec(pos)[:, None], _vec(neg)[:, None])[0])


def threshold_for_fpr(neg_scores: Values, target_fpr: float = 0.01) -> float:
    """The smallest threshold t such that at most ⌊target_fpr · N⌋ of the N negatives score ≥ t.

    That is t just above the (⌊target_fpr·N⌋ + 1)-th largest negative score s: the next float32 above s, so
    the comparison holds whether scores are compared as float32 or float64. Ties at s all fall below t (so
    with ties fewer negatives than allowed may fire). Small samples: with N < 1/target_fpr no negative may
    fire at all, so t lands just above the largest negative — conservative, and the true FPR on new data is
    then only loosely bounded; report N beside the threshold. For scores in [0, 1], t can exceed 1 only
    when too many negatives score exactly 1.0 (callers storing it in a spec must treat that as a failure).
    """
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    v = _vec(neg_scores)
    if v.numel() == 0:
        raise ValueError("threshold_for_fpr needs at least one negative score")
    if bool(torch.isnan(v).any()):
        raise ValueError("negative scores contain NaN")
    allowed = math.floor(target_fpr * v.numel() + 1e-9)  # 1e-9: 0.29 · 100 must give 29, not 28
    s = float(v.sort(descending=True).values[allowed])
    return float(np.nextafter(np.float32(s), np.float32(np.inf)))


def metrics(pos: Values, neg: Values, threshold: float) -> dict[str, float]:
    """auroc (threshold-free), and at `threshold`: recall_at_fpr (recall of positives at the FPR this
    threshold gives), precision (0.0 when nothing fires; depends on the pos:neg ratio of the sample), f1,
    fpr; plus n_pos, n_neg."""
    p, n = _vec(pos), _vec(neg)
    tp = int((p >= threshold).sum())
    fp = int((n >= threshold).sum())
    recall = tp / p.numel() if p.numel() else 0.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "auroc": auroc(p, n) if p.numel() and n.numel() else float("nan"),
        "recall_at_fpr": recall,
        "precision": precision,
        "f1": f1,
        "fpr": fp / n.numel() if n.numel() else 0.0,
        "threshold": float(threshold),
        "n_pos": float(p.numel()),
        "n_neg": float(n.numel()),
    }


def message_scores(
    det: Detector, features: Iterable[TokenFeatures], aggregation: Aggregation | None = None
) -> Tensor:
    """(N,) message values: each record's token scores aggregated (spec default aggregation)."""
    return torch.tensor([score_message(det, f, aggregation) for f in features], dtype=torch.float64)


def calibrate_detector(
    det: Detector,
    pos_features: Iterable[TokenFeatures],
    neg_features: Iterable[TokenFeatures],
    target_fpr: float | None = None,
) -> BaseSpec:
    """A copy of the detector's spec with `threshold` set for `target_fpr` (default: the spec's, else 1%)
    on the negatives' message values, `target_fpr` recorded, and `eval` holding `metrics` on this data.
    Use held-out records: figures on training data are optimistic."""
    fpr = target_fpr or det.spec.target_fpr or 0.01
    pos, neg = message_scores(det, pos_features), message_scores(det, neg_features)
    thr = threshold_for_fpr(neg, fpr)
    if thr > 1.0:
        raise DetectorError(
            f"detector {det.name!r}: more than {fpr:.2%} of negatives score 1.0; no threshold in [0, 1] "
            "reaches the target FPR"
        )
    figures: dict[str, Any] = {k: round(v, 6) for k, v in metrics(pos, neg, thr).items()}
    body = {
        **det.spec.model_dump(),
        "threshold": thr,
        "target_fpr": fpr,
        "eval": {**det.spec.eval, **figures},
    }
    return type(det.spec).model_validate(body)
