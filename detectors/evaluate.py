"""Evaluate each concept's detectors (probe and sae_features side by side) against a TF-IDF baseline.

Suites: our own held-out seed test split ("seed-test") and the public slices of detectors.datasets
.EVAL_SUITES (test splits only; missing files are reported, not fatal). Detectors are scored exactly as
`featurewatch score` does (detectors.scoring.Scorer); the baseline reads the same monitored text (the
assistant turn, or the text). Per suite and detector:
  auroc           threshold-free separation of positives from negatives;
  recall_at_fpr   recall at the threshold that gives `target_fpr` on this suite's own negatives (an
                  oracle threshold: what the scores could do here);
  f1, recall, fpr at the detector's calibrated threshold from its spec (what shipping it would do).
Baseline: TfidfVectorizer(ngram 1-2, min_df 2) + LogisticRegression(balanced) trained on the same records
as the detectors: the shipped spec's eval.train.data (detectors.datasets.TrainingData: the seed train split
and/or N public train records per suite, cut to the same max_tokens) is rebuilt here; a spec without it was
trained on the seed train split alone. Its threshold is calibrated like the detectors' (target FPR on
out-of-fold training negatives).
A second detector family of a concept (e.g. scam_message: `detectors train --name`) is evaluated by its
own name on its concept's suites (eval.concept in its spec).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from detectors.base import Detector
from detectors.build import SUFFIX
from detectors.calibrate import auroc, metrics, threshold_for_fpr
from detectors.datasets import (
    EVAL_SUITES,
    SEED_CONCEPTS,
    DatasetError,
    EvalSuite,
    TrainingData,
    load_seed,
    monitored_text,
    truncate_records,
)
from detectors.errors import DetectorError
from detectors.registry import available_detectors, load_detector
from detectors.scoring import Scorer
from sae_assets.registry import DEFAULT_SAE
from sae_assets.sae import SAE

BASELINE = "tfidf"
TRAIN_ROW = "train"  # the suite name of the bookkeeping row that says what a concept was trained on


@dataclass(frozen=True)
class EvalRow:
    concept: str
    suite: str
    detector: str  # "probe", "sae_features" or "tfidf"
    shipped: bool  # the kind that ships as <concept>
    n_pos: int
    n_neg: int
    auroc: float | None
    recall_at_fpr: float | None
    f1: float | None
    recall: float | None
    fpr: float | None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class TfidfBaseline:
    """Bag-of-n-grams logistic regression on the monitored text, with a calibrated threshold."""

    def __init__(self, texts: Sequence[str], labels: Sequence[int], target_fpr: float = 0.01) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold, cross_val_predict
        from sklearn.pipeline import make_pipeline

        def pipe() -> Any:
            vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2)
            return make_pipeline(vec, LogisticRegression(class_weight="balanced", max_iter=2000))

        y = np.asarray(labels)
        k = int(min(5, np.bincount(y, minlength=2).min()))
        if k < 2:
            raise DetectorError("the TF-IDF baseline needs ≥ 2 training texts of each label")
        cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=0)
        self.n_pos, self.n_neg = int((y == 1).sum()), int((y == 0).sum())
        oof = cross_val_predict(pipe(), list(texts), y, cv=cv, method="predict_proba")[:, 1]
        self.threshold = threshold_for_fpr(oof[y == 0], target_fpr)
        self.model = pipe().fit(list(texts), y)

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.model.predict_proba(list(texts))[:, 1], dtype=np.float64)


def _row(
    concept: str,
    suite: str,
    det: str,
    shipped: bool,
    pos: Any,
    neg: Any,
    thr: float,
    target_fpr: float,
    note: str,
) -> EvalRow:
    p, n = torch.as_tensor(pos, dtype=torch.float64), torch.as_tensor(neg, dtype=torch.float64)
    if not len(p) or not len(n):
        return EvalRow(
            concept,
            suite,
            det,
            shipped,
            len(p),
            len(n),
            None,
            None,
            None,
            None,
            None,
            note or "one class only",
        )
    oracle = threshold_for_fpr(n, target_fpr)
    m = metrics(p, n, thr)
    return EvalRow(
        concept,
        suite,
        det,
        shipped,
        len(p),
        len(n),
        auroc(p, n),
        float((p >= oracle).double().mean()),
        m["f1"],
        m["recall_at_fpr"],
        m["fpr"],
        note,
    )


def concept_detectors(
    detectors_dir: str | Path, concept: str, sae: SAE | None, model: Any
) -> tuple[dict[str, Detector], str]:
    """({kind: detector}, shipped kind): `<concept>` for its own kind, the build alternative for the other."""
    names = available_detectors(detectors_dir)
    dets = {
        kind: load_detector(f"{concept}{suffix}", detectors_dir, sae, model=model)
        for kind, suffix in SUFFIX.items()
        if f"{concept}{suffix}" in names
    }
    if concept in names:
        primary = load_detector(concept, detectors_dir, sae, model=model)
        dets[primary.spec.kind] = primary  # the shipped spec itself (it may have been recalibrated since)
        return dets, primary.spec.kind
    if not dets:
        raise DetectorError(
            f"no detectors for concept {concept!r} in {detectors_dir}; valid: {', '.join(names) or 'none'}"
        )
    return dets, ""


def evaluate_detectors(
    model: Any,
    tokenizer: Any,
    sae: SAE | None,
    detectors_dir: str | Path,
    concepts: Sequence[str] = SEED_CONCEPTS,
    *,
    suites: dict[str, list[EvalSuite]] | None = None,
    max_per_suite: int | None = None,
    max_tokens: int | None = 192,
    chat: bool = True,
    seed_sae: str | Path = DEFAULT_SAE,
    target_fpr: float = 0.01,
    batch_size: int = 8,
    progress: bool = False,
    extra_negatives: Mapping[str, Sequence[dict[str, Any]]] | None = None,
    extra_suites: Mapping[str, tuple[Sequence[dict[str, Any]], str]] | None = None,
) -> list[EvalRow]:
    """Rows for every (concept, suite, detector kind + baseline); see the module doc.
    `extra_negatives` {name: records}: for each, a suite `seed-test+<name>` of the seed test split plus
    those records as further negatives (e.g. the monitored model's own held-out answers).
    `extra_suites` {name: (labelled records, note)}: further test suites as they are (e.g. held-out files
    of our own), for every concept evaluated."""
    rows: list[EvalRow] = []
    for family in concepts:
        dets, shipped = concept_detectors(detectors_dir, family, sae, model)
        concept = concept_of(dets, shipped, family)
        base, data = baseline_for(concept, dets, shipped, tokenizer, seed_sae, target_fpr)
        rows.append(_training_row(family, data, base))
        scorer = Scorer(model, tokenizer, sae, dict(dets), top_k=0)
        seed_test = load_seed(concept, "test", sae=seed_sae)
        todo: list[tuple[str, list[dict[str, Any]] | None, str]] = [
            ("seed-test", seed_test, "our held-out split")
        ]
        for extra, negs in (extra_negatives or {}).items():
            more = [{**r, "label": 0} for r in negs]
            todo.append((f"seed-test+{extra}", seed_test + more, f"seed test split + {len(more)} {extra}"))
        todo += [(name, list(recs), note) for name, (recs, note) in (extra_suites or {}).items()]
        for suite in (suites if suites is not None else EVAL_SUITES).get(concept, []):
            try:
                todo.append((suite.name, suite.load(max_n=max_per_suite, chat=chat), suite.note))
            except DatasetError as e:
                todo.append((suite.name, None, f"skipped: {e}"))
        for name, recs, note in todo:
            if recs is None:
                rows.append(EvalRow(concept, name, "-", False, 0, 0, None, None, None, None, None, note))
                continue
            if max_tokens:
                recs = truncate_records(recs, tokenizer, max_tokens)
            rows.extend(
                _suite_rows(family, name, note, recs, scorer, base, shipped, target_fpr, batch_size, progress)
            )
    return rows


def _shipped_first(dets: dict[str, Detector], shipped: str) -> list[str]:
    return [shipped, *dets] if shipped else list(dets)


def concept_of(dets: dict[str, Detector], shipped: str, family: str) -> str:
    """The labelled concept a detector family was built for (its specs' `concept`), else the family's
    own name (specs from before it was recorded)."""
    found = (dets[kind].spec.concept for kind in _shipped_first(dets, shipped))
    return next((c for c in found if c), family)


def training_data(dets: dict[str, Detector], shipped: str) -> TrainingData:
    """What the concept's detectors were trained on: the shipped spec's record (else any kind's)."""
    for kind in _shipped_first(dets, shipped):
        raw = (dets[kind].spec.eval.get("train") or {}).get("data")
        if raw is not None:
            return TrainingData.from_dict(raw)
    return TrainingData()  # specs from before eval.train.data: seed train split only


def baseline_for(
    concept: str,
    dets: dict[str, Detector],
    shipped: str,
    tokenizer: Any,
    seed_sae: str | Path,
    target_fpr: float,
) -> tuple[TfidfBaseline, TrainingData]:
    """The TF-IDF baseline trained on the detectors' own training records (see the module doc)."""
    data = training_data(dets, shipped)
    train = data.records(concept, sae=seed_sae)
    if data.max_tokens:
        train = truncate_records(train, tokenizer, data.max_tokens)
    texts, labels = [monitored_text(r) for r in train], [int(r["label"]) for r in train]
    return TfidfBaseline(texts, labels, target_fpr), data


def _training_row(concept: str, data: TrainingData, base: TfidfBaseline) -> EvalRow:
    """A bookkeeping row (suite "train") saying what detectors and baseline were trained on."""
    suites = "all suites" if data.public_suites is None else ", ".join(data.public_suites) or "none"
    what = ("seed train split" if data.seed else "no seed data") + (
        f" + {data.public_per_suite} public train records per suite ({suites})"
        if data.public_per_suite
        else ""
    )
    if data.extra_files:
        what += f"; the detectors also saw {', '.join(data.extra_files)}, the baseline did not"
    return EvalRow(concept, TRAIN_ROW, "-", False, base.n_pos, base.n_neg, None, None, None, None, None, what)


def _suite_rows(
    concept: str,
    suite: str,
    note: str,
    recs: list[dict[str, Any]],
    scorer: Scorer,
    base: TfidfBaseline,
    shipped: str,
    target_fpr: float,
    batch_size: int,
    progress: bool,
) -> list[EvalRow]:
    it = scorer.score_records(recs, batch_size)
    results = list(tqdm(it, total=len(recs), desc=f"{concept}/{suite}", disable=not progress, leave=False))
    ok = [(r, out) for r, out in zip(recs, results, strict=True) if "error" not in out]
    if len(ok) < len(recs):
        note = f"{note}; {len(recs) - len(ok)} record(s) failed to score".lstrip("; ")
    labels = np.array([int(r["label"]) for r, _ in ok])
    rows = []
    for kind, det in scorer.detectors.items():
        s = np.array([out["scores"][kind] for _, out in ok])
        rows.append(
            _row(
                concept,
                suite,
                kind,
                kind == shipped,
                s[labels == 1],
                s[labels == 0],
                det.spec.threshold,
                target_fpr,
                note,
            )
        )
    b = base.scores([monitored_text(r) for r, _ in ok]) if ok else np.zeros(0)
    rows.append(
        _row(
            concept, suite, BASELINE, False, b[labels == 1], b[labels == 0], base.threshold, target_fpr, note
        )
    )
    return rows


def _fmt(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def render_markdown(
    rows: Sequence[EvalRow], *, title: str = "Detector evaluation", target_fpr: float = 0.01
) -> str:
    """One table per concept: a row per (suite, detector); the shipped kind is marked."""
    pct = f"{target_fpr:.0%}"
    lines = [
        f"# {title}",
        "",
        f"AUROC is threshold-free. Recall@{pct}FPR uses the threshold that gives {pct} FPR on that suite's",
        "own negatives (an oracle). F1, recall and FPR @thr use each detector's calibrated threshold (what",
        "shipping it does). `tfidf` is the TF-IDF + logistic-regression baseline trained on the same",
        'records as the detectors ("trained on" under each concept). Public suites use their test splits',
        "(detectors.datasets), which training never sees. F1 depends on each suite's positive:negative",
        "ratio; compare it within a suite only.",
    ]
    for concept in dict.fromkeys(r.concept for r in rows):
        lines += ["", f"## {concept}", ""]
        for r in (r for r in rows if r.concept == concept and r.suite == TRAIN_ROW):
            lines += [f"Trained on: {r.note} ({r.n_pos} positive / {r.n_neg} negative records).", ""]
        lines += [
            f"| suite | n+ / n− | detector | AUROC | R@{pct}FPR | F1@thr | recall@thr | FPR@thr | note |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r.concept == concept and r.suite != TRAIN_ROW):
            det = f"**{r.detector}** (shipped)" if r.shipped else r.detector
            vals = " | ".join(_fmt(v) for v in (r.auroc, r.recall_at_fpr, r.f1, r.recall, r.fpr))
            lines.append(f"| {r.suite} | {r.n_pos} / {r.n_neg} | {det} | {vals} | {r.note} |")
    return "\n".join(lines) + "\n"
