"""Runtime benchmarks for [1/7]: model load (cold/warm), plain vs monitored generation, early-exit scoring.

Run: .venv/bin/python bench/bench_runtime.py [--rounds 3] [--tokens 48] [--json out.json]
Plain and monitored generation are interleaved round by round in one process, and ratios are reported,
because this machine is noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from monitor.generate import Generator, SamplingParams, generate_text
from monitor.model import load_model
from sae_assets.hooks import run_to_hooks
from sae_assets.registry import DEFAULT_SAE, resolve_sae_path
from sae_assets.sae import SAE

PROMPTS = ["Write a haiku about the sea.", "Explain what a bank transfer is.", "Name three colours."]


def bench_load() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cold = load_model(root=Path(tmp), device="cpu")
        warm = load_model(root=Path(tmp), device="cpu")
    assert cold.converted and not warm.converted
    return {"load_cold_s": cold.load_seconds, "load_warm_s": warm.load_seconds}


def bench_generation(lm, sae: SAE, n_tokens: int, rounds: int, n_watch: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    plain = Generator(lm.model, lm.tokenizer)
    hooked = Generator(lm.model, lm.tokenizer, sae)
    plain.eos_ids = hooked.eos_ids = set()  # fixed length: every run generates exactly n_tokens
    watch = list(range(0, sae.d_sae, max(1, sae.d_sae // n_watch)))[:n_watch]
    params = SamplingParams(max_tokens=n_tokens)
    rates: dict[str, list[float]] = {"plain": [], "watched": []}
    for _ in range(rounds):
        for name, gen, kw in (("plain", plain, {}), ("watched", hooked, {"watch": watch})):
            for p in PROMPTS:
                ids = lm.chat_ids([{"role": "user", "content": p}])
                t0 = time.perf_counter()
                generate_text(gen, ids, params, **kw)
                rates[name].append(n_tokens / (time.perf_counter() - t0))
    p_med, w_med = statistics.median(rates["plain"]), statistics.median(rates["watched"])
    return {
        "gen_plain_tok_s": p_med,
        "gen_watched_tok_s": w_med,
        "gen_ratio": w_med / p_med,
        "n_watched": len(watch),
    }


def bench_scoring(lm, point: str, rounds: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    ids = torch.randint(100, 40000, (8, 128))
    early, full = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run_to_hooks(lm.model, [point], input_ids=ids)
        early.append(ids.numel() / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        with torch.inference_mode():
            lm.model(input_ids=ids, use_cache=False)
        full.append(ids.numel() / (time.perf_counter() - t0))
    e, f = statistics.median(early), statistics.median(full)
    return {"score_early_exit_tok_s": e, "score_full_forward_tok_s": f, "score_ratio": e / f}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--watch", type=int, default=32, help="number of watched latents")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out: dict[str, float | str] = {"torch_threads": float(torch.get_num_threads())}
    out.update(bench_load())
    lm = load_model(device="cpu")
    sae = SAE.load(resolve_sae_path(DEFAULT_SAE))
    point = sae.cfg.metadata.extra.get("hf_hook_point", "model.layers.15")
    out.update(bench_generation(lm, sae, args.tokens, args.rounds, args.watch))
    out.update(bench_scoring(lm, point, args.rounds))
    for k, v in out.items():
        print(f"{k:28s} {v:.3f}" if isinstance(v, float) else f"{k:28s} {v}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
