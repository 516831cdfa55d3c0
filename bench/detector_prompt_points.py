"""Prompt-scope operating points for completion detectors (e.g. the default policy's `scam-prompt-flag`).

    OMP_NUM_THREADS=2 .venv/bin/python bench/detector_prompt_points.py --concept scam \\
        --set new=sae_assets/smollm2-135m-l15/detectors \\
        --calib $HN/calib.jsonl --calib $HN/calib_human.jsonl --heldout $HN/test.jsonl --paste 200 \\
        --json-out /tmp/prompt_points.json      # HN=~/.cache/featurewatch/hardneg

A policy rule with `scope: prompt` reads the detector over the prompt tokens with the spec's own
aggregation; a probe trained on completions runs lower there, so its completion thresholds do not carry
over. Here every record is cut before its last assistant turn (what `featurewatch score` then scores as a
prompt), the --fpr point is taken over the calibration prompts (the same general-chat split the completion
thresholds use; prompts shared by several records count once), and held out it reports how often that
point fires on: the concept's seed TEST requests for positives written by hand (label 1), its seed test
requests for hand-written negatives (label 0: genuine notices, explainers …), and the --heldout chat
prompts. The seed's model-written and composed records are left out: they repeat the hand-written
requests. With --paste N, the concept's public eval suites (their TEST splits, N records each, cut to
--paste-tokens) are pasted into a user turn behind one of a few everyday asks ("Is this email legit?",
"Summarise this:" …) with the message's own label: how a detector reads a message a user forwards. Nothing
here fits anything; the points are for the policy file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

# Seed kinds that reuse a hand-written request (bench/detector_modelscam.py answers, classify_short
# records composed from seed messages): counted once through the hand-written record instead.
DERIVED_KINDS = {"model_scam", "model_answer", "classify_short"}
# Everyday asks a pasted message comes with (chosen per record by its id, so the sample is fixed).
ASKS = (
    "Is this email legit?",
    "Can you summarise this message for me?",
    "I got this today. What should I do?",
    "Help me write a reply to this:",
)


def prompt_only(rec: dict[str, Any]) -> dict[str, Any] | None:
    """The record without its final assistant turn; None when nothing but the assistant turn is left."""
    msgs = rec.get("messages") or []
    if msgs and msgs[-1].get("role") == "assistant":
        msgs = msgs[:-1]
    if not msgs:
        return None
    return {"id": rec["id"], "messages": msgs}


def unique_prompts(records: list[dict[str, Any]], origin: str) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for rec in records:
        p = prompt_only(rec)
        if p is None:
            continue
        key = json.dumps(p["messages"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append({**p, "origin": origin, "label": int(rec.get("label", 0))})
    return out


def pasted(concept: str, n: int, max_tokens: int, tokenizer: Any) -> list[dict[str, Any]]:
    """Public test-split messages of the concept's suites inside a user turn (see the module doc)."""
    from detectors.datasets import EVAL_SUITES, stable_hash, truncate_records

    out = []
    for suite in EVAL_SUITES.get(concept, []):
        recs = truncate_records(suite.load(max_n=n, chat=False), tokenizer, max_tokens)
        for r in recs:
            ask = ASKS[stable_hash("ask", r["id"]) % len(ASKS)]
            msgs = [{"role": "user", "content": f"{ask}\n\n{r['text']}"}]
            origin = f"paste:{suite.name}"
            out.append({"id": r["id"], "messages": msgs, "label": int(r["label"]), "origin": origin})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concept", default="scam", help="Seed data and public suites to read.")
    ap.add_argument("--detector", help="Detector name (default: the concept's), e.g. scam_message.")
    ap.add_argument("--set", action="append", required=True, help="LABEL=detectors folder; repeatable.")
    ap.add_argument("--calib", action="append", type=Path, required=True, help="Calibration chats.")
    ap.add_argument("--heldout", action="append", type=Path, default=[], help="Held-out chat records.")
    ap.add_argument("--fpr", type=float, default=0.01)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=512, help="Prompts longer than this are skipped.")
    ap.add_argument("--paste", type=int, default=0, help="Pasted public messages per suite (0: none).")
    ap.add_argument("--paste-tokens", type=int, default=192)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    from tqdm import tqdm

    from detectors.calibrate import auroc, threshold_for_fpr
    from detectors.datasets import load_seed, read_records
    from detectors.registry import load_detector
    from detectors.scoring import Scorer
    from monitor.model import load_model
    from sae_assets.registry import DEFAULT_SAE, resolve_sae_path
    from sae_assets.sae import SAE

    c = args.concept
    sets = dict(s.split("=", 1) for s in args.set)
    lm = load_model(args.model, device="cpu")
    sae = SAE.load(resolve_sae_path(DEFAULT_SAE))
    name = args.detector or c
    dets = {lab: load_detector(name, Path(d).expanduser(), sae, model=lm.model) for lab, d in sets.items()}

    calib = unique_prompts([r for f in args.calib for r in read_records(f.expanduser())], "calib")
    seed = [r for r in load_seed(c, "test") if r.get("kind") not in DERIVED_KINDS]
    held = unique_prompts([r for f in args.heldout for r in read_records(f.expanduser())], "chat")
    recs = calib + unique_prompts(seed, "seed") + [{**r, "label": 0} for r in held]
    if args.paste:
        recs += pasted(c, args.paste, args.paste_tokens, lm.tokenizer)
    scorer = Scorer(lm.model, lm.tokenizer, sae, dets, top_k=0, max_tokens=args.max_tokens)
    res = list(tqdm(scorer.score_records(recs, 8), total=len(recs), desc="prompts"))
    skipped = [r["error"] for r in res if "error" in r]
    keep = [(rec, r) for rec, r in zip(recs, res, strict=True) if "error" not in r]

    def scores(label: str, origin: str, y: int | None = None) -> torch.Tensor:
        """Scores of one origin's records (of label y)."""
        pick = [
            s["scores"][label] for rec, s in keep if rec["origin"] == origin and y in (None, rec["label"])
        ]
        return torch.tensor(pick, dtype=torch.float64)

    pastes = list(dict.fromkeys(rec["origin"] for rec, _ in keep if rec["origin"].startswith("paste:")))

    def pasted_figures(label: str, thr: float) -> dict[str, Any]:
        out = {}
        for o in pastes:
            p_, n_ = scores(label, o, 1), scores(label, o, 0)
            out[o.removeprefix("paste:")] = {
                "recall": [int((p_ >= thr).sum()), len(p_)],
                "fires": [int((n_ >= thr).sum()), len(n_)],
                "auroc": auroc(p_, n_),
            }
        return out

    rows = []
    for label in dets:
        neg = scores(label, "calib")
        thr = threshold_for_fpr(neg, args.fpr)
        pos, benign, chat = scores(label, "seed", 1), scores(label, "seed", 0), scores(label, "chat")
        rows.append(
            {
                "set": label,
                "threshold": thr,
                "n_calib": len(neg),
                "recall_seed_requests": [int((pos >= thr).sum()), len(pos)],
                "fires_benign_requests": [int((benign >= thr).sum()), len(benign)],
                "fires_chat_prompts": [int((chat >= thr).sum()), len(chat)],
                "auroc_requests_vs_chat": auroc(pos, torch.cat([neg, chat])),
                "auroc_requests_vs_benign": auroc(pos, benign),
                "pasted": pasted_figures(label, thr),
            }
        )
    print(f"{name}: prompt-scope {args.fpr:.0%} point over calibration prompts ({len(skipped)} skipped)")
    print(
        "| set | threshold | n calib | seed positive requests | seed negative requests | chat prompts "
        "| AUROC vs chat / benign |"
    )
    print("|---|---:|---:|---|---|---|---|")
    for r in rows:
        frac = " | ".join(f"{a} of {b}" for a, b in (r[k] for k in list(r)[3:6]))
        print(
            f"| {r['set']} | {r['threshold']:.4f} | {r['n_calib']} | {frac} | "
            f"{r['auroc_requests_vs_chat']:.3f} / {r['auroc_requests_vs_benign']:.3f} |"
        )
    for r in rows:
        for suite, f in r["pasted"].items():
            print(
                f"{r['set']}: pasted {suite}: recall {f['recall'][0]} of {f['recall'][1]}, "
                f"fires on {f['fires'][0]} of {f['fires'][1]} genuine, AUROC {f['auroc']:.3f}"
            )
    if args.json_out:
        args.json_out.write_text(json.dumps({"rows": rows, "skipped": skipped}, indent=2) + "\n")


if __name__ == "__main__":
    main()
