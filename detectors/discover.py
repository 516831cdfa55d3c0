"""Discovery: rank SAE latents by how well they separate positive from negative examples, and turn the
best few into an `sae_features` spec.

Inputs are per-example pooled latent activations (detectors.extract.pooled_latents: the max — or mean —
of each latent over the example's scoped tokens), positives (Np, n) and negatives (Nn, n).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from detectors.aggregate import Aggregation
from detectors.base import TokenFeatures
from detectors.calibrate import auroc_columns, metrics, threshold_for_fpr
from detectors.errors import DetectorError
from detectors.extract import Pool, pooled_latents
from detectors.linear import fit_logistic
from detectors.spec import LatentSpec, SaeFeaturesSpec, Scope, dump_spec


@dataclass(frozen=True)
class LatentRank:
    latent_id: int
    auroc: float  # of the pooled activation, positives vs negatives (0.5 = chance)
    mean_pos: float  # mean pooled activation over positive examples
    mean_neg: float
    mean_diff: float  # mean_pos − mean_neg
    fire_pos: float  # fraction of positive examples where the latent fires (pooled activation > 0)
    fire_neg: float
    label: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def rank_latents(
    pos: Tensor,
    neg: Tensor,
    latent_ids: Sequence[int] | None = None,
    *,
    labels: dict[int, str] | None = None,
    by: Literal["auroc", "mean_diff"] = "auroc",
) -> list[LatentRank]:
    """Every latent (column) with its separation figures, best first (ties: the other key, then id).
    `latent_ids` names the columns (default 0..n−1). Latents that are higher on negatives sort last."""
    if pos.dim() != 2 or neg.dim() != 2 or pos.shape[1] != neg.shape[1]:
        raise ValueError(f"need pos (Np, n) and neg (Nn, n); got {tuple(pos.shape)} and {tuple(neg.shape)}")
    ids = list(latent_ids) if latent_ids is not None else list(range(pos.shape[1]))
    if len(ids) != pos.shape[1]:
        raise ValueError(f"{len(ids)} latent ids for {pos.shape[1]} columns")
    pos, neg = pos.double(), neg.double()
    au = auroc_columns(pos, neg).tolist()
    mp, mn = pos.mean(dim=0).tolist(), neg.mean(dim=0).tolist()
    fp, fn = (pos > 0).double().mean(dim=0).tolist(), (neg > 0).double().mean(dim=0).tolist()
    labels = labels or {}
    rows = [
        LatentRank(i, au[j], mp[j], mn[j], mp[j] - mn[j], fp[j], fn[j], labels.get(i, ""))
        for j, i in enumerate(ids)
    ]
    if by == "auroc":
        rows.sort(key=lambda r: (-r.auroc, -r.mean_diff, r.latent_id))
    else:
        rows.sort(key=lambda r: (-r.mean_diff, -r.auroc, r.latent_id))
    return rows


def discover(
    pos_features: Iterable[TokenFeatures],
    neg_features: Iterable[TokenFeatures],
    *,
    pool: Pool = "max",
    labels: dict[int, str] | None = None,
) -> tuple[list[LatentRank], Tensor, Tensor, list[int]]:
    """Pool each example's latents and rank them. Returns (ranked, pos (Np, n), neg (Nn, n), latent ids
    of the columns) so the pooled tables can go straight into make_sae_features_spec."""
    pos_list, neg_list = list(pos_features), list(neg_features)
    if not pos_list or not neg_list:
        raise DetectorError("discovery needs positive and negative examples")
    ids = list(pos_list[0].latent_ids)
    if any(f.latent_ids != ids for f in pos_list + neg_list):
        raise DetectorError("all examples must carry the same latent columns")
    pos, neg = pooled_latents(pos_list, pool), pooled_latents(neg_list, pool)
    return rank_latents(pos, neg, ids, labels=labels), pos, neg, ids


def make_sae_features_spec(
    ranked: Sequence[LatentRank],
    n: int,
    pos: Tensor,
    neg: Tensor,
    *,
    name: str,
    latent_ids: Sequence[int] | None = None,
    description: str = "",
    scope: Scope = "completion",
    aggregation: Aggregation | None = None,
    target_fpr: float = 0.01,
    C: float = 1.0,
    out: str | Path | None = None,
) -> SaeFeaturesSpec:
    """An sae_features spec on the top-n ranked latents: weights and bias from balanced logistic
    regression on the pooled activations (fitted standardised, then folded back to raw activations),
    threshold for `target_fpr` on the negatives' pooled scores. `eval` holds in-sample figures only;
    recalibrate on held-out token features with detectors.calibrate.calibrate_detector. Written to `out`
    (a .yaml path) when given."""
    ids = list(latent_ids) if latent_ids is not None else list(range(pos.shape[1]))
    col = {lat: j for j, lat in enumerate(ids)}
    top = list(ranked[:n])
    if not top:
        raise DetectorError("no ranked latents to build a detector from")
    cols = torch.tensor([col[r.latent_id] for r in top], dtype=torch.long)
    xp, xn = pos.float().index_select(1, cols), neg.float().index_select(1, cols)
    w, b = fit_logistic(xp, xn, C=C).folded()
    sp, sn = torch.sigmoid(xp @ w + b), torch.sigmoid(xn @ w + b)
    thr = threshold_for_fpr(sn, target_fpr)
    if thr > 1.0:
        raise DetectorError(f"{name}: too many negatives score 1.0 to reach target FPR {target_fpr}")
    figures = {k: round(v, 6) for k, v in metrics(sp, sn, thr).items()}
    spec = SaeFeaturesSpec(
        name=name,
        description=description,
        scope=scope,
        aggregation=aggregation or Aggregation(),
        threshold=thr,
        target_fpr=target_fpr,
        eval={**figures, "calibrated_on": "pooled training activations (in-sample)"},
        latents=[LatentSpec(id=r.latent_id, weight=float(w[j]), label=r.label) for j, r in enumerate(top)],
        bias=b,
    )
    if out is not None:
        dump_spec(spec, out)
    return spec
