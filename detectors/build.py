"""Build a concept's detectors from labelled records, and let held-out numbers pick the one that ships.

`build_concept_detectors` extracts completion-scope residuals once (at `layers` and the SAE's hook point;
SAE latents are encoded from the stored residuals, so nothing runs the model twice) and fits two kinds:
  probe        logistic regression on residuals, applied per token and aggregated; the training unit is
               a record's mean- or max-pooled completion tokens, or (pool "token", opt-in) every
               completion token as its own row labelled with its record's label, each record weighing
               the same in total (so per-token scores mean what the served per-token aggregation uses);
  sae_features discovery on pooled SAE latents, top `n_latents` weighted by logistic regression.
Within a kind, the variant (pooling, aggregation, C) with the best out-of-fold AUROC on the training
records wins (folds keep records with the same final user prompt together: the seed data's mirror pairs);
with `select_by="calib_recall"` it is the variant whose fold models recall the most seed positives (held
out in their fold) at the threshold giving `select_fpr` on `calib_records` (no test record is used);
"hard_recall" is the same with each fold's held-out seed negatives (topic-matched hard negatives such as
genuine bank notices) added to those calibration negatives, so recall bought by firing on them does not
count. With `stream_from` the *_recall criteria, and the thresholds, read each record's stream peak (the
highest running aggregate from that token on, as a mid-stream rule does) instead of its final value.
Thresholds are set for `target_fpr` on calibration negatives: the out-of-fold scores of the training
negatives plus the final model's scores on `calib_records` (label 0 or unlabelled), or the latter only
(`calib_only`); `operating_fprs` adds further calibrated operating points on the same negatives. The kind
with the higher AUROC on `test_records` (out-of-fold AUROC without them) is written as `<name>.yaml`;
both stay as `<name>_probe.yaml` / `<name>_sae.yaml` (eval.variant_of = name), with the figures in
`eval`. The name is the concept's unless given: a second detector family for the same concept (e.g.
`scam_message`, trained on standalone messages rather than chat) records its concept as eval.concept, so
that evaluation reads that concept's seed data and public suites.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from detectors.aggregate import Aggregation, aggregate, stream_peak
from detectors.base import Detector, TokenFeatures
from detectors.calibrate import auroc, metrics, threshold_for_fpr
from detectors.datasets import group_key, monitored_text, stable_hash, truncate_records
from detectors.discover import make_sae_features_spec, rank_latents
from detectors.errors import DetectorError
from detectors.extract import iter_token_features, sae_hook_point
from detectors.probe import ProbeDetector, save_probe, train_probe
from detectors.registry import available_detectors
from detectors.sae_features import SaeFeaturesDetector
from detectors.spec import BaseSpec, ProbeSpec, dump_spec, load_spec
from sae_assets.hooks import hf_hook_point
from sae_assets.sae import SAE

SUFFIX = {"probe": "_probe", "sae_features": "_sae"}
SELECT_BY = ("auroc_oof", "calib_recall", "hard_recall")
Labels = Callable[[int], str]


@dataclass(frozen=True)
class Variant:
    kind: str
    pool: str  # "mean" / "max" / "last:K" / "mix:K:A": one pooled row per record; "token": one per token
    agg: str  # "mean", "max", "topk_mean:K", "last_mean:K" or "mix:K:A"
    C: float = 1.0

    def as_dict(self) -> dict[str, Any]:
        return {"pool": self.pool, "aggregation": self.agg, "C": self.C}


def parse_agg(agg: str) -> Aggregation:
    """A variant's aggregation name as an Aggregation ("topk_mean:8" → top-8 mean, "last_mean:2",
    "mix:2:0.5")."""
    kind, *params = agg.split(":")
    if kind == "mix":
        return Aggregation(kind="mix", k=int(params[0]), alpha=float(params[1]))
    return Aggregation.model_validate({"kind": kind, "k": int(params[0])} if params else kind)


# C = 0.001 was added when public training data came in: with ~1,000 records of 576–1,152 features the
# layer sweep (bench/detector_layers.py) picked the smallest C of the old grid for most layers.
VARIANTS = [
    Variant("probe", p, a, c)
    for p in ("mean", "max")
    for a in ("mean", "max")
    for c in (0.001, 0.01, 0.1, 1.0)
]
VARIANTS += [Variant("sae_features", p, a) for p in ("max", "mean") for a in ("max", "mean")]
# Token-level training (pools=("token", …)): the served aggregation of per-token scores is the mean or a
# top-k mean, so those are the variants; a token-level fit has ~50× more rows, so its grid is smaller.
TOKEN_VARIANTS = [
    Variant("probe", "token", a, c) for a in ("mean", "topk_mean:8") for c in (0.001, 0.01, 0.1)
]
# "latents": a probe on mean-pooled SAE latents (ProbeSpec.on_latents) instead of residuals. It reads which
# features fired, closer to a bag of words than the residual is: on CrowS-Pairs (TF-IDF's strength) it
# scored 0.70 vs the residual probe's 0.62, lower on our chat seed (docs/benchmarks.md, [3/7], session 14).
LATENT_VARIANTS = [Variant("probe", "latents", a, c) for a in ("mean", "max") for c in (0.001, 0.01, 0.1)]
# Inputs of a latent probe: the latents active (> 0) in at least this share of the fitting records, the most
# frequent first, at most LATENT_INPUTS_MAX (the SAE has 9,216; most fire rarely and only add noise).
LATENT_MIN_SHARE = 0.01
LATENT_INPUTS_MAX = 2048
POOLS = ("mean", "max", "token", "last:K", "mix:K:A", "latents")


def last_pool_k(pool: str) -> int | None:
    """K of a "last:K" pool (the mean of a record's last K completion tokens), else None."""
    name, _, k = pool.partition(":")
    return int(k) if name == "last" and k.isdigit() and int(k) >= 1 else None


def mix_pool(pool: str) -> tuple[int, float] | None:
    """(K, A) of a "mix:K:A" pool, A·mean + (1 − A)·(mean of the last K tokens) with 0 < A < 1, else None.
    Served as the `mix` aggregation, which reproduces it exactly (detectors.aggregate)."""
    name, _, rest = pool.partition(":")
    k, _, a = rest.partition(":")
    if name != "mix" or not k.isdigit() or int(k) < 1:
        return None
    try:
        alpha = float(a)
    except ValueError:
        return None
    return (int(k), alpha) if 0.0 < alpha < 1.0 else None


def valid_pool(pool: str) -> bool:
    return (
        pool in ("mean", "max", "token", "latents")
        or last_pool_k(pool) is not None
        or mix_pool(pool) is not None
    )


def last_variants(pool: str) -> list[Variant]:
    """A "last:K" fit (a truth probe reads the end of a statement: bench/detector_falsehood.py) is served
    as the mean of the last K token scores, or as the max over tokens (for answers of several sentences)."""
    k = last_pool_k(pool)
    return [Variant("probe", pool, a, c) for a in (f"last_mean:{k}", "max") for c in (0.001, 0.01, 0.1)]


def mix_variants(pool: str) -> list[Variant]:
    """A "mix:K:A" fit (TruthfulQA reads best over the mean, cities at the end: both in one probe) is served
    only as the `mix` aggregation with the same K and A: any other would not be the fitted function."""
    return [Variant("probe", pool, f"mix:{pool.partition(':')[2]}", c) for c in (0.001, 0.01, 0.1)]


@dataclass(frozen=True)
class TokenRows:
    """Token-level training: which completion tokens become rows (`skip` first tokens of each record
    left out when it has more; at most `max_rows` per record, evenly spaced)."""

    skip: int = 0
    max_rows: int = 32

    def as_dict(self) -> dict[str, int]:
        return {"skip": self.skip, "max_rows": self.max_rows}


@dataclass
class Corpus:
    """Per record: completion-scope residuals, label, fold group; pooled tables filled on demand."""

    feats: list[TokenFeatures]
    labels: Tensor  # (N,) long
    groups: list[str]
    pooled: dict[tuple[str, ...], Tensor]  # (what, hook point, pool) -> (N, D); token tables (token_table)
    weights: Tensor | None = None  # (N,) per-record probe training weights; None = all 1

    def rows(self, idx: Tensor, label: int) -> Tensor:
        return idx[self.labels[idx] == label]


@dataclass
class BuildResult:
    name: str  # the detector family (file names); the concept's own name unless given
    concept: str
    selected: str
    specs: dict[str, BaseSpec]
    paths: list[Path]


def _groups(records: Sequence[dict[str, Any]], max_shared: int = 5) -> list[str]:
    """Fold groups: records sharing a specific final user prompt (the seed data's mirror pairs) or a
    pair/group/question id. A prompt shared by more than `max_shared` records is a generic instruction
    (like the chat form's "Write an email.") and groups nothing."""
    prompts = []
    for rec in records:
        users = [m.get("content") for m in rec.get("messages") or [] if m.get("role") == "user"]
        prompts.append(str(users[-1]) if users else None)
    count = Counter(prompts)
    return [
        f"prompt={p}" if p is not None and count[p] <= max_shared else group_key(rec)
        for p, rec in zip(prompts, records, strict=True)
    ]


def extract_corpus(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    points: Sequence[str],
    *,
    default_label: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = False,
    desc: str = "extract",
    cache_dir: str | Path | None = None,
) -> Corpus:
    """Residuals of every record's completion (the whole text for `text` records). Records need a label
    (0/1) unless `default_label` is given, and a completion (a chat must end with the assistant).
    `cache_dir`: a disk cache of each record's residuals (float32, keyed by the model, the hook points and
    the record's content after truncation), so that a rerun or another concept skips the forward pass."""
    for rec in records:
        msgs = rec.get("messages")
        if isinstance(msgs, list) and msgs and msgs[-1].get("role") != "assistant":
            raise DetectorError(
                f"record {rec.get('id')!r}: a chat must end with the assistant turn to train on"
            )
        if rec.get("label", default_label) not in (0, 1):
            raise DetectorError(f"record {rec.get('id')!r}: label must be 0 or 1, got {rec.get('label')!r}")
    recs = truncate_records(records, tokenizer, max_tokens) if max_tokens else list(records)
    labels = torch.tensor([int(r.get("label", default_label) or 0) for r in recs], dtype=torch.long)
    if cache_dir is None:
        it = iter_token_features(model, tokenizer, recs, points, scope="completion", batch_size=batch_size)
        feats = list(tqdm(it, total=len(recs), desc=desc, disable=not progress, leave=False))
        return Corpus(feats, labels, _groups(recs), {})
    cache = ActivationCache(cache_dir, model, points)
    found: dict[int, TokenFeatures] = {}
    for i, r in enumerate(recs):
        hit = cache.get(r)
        if hit is not None:
            found[i] = hit
    todo = [i for i in range(len(recs)) if i not in found]
    it = iter_token_features(
        model, tokenizer, [recs[i] for i in todo], points, scope="completion", batch_size=batch_size
    )
    bar = tqdm(total=len(recs), initial=len(found), desc=desc, disable=not progress, leave=False)
    for i, f in zip(todo, it, strict=True):
        cache.put(recs[i], f)
        found[i] = f
        bar.update(1)
    bar.close()
    return Corpus([found[i] for i in range(len(recs))], labels, _groups(recs), {})


class ActivationCache:
    """Completion-scope residuals per record on disk (`<dir>/<key[:2]>/<key>.safetensors`, float32, so a
    cached corpus gives the same numbers as a live one)."""

    def __init__(self, folder: str | Path, model: Any, points: Sequence[str]) -> None:
        self.folder = Path(folder).expanduser()
        self.points = [hf_hook_point(p) for p in points]
        cfg = getattr(model, "config", None)
        ident = {
            "model": str(getattr(cfg, "_name_or_path", "")),
            "arch": cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else None,
            "n_params": sum(int(p.numel()) for p in model.parameters()),
        }
        self._model = json.dumps(ident, sort_keys=True, default=str)

    def key(self, rec: dict[str, Any]) -> str:
        body = {"m": rec.get("messages"), "t": rec.get("text"), "p": self.points, "model": self._model}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def _path(self, rec: dict[str, Any]) -> Path:
        k = self.key(rec)
        return self.folder / k[:2] / f"{k}.safetensors"

    def get(self, rec: dict[str, Any]) -> TokenFeatures | None:
        path = self._path(rec)
        if not path.is_file():
            return None
        try:
            state = load_file(str(path))
        except Exception:  # a half-written file from an interrupted run: extract again
            return None
        return TokenFeatures(resid={p: state[p].float() for p in self.points})

    def put(self, rec: dict[str, Any], feats: TokenFeatures) -> None:
        path = self._path(rec)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({p: feats.resid_at(p).float().contiguous() for p in self.points}, str(tmp))
        tmp.replace(path)


def pooled_table(corpus: Corpus, what: str, pool: str, point: str, sae: SAE | None = None) -> Tensor:
    """(N, D) pooled residuals at `point` (what="resid") or all SAE latents (what="latents"), cached."""
    key = (what, point)
    mixed = mix_pool(pool)
    if mixed is not None and (*key, pool) not in corpus.pooled:
        k, alpha = mixed
        whole = pooled_table(corpus, what, "mean", point, sae)  # (N, D)
        end = pooled_table(corpus, what, f"last:{k}", point, sae)  # (N, D)
        corpus.pooled[(*key, pool)] = alpha * whole + (1.0 - alpha) * end  # (N, D)
    k_last = last_pool_k(pool)
    if k_last is not None and (*key, pool) not in corpus.pooled:
        last = [_last_rows(f, what, point, k_last, sae) for f in corpus.feats]
        corpus.pooled[(*key, pool)] = torch.stack(last) if last else torch.zeros(0, 0)
    if (*key, pool) not in corpus.pooled:
        rows: dict[str, list[Tensor]] = {"max": [], "mean": []}
        for f in corpus.feats:  # both pools in one pass: encoding all latents is the costly part
            x = f.resid_at(point).float()
            if what == "latents":
                assert sae is not None
                with torch.inference_mode():
                    x = sae.encode(x.to(sae.W_enc.device)).float().cpu()
            empty = x.shape[0] == 0
            rows["max"].append(torch.zeros(x.shape[1]) if empty else x.max(dim=0).values)
            rows["mean"].append(torch.zeros(x.shape[1]) if empty else x.mean(dim=0))
        for p, r in rows.items():
            corpus.pooled[(*key, p)] = torch.stack(r) if r else torch.zeros(0, 0)
    return corpus.pooled[(*key, pool)]


def _last_rows(f: TokenFeatures, what: str, point: str, k: int, sae: SAE | None) -> Tensor:
    """(D,) mean of the last k tokens' residuals (or SAE latents) of one record."""
    x = f.resid_at(point).float()[-k:]  # (≤k, d_in)
    if what == "latents":
        assert sae is not None
        with torch.inference_mode():
            x = sae.encode(x.to(sae.W_enc.device)).float().cpu()  # (≤k, d_sae)
    return x.mean(dim=0) if x.shape[0] else torch.zeros(x.shape[1])


def active_latents(lat: Tensor) -> list[int]:
    """Ids of the latents active (> 0) in at least LATENT_MIN_SHARE of the rows of `lat` (N, d_sae), the
    most frequent first (ties: lower id), at most LATENT_INPUTS_MAX; at least one."""
    share = (lat > 0).double().mean(dim=0)  # (d_sae,)
    order = torch.sort(share, descending=True, stable=True).indices  # stable: ties keep the lower id first
    keep = order[share[order] >= LATENT_MIN_SHARE][:LATENT_INPUTS_MAX]
    return (keep if len(keep) else order[:1]).tolist()


def token_table(corpus: Corpus, points: Sequence[str], rows: TokenRows) -> tuple[Tensor, Tensor, Tensor]:
    """Token-level training rows, cached: (X (R, D) residuals at `points` concatenated, record index (R,),
    row weight (R,)). A record's rows share its weight (corpus.weights, else 1) equally, so every record
    counts the same however long it is."""
    key = ("token", "|".join(points), f"{rows.skip},{rows.max_rows}")
    if key not in corpus.pooled:
        xs, owner, weight = [], [], []
        for i, f in enumerate(corpus.feats):
            x = torch.cat([f.resid_at(p).float() for p in points], dim=1)
            if x.shape[0] > rows.skip:
                x = x[rows.skip :]
            if x.shape[0] > rows.max_rows:
                x = x[torch.linspace(0, x.shape[0] - 1, rows.max_rows).round().long().unique()]
            if x.shape[0] == 0:
                continue
            w = 1.0 if corpus.weights is None else float(corpus.weights[i])
            xs.append(x)
            owner.append(torch.full((x.shape[0],), i, dtype=torch.long))
            weight.append(torch.full((x.shape[0],), w / x.shape[0], dtype=torch.float64))
        corpus.pooled[key] = torch.cat(xs)
        corpus.pooled[(*key, "owner")] = torch.cat(owner)
        corpus.pooled[(*key, "weight")] = torch.cat(weight)
    return corpus.pooled[key], corpus.pooled[(*key, "owner")], corpus.pooled[(*key, "weight")]


class _Fitter:
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
        self, v: Variant, folds: Tensor, calib: _Fitter | None = None, peak_from: int | None = None
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


def _r(x: float) -> float:
    return round(float(x), 4)


def build_concept_detectors(
    model: Any,
    tokenizer: Any,
    sae: SAE,
    concept: str,
    train_records: Sequence[dict[str, Any]],
    calib_records: Sequence[dict[str, Any]],
    out_dir: str | Path,
    *,
    test_records: Sequence[dict[str, Any]] = (),
    layers: Sequence[str] = ("model.layers.15",),
    n_latents: int = 16,
    target_fpr: float = 0.01,
    folds: int = 5,
    labels: Labels | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
    data: dict[str, Any] | None = None,
    balance_sources: bool = False,
    pools: Sequence[str] = ("mean", "max"),
    token_rows: TokenRows = TokenRows(),
    select_by: str = "auroc_oof",
    select_fpr: float = 0.05,
    calib_only: bool = False,
    operating_fprs: Sequence[float] = (),
    stream_from: int | None = None,
    cache_dir: str | Path | None = None,
    name: str | None = None,
) -> BuildResult:
    """Fit, calibrate, compare and write both kinds for `concept` (see the module doc). `data` describes
    the training records (detectors.datasets.TrainingData.as_dict) and is stored as eval.train.data, so
    that evaluation can rebuild them for its baseline. `balance_sources` weights probe training records
    so that every source (seed, each public suite) has the same total weight (source_weights).
    `pools`: the probe training units to try ("mean", "max", "token"); `token_rows`: which tokens a
    token-level fit reads. `select_by`: one of SELECT_BY (see the module doc).
    `calib_only`: thresholds from `calib_records` alone. `operating_fprs`: extra operating points.
    `stream_from`: calibrate on each negative's highest running value from that token on (the peak a
    mid-stream rule with `min_tokens: stream_from` sees) instead of its final value. `name`: the detector
    family written (default: the concept)."""
    family = name or concept
    unknown = [p for p in pools if not valid_pool(p)]
    if unknown or not pools:
        raise DetectorError(f"pools {list(pools)}: each must be one of {', '.join(POOLS)}")
    if stream_from is not None and stream_from < 1:
        raise DetectorError(f"stream_from must be ≥ 1, got {stream_from}")
    if select_by not in SELECT_BY:
        raise DetectorError(f"select_by {select_by!r}: must be one of {', '.join(SELECT_BY)}")
    points = [hf_hook_point(p) for p in layers]
    capture = list(dict.fromkeys([*points, sae_hook_point(sae)]))
    kw: dict[str, Any] = {
        "batch_size": batch_size,
        "max_tokens": max_tokens,
        "progress": progress,
        "cache_dir": cache_dir,
    }
    train = extract_corpus(model, tokenizer, train_records, capture, desc=f"{concept} train", **kw)
    n_pos, n_neg = int(train.labels.sum()), int((train.labels == 0).sum())
    if min(n_pos, n_neg) < 2:
        raise DetectorError(
            f"{concept}: need ≥ 2 training records of each label (got {n_pos} pos, {n_neg} neg)"
        )
    calib_ok = [r for r in calib_records if r.get("label", 0) == 0 and _has_completion(r)]
    if (calib_only or select_by != "auroc_oof") and not calib_ok:
        raise DetectorError(f"{concept}: calib_only / select_by={select_by} need calibration records")
    calib = extract_corpus(
        model, tokenizer, calib_ok, capture, default_label=0, desc=f"{concept} calib", **kw
    )
    test = extract_corpus(model, tokenizer, test_records, capture, desc=f"{concept} test", **kw)
    sources = [_sources(r) for r in train_records]
    if balance_sources:
        train.weights = source_weights([srcs[0] for srcs in sources])
    fitter = _Fitter(train, points, sae, n_latents, labels, token_rows)
    calib_fitter = _Fitter(calib, points, sae, n_latents, labels, token_rows)
    fold = assign_folds(train.groups, train.labels, folds)
    seed_pos = torch.tensor(["seed" in s for s in sources]) & (train.labels == 1)
    if not bool(seed_pos.any()):
        seed_pos = train.labels == 1
    seed_neg = torch.tensor(["seed" in s for s in sources]) & (train.labels == 0)
    hard_neg = seed_neg if select_by == "hard_recall" else None
    everything = torch.arange(len(train.feats))
    variants = [v for v in VARIANTS if v.kind != "probe" or v.pool in pools]
    variants += [v for v in TOKEN_VARIANTS if "token" in pools]
    variants += [v for v in LATENT_VARIANTS if "latents" in pools]
    variants += [v for p in pools if last_pool_k(p) is not None for v in last_variants(p)]
    variants += [v for p in pools if mix_pool(p) is not None for v in mix_variants(p)]
    test_sources = [_sources(r)[0] for r in test_records]

    def held_out(det: Detector, thr: float, op_thr: dict[str, float]) -> dict[str, Any]:
        """Figures on the test records: AUROC (final values), metrics at the threshold and each operating
        point, and the FPR on each source of test negatives (e.g. seed vs the model's own answers); with
        `stream_from` the thresholded figures use stream peaks, as the thresholds do."""
        everyone = torch.arange(len(test.feats))
        finals, test_peaks = _Fitter(test, points, sae, n_latents, labels).values(det, everyone, stream_from)
        fig: dict[str, Any] = {
            "auroc_test": _r(auroc(finals[test.labels == 1], finals[test.labels == 0]))
            if bool((test.labels == 1).any() and (test.labels == 0).any())
            else None
        }
        ts = finals if test_peaks is None else test_peaks
        tp, tn = ts[test.labels == 1], ts[test.labels == 0]
        fig["test"] = _figures(metrics(tp, tn, thr))
        if op_thr:
            fig["operating_points"] = {k: _figures(metrics(tp, tn, t)) for k, t in op_thr.items()}
        neg_src = [src for src, lab in zip(test_sources, test.labels.tolist(), strict=True) if lab == 0]
        if len(set(neg_src)) > 1:
            fig["test_fpr_by_source"] = {
                src: {
                    name: _r(float((tn[mask] >= t).double().mean()))
                    for name, t in {"threshold": thr, **op_thr}.items()
                }
                | {"n_neg": int(mask.sum())}
                for src in dict.fromkeys(neg_src)
                for mask in [torch.tensor([s == src for s in neg_src])]
            }
        return fig

    def calib_negatives_oof(v: Variant) -> Tensor:
        """The training negatives' out-of-fold values used for thresholds (none with calib_only):
        stream peaks with stream_from, else final values."""
        if calib_only:
            return torch.zeros(0, dtype=torch.float64)
        return (peaks if stream_from is not None else tried)[v][train.labels == 0]

    out, specs, figures = Path(out_dir), {}, {}
    tried: dict[Variant, Tensor] = {}  # out-of-fold final values per variant (AUROC)
    peaks: dict[Variant, Tensor] = {}  # their stream peaks (stream_from): selection and thresholds
    for kind, suffix in SUFFIX.items():
        name = f"{family}{suffix}"
        tried.clear()
        peaks.clear()
        sel: dict[Variant, float] = {}
        use_calib = calib_fitter if select_by != "auroc_oof" else None
        for v in (v for v in variants if v.kind == kind):
            # with stream_from, each variant is judged as its mid-stream rules will run: on peaks
            tried[v], v_peaks, per_fold = fitter.oof(v, fold, use_calib, stream_from)
            if v_peaks is not None:
                peaks[v] = v_peaks
            if use_calib is not None:
                vals = tried[v] if v_peaks is None else v_peaks
                sel[v] = calib_recall(vals, per_fold, fold, seed_pos, select_fpr, hard_neg)
        oof_auc = {v: auroc(s[train.labels == 1], s[train.labels == 0]) for v, s in tried.items()}
        # First listed wins ties: the simpler variants.
        best = max(tried, key=lambda v: (sel.get(v, 0.0), oof_auc[v]))
        det, fit = fitter.fit(best, everything, name)
        neg_oof = calib_negatives_oof(best)
        neg_extra = calib_fitter.scores(det, torch.arange(len(calib.feats)), stream_from)
        negs = neg_extra if calib_only else torch.cat([neg_oof, neg_extra])
        thr = threshold_for_fpr(negs, target_fpr)
        if thr > 1.0:
            raise DetectorError(f"{name}: too many calibration negatives score 1.0 to reach FPR {target_fpr}")
        op_thr = {str(float(f)): threshold_for_fpr(negs, f) for f in operating_fprs}
        ev: dict[str, Any] = {
            "variant_of": family,
            "concept": concept,
            "auroc_oof": _r(oof_auc[best]),
            "train": {
                "n_pos": n_pos,
                "n_neg": n_neg,
                "folds": int(fold.max()) + 1,
                "variant": best.as_dict(),
                "balance_sources": balance_sources,
                **({"token_rows": token_rows.as_dict()} if best.pool == "token" else {}),
                **({"data": data} if data is not None else {}),
            },
            "auroc_oof_by_source": _by_source(tried[best], train.labels, sources),
            "variants_auroc_oof": {_vname(v): _r(a) for v, a in oof_auc.items()},
            "calibration": {
                "n_neg_oof": 0 if calib_only else len(neg_oof),
                "n_neg_extra": len(neg_extra),
                "n_skipped_no_completion": len(calib_records) - len(calib_ok),
                **({"stream_from": stream_from} if stream_from is not None else {}),
            },
        }
        if sel:
            ev["selection"] = {
                "by": f"{select_by}@{select_fpr}",
                "n_seed_pos": int(seed_pos.sum()),
                **({"n_hard_neg": int(seed_neg.sum())} if hard_neg is not None else {}),
                "variants": {_vname(v): _r(r) for v, r in sel.items()},
            }
        if len(test.feats):
            ev.update(held_out(det, thr, op_thr))
        if kind == "probe" and len({v.pool for v in tried}) > 1:
            # The best variant of each training unit, fitted and calibrated the same way, on the same
            # held-out records: what shipping the other unit would have given.
            ev["by_pool"] = {}
            for pool in dict.fromkeys(v.pool for v in tried):
                bp = max((v for v in tried if v.pool == pool), key=lambda v: (sel.get(v, 0.0), oof_auc[v]))
                d, _ = fitter.fit(bp, everything, name)
                n_extra = calib_fitter.scores(d, torch.arange(len(calib.feats)), stream_from)
                n_all = n_extra if calib_only else torch.cat([calib_negatives_oof(bp), n_extra])
                t = threshold_for_fpr(n_all, target_fpr)
                ops = {str(float(f)): threshold_for_fpr(n_all, f) for f in operating_fprs}
                ev["by_pool"][pool] = {
                    "variant": bp.as_dict(),
                    "auroc_oof": _r(oof_auc[bp]),
                    **({"calib_recall": _r(sel[bp])} if bp in sel else {}),
                    "threshold": t,
                    "operating_points": ops,
                    **(held_out(d, t, ops) if len(test.feats) else {}),
                }
        body = {
            **det.spec.model_dump(),
            "threshold": thr,
            "target_fpr": target_fpr,
            "operating_points": op_thr,
            "eval": ev,
        }
        about = concept if family == concept else f"{family} (concept {concept})"
        body["description"] = f"{about}: {kind} detector built by featurewatch detectors train"
        specs[name] = type(det.spec).model_validate(body)
        if fit is not None:
            ids = det.latent_ids()  # a latent probe's inputs; [] for a residual probe
            save_probe(
                fit,
                out / f"{name}.safetensors",
                hook_points=None if ids else points,
                latent_ids=ids or None,
            )
        figures[kind] = ev
    key = "auroc_test" if all(f.get("auroc_test") is not None for f in figures.values()) else "auroc_oof"
    # Ties go to sae_features: same quality, but interpretable and able to steer.
    selected = max(("probe", "sae_features"), key=lambda k: (figures[k][key], k == "sae_features"))
    summary = {k: {m: figures[k].get(m) for m in ("auroc_oof", "auroc_test")} for k in SUFFIX}
    primary = specs[f"{family}{SUFFIX[selected]}"]
    ev = {k: v for k, v in primary.eval.items() if k != "variant_of"}
    ev.update(selected=selected, selected_by=key, kinds=summary)
    specs[family] = type(primary).model_validate({**primary.model_dump(), "name": family, "eval": ev})
    paths = [dump_spec(spec, out / f"{n}.yaml") for n, spec in specs.items()]
    return BuildResult(family, concept, selected, specs, paths)


def _figures(m: dict[str, float]) -> dict[str, float | int]:
    return {k: int(v) if k.startswith("n_") else _r(v) for k, v in m.items()}


def source_weights(sources: Sequence[str]) -> Tensor:
    """(N,) weights giving every source the same total weight, mean 1: with 1,000+ public records and
    ~150 seed records the probe would otherwise fit the public data's style and neglect the seed data's
    chat-format hard negatives (what the monitor actually reads)."""
    count = Counter(sources)
    w = torch.tensor([1.0 / count[s] for s in sources], dtype=torch.float64)
    return w * (len(sources) / w.sum())


def _sources(rec: dict[str, Any]) -> tuple[str, ...]:
    """The public suites that drew a record (detectors.datasets.public_train_records), else seed/other."""
    suites = rec.get("suites") or ([rec["suite"]] if rec.get("suite") else [])
    return tuple(map(str, suites)) or ("seed" if "split" in rec else "other",)


def _by_source(scores: Tensor, labels: Tensor, sources: Sequence[tuple[str, ...]]) -> dict[str, float | None]:
    """Out-of-fold AUROC within each source of training records ("seed", a public suite's train part, or
    "other": --train files): a pooled AUROC over mixed sources can hide a source it does not separate."""
    out: dict[str, float | None] = {}
    for src in dict.fromkeys(s for srcs in sources for s in srcs):
        mask = torch.tensor([src in s for s in sources])
        pos, neg = scores[mask & (labels == 1)], scores[mask & (labels == 0)]
        out[src] = _r(auroc(pos, neg)) if len(pos) and len(neg) else None
    return out


def _vname(v: Variant) -> str:
    return f"pool={v.pool},agg={v.agg}" + (f",C={v.C}" if v.kind == "probe" else "")


def _has_completion(rec: dict[str, Any]) -> bool:
    msgs = rec.get("messages")
    if isinstance(msgs, list) and msgs:
        return msgs[-1].get("role") == "assistant" and bool(monitored_text(rec).strip())
    return isinstance(rec.get("text"), str)


def recalibrate(
    det: Detector, neg_scores: Tensor, pos_scores: Tensor | None = None, target_fpr: float | None = None
) -> BaseSpec:
    """A copy of the spec with its threshold set for `target_fpr` on these negatives' message values
    (figures on positives added when given); other eval entries are kept."""
    fpr = target_fpr or det.spec.target_fpr or 0.01
    thr = threshold_for_fpr(neg_scores, fpr)
    if thr > 1.0:
        raise DetectorError(f"{det.name}: too many negatives score 1.0 to reach FPR {fpr}")
    pos = pos_scores if pos_scores is not None else torch.zeros(0)
    fig = {k: _r(v) for k, v in metrics(pos, neg_scores, thr).items() if len(pos) or k in ("fpr", "n_neg")}
    ev = {**det.spec.eval, "recalibrated": fig}
    return type(det.spec).model_validate(
        {**det.spec.model_dump(), "threshold": thr, "target_fpr": fpr, "eval": ev}
    )


def shipped_detectors(detectors_dir: str | Path) -> list[str]:
    """The detectors a monitor runs by default: every spec except build alternatives (eval.variant_of)."""
    folder = Path(detectors_dir)
    names = available_detectors(folder)
    return [n for n in names if "variant_of" not in load_spec(folder / f"{n}.yaml").eval]
