"""Balanced logistic regression shared by probes, sae_features weight fitting and the calibrated link."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

# Features whose spread is below this are treated as constant (std 1) instead of being blown up.
MIN_STD = 1e-6


@dataclass(frozen=True)
class LinearFit:
    """logit(x) = ((x − mean) / std) · weight + bias; all float32 tensors, bias a 0-d tensor."""

    weight: torch.Tensor  # (D,)
    bias: torch.Tensor  # ()
    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N,) float32."""
        return ((x.float() - self.mean) / self.std) @ self.weight + self.bias

    def folded(self) -> tuple[torch.Tensor, float]:
        """The same map on raw features: (w_raw (D,), b_raw) with logit = x · w_raw + b_raw."""
        w = self.weight / self.std
        return w, float(self.bias - (self.mean * w).sum())


def _as_2d(x: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = np.asarray(torch.as_tensor(x).detach().cpu().double())
    return arr[:, None] if arr.ndim == 1 else arr


def fit_logistic(
    x_pos: torch.Tensor | np.ndarray,
    x_neg: torch.Tensor | np.ndarray,
    *,
    C: float = 1.0,
    standardise: bool = True,
    max_iter: int = 2000,
    w_pos: torch.Tensor | np.ndarray | None = None,
    w_neg: torch.Tensor | np.ndarray | None = None,
) -> LinearFit:
    """Fit positives (label 1) against negatives (label 0), class_weight="balanced" so that neither class
    size nor ratio moves the decision boundary. Features are standardised with the pooled mean/std first
    (so C means the same for every feature scale). Optional per-row weights (`w_pos`, `w_neg`) multiply
    the class weights, e.g. to give each data source an equal say."""
    pos, neg = _as_2d(x_pos), _as_2d(x_neg)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"need positives and negatives (got {len(pos)} and {len(neg)})")
    if pos.shape[1] != neg.shape[1]:
        raise ValueError(f"feature widths differ: positives {pos.shape[1]}, negatives {neg.shape[1]}")
    x = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    mean = x.mean(axis=0) if standardise else np.zeros(x.shape[1])
    std = x.std(axis=0) if standardise else np.ones(x.shape[1])
    std = np.where(std < MIN_STD, 1.0, std)
    clf = LogisticRegression(C=C, class_weight="balanced", max_iter=max_iter)
    weight = None
    if w_pos is not None or w_neg is not None:
        wp = np.ones(len(pos)) if w_pos is None else _as_2d(w_pos).reshape(-1)
        wn = np.ones(len(neg)) if w_neg is None else _as_2d(w_neg).reshape(-1)
        if len(wp) + len(wn) != len(x):
            raise ValueError(f"{len(wp) + len(wn)} row weights for {len(x)} rows")
        # Balance the classes by their weight totals (not row counts: older scikit-learn counts rows),
        # so each class weighs half of Σ w, e.g. records of many token rows weigh no more than short ones.
        total = wp.sum() + wn.sum()
        weight = np.concatenate([wp * total / (2 * wp.sum()), wn * total / (2 * wn.sum())])
        clf = LogisticRegression(C=C, class_weight=None, max_iter=max_iter)
    clf.fit((x - mean) / std, y, sample_weight=weight)
    f32 = torch.float32
    return LinearFit(
        weight=torch.as_tensor(clf.coef_[0], dtype=f32),
        bias=torch.as_tensor(float(clf.intercept_[0]), dtype=f32),
        mean=torch.as_tensor(mean, dtype=f32),
        std=torch.as_tensor(std, dtype=f32),
    )
