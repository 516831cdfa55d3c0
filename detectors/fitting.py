"""Fitting a variant on some records of a corpus and scoring others: out-of-fold values over grouped,
stratified folds, the inputs of a latent probe, and the calibration recall that selection can rank by.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from detectors.aggregate import aggregate, stream_peak
from detectors.base import Detector, TokenFeatures
from detectors.calibrate import threshold_for_fpr
from detectors.corpus import Corpus, TokenRows, pooled_table, token_table
from detectors.datasets import stable_hash
from detectors.discover import make_sae_features_spec, rank_latents
from detectors.errors import DetectorError
from detectors.extract import sae_hook_point
from detectors.probe import ProbeDetector, train_probe
from detectors.sae_features import SaeFeaturesDetector
from detectors.spec import ProbeSpec
from detectors.variants import Variant, parse_agg
from sae_assets.sae import SAE

Labels = Callable[[int], str]  # a latent id -> its label, for sae_features specs

# Inputs of a latent probe: the latents active (> 0) in at least this share of the fitting records, the most
# frequent first, at most LATENT_INPUTS_MAX (the SAE has 9,216; most fire rarely and only add noise).
LATENT_MIN_SHARE = 0.01
LATENT_INPUTS_MAX = 2048


def active_latents(lat: Tensor) -> list[int]:
    """Ids of the latents active (> 0) in at least LATENT_MIN_SHARE of the rows of `lat` (N, d_sae), the
    most frequent first (ties: lower id), at most LATENT_INPUTS_MAX; at least one."""
    share = (lat > 0).double().mean(dim=0)  # (d_sae,)
    order = torch.sort(share, descending=True, stable=True).indices  # stable: ties keep the lower id first
    keep = order[share[order] >= LATENT_MIN_SHARE][:LATENT_INPUTS_MAX]
    return (keep if len(keep) else order[:1]).tolist()


class Fitter:
    """Fits a variant on some records of a corpus and scores others (message values)."""

    def __init__(
        self,
        corpus: Corpus,
        points: list[str],
        sae: SAE,
        n_latents: int,
        labels: Labels | None,
        token_rows: TokenRows = TokenRows(),
    ):
        self.c, self.points, self.sae, self.n, self.labels = corpus, points, sae, n_latents, labels
        self.sae_point = sae_hook_point(sae)
        self.token_rows = token_rows
        self._fits: dict[tuple[Any, ...], Any] = {}  # probe fits shared by variants that differ in agg only

    def _probe_fit(self, v: Variant, idx: Tensor) -> tuple[Any, list[int] | None]:
        """The fitted probe and, for a latent probe, the latent ids it reads (else None)."""
        key = (v.pool, v.C, hashlib.sha256(idx.numpy().tobytes()).hexdigest())
        if key in self._fits:
            return self._fits[key]
        pos, neg = self.c.rows(idx, 1), self.c.rows(idx, 0)
        w = self.c.weights
        ids: list[int] | None = None
        if v.pool == "token":
            x, owner, weight = token_table(self.c, self.points, self.token_rows)
            keep = torch.zeros(len(self.c.feats), dtype=torch.bool)
            keep[idx] = True
            sel = keep[owner]
            x, owner, weight = x[sel], owner[sel], weight[sel]
            y = self.c.labels[owner]
            fit = train_probe(x[y == 1], x[y == 0], C=v.C, w_pos=weight[y == 1], w_neg=weight[y == 0])
        else:
            if v.pool == "latents":
                lat = pooled_table(self.c, "latents", "mean", self.sae_point, self.sae)  # (N, d_sae)
                ids = active_latents(lat[idx])
                x = lat[:, ids]
            else:
                x = torch.cat([pooled_table(self.c, "resid", v.pool, p) for p in self.points], dim=1)
            fit = train_probe(
                x[pos],
                x[neg],
                C=v.C,
                w_pos=None if w is None else w[pos],
                w_neg=None if w is None else w[neg],
            )
        self._fits[key] = (fit, ids)
        return fit, ids

    def fit(self, v: Variant, idx: Tensor, name: str) -> tuple[Detector, Any]:
        agg = parse_agg(v.agg)
        pos, neg = self.c.rows(idx, 1), self.c.rows(idx, 0)
        if v.kind == "probe":
            fit, ids = self._probe_fit(v, idx)
            probe = ProbeSpec(
                name=name,
                threshold=0.5,
                aggregation=agg,
                hook_points=[] if ids is not None else self.points,
                on_latents=ids is not None,
                latent_ids=ids,
                weights_file=f"{name}.safetensors",
            )
            return ProbeDetector(probe, fit, ids or []), fit
        x = pooled_table(self.c, "latents", v.pool, self.sae_point, self.sae)
        ranked = rank_latents(x[pos], x[neg])
        if self.labels is not None:
            ranked = [replace(r, label=self.labels(r.latent_id)) for r in ranked[: self.n]]
        spec = make_sae_features_spec(ranked, self.n, x[pos], x[neg], name=name, aggregation=agg)
        return SaeFeaturesDetector(spec), None

    def scores(self, det: Detector, idx: Tensor, peak_from: int | None = None) -> Tensor:
        """Message values of records `idx`; with `peak_from`, each record's highest running value from
        that token on (aggregate.stream_peak: what a mid-stream rule with that min_tokens sees)."""
        finals, peaks = self.values(det, idx, peak_from)
        return finals if peaks is None else peaks

    def values(self, det: Detector, idx: Tensor, peak_from: int | None) -> tuple[Tensor, Tensor | None]:
        """Final message values of records `idx` and (with `peak_from`) their stream peaks, both from
        one pass over each record's token scores."""
        finals, peaks = [], []
        agg = det.spec.aggregation
        ids = det.latent_ids()  # the latents score_tokens reads (sae_features, latent probes); else []
        for i in idx.tolist():
            f = self.c.feats[i]
            if ids:
                with torch.inference_mode():
                    lat = self.sae.encode_watched(f.resid_at(self.sae_point).to(self.sae.W_enc.device), ids)
                f = TokenFeatures(latents=lat.float().cpu(), latent_ids=ids)
            tokens = det.score_tokens(f)
            finals.append(aggregate(tokens, agg))
            if peak_from is not None:
                peaks.append(stream_peak(tokens, agg, peak_from))
        out = torch.tensor(finals, dtype=torch.float64)
        return out, (torch.tensor(peaks, dtype=torch.float64) if peak_from is not None else None)

    def oof(
        self, v: Variant, folds: Tensor, calib: Fitter | None = None, peak_from: int | None = None
    ) -> tuple[Tensor, Tensor | None, list[Tensor]]:
        """Out-of-fold final message values for every record, their stream peaks (with `peak_from`, see
        `scores`; else None), and (with `calib`) each fold model's values on the calibration records,
        peaks with `peak_from` (one tensor per fold, in fold order)."""
        out = torch.zeros(len(folds), dtype=torch.float64)
        out_peaks = torch.zeros(len(folds), dtype=torch.float64) if peak_from is not None else None
        per_fold: list[Tensor] = []
        for k in folds.unique().tolist():
            det, _ = self.fit(v, torch.nonzero(folds != k).flatten(), "oof")
            held = torch.nonzero(folds == k).flatten()
            out[held], held_peaks = self.values(det, held, peak_from)
            if out_peaks is not None and held_peaks is not None:
                out_peaks[held] = held_peaks
            if calib is not None:
                per_fold.append(calib.scores(det, torch.arange(len(calib.c.feats)), peak_from))
        return out, out_peaks, per_fold


