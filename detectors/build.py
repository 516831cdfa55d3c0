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

The parts: the variants and pool names (detectors.variants), the records' residuals and the tables fitted
on (detectors.corpus), fitting, folds and calib_recall (detectors.fitting), and each kind's selection,
calibration and figures (detectors.selection).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from detectors.base import Detector
from detectors.calibrate import metrics, threshold_for_fpr
from detectors.corpus import Corpus, TokenRows, extract_corpus
from detectors.datasets import monitored_text
from detectors.errors import DetectorError
from detectors.extract import sae_hook_point
from detectors.fitting import Fitter, Labels, assign_folds
from detectors.registry import available_detectors
from detectors.selection import BuildInputs, build_kind, round4
from detectors.spec import BaseSpec, dump_spec, load_spec
from detectors.variants import POOLS, valid_pool, variants_for
from sae_assets.hooks import hf_hook_point
from sae_assets.sae import SAE

SUFFIX = {"probe": "_probe", "sae_features": "_sae"}
SELECT_BY = ("auroc_oof", "calib_recall", "hard_recall")


@dataclass
class BuildResult:
    name: str  # the detector family (file names); the concept's own name unless given
    concept: str
    selected: str
    specs: dict[str, BaseSpec]
    paths: list[Path]


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
    _check_options(pools, stream_from, select_by)
    points = [hf_hook_point(p) for p in layers]
    capture = list(dict.fromkeys([*points, sae_hook_point(sae)]))
    kw: dict[str, Any] = {
        "batch_size": batch_size,
        "max_tokens": max_tokens,
        "progress": progress,
        "cache_dir": cache_dir,
    }
    train = extract_corpus(model, tokenizer, train_records, capture, desc=f"{concept} train", **kw)
    n_pos, n_neg = _label_counts(train, concept)
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
    fitter = Fitter(train, points, sae, n_latents, labels, token_rows)
    calib_fitter = Fitter(calib, points, sae, n_latents, labels, token_rows)
    fold = assign_folds(train.groups, train.labels, folds)
    seed_pos, seed_neg = _seed_masks(sources, train.labels)
    inputs = BuildInputs(
        concept=concept,
        family=family,
        points=points,
        sae=sae,
        n_latents=n_latents,
        labels=labels,
        train=train,
        calib=calib,
        test=test,
        n_pos=n_pos,
        n_neg=n_neg,
        n_skipped=len(calib_records) - len(calib_ok),
        fitter=fitter,
        calib_fitter=calib_fitter,
        fold=fold,
        everything=torch.arange(len(train.feats)),
        sources=sources,
        test_sources=[_sources(r)[0] for r in test_records],
        seed_pos=seed_pos,
        seed_neg=seed_neg,
        hard_neg=seed_neg if select_by == "hard_recall" else None,
        select_by=select_by,
        select_fpr=select_fpr,
        target_fpr=target_fpr,
        operating_fprs=operating_fprs,
        calib_only=calib_only,
        stream_from=stream_from,
        balance_sources=balance_sources,
        token_rows=token_rows,
        data=data,
    )
    variants = variants_for(pools)
    out = Path(out_dir)
    specs: dict[str, BaseSpec] = {}
    figures: dict[str, dict[str, Any]] = {}
    for kind, suffix in SUFFIX.items():
        name = f"{family}{suffix}"
        specs[name], figures[kind] = build_kind(
            inputs, kind, name, [v for v in variants if v.kind == kind], out
        )
    selected, specs[family] = _ship(specs, figures, family)
    paths = [dump_spec(spec, out / f"{n}.yaml") for n, spec in specs.items()]
    return BuildResult(family, concept, selected, specs, paths)


def _check_options(pools: Sequence[str], stream_from: int | None, select_by: str) -> None:
    """An error for an unknown pool, an empty pool list, stream_from < 1 or an unknown select_by."""
    unknown = [p for p in pools if not valid_pool(p)]
    if unknown or not pools:
        raise DetectorError(f"pools {list(pools)}: each must be one of {', '.join(POOLS)}")
    if stream_from is not None and stream_from < 1:
        raise DetectorError(f"stream_from must be ≥ 1, got {stream_from}")
    if select_by not in SELECT_BY:
        raise DetectorError(f"select_by {select_by!r}: must be one of {', '.join(SELECT_BY)}")


def _label_counts(train: Corpus, concept: str) -> tuple[int, int]:
    """(positives, negatives) among the training records; ≥ 2 of each or an error."""
    n_pos, n_neg = int(train.labels.sum()), int((train.labels == 0).sum())
    if min(n_pos, n_neg) < 2:
        raise DetectorError(
            f"{concept}: need ≥ 2 training records of each label (got {n_pos} pos, {n_neg} neg)"
        )
    return n_pos, n_neg


def _seed_masks(sources: Sequence[tuple[str, ...]], labels: Tensor) -> tuple[Tensor, Tensor]:
    """(N,) bool masks of the seed positives (all positives when no record is seed data) and the seed
    negatives: what the *_recall criteria count."""
    seed_pos = torch.tensor(["seed" in s for s in sources]) & (labels == 1)
    if not bool(seed_pos.any()):
        seed_pos = labels == 1
    seed_neg = torch.tensor(["seed" in s for s in sources]) & (labels == 0)
    return seed_pos, seed_neg


def _ship(
    specs: dict[str, BaseSpec], figures: dict[str, dict[str, Any]], family: str
) -> tuple[str, BaseSpec]:
    """The kind that ships as `family` (higher test AUROC, else out-of-fold) and its spec under that name."""
    key = "auroc_test" if all(f.get("auroc_test") is not None for f in figures.values()) else "auroc_oof"
    # Ties go to sae_features: same quality, but interpretable and able to steer.
    selected = max(("probe", "sae_features"), key=lambda k: (figures[k][key], k == "sae_features"))
    summary = {k: {m: figures[k].get(m) for m in ("auroc_oof", "auroc_test")} for k in SUFFIX}
    primary = specs[f"{family}{SUFFIX[selected]}"]
    ev = {k: v for k, v in primary.eval.items() if k != "variant_of"}
    ev.update(selected=selected, selected_by=key, kinds=summary)
    return selected, type(primary).model_validate({**primary.model_dump(), "name": family, "eval": ev})


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
    fig = {
        k: round4(v) for k, v in metrics(pos, neg_scores, thr).items() if len(pos) or k in ("fpr", "n_neg")
    }
    ev = {**det.spec.eval, "recalibrated": fig}
    return type(det.spec).model_validate(
        {**det.spec.model_dump(), "threshold": thr, "target_fpr": fpr, "eval": ev}
    )


def shipped_detectors(detectors_dir: str | Path) -> list[str]:
    """The detectors a monitor runs by default: every spec except build alternatives (eval.variant_of)."""
    folder = Path(detectors_dir)
    names = available_detectors(folder)
    return [n for n in names if "variant_of" not in load_spec(folder / f"{n}.yaml").eval]
