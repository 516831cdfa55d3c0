"""The monitored model's own answers to the scam seed's requests, for hand labelling.

    OMP_NUM_THREADS=2 .venv/bin/python bench/detector_modelscam.py generate  # ~/.cache/featurewatch/modelscam
    # ... write labels.jsonl there (see below), then:
    .venv/bin/python bench/detector_modelscam.py merge

Why: the scam seed's positives are human-written, fluent scams. SmolLM2-135M writes shorter, clumsier
ones, and a probe fitted on the human texts catches few of them (docs/benchmarks.md, [3/7] session 13).
This script asks the default model every request of `concepts/scam.jsonl` that has a request-shaped
user turn (the scam requests and the benign requests for genuine notices, both splits) in these ways:

- `greedy`: what the server answers by default (temperature 0);
- `sampled`: temperature 0.8, top-p 0.95 (a different wording each run of the seed);
- `prefill`: sampled after the assistant turn was started with the first words of the seed's own answer
  (a model that was jailbroken or told how to begin; it also makes the model comply far more often);
  `prefill2` (scam requests only): the same with another sampling seed.

`generate` appends to `answers.jsonl` (resumable: done ids are skipped). Labels are given by reading
each answer, not from the request: `labels.jsonl` holds `{"id", "label": 1 | 0 | null, "why"}` (1: the
text would work as, or as part of, a scam / phishing / fraud message to a victim; 0: it would not:
refusal, warning, genuine notice, off-topic; null: too degenerate or ambiguous to say). `merge` writes
the labelled answers into the seed file (ids `scam-m-*`, kinds `model_scam` / `model_answer`, the
request's split), replacing an earlier merge. The texts are the model's own output to our prompts, so
they may live in the repository (no shared data in them).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from detectors.datasets import seed_dir

# Seed kinds whose user turn is a request to write a message (scam or genuine): the prompts to reuse.
REQUEST_KINDS = {
    1: None,  # every positive is a request to write a scam
    0: {"legit_bank_alert", "legit_notice", "marketing_email", "password_reset"},
}
VARIANTS = ("greedy", "sampled", "prefill", "prefill2")  # prefill2: prefill again, other sampling seed
BENIGN_VARIANTS = ("greedy", "prefill", "sampled")
SEED_OFFSET = {"prefill2": 1000}  # sampling seed = --seed + offset + batch start
PREFILL_WORDS = 5  # first words of the seed's answer given as the start of the assistant turn
SEED_FILE = "scam.jsonl"
ID_PREFIX = "scam-m-"


def requests() -> list[dict[str, Any]]:
    out = []
    with open(seed_dir() / SEED_FILE, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec["id"].startswith(ID_PREFIX):
                continue
            kinds = REQUEST_KINDS[rec["label"]]
            if kinds is not None and rec.get("kind") not in kinds:
                continue
            msgs = rec.get("messages") or []
            if len(msgs) != 2 or msgs[0]["role"] != "user":
                continue
            out.append(rec)
    return out


def prefill_of(answer: str) -> str:
    words = re.split(r"(\s+)", answer.strip())
    return "".join(words[: 2 * PREFILL_WORDS - 1])


def jobs(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for rec in recs:
        for v in VARIANTS if rec["label"] else BENIGN_VARIANTS:
            out.append(
                {
                    "id": f"{rec['id']}-{v}",
                    "seed_id": rec["id"],
                    "variant": v,
                    "request_label": rec["label"],
                    "split": rec["split"],
                    "prompt": rec["messages"][0]["content"],
                    "prefill": prefill_of(rec["messages"][1]["content"]) if v.startswith("prefill") else "",
                }
            )
    return out


def generate(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    from monitor.generate import Generator, SamplingParams
    from monitor.model import load_model
    from sae_assets.text import chat_token_ids

    out: Path = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "answers.jsonl"
    done = set()
    if path.is_file():
        done = {json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()}
    todo = [j for j in jobs(requests()) if j["id"] not in done]
    lm = load_model(args.model, device="cpu")
    tok = lm.tokenizer

    def ids_of(j: dict[str, Any]) -> list[int]:
        ids = chat_token_ids(tok, [{"role": "user", "content": j["prompt"]}])
        return ids + (tok(j["prefill"], add_special_tokens=False)["input_ids"] if j["prefill"] else [])

    ids = {j["id"]: ids_of(j) for j in todo}
    gen = Generator(lm.model, lm.tokenizer)
    t0 = time.perf_counter()
    with open(path, "a", encoding="utf-8") as fh, tqdm(total=len(todo), desc="generate") as bar:
        for variant in VARIANTS:  # one sampling setting per batch
            part = sorted((j for j in todo if j["variant"] == variant), key=lambda j: len(ids[j["id"]]))
            greedy = variant == "greedy"
            for i in range(0, len(part), args.batch_size):
                batch = part[i : i + args.batch_size]
                params = SamplingParams(
                    max_tokens=args.max_new_tokens,
                    temperature=0.0 if greedy else 0.8,
                    top_p=1.0 if greedy else 0.95,
                    seed=None if greedy else args.seed + SEED_OFFSET.get(variant, 0) + i,
                )
                results: list[Any] = []
                for _ in gen.stream([ids[j["id"]] for j in batch], params, results=results):
                    pass
                for j, r in zip(batch, results, strict=True):
                    answer = (j["prefill"] + r.text).strip()
                    fh.write(json.dumps({**j, "answer": answer}, ensure_ascii=False) + "\n")
                fh.flush()
                bar.update(len(batch))
    print(f"generated {len(todo)} answers in {time.perf_counter() - t0:.0f} s -> {path}")


def merge(args: argparse.Namespace) -> None:
    out: Path = args.out.expanduser()
    answers = {}
    for line in (out / "answers.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        answers[rec["id"]] = rec
    labels = {}
    for line in (out / "labels.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec["id"] not in answers:
            raise SystemExit(f"labels.jsonl: unknown id {rec['id']!r}")
        if rec["label"] not in (0, 1, None):
            raise SystemExit(f"labels.jsonl: {rec['id']}: label must be 0, 1 or null")
        labels[rec["id"]] = rec["label"]
    missing = sorted(set(answers) - set(labels))
    if missing:
        raise SystemExit(f"{len(missing)} answers have no label yet, e.g. {missing[:3]}")
    seed = seed_dir() / SEED_FILE
    keep = [
        line
        for line in seed.read_text(encoding="utf-8").splitlines()
        if not json.loads(line)["id"].startswith(ID_PREFIX)
    ]
    added = []
    for aid in sorted(answers):
        a, label = answers[aid], labels[aid]
        if label is None or not a["answer"]:
            continue
        added.append(
            {
                "id": ID_PREFIX + aid.removeprefix("scam-"),
                "label": label,
                "kind": "model_scam" if label else "model_answer",
                "split": a["split"],
                "source": f"smollm2-135m-instruct:{a['variant']}",
                "messages": [
                    {"role": "user", "content": a["prompt"]},
                    {"role": "assistant", "content": a["answer"]},
                ],
            }
        )
    text = "\n".join(keep + [json.dumps(r, ensure_ascii=False) for r in added]) + "\n"
    seed.write_text(text, encoding="utf-8")
    n1 = sum(r["label"] for r in added)
    print(
        f"merged {len(added)} model answers ({n1} scams, {len(added) - n1} not) into {seed}; "
        f"{sum(lab is None for lab in labels.values())} left out as unclear"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=("generate", "merge"))
    ap.add_argument("--out", type=Path, default=Path("~/.cache/featurewatch/modelscam"))  # outside the repo
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    generate(args) if args.step == "generate" else merge(args)


if __name__ == "__main__":
    main()
