"""Held-out chat figures for detector sets: seed TEST positives vs seed test negatives + the monitored
model's own held-out answers (bench/detector_hardneg.py's `test.jsonl`).

    OMP_NUM_THREADS=1 .venv/bin/python bench/detector_heldout.py \\
        --set old=/tmp/fw_old/detectors --set new=sae_assets/smollm2-135m-l15/detectors \\
        --hardneg ~/.cache/featurewatch/hardneg/test.jsonl --json-out /tmp/heldout.json

Every detector set is scored in one batched pass per record, as `featurewatch score` does (completion
tokens, each spec's own aggregation), records cut to --max-tokens. Per concept and set: AUROC of the
seed test positives against all held-out negatives, and at the spec's threshold (1 %) and each
operating point: recall on the seed test positives, FPR on the model's answers and on the seed test
negatives. Nothing here is used to fit or calibrate anything.

Mid-stream (`stream` columns): the server evaluates rules on the running aggregate after every token once
a rule's `min_tokens` have been generated (the default policy's block rules: 8), so a record "fires
mid-stream" when the running aggregate reaches the threshold at any token from --min-tokens on (a record
shorter than that: its final value). For `mean` aggregation this peak can exceed the final value.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", action="append", required=True, help="LABEL=detectors folder; repeatable.")
    ap.add_argument("--hardneg", type=Path, required=True, help="Held-out negatives (JSON Lines).")
    ap.add_argument("--concepts", default="scam,deception,bias")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--point",
        action="append",
        default=[],
        help="Extra threshold SET:CONCEPT:NAME=VALUE (e.g. a policy's fixed block point); repeatable.",
    )
    ap.add_argument("--min-tokens", type=int, default=8, help="First token a mid-stream rule reads.")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from tqdm import tqdm

    from detectors.calibrate import auroc
    from detectors.datasets import load_seed, read_records, truncate_records
    from detectors.registry import load_detector
    from detectors.scoring import Scorer
    from monitor.model import load_model
    from sae_assets.registry import DEFAULT_SAE, resolve_sae_path
    from sae_assets.sae import SAE

    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()]
    sets = dict(s.split("=", 1) for s in args.set)
    extra = {tuple(k.split(":", 2)): v for k, v in (p.rsplit("=", 1) for p in args.point)}
    lm = load_model(args.model, device="cpu")
    sae = SAE.load(resolve_sae_path(DEFAULT_SAE))
    dets = {
        f"{label}:{c}": load_detector(c, Path(folder).expanduser(), sae, model=lm.model)
        for label, folder in sets.items()
        for c in concepts
    }
    hard = [{**r, "label": 0, "origin": "hardneg"} for r in read_records(args.hardneg.expanduser())]
    recs: list[dict[str, Any]] = []
    for c in concepts:
        recs += [{**r, "origin": f"seed:{c}"} for r in load_seed(c, "test")]
    recs += hard
    recs = truncate_records(recs, lm.tokenizer, args.max_tokens)
    scorer = Scorer(lm.model, lm.tokenizer, sae, dets, top_k=0, stream_from=args.min_tokens)
    res = list(tqdm(scorer.score_records(recs, args.batch_size), total=len(recs), desc="score"))
    bad = [r for r in res if "error" in r]
    if bad:
        raise SystemExit(f"{len(bad)} records failed: {bad[0]['error']}")

    rows = []
    origin = [r["origin"] for r in recs]
    lab = torch.tensor([int(r["label"]) for r in recs])
    # Seed records written by the monitored model (bench/detector_modelscam.py) vs by hand: reported
    # apart as well, since a probe fitted on fluent human-written texts can miss the model's own.
    by_model = torch.tensor([str(r.get("source", "")).startswith("smollm2") for r in recs])
    for (key, det), written in itertools.product(dets.items(), ("all", "human", "model")):
        label, c = key.split(":")
        s = torch.tensor([r["scores"][key] for r in res], dtype=torch.float64)
        seed = torch.tensor([o == f"seed:{c}" for o in origin])
        if written != "all":
            if not (seed & by_model).any():
                continue
            seed = seed & (by_model if written == "model" else ~by_model)
        hn = torch.tensor([o == "hardneg" for o in origin])
        pos, seed_neg, hn_neg = s[seed & (lab == 1)], s[seed & (lab == 0)], s[hn]
        st = torch.tensor([r["stream_peaks"][key] for r in res], dtype=torch.float64)
        st_pos, st_seed_neg, st_hn = st[seed & (lab == 1)], st[seed & (lab == 0)], st[hn]
        points = {
            "1%": det.spec.threshold,
            **{f"{float(k):.0%}": v for k, v in det.spec.operating_points.items()},
            **{n: float(v) for (set_, concept, n), v in extra.items() if (set_, concept) == (label, c)},
        }
        row: dict[str, Any] = {
            "set": label,
            "concept": c,
            "written": written,
            "n_pos": len(pos),
            "n_seed_neg": len(seed_neg),
            "n_hardneg": len(hn_neg),
            "auroc": auroc(pos, torch.cat([seed_neg, hn_neg])),
            "auroc_vs_hardneg": auroc(pos, hn_neg),
            "auroc_stream": auroc(st_pos, torch.cat([st_seed_neg, st_hn])),
            "auroc_stream_vs_seed_neg": auroc(st_pos, st_seed_neg),
            "hardneg_median": float(hn_neg.median()),
            "points": {},
        }
        for name, thr in points.items():
            row["points"][name] = {
                "threshold": thr,
                "recall": float((pos >= thr).double().mean()),
                "fpr_hardneg": float((hn_neg >= thr).double().mean()),
                "fpr_seed_neg": float((seed_neg >= thr).double().mean()),
                "stream_recall": float((st_pos >= thr).double().mean()),
                "stream_fpr_hardneg": float((st_hn >= thr).double().mean()),
                "stream_fpr_seed_neg": float((st_seed_neg >= thr).double().mean()),
            }
        rows.append(row)
    print(
        "| set | concept | seed written by | n+ / n− seed | AUROC all / answers "
        "| stream AUROC all / seed neg | point | threshold | recall "
        "| FPR answers | FPR seed neg "
        f"| mid-stream (from token {args.min_tokens}): recall / FPR answers / FPR seed neg |"
    )
    print("|---|---|---|---|---|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        for name, p in r["points"].items():
            print(
                f"| {r['set']} | {r['concept']} | {r['written']} | {r['n_pos']} / {r['n_seed_neg']} | "
                f"{r['auroc']:.3f} / {r['auroc_vs_hardneg']:.3f} | "
                f"{r['auroc_stream']:.3f} / {r['auroc_stream_vs_seed_neg']:.3f} | {name} | "
                f"{p['threshold']:.4f} | {p['recall']:.2f} | {p['fpr_hardneg']:.3f} | "
                f"{p['fpr_seed_neg']:.3f} | {p['stream_recall']:.2f} / {p['stream_fpr_hardneg']:.3f} / "
                f"{p['stream_fpr_seed_neg']:.3f} |"
            )
    if args.json_out:
        per_record = [
            {
                "id": r["id"],
                "origin": r["origin"],
                "label": r["label"],
                "kind": r.get("kind"),
                "source": r.get("source"),
                "scores": o["scores"],
            }
            for r, o in zip(recs, res, strict=True)
        ]
        body = {"rows": rows, "records": per_record}
        args.json_out.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
