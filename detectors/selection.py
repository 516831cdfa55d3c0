"""One kind's detector in a build (detectors.build): its variants tried out-of-fold, the best one chosen,
fitted on every training record and calibrated, and the figures its spec's eval records.

Shapes: N training records; out-of-fold values and masks are (N,).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from detectors.base import Detector
from detectors.calibrate import auroc, metrics, threshold_for_fpr
from detectors.corpus import Corpus, TokenRows
from detectors.errors import DetectorError
from detectors.fitting import Fitter, Labels, calib_recall
from detectors.probe import save_probe
from detectors.spec import BaseSpec
from detectors.variants import Variant
from sae_assets.sae import SAE


@dataclass(frozen=True)
class BuildInputs:
    """A build's inputs, the same for both kinds: the extracted corpora (N training records) with their
    fitters, folds and selection masks, and the options that shape selection, thresholds and figures."""

    concept: str
    family: str
    points: list[str]  # the probes' residual hook points
    sae: SAE
    n_latents: int
    labels: Labels | None
    train: Corpus
    calib: Corpus  # the calibration records with a completion
    test: Corpus
    n_pos: int
    n_neg: int
    n_skipped: int  # calibration records left out for lack of a completion
    fitter: Fitter  # fits on train and scores it
    calib_fitter: Fitter  # scores calib
    fold: Tensor  # (N,) long: each training record's fold
    everything: Tensor  # (N,) long: every training record's index
    sources: list[tuple[str, ...]]  # (N,) each training record's sources
    test_sources: list[str]  # each test record's first source
    seed_pos: Tensor  # (N,) bool: the positives the *_recall criteria count
    seed_neg: Tensor  # (N,) bool: seed negatives
    hard_neg: Tensor | None  # seed_neg with select_by="hard_recall", else None
    select_by: str
    select_fpr: float
    target_fpr: float
    operating_fprs: Sequence[float]
    calib_only: bool
    stream_from: int | None
    balance_sources: bool
    token_rows: TokenRows
    data: dict[str, Any] | None


def build_kind(
    s: BuildInputs, kind: str, name: str, variants: Sequence[Variant], out: Path
) -> tuple[BaseSpec, dict[str, Any]]:
    """Detector `name` of one kind: its `variants` tried, the best fitted on all training records and
    calibrated, its figures; a probe's weights written to `out`. Returns the spec and its eval."""
    tried, peaks, sel = _try_variants(s, variants)
    oof_auc = {v: auroc(x[s.train.labels == 1], x[s.train.labels == 0]) for v, x in tried.items()}
    # First listed wins ties: the simpler variants.
    best = max(tried, key=lambda v: (sel.get(v, 0.0), oof_auc[v]))
    det, fit = s.fitter.fit(best, s.everything, name)
    neg_oof = _calib_negatives_oof(s, tried, peaks, best)
    neg_extra, thr, op_thr = _calibrate(s, name, det, neg_oof)
    ev = _train_figures(s, best, tried, oof_auc, sel, len(neg_oof), len(neg_extra))
    if len(s.test.feats):
        ev.update(_held_out(s, det, thr, op_thr))
    if kind == "probe" and len({v.pool for v in tried}) > 1:
        ev["by_pool"] = _by_pool(s, name, tried, peaks, sel, oof_auc)
    spec = _spec(s, kind, det, thr, op_thr, ev)
    if fit is not None:
        _save_weights(s, det, fit, out / f"{name}.safetensors")
    return spec, ev


def _try_variants(
    s: BuildInputs, variants: Sequence[Variant]
) -> tuple[dict[Variant, Tensor], dict[Variant, Tensor], dict[Variant, float]]:
    """Per variant: out-of-fold final values (N,) (AUROC), their stream peaks (N,) (stream_from:
    selection and thresholds) and, selecting by a *_recall criterion, its calib_recall."""
    tried: dict[Variant, Tensor] = {}
    peaks: dict[Variant, Tensor] = {}
    sel: dict[Variant, float] = {}
    use_calib = s.calib_fitter if s.select_by != "auroc_oof" else None
    for v in variants:
        # with stream_from, each variant is judged as its mid-stream rules will run: on peaks
        tried[v], v_peaks, per_fold = s.fitter.oof(v, s.fold, use_calib, s.stream_from)
        if v_peaks is not None:
            peaks[v] = v_peaks
        if use_calib is not None:
            vals = tried[v] if v_peaks is None else v_peaks
            sel[v] = calib_recall(vals, per_fold, s.fold, s.seed_pos, s.select_fpr, s.hard_neg)
    return tried, peaks, sel


