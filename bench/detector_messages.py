"""Scam detectors on held-out messages in today's styles (`concepts/heldout/scam_messages.jsonl`).

    OMP_NUM_THREADS=2 .venv/bin/python bench/detector_messages.py \\
        --det scam=sae_assets/smollm2-135m-l15/detectors:scam \\
        --det scam_message=sae_assets/smollm2-135m-l15/detectors:scam_message

The file holds 130 hand-written chat records (genuine account mail, personal money texts, account-phishing
twins, scam texts; sae_assets/smollm2-135m-l15/concepts/README.md, "Held-out messages") that no shipped
detector was trained on (and --file heldout/scam_messages_b7.jsonl, _b9.jsonl or _b11.jsonl, the sets of
sessions 18–19 whose requests never name the label). The public inbox suites are Enron-era mail; this
set asks whether a detector read scams or the suites' style. --user replaces every request and --as-text
drops it, to see how much a detector leans on a request that names the scam. Per detector
(LABEL=FOLDER:NAME): AUROC over all records, over the mails and over the texts, and how many records of
each kind reach the spec's threshold. Fits nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# Mail kinds of heldout/scam_messages.jsonl (session 16) and heldout/scam_messages_b7.jsonl (session 18);
# every other kind is a text message.
MAIL_KINDS = ("legit_account_mail", "account_phish", "legit_mail", "scam_mail")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--det", action="append", required=True, help="LABEL=FOLDER:NAME; repeatable.")
    ap.add_argument("--file", type=Path, help="default: <shipped SAE>/concepts/heldout/scam_messages.jsonl")
    ap.add_argument(
        "--as-text", action="store_true", help="Score each message alone, as a `text` record (no request)."
    )
    ap.add_argument("--user", help='Replace every user turn with this (e.g. "Show me the message.").')
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    from detectors.calibrate import auroc
    from detectors.datasets import as_text, read_records, seed_dir
    from detectors.registry import load_detector
    from detectors.scoring import Scorer
    from monitor.model import load_model
    from sae_assets.registry import DEFAULT_SAE, resolve_sae_path
    from sae_assets.sae import SAE

    lm = load_model(args.model, device="cpu")
    sae = SAE.load(resolve_sae_path(DEFAULT_SAE))
    dets = {}
    for item in args.det:
        label, where = item.split("=", 1)
        folder, name = where.rsplit(":", 1)
        dets[label] = load_detector(name, Path(folder).expanduser(), sae, model=lm.model)
    recs = read_records(args.file or seed_dir() / "heldout" / "scam_messages.jsonl")
    if args.user is not None:  # what the detectors read when the request does not name the label
        for r in recs:
            r["messages"] = [{**m, "content": args.user} if m["role"] == "user" else m for m in r["messages"]]
    if args.as_text:  # how `featurewatch score` reads a pasted message: the default prompt, no request
        recs = [as_text(r) for r in recs]
    res = list(Scorer(lm.model, lm.tokenizer, sae, dets, top_k=0).score_records(recs, 8))
    y = torch.tensor([int(r["label"]) for r in recs])
    mail = torch.tensor([r["kind"] in MAIL_KINDS for r in recs])
    kinds = sorted({r["kind"] for r in recs})
    rows = []
    for label, det in dets.items():
        s = torch.tensor([r["scores"][label] for r in res], dtype=torch.float64)
        thr = det.spec.threshold
        fired = {}
        for k in kinds:
            mask = torch.tensor([r["kind"] == k for r in recs])
            fired[k] = [int((s[mask] >= thr).sum()), int(mask.sum())]
        row = {
            "detector": label,
            "threshold": thr,
            "auroc": auroc(s[y == 1], s[y == 0]),
            "auroc_mail": _auroc_or_none(s, y, mail),
            "auroc_texts": _auroc_or_none(s, y, ~mail),
            "fired": fired,
        }
        rows.append(row)
        shown = ", ".join(f"{k} {a} of {b}" for k, (a, b) in fired.items())
        parts = [f"{k} {row['auroc_' + k]:.3f}" for k in ("mail", "texts") if row["auroc_" + k] is not None]
        print(f"{label}: AUROC {row['auroc']:.3f} ({', '.join(parts)}); at {thr:.4f}: {shown}")
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2) + "\n")


def _auroc_or_none(s: torch.Tensor, y: torch.Tensor, part: torch.Tensor) -> float | None:
    """AUROC over one part of the file (mail or texts); None where it lacks a label (b9 is texts only)."""
    from detectors.calibrate import auroc

    pos, neg = s[part & (y == 1)], s[part & (y == 0)]
    return auroc(pos, neg) if len(pos) and len(neg) else None


if __name__ == "__main__":
    main()
