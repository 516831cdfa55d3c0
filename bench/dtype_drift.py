"""Do the shipped detectors' thresholds hold when the model runs in bf16 (the default on CUDA)?

    OMP_NUM_THREADS=2 .venv/bin/python bench/dtype_drift.py \\
        --hardneg ~/.cache/featurewatch/hardneg/test.jsonl --json-out /tmp/dtype_drift.json

Every shipped threshold was calibrated on fp32 activations (CPU), but `dtype=auto` serves bf16 on CUDA.
This scores the same held-out records (each concept's seed test split + the model's held-out chat answers)
once with the model in --reference dtype and once in --dtype, on one device, and reports per detector:
how far the completion scores and stream peaks move (median / p99 / max absolute change), AUROC under each,
and how many records change side at the spec threshold and at each operating point (and at any
--point, e.g. a policy's block value). The SAE and the detector heads run in their own dtype (fp32)
either way; only the model's residual stream differs. Nothing here fits or calibrates anything.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch


def _score(args: argparse.Namespace, lm: Any, recs: list[dict[str, Any]]) -> tuple[list[dict], dict]:
    from tqdm import tqdm

    from detectors.registry import load_detector
    from detectors.scoring import Scorer
    from sae_assets.registry import DEFAULT_SAE, resolve_sae_path
    from sae_assets.sae import SAE

    dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    sae = SAE.load(resolve_sae_path(DEFAULT_SAE)).to(lm.device)
    folder = Path(args.detectors).expanduser()
    dets = {c: load_detector(c, folder, sae, model=lm.model) for c in args.concepts.split(",")}
    scorer = Scorer(lm.model, lm.tokenizer, sae, dets, top_k=0, stream_from=args.min_tokens)
    res = list(tqdm(scorer.score_records(recs, args.batch_size), total=len(recs), desc=f"score {dtype}"))
    bad = [r for r in res if "error" in r]
    if bad:
        raise SystemExit(f"{len(bad)} records failed under {dtype}: {bad[0]['error']}")
    return res, dets


def _quantiles(d: torch.Tensor) -> dict[str, float]:
    return {
        "median": float(d.median()),
        "p99": float(torch.quantile(d, 0.99)),
        "max": float(d.max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hardneg", type=Path, required=True, help="Held-out negatives (JSON Lines).")
    ap.add_argument("--concepts", default="scam,deception,bias,falsehood")
    ap.add_argument("--detectors", default="sae_assets/smollm2-135m-l15/detectors")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reference", default="float32")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--min-tokens", type=int, default=8, help="First token a mid-stream rule reads.")
    ap.add_argument("--point", action="append", default=[], help="Extra CONCEPT:NAME=VALUE; repeatable.")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    from detectors.calibrate import auroc
    from detectors.datasets import load_seed, read_records, truncate_records
    from monitor.model import load_model

    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()]
    recs: list[dict[str, Any]] = []
    for c in concepts:
        recs += [{**r, "origin": c} for r in load_seed(c, "test")]
    recs += [{**r, "label": 0, "origin": "hardneg"} for r in read_records(args.hardneg.expanduser())]
    ref_lm = load_model(args.model, device=args.device, dtype=args.reference)
    recs = truncate_records(recs, ref_lm.tokenizer, args.max_tokens)
    ref, dets = _score(args, ref_lm, recs)
    del ref_lm  # one model in memory at a time
    low, _ = _score(args, load_model(args.model, device=args.device, dtype=args.dtype), recs)

    extra: dict[str, dict[str, float]] = {}
    for p in args.point:
        key, value = p.rsplit("=", 1)
        concept, name = key.split(":", 1)
        extra.setdefault(concept, {})[name] = float(value)
    rows = []
    for c, det in dets.items():
        keep = torch.tensor([r["origin"] in (c, "hardneg") for r in recs])
        lab = torch.tensor([int(r["label"]) for r in recs])[keep]
        row: dict[str, Any] = {"concept": c, "n_pos": int(lab.sum()), "n_neg": int((lab == 0).sum())}
        for field in ("scores", "stream_peaks"):
            a = torch.tensor([r[field][c] for r in ref], dtype=torch.float64)[keep]
            b = torch.tensor([r[field][c] for r in low], dtype=torch.float64)[keep]
            points = {
                "threshold": det.spec.threshold,
                **{f"{float(k):.0%}": v for k, v in det.spec.operating_points.items()},
                **extra.get(c, {}),
            }
            row[field] = {
                "abs_diff": _quantiles((a - b).abs()),
                "auroc": {
                    args.reference: auroc(a[lab == 1], a[lab == 0]),
                    args.dtype: auroc(b[lab == 1], b[lab == 0]),
                },
                "flips": {
                    name: {
                        "n": int(((a >= t) != (b >= t)).sum()),
                        "fired_ref": int((a >= t).sum()),
                        "fired_low": int((b >= t).sum()),
                        "threshold": t,
                    }
                    for name, t in points.items()
                },
            }
        rows.append(row)
    print(
        f"| detector | n+ / n− | value | |Δ| median / p99 / max | AUROC {args.reference} / {args.dtype} "
        f"| point | fired {args.reference} → {args.dtype} (records changing side) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for field in ("scores", "stream_peaks"):
            f = r[field]
            d = f["abs_diff"]
            for name, fl in f["flips"].items():
                print(
                    f"| {r['concept']} | {r['n_pos']} / {r['n_neg']} | {field} | "
                    f"{d['median']:.4f} / {d['p99']:.4f} / {d['max']:.4f} | "
                    f"{f['auroc'][args.reference]:.3f} / {f['auroc'][args.dtype]:.3f} | "
                    f"{name} {fl['threshold']:.4f} | {fl['fired_ref']} → {fl['fired_low']} ({fl['n']}) |"
                )
    if args.json_out:
        body = {"device": args.device, "reference": args.reference, "dtype": args.dtype, "rows": rows}
        args.json_out.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
