"""Where does SmolLM2 encode a statement's truth value? A probe sweep over layers and token pools.

Training records: `--public-train` per falsehood suite from the public TRAIN splits (got-cities, got-other,
truthfulqa; detectors.datasets.EVAL_SUITES["falsehood"], the suite caps lifted to N), completion-scope
residuals at layers 12–21. Pools: the mean of the last K completion tokens (K = 1, 2, 3: the end of the
statement, where Marks & Tegmark read truth) and the mean over all completion tokens. Per pool × layers ×
C: grouped 5-fold out-of-fold AUROC per suite on the training records (the figure used for choices), and,
for reference, AUROC on up to 200 records of each suite's TEST split of a probe fitted on all training
records. The shipped detector is built by `featurewatch detectors train --concept falsehood`, which picks
its variant by out-of-fold AUROC; this script only tells which layer and pool to offer it.

Run: .venv/bin/python bench/detector_falsehood.py --public-train 2000 --suites got-cities
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from detectors.calibrate import auroc
from detectors.corpus import Corpus, extract_corpus
from detectors.datasets import EVAL_SUITES, public_train_records
from detectors.fitting import assign_folds
from detectors.probe import train_probe
from monitor.model import load_model


def _pool(c: Corpus, points: list[str], k: int | None) -> torch.Tensor:
    """(N, D·len(points)): mean of the last k tokens (k=None: all tokens) at each point, concatenated."""
    rows = []
    for f in c.feats:
        parts = [f.resid_at(p).float() for p in points]  # each (T, d_in)
        rows.append(torch.cat([(x if k is None else x[-k:]).mean(0) for x in parts]))
    return torch.stack(rows)


def _auc(s: torch.Tensor, y: torch.Tensor) -> float:
    return round(auroc(s[y == 1], s[y == 0]), 3)


def sweep(lm: Any, n: int, suites: list[str], layers: list[int], cache: Path | None) -> list[dict[str, Any]]:
    big = {"falsehood": [dataclasses.replace(s, max_n=n) for s in EVAL_SUITES["falsehood"]]}
    train = public_train_records("falsehood", n, only=suites, suites=big)
    named = {s.name: s for s in EVAL_SUITES["falsehood"]}
    tests = {name: named[name].load(max_n=200, split="test") for name in suites}
    points = [f"model.layers.{i}" for i in layers]
    kw: dict[str, Any] = {"max_tokens": 96, "batch_size": 16, "progress": True, "cache_dir": cache}
    tr = extract_corpus(lm.model, lm.tokenizer, train, points, desc="train", **kw)
    te = {
        name: extract_corpus(lm.model, lm.tokenizer, r, points, desc=name, **kw) for name, r in tests.items()
    }
    src = [str(r["suites"][0]) for r in train]
    fold = assign_folds(tr.groups, tr.labels, 5)
    rows = []
    combos = [[p] for p in points] + ([[points[0], points[-1]]] if len(points) > 1 else [])
    for k in (1, 2, 3, None):
        for pts in combos:
            x = _pool(tr, pts, k)
            for C in (0.001, 0.01, 0.1):
                oof = torch.zeros(len(tr.labels))
                for j in fold.unique().tolist():
                    m = fold == j
                    oof[m] = train_probe(x[~m & (tr.labels == 1)], x[~m & (tr.labels == 0)], C=C).logits(x[m])
                fit = train_probe(x[tr.labels == 1], x[tr.labels == 0], C=C)
                row = {
                    "pool": "mean" if k is None else f"last:{k}",
                    "layers": pts,
                    "C": C,
                    "oof": {
                        s: _auc(oof[m], tr.labels[m])
                        for s in suites
                        for m in [torch.tensor([v == s for v in src])]
                    },
                    "test": {name: _auc(fit.logits(_pool(c, pts, k)), c.labels) for name, c in te.items()},
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--public-train", type=int, default=2000, help="records per suite (train split)")
    ap.add_argument("--suites", default="got-cities,got-other,truthfulqa")
    ap.add_argument("--layers", default="12,15,18,21")
    ap.add_argument("--cache", type=Path, help="activation cache folder")
    ap.add_argument("--json-out", type=Path)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    lm = load_model(device="cpu")
    rows = sweep(lm, a.public_train, a.suites.split(","), [int(v) for v in a.layers.split(",")], a.cache)
    if a.json_out:
        a.json_out.parent.mkdir(parents=True, exist_ok=True)
        a.json_out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
