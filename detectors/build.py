"""Build a concept's detectors from labelled records, and let held-out numbers pick the one that ships.

`build_concept_detectors` extracts completion-scope residuals once (at `layers` and the SAE's hook point;
SAE latents are encoded from the stored residuals, so nothing runs the model twice) and fits two kinds:
  probe        logistic regression on pooled residuals (mean- or max-pooled completion tokens are the
               training unit), applied per token and aggregated;
  sae_features discovery on pooled SAE latents, top `n_latents` weighted by logistic regression.
Within a kind, the variant (pooling, aggregation, C) with the best out-of-fold AUROC on the training
records wins (folds keep records with the same final user prompt together: the seed data's mirror pairs).
Thresholds are set for `target_fpr` on calibration negatives: the out-of-fold scores of the training
negatives plus the final model's scores on `calib_records` (label 0 or unlabelled). The kind with the
higher AUROC on `test_records` (out-of-fold AUROC without them) is written as `<concept>.yaml`; both stay
as `<concept>_probe.yaml` / `<concept>_sae.yaml` (eval.variant_of = concept), with the figures in `eval`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from detectors.aggregate import Aggregation
from detectors.base import Detector, TokenFeatures, score_message
from detectors.calibrate import auroc, metrics, threshold_for_fpr
from detectors.datasets import group_key, monitored_text, stable_hash, truncate_records
from detectors.discover import make_sae_features_spec, rank_latents
from detectors.errors import DetectorError
from detectors.extract import Pool, iter_token_features, sae_hook_point
from detectors.probe import ProbeDetector, save_probe, train_probe
from detectors.registry import available_detectors
from detectors.sae_features import SaeFeaturesDetector
from detectors.spec import BaseSpec, ProbeSpec, dump_spec, load_spec
from sae_assets.hooks import hf_hook_point
from sae_assets.sae import SAE

SUFFIX = {"probe": "_probe", "sae_features": "_sae"}
Labels = Callable[[int], str]


@dataclass(frozen=True)
class Variant:
    kind: str
    pool: Pool
    agg: str
    C: float = 1.0

    def as_dict(self) -> dict[str, Any]:
        return {"pool": self.pool, "aggregation": self.agg, "C": self.C}


# C = 0.001 was added when public training data came in: with ~1,000 records of 576–1,152 features the
# layer sweep (bench/detector_layers.py) picked the smallest C of the old grid for most layers.
VARIANTS = [
    Variant("probe", p, a, c)
    for p in ("mean", "max")
    for a in ("mean", "max")
    for c in (0.001, 0.01, 0.1, 1.0)
]
VARIANTS += [Variant("sae_features", p, a) for p in ("max", "mean") for a in ("max", "mean")]


@dataclass
class Corpus:
    """Per record: completion-scope residuals, label, fold group; pooled tables filled on demand."""

    feats: list[TokenFeatures]
    labels: Tensor  # (N,) long
    groups: list[str]
    pooled: dict[tuple[str, str, str], Tensor]  # (what, hook point, pool) -> (N, D)
    weights: Tensor | None = None  # (N,) per-record probe training weights; None = all 1

    def rows(self, idx: Tensor, label: int) -> Tensor:
        return idx[self.labels[idx] == label]


@dataclass
class BuildResult:
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
) -> Corpus:
    """Residuals of every record's completion (the whole text for `text` records). Records need a label
    (0/1) unless `default_label` is given, and a completion (a chat must end with the assistant)."""
    for rec in records:
        msgs = rec.get("messages")
        if isinstance(msgs, list) and msgs and msgs[-1].get("role") != "assistant":
            raise DetectorError(
                f"record {rec.get('id')!r}: a chat must end with the assistant turn to train on"
            )
        if rec.get("label", default_label) not in (0, 1):
            raise DetectorError(f"record {rec.get('id')!r}: label must be 0 or 1, got {rec.get('label')!r}")
    recs = truncate_records(records, tokenizer, max_tokens) if max_tokens else list(records)
    it = iter_token_features(model, tokenizer, recs, points, scope="completion", batch_size=batch_size)
    feats = list(tqdm(it, total=len(recs), desc=desc, disable=not progress, leave=False))
    labels = torch.tensor([int(r.get("label", default_label) or 0) for r in recs], dtype=torch.long)
    return Corpus(feats, labels, _groups(recs), {})


def pooled_table(corpus: Corpus, what: str, pool: Pool, point: str, sae: SAE | None = None) -> Tensor:
    """(N, D) pooled residuals at `point` (what="resid") or all SAE latents (what="latents"), cached."""
    key = (what, point)
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


class _Fitter:
    """Fits a variant on some records of a corpus and scores others (message values)."""

    def __init__(self, corpus: Corpus, points: list[str], sae: SAE, n_latents: int, labels: Labels | None):
        self.c, self.points, self.sae, self.n, self.labels = corpus, points, sae, n_latents, labels
        self.sae_point = sae_hook_point(sae)

    def fit(self, v: Variant, idx: Tensor, name: str) -> tuple[Detector, Any]:
        agg = Aggregation.model_validate(v.agg)
        pos, neg = self.c.rows(idx, 1), self.c.rows(idx, 0)
        if v.kind == "probe":
            x = torch.cat([pooled_table(self.c, "resid", v.pool, p) for p in self.points], dim=1)
            w = self.c.weights
            fit = train_probe(
                x[pos],
                x[neg],
                C=v.C,
                w_pos=None if w is None else w[pos],
                w_neg=None if w is None else w[neg],
            )
            probe = ProbeSpec(
                name=name,
                threshold=0.5,
                aggregation=agg,
                hook_points=self.points,
                weights_file=f"{name}.safetensors",
            )
            return ProbeDetector(probe, fit, []), fit
        x = pooled_table(self.c, "latents", v.pool, self.sae_point, self.sae)
        ranked = rank_latents(x[pos], x[neg])
        if self.labels is not None:
            ranked = [replace(r, label=self.labels(r.latent_id)) for r in ranked[: self.n]]
        spec = make_sae_features_spec(ranked, self.n, x[pos], x[neg], name=name, aggregation=agg)
        return SaeFeaturesDetector(spec), None

    def scores(self, det: Detector, idx: Tensor) -> Tensor:
        out = []
        for i in idx.tolist():
            f = self.c.feats[i]
            if isinstance(det, SaeFeaturesDetector):
                ids = det.latent_ids()
                with torch.inference_mode():
                    lat = self.sae.encode_watched(f.resid_at(self.sae_point).to(self.sae.W_enc.device), ids)
                f = TokenFeatures(latents=lat.float().cpu(), latent_ids=ids)
            out.append(score_message(det, f))
        return torch.tensor(out, dtype=torch.float64)

    def oof(self, v: Variant, folds: Tensor) -> Tensor:
        """Out-of-fold message values for every record."""
        out = torch.zeros(len(folds), dtype=torch.float64)
        for k in folds.unique().tolist():
            det, _ = self.fit(v, torch.nonzero(folds != k).flatten(), "oof")
            held = torch.nonzero(folds == k).flatten()
            out[held] = self.scores(det, held)
        return out


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
) -> BuildResult:
    """Fit, calibrate, compare and write both kinds for `concept` (see the module doc). `data` describes
    the training records (detectors.datasets.TrainingData.as_dict) and is stored as eval.train.data, so
    that evaluation can rebuild them for its baseline. `balance_sources` weights probe training records
    so that every source (seed, each public suite) has the same total weight (source_weights)."""
    points = [hf_hook_point(p) for p in layers]
    capture = list(dict.fromkeys([*points, sae_hook_point(sae)]))
    kw: dict[str, Any] = {"batch_size": batch_size, "max_tokens": max_tokens, "progress": progress}
    train = extract_corpus(model, tokenizer, train_records, capture, desc=f"{concept} train", **kw)
    n_pos, n_neg = int(train.labels.sum()), int((train.labels == 0).sum())
    if min(n_pos, n_neg) < 2:
        raise DetectorError(
            f"{concept}: need ≥ 2 training records of each label (got {n_pos} pos, {n_neg} neg)"
        )
    calib_ok = [r for r in calib_records if r.get("label", 0) == 0 and _has_completion(r)]
    calib = extract_corpus(
        model, tokenizer, calib_ok, capture, default_label=0, desc=f"{concept} calib", **kw
    )
    test = extract_corpus(model, tokenizer, test_records, capture, desc=f"{concept} test", **kw)
    sources = [_sources(r) for r in train_records]
    if balance_sources:
        train.weights = source_weights([srcs[0] for srcs in sources])
    fitter = _Fitter(train, points, sae, n_latents, labels)
    fold = assign_folds(train.groups, train.labels, folds)
    everything = torch.arange(len(train.feats))
    out, specs, figures = Path(out_dir), {}, {}
    for kind, suffix in SUFFIX.items():
        name = f"{concept}{suffix}"
        tried = {v: fitter.oof(v, fold) for v in VARIANTS if v.kind == kind}
        oof_auc = {v: auroc(s[train.labels == 1], s[train.labels == 0]) for v, s in tried.items()}
        best = max(tried, key=lambda v: oof_auc[v])  # first listed wins ties: the simpler variants
        det, fit = fitter.fit(best, everything, name)
        neg_oof = tried[best][train.labels == 0]
        neg_extra = _Fitter(calib, points, sae, n_latents, labels).scores(det, torch.arange(len(calib.feats)))
        thr = threshold_for_fpr(torch.cat([neg_oof, neg_extra]), target_fpr)
        if thr > 1.0:
            raise DetectorError(f"{name}: too many calibration negatives score 1.0 to reach FPR {target_fpr}")
        ev: dict[str, Any] = {
            "variant_of": concept,
            "auroc_oof": _r(oof_auc[best]),
            "train": {
                "n_pos": n_pos,
                "n_neg": n_neg,
                "folds": int(fold.max()) + 1,
                "variant": best.as_dict(),
                "balance_sources": balance_sources,
                **({"data": data} if data is not None else {}),
            },
            "auroc_oof_by_source": _by_source(tried[best], train.labels, sources),
            "variants_auroc_oof": {_vname(v): _r(a) for v, a in oof_auc.items()},
            "calibration": {
                "n_neg_oof": len(neg_oof),
                "n_neg_extra": len(neg_extra),
                "n_skipped_no_completion": len(calib_records) - len(calib_ok),
            },
        }
        if len(test.feats):
            ts = _Fitter(test, points, sae, n_latents, labels).scores(det, torch.arange(len(test.feats)))
            tp, tn = ts[test.labels == 1], ts[test.labels == 0]
            ev["auroc_test"] = _r(auroc(tp, tn)) if len(tp) and len(tn) else None
            ev["test"] = {k: int(v) if k.startswith("n_") else _r(v) for k, v in metrics(tp, tn, thr).items()}
        body = {**det.spec.model_dump(), "threshold": thr, "target_fpr": target_fpr, "eval": ev}
        body["description"] = f"{concept}: {kind} detector built by featurewatch detectors train"
        specs[name] = type(det.spec).model_validate(body)
        if fit is not None:
            save_probe(fit, out / f"{name}.safetensors", hook_points=points)
        figures[kind] = ev
    key = "auroc_test" if all(f.get("auroc_test") is not None for f in figures.values()) else "auroc_oof"
    # Ties go to sae_features: same quality, but interpretable and able to steer.
    selected = max(("probe", "sae_features"), key=lambda k: (figures[k][key], k == "sae_features"))
    summary = {k: {m: figures[k].get(m) for m in ("auroc_oof", "auroc_test")} for k in SUFFIX}
    primary = specs[f"{concept}{SUFFIX[selected]}"]
    ev = {k: v for k, v in primary.eval.items() if k != "variant_of"}
    ev.update(selected=selected, selected_by=key, kinds=summary)
    specs[concept] = type(primary).model_validate({**primary.model_dump(), "name": concept, "eval": ev})
    paths = [dump_spec(spec, out / f"{name}.yaml") for name, spec in specs.items()]
    return BuildResult(concept, selected, specs, paths)


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
