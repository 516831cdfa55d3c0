"""Pick the probe layer(s) by held-out numbers that are NOT the public test splits we report.

For each concept: training records = the seed train split + `--public-train` records per eval suite from
the public TRAIN splits (detectors.datasets.public_train_records). Completion residuals are extracted once
at every candidate layer (one forward pass that stops after the deepest one), mean-pooled, and a balanced
logistic-regression probe per layer (and per layer pair) is scored by
  oof         grouped 5-fold out-of-fold AUROC over all training records (folds as in detectors.fitting),
  oof/<src>   the same out-of-fold scores restricted to one source (seed, or one public suite's train part),
  seed-test   AUROC on the seed test split of a probe fitted on all training records.
The public test splits are never loaded here.

Run: .venv/bin/python bench/detector_layers.py --concepts scam,deception,bias --public-train 200 \
         --layers 9,12,15,18,21,24 --json-out runs/layers.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import torch

from detectors.calibrate import auroc
from detectors.corpus import Corpus, extract_corpus, pooled_table
from detectors.datasets import load_seed, public_train_records
from detectors.fitting import assign_folds
from detectors.probe import train_probe
from monitor.model import load_model

C_GRID = (0.001, 0.01, 0.1, 1.0)  # the probe variants' C values in detectors.variants.VARIANTS


def _x(corpus: Corpus, points: list[str]) -> torch.Tensor:
    return torch.cat([pooled_table(corpus, "resid", "mean", p) for p in points], dim=1)


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    pos, neg = scores[labels == 1], scores[labels == 0]
    return round(auroc(pos, neg), 4) if len(pos) and len(neg) else None


def _oof(x: torch.Tensor, labels: torch.Tensor, fold: torch.Tensor, C: float) -> torch.Tensor:
    out = torch.zeros(len(labels), dtype=torch.float64)
    for k in fold.unique().tolist():
        tr, te = fold != k, fold == k
        fit = train_probe(x[tr & (labels == 1)], x[tr & (labels == 0)], C=C)
        out[te] = fit.logits(x[te]).double()
    return out


def sweep(
    lm: Any,
    concept: str,
    n_public: int,
    layers: list[int],
    max_tokens: int,
    batch: int,
    only: list[str] | None = None,
) -> dict[str, Any]:
    train = load_seed(concept, "train") + public_train_records(concept, n_public, only=only)
    test = load_seed(concept, "test")
    src = [str(r.get("suite", "seed")) for r in train]  # first suite only (ham shared by two: the first)
    points = [f"model.layers.{i}" for i in layers]
    kw: dict[str, Any] = {"max_tokens": max_tokens, "batch_size": batch, "progress": True}
    t0 = time.perf_counter()
    tr = extract_corpus(lm.model, lm.tokenizer, train, points, desc=f"{concept} train", **kw)
    te = extract_corpus(lm.model, lm.tokenizer, test, points, desc=f"{concept} test", **kw)
    secs = time.perf_counter() - t0
    fold = assign_folds(tr.groups, tr.labels, 5)
    combos = [[p] for p in points] + [
        [a, b] for a, b in itertools.combinations(points, 2) if a.endswith("15")
    ]
    rows = []
    for pts in combos:
        x, xt = _x(tr, pts), _x(te, pts)
        best: dict[str, Any] | None = None
        for C in C_GRID:  # C picked by overall oof AUROC, as detectors.build does
            oof = _oof(x, tr.labels, fold, C)
            auc = _auc(oof, tr.labels)
            if best is None or (auc or 0) > best["oof"]:
                per = {
                    s: _auc(
                        oof[torch.tensor([v == s for v in src])],
                        tr.labels[torch.tensor([v == s for v in src])],
                    )
                    for s in dict.fromkeys(src)
                }
                best = {"C": C, "oof": auc, "oof_by_source": per, "_C": C}
        assert best is not None
        fit = train_probe(x[tr.labels == 1], x[tr.labels == 0], C=best["_C"])
        best["seed_test"] = _auc(fit.logits(xt).double(), te.labels)
        best.pop("_C")
        rows.append({"layers": pts, **best})
        print(concept, pts, json.dumps({k: v for k, v in best.items()}), flush=True)
    return {
        "concept": concept,
        "n_train": len(train),
        "n_pos": int(tr.labels.sum()),
        "extract_s": round(secs, 1),
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", default="scam,deception,bias")
    ap.add_argument("--public-train", type=int, default=200, help="records per eval suite (train split)")
    ap.add_argument("--layers", default="9,12,15,18,21,24")
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--public-suites", help="only these public suites (comma-separated)")
    ap.add_argument("--json-out", type=Path)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    lm = load_model(device="cpu")
    layers = [int(v) for v in a.layers.split(",")]
    only = a.public_suites.split(",") if a.public_suites else None
    res = [
        sweep(lm, c.strip(), a.public_train, layers, a.max_tokens, a.batch_size, only)
        for c in a.concepts.split(",")
    ]
    if a.json_out:
        a.json_out.parent.mkdir(parents=True, exist_ok=True)
        a.json_out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