def calib_recall(
    oof: Tensor,
    per_fold_calib: Sequence[Tensor],
    folds: Tensor,
    positives: Tensor,
    fpr: float,
    hard_negatives: Tensor | None = None,
) -> float:
    """Share of `positives` (bool mask) that their own fold's model scores at or above the threshold
    giving `fpr` on the calibration records (scored by that same fold model) — plus, with
    `hard_negatives` (bool mask), that fold's held-out training negatives of the mask, so that a
    variant firing on topic-matched benign texts pays for it in recall."""
    hits, total = 0, 0
    for j, k in enumerate(folds.unique().tolist()):
        negs = per_fold_calib[j]
        if hard_negatives is not None:
            negs = torch.cat([negs, oof[hard_negatives & (folds == k)].to(negs.dtype)])
        thr = threshold_for_fpr(negs, fpr)
        m = positives & (folds == k)
        hits += int((oof[m] >= thr).sum())
        total += int(m.sum())
    return hits / total if total else 0.0


def assign_folds(groups: Sequence[str], labels: Tensor, k: int) -> Tensor:
    """Fold per record, ≤ k folds. Groups stay together; groups sorted by their labels, then sha256, are
    dealt round-robin (stratified). Fewer folds are used when some fold's complement would lack a label."""
    members: dict[str, set[int]] = {}
    for g, lab in zip(groups, labels.tolist(), strict=True):
        members.setdefault(g, set()).add(lab)
    order = sorted(members, key=lambda g: (sorted(members[g]), stable_hash("fold", g), g))
    for n in range(min(k, len(order)), 1, -1):
        fold_of = {g: j % n for j, g in enumerate(order)}
        fold = torch.tensor([fold_of[g] for g in groups], dtype=torch.long)
        if all(len(labels[fold != f].unique()) == 2 for f in range(n)):
            return fold
    raise DetectorError("too few independent groups of records to cross-validate (need ≥ 2 per label)")