def _calib_negatives_oof(
    s: BuildInputs, tried: dict[Variant, Tensor], peaks: dict[Variant, Tensor], v: Variant
) -> Tensor:
    """The training negatives' out-of-fold values used for thresholds (none with calib_only):
    stream peaks with stream_from, else final values."""
    if s.calib_only:
        return torch.zeros(0, dtype=torch.float64)
    return (peaks if s.stream_from is not None else tried)[v][s.train.labels == 0]


def _calibrate(
    s: BuildInputs, name: str, det: Detector, neg_oof: Tensor
) -> tuple[Tensor, float, dict[str, float]]:
    """The fitted detector's values on the calibration records (M,), its threshold for target_fpr on
    them plus `neg_oof` (them alone with calib_only), and a threshold per operating FPR."""
    neg_extra = s.calib_fitter.scores(det, torch.arange(len(s.calib.feats)), s.stream_from)  # (M,)
    negs = neg_extra if s.calib_only else torch.cat([neg_oof, neg_extra])
    thr = threshold_for_fpr(negs, s.target_fpr)
    if thr > 1.0:
        raise DetectorError(f"{name}: too many calibration negatives score 1.0 to reach FPR {s.target_fpr}")
    op_thr = {str(float(f)): threshold_for_fpr(negs, f) for f in s.operating_fprs}
    return neg_extra, thr, op_thr


def _save_weights(s: BuildInputs, det: Detector, fit: Any, path: Path) -> None:
    """A probe's weights, with the inputs it reads: latent ids for a latent probe, else hook points."""
    ids = det.latent_ids()  # a latent probe's inputs; [] for a residual probe
    save_probe(
        fit,
        path,
        hook_points=None if ids else s.points,
        latent_ids=ids or None,
    )


def _train_figures(
    s: BuildInputs,
    best: Variant,
    tried: dict[Variant, Tensor],
    oof_auc: dict[Variant, float],
    sel: dict[Variant, float],
    n_neg_oof: int,
    n_neg_extra: int,
) -> dict[str, Any]:
    """The eval entries from training records and calibration: the chosen variant, out-of-fold AUROC
    (overall, per source, per variant), the calibration negatives and the selection criterion."""
    ev: dict[str, Any] = {
        "variant_of": s.family,
        "concept": s.concept,
        "auroc_oof": round4(oof_auc[best]),
        "train": {
            "n_pos": s.n_pos,
            "n_neg": s.n_neg,
            "folds": int(s.fold.max()) + 1,
            "variant": best.as_dict(),
            "balance_sources": s.balance_sources,
            **({"token_rows": s.token_rows.as_dict()} if best.pool == "token" else {}),
            **({"data": s.data} if s.data is not None else {}),
        },
        "auroc_oof_by_source": _by_source(tried[best], s.train.labels, s.sources),
        "variants_auroc_oof": {_vname(v): round4(a) for v, a in oof_auc.items()},
        "calibration": {
            "n_neg_oof": 0 if s.calib_only else n_neg_oof,
            "n_neg_extra": n_neg_extra,
            "n_skipped_no_completion": s.n_skipped,
            **({"stream_from": s.stream_from} if s.stream_from is not None else {}),
        },
    }
    if sel:
        ev["selection"] = {
            "by": f"{s.select_by}@{s.select_fpr}",
            "n_seed_pos": int(s.seed_pos.sum()),
            **({"n_hard_neg": int(s.seed_neg.sum())} if s.hard_neg is not None else {}),
            "variants": {_vname(v): round4(r) for v, r in sel.items()},
        }
    return ev


