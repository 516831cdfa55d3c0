"""What naming the latents behind a probe costs in serving: the generator's full SAE encode per token
(`watch_all`) and the request monitor's per-token attribution, each side by side with its absence.

Run: .venv/bin/python bench/evidence_cost.py [--rounds 3] [--tokens 48] [--device cpu|cuda] [--json out.json]

1. Generator: batches of 1 and 8 chat prompts, greedy, `--tokens` each, residual captures at the shipped
   detectors' hook points, `watch_all` off / on, interleaved round by round (medians; tokens/s).
2. Request monitor: `observe_token` with the shipped detectors and default policy on one token's
   residuals, without / with all latents (ms per token, median of the rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from detectors.build import shipped_detectors
from detectors.registry import load_detectors
from monitor.generate import Generator, SamplingParams
from monitor.model import load_model
from monitor.monitoring import DetectorSet, RequestMonitor
from policies.loader import load_policy
from sae_assets.registry import DEFAULT_SAE, resolve_sae_path
from sae_assets.sae import SAE

TOPICS = ["the sea", "bank transfers", "tea", "volcanoes", "chess", "bridges", "bees", "trains"]


def _prompts(tokenizer: Any, n: int) -> list[list[int]]:
    chats = [[{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}] for i in range(n)]
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _gen_rate(gen: Generator, prompts: list[list[int]], tokens: int, points: list[str], full: bool) -> float:
    t0 = time.perf_counter()
    n = sum(
        1
        for _ in gen.stream(prompts, SamplingParams(max_tokens=tokens), watch_all=full, capture_points=points)
    )
    return n / (time.perf_counter() - t0)


def _observe_ms(dset: DetectorSet, policy: Any, full: torch.Tensor | None, n: int = 300) -> float:
    m = RequestMonitor(dset, policy)
    m.observe_prompt([0, 1, 2], torch.zeros(3, 0), {p: torch.randn(3, 576) for p in dset.points}, set())
    resid = {p: torch.randn(576) for p in dset.points}
    t0 = time.perf_counter()
    for i in range(n):
        m.observe_token(i, "x", torch.zeros(0), resid, full)
    return (time.perf_counter() - t0) / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--device", default="cpu", help="cpu, cuda or auto (the monitor's part stays on the CPU, as served)"
    )
    a = ap.parse_args()
    lm = load_model("smollm2-135m-instruct", device=a.device)
    folder = resolve_sae_path(DEFAULT_SAE)
    sae = SAE.load(folder).to(lm.device)
    names = shipped_detectors(folder / "detectors")
    dset = DetectorSet.build(load_detectors(names, folder / "detectors", sae, model=lm.model), names)
    gen = Generator(lm.model, lm.tokenizer, sae, "model.layers.15")
    gen.eos_ids = set()  # every row runs the full length
    out: dict[str, Any] = {
        "detectors": names,
        "attributing": list(dset.attributing),
        "tokens": a.tokens,
        "device": str(lm.device),
    }
    for batch in (1, 8):
        prompts = _prompts(lm.tokenizer, batch)
        rates: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(a.rounds):
            for full in (False, True):
                rates[full].append(_gen_rate(gen, prompts, a.tokens, dset.points, full))
        off, on = statistics.median(rates[False]), statistics.median(rates[True])
        out[f"generator_batch_{batch}"] = {
            "off_tok_s": off,
            "on_tok_s": on,
            "ratio": on / off,
            "rounds": rates,
        }
    policy = load_policy("policies/default.yaml")
    x = torch.randn(576, device=lm.device)
    full_latents = sae.encode(x[None])[0].detach().float().cpu()  # served latents arrive on the CPU
    times: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(a.rounds):
        times["without"].append(_observe_ms(dset, policy, None))
        times["with"].append(_observe_ms(dset, policy, full_latents))
    out["observe_token_ms"] = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps(out, indent=1, default=str))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
