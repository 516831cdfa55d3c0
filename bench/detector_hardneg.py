"""Hard negatives from the monitored model itself: SmolLM2's own answers to general chat prompts.

    OMP_NUM_THREADS=1 .venv/bin/python bench/detector_hardneg.py --out ~/.cache/featurewatch/hardneg

Samples user prompts from the public chat corpus (`$FEATUREWATCH_SHARED_DIR/corpus`, default ../shared:
Dolly prompts, Self-Instruct seed tasks, Schema-Guided Dialogue, HH-RLHF harmless, GSM8K), lets the default
model answer each one greedily (batched, resumable: answers are appended to `answers.jsonl` and skipped on
a rerun), then writes `train.jsonl`, `calib.jsonl` and `test.jsonl` (label 0 chat records: the prompt as
the user turn, the model's answer as the monitored assistant turn), split by prompt (sha256 of the prompt
id, stratified by source), and `calib_human.jsonl` (human-written answers to other prompts of the same
corpus, for calibration only). Nothing derived from the corpus belongs in the repository: keep `--out`
outside.

HH-RLHF prompts are red-team style; a prompt that mentions one of the concepts (scams, lying, groups of
people …) is skipped, because the model's answer to it is not known to be a negative.
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

from detectors.datasets import shared_dir, stable_hash

SOURCES = {  # name -> (corpus file, prompts to sample)
    "dolly": ("chat_dolly15k_prompts_only.jsonl", 90),
    "self_instruct": ("chat_self_instruct_seed_tasks.jsonl", 50),
    "sgd": ("chat_sgd_dev_sample.jsonl", 50),
    "hh_harmless": ("chat_hh_rlhf_harmless_base_test.jsonl", 50),
    "gsm8k": ("chat_gsm8k.jsonl", 50),
}
# Words that make an answer's label unknown for one of the three concepts (mainly in red-team prompts).
CONCEPT_WORDS = re.compile(
    r"\b(scam\w*|fraud\w*|phish\w*|spam\w*|lie|lies|lying|liar|deceiv\w*|decept\w*|trick\w*|cheat\w*|"
    r"fake\w*|forg\w*|steal\w*|stole|con artist|launder\w*|bribe\w*|password\w*|hack\w*|"
    r"stereotyp\w*|racis\w*|sexis\w*|race|races|black|white|asian\w*|mexican\w*|jew\w*|muslim\w*|"
    r"christian\w*|gay|lesbian\w*|trans\w*|women|woman|men|girls?|boys?|immigrant\w*|african\w*|"
    r"chinese|indian\w*|arab\w*|old people|elderly|disab\w*|fat|ugly|poor people)\b",
    re.I,
)
SPLITS = (("train", 0.5), ("calib", 0.25), ("test", 0.25))
# Human-written general-chat answers for calibration only (`calib_human.jsonl`): more negatives make the
# 1 % point less noisy. Prompts sampled above (any split) are never used here.
HUMAN_CALIB = (
    "chat_sgd_dev_sample.jsonl",
    "chat_hh_rlhf_harmless_base_test.jsonl",
    "chat_self_instruct_seed_tasks.jsonl",
    "chat_gsm8k.jsonl",
)


def human_calib(corpus: Path, taken: set[str], per_file: int) -> list[dict[str, Any]]:
    """The first `per_file` single-exchange (user, assistant) records per file in sha256 order whose
    prompt was not sampled for the model's own answers (and, for HH, touches no concept)."""
    out = []
    for fname in HUMAN_CALIB:
        rows = []
        with open(corpus / fname, encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                msgs = rec.get("messages") or []
                if f"hn-{rec['id']}" in taken or len(msgs) < 2 or msgs[1].get("role") != "assistant":
                    continue
                if "hh_rlhf" in fname and CONCEPT_WORDS.search(msgs[0]["content"] + msgs[1]["content"]):
                    continue
                rows.append((stable_hash("human-calib", rec["id"]), rec["id"], msgs[:2]))
        rows.sort(key=lambda r: (r[0], r[1]))
        for _, rid, msgs in rows[:per_file]:
            out.append({"id": f"hc-{rid}", "label": 0, "kind": "human_answer", "messages": msgs})
    return out


def sample_prompts(corpus: Path, tokenizer: Any, max_prompt_tokens: int) -> list[dict[str, Any]]:
    """Per source, the first N prompts in sha256 order that fit and (HH) do not touch a concept."""
    out = []
    for source, (fname, n) in SOURCES.items():
        rows = []
        with open(corpus / fname, encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                msgs = rec.get("messages") or []
                if not msgs or msgs[0].get("role") != "user":
                    continue
                prompt = str(msgs[0]["content"]).strip()
                if not prompt or (source == "hh_harmless" and CONCEPT_WORDS.search(prompt)):
                    continue
                rows.append((stable_hash("hardneg", rec["id"]), rec["id"], prompt))
        rows.sort()
        taken = 0
        for _, rid, prompt in rows:
            if len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) > max_prompt_tokens:
                continue
            out.append({"id": f"hn-{rid}", "source": source, "prompt": prompt})
            taken += 1
            if taken == n:
                break
    return out


def assign_split(prompts: list[dict[str, Any]]) -> None:
    """train / calib / test by prompt, in sha256 order within each source (stratified)."""
    by_source: dict[str, list[dict[str, Any]]] = {}
    for p in prompts:
        by_source.setdefault(p["source"], []).append(p)
    for members in by_source.values():
        members.sort(key=lambda p: stable_hash("hardneg-split", p["id"]))
        n, start = len(members), 0
        for i, (name, frac) in enumerate(SPLITS):
            stop = n if i == len(SPLITS) - 1 else start + round(frac * n)
            for p in members[start:stop]:
                p["split"] = name
            start = stop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("~/.cache/featurewatch/hardneg").expanduser())
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--max-prompt-tokens", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--human-calib", type=int, default=50, help="Human answers per chat file for calib.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from monitor.generate import Generator, SamplingParams
    from monitor.model import load_model
    from sae_assets.text import chat_token_ids

    out: Path = args.out.expanduser()
    if (Path(__file__).resolve().parent.parent in out.resolve().parents) or out.resolve() == Path.cwd():
        raise SystemExit("--out must lie outside the repository (derived corpus data)")
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(args.model, device="cpu")
    prompts = sample_prompts(shared_dir() / "corpus", lm.tokenizer, args.max_prompt_tokens)
    assign_split(prompts)
    answers_path = out / "answers.jsonl"
    done: dict[str, str] = {}
    if answers_path.is_file():
        for line in answers_path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            done[rec["id"]] = rec["answer"]
    todo = [p for p in prompts if p["id"] not in done]
    # Similar prompt lengths per batch: less left padding.
    ids = {p["id"]: chat_token_ids(lm.tokenizer, [{"role": "user", "content": p["prompt"]}]) for p in todo}
    todo.sort(key=lambda p: len(ids[p["id"]]))
    gen = Generator(lm.model, lm.tokenizer)
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0)
    t0 = time.perf_counter()
    with open(answers_path, "a", encoding="utf-8") as fh, tqdm(total=len(todo), desc="generate") as bar:
        for i in range(0, len(todo), args.batch_size):
            batch = todo[i : i + args.batch_size]
            results: list[Any] = []
            for _ in gen.stream([ids[p["id"]] for p in batch], params, results=results):
                pass
            for p, r in zip(batch, results, strict=True):
                done[p["id"]] = r.text.strip()
                fh.write(json.dumps({"id": p["id"], "answer": done[p["id"]]}, ensure_ascii=False) + "\n")
            fh.flush()
            bar.update(len(batch))
    print(f"generated {len(todo)} answers in {time.perf_counter() - t0:.0f} s")
    counts: dict[str, int] = {}
    files = {name: open(out / f"{name}.jsonl", "w", encoding="utf-8") for name, _ in SPLITS}  # noqa: SIM115
    try:
        for p in prompts:
            answer = done.get(p["id"], "")
            if not answer:
                continue
            rec = {
                "id": p["id"],
                "label": 0,
                "kind": "smollm_answer",
                "source": p["source"],
                "part": p["split"],  # not `split`: detectors.build counts records with `split` as seed data
                "suite": "smollm-answers",  # the training source named in per-source figures
                "messages": [
                    {"role": "user", "content": p["prompt"]},
                    {"role": "assistant", "content": answer},
                ],
            }
            files[p["split"]].write(json.dumps(rec, ensure_ascii=False) + "\n")
            counts[p["split"]] = counts.get(p["split"], 0) + 1
    finally:
        for f in files.values():
            f.close()
    human = human_calib(shared_dir() / "corpus", {p["id"] for p in prompts}, args.human_calib)
    with open(out / "calib_human.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in human)
    print(
        f"wrote {', '.join(f'{k} {v}' for k, v in counts.items())}, calib_human {len(human)} records to {out}"
    )


if __name__ == "__main__":
    main()