def _held_out(s: BuildInputs, det: Detector, thr: float, op_thr: dict[str, float]) -> dict[str, Any]:
    """Figures on the test records: AUROC (final values), metrics at the threshold and each operating
    point, and the FPR on each source of test negatives (e.g. seed vs the model's own answers); with
    `stream_from` the thresholded figures use stream peaks, as the thresholds do."""
    test = s.test
    everyone = torch.arange(len(test.feats))
    finals, test_peaks = Fitter(test, s.points, s.sae, s.n_latents, s.labels).values(
        det, everyone, s.stream_from
    )
    fig: dict[str, Any] = {
        "auroc_test": round4(auroc(finals[test.labels == 1], finals[test.labels == 0]))
        if bool((test.labels == 1).any() and (test.labels == 0).any())
        else None
    }
    ts = finals if test_peaks is None else test_peaks
    tp, tn = ts[test.labels == 1], ts[test.labels == 0]
    fig["test"] = _figures(metrics(tp, tn, thr))
    if op_thr:
        fig["operating_points"] = {k: _figures(metrics(tp, tn, t)) for k, t in op_thr.items()}
    neg_src = [src for src, lab in zip(s.test_sources, test.labels.tolist(), strict=True) if lab == 0]
    if len(set(neg_src)) > 1:
        fig["test_fpr_by_source"] = {
            src: {
                name: round4(float((tn[mask] >= t).double().mean()))
                for name, t in {"threshold": thr, **op_thr}.items()
            }
            | {"n_neg": int(mask.sum())}
            for src in dict.fromkeys(neg_src)
            for mask in [torch.tensor([x == src for x in neg_src])]
        }
    return fig


def _by_pool(
    s: BuildInputs,
    name: str,
    tried: dict[Variant, Tensor],
    peaks: dict[Variant, Tensor],
    sel: dict[Variant, float],
    oof_auc: dict[Variant, float],
) -> dict[str, Any]:
    """The best variant of each training unit, fitted and calibrated the same way, on the same held-out
    records: what shipping the other unit would have given."""
    by_pool: dict[str, Any] = {}
    for pool in dict.fromkeys(v.pool for v in tried):
        bp = max((v for v in tried if v.pool == pool), key=lambda v: (sel.get(v, 0.0), oof_auc[v]))
        d, _ = s.fitter.fit(bp, s.everything, name)
        n_extra = s.calib_fitter.scores(d, torch.arange(len(s.calib.feats)), s.stream_from)
        n_all = n_extra if s.calib_only else torch.cat([_calib_negatives_oof(s, tried, peaks, bp), n_extra])
        t = threshold_for_fpr(n_all, s.target_fpr)
        ops = {str(float(f)): threshold_for_fpr(n_all, f) for f in s.operating_fprs}
        by_pool[pool] = {
            "variant": bp.as_dict(),
            "auroc_oof": round4(oof_auc[bp]),
            **({"calib_recall": round4(sel[bp])} if bp in sel else {}),
            "threshold": t,
            "operating_points": ops,
            **(_held_out(s, d, t, ops) if len(s.test.feats) else {}),
        }
    return by_pool


def _spec(
    s: BuildInputs, kind: str, det: Detector, thr: float, op_thr: dict[str, float], ev: dict[str, Any]
) -> BaseSpec:
    """The kind's spec: the fitted detector's, with its threshold, operating points and figures."""
    body = {
        **det.spec.model_dump(),
        "threshold": thr,
        "target_fpr": s.target_fpr,
        "operating_points": op_thr,
        "eval": ev,
    }
    about = s.concept if s.family == s.concept else f"{s.family} (concept {s.concept})"
    body["description"] = f"{about}: {kind} detector built by featurewatch detectors train"
    return type(det.spec).model_validate(body)


def _figures(m: dict[str, float]) -> dict[str, float | int]:
    return {k: int(v) if k.startswith("n_") else round4(v) for k, v in m.items()}


def _by_source(scores: Tensor, labels: Tensor, sources: Sequence[tuple[str, ...]]) -> dict[str, float | None]:
    """Out-of-fold AUROC within each source of training records ("seed", a public suite's train part, or
    "other": --train files): a pooled AUROC over mixed sources can hide a source it does not separate."""
    out: dict[str, float | None] = {}
    for src in dict.fromkeys(s for srcs in sources for s in srcs):
        mask = torch.tensor([src in s for s in sources])
        pos, neg = scores[mask & (labels == 1)], scores[mask & (labels == 0)]
        out[src] = round4(auroc(pos, neg)) if len(pos) and len(neg) else None
    return out


def _vname(v: Variant) -> str:
    return f"pool={v.pool},agg={v.agg}" + (f",C={v.C}" if v.kind == "probe" else "")


def round4(x: float) -> float:
    """Figures in specs: 4 decimals."""
    return round(float(x), 4)
