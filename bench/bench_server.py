"""Sidecar benchmarks over real HTTP (uvicorn on loopback, the `openai` client), default model and policy.

1. Monitoring overhead: the same model served twice in this process, monitoring on (shipped detectors,
   default policy) and off; requests alternate between the two so machine noise hits both alike.
   Reported as completion tokens/s and the on/off ratio, at 1 stream and at 8 concurrent streams.
   Also the time to the first streamed text (monitoring on holds back the policy's window).
2. Concurrency: aggregate completion tokens/s at 1/4/8/16 concurrent streams (monitoring on).
3. Shadow scoring: /v1/monitor/score throughput (conversations/s, tokens/s).

Greedy decoding with a fixed `max_tokens`; a stream that stops early (EOS) counts the tokens it produced.
Run:  .venv/bin/python bench/bench_server.py [--max-tokens 64] [--rounds 3] [--out docs/bench_server.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = [
    "Write a short note thanking a colleague for their help with a report.",
    "Explain in two sentences why the sky is blue.",
    "Give three tips for keeping a small garden healthy.",
    "Describe a quiet morning in a small coastal town.",
    "What should I pack for a weekend hiking trip?",
    "Summarise the plot of a detective story in a few sentences.",
    "Write a friendly reminder about a team meeting on Friday.",
    "List some ways to save energy at home.",
]


def _server(monitoring: bool, max_batch: int, model: str, device: str) -> tuple[Any, Any]:
    from monitor.background import serve_in_thread
    from monitor.runtime import load_runtime
    from monitor.server import create_app
    from monitor.settings import Settings

    settings = Settings(
        model=model,
        served_model_name="smollm2-135m-instruct",  # what the clients below ask for, whatever the folder
        device=device,
        monitoring=monitoring,
        max_batch_size=max_batch,
        policy_poll_s=0,
        max_queue=256,
    )
    rt = load_runtime(settings)
    return rt, serve_in_thread(create_app(settings, rt, sinks=[]))


def _one(client: openai.OpenAI, prompt: str, max_tokens: int) -> int:
    r = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
    )
    assert r.usage is not None
    return int(r.usage.completion_tokens)


def _wave(url: str, streams: int, max_tokens: int) -> float:
    """`streams` concurrent requests; returns aggregate completion tokens/s."""
    with openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=600) as client:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            counts = list(
                pool.map(lambda i: _one(client, PROMPTS[i % len(PROMPTS)], max_tokens), range(streams))
            )
        return sum(counts) / (time.perf_counter() - t0)


def overhead(urls: dict[str, str], rounds: int, max_tokens: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for streams in (1, 8):
        rates: dict[str, list[float]] = {"on": [], "off": []}
        for _ in range(rounds):
            for mode in ("on", "off"):  # alternate: drift in machine load hits both
                rates[mode].append(_wave(urls[mode], streams, max_tokens))
        on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
        out[f"streams_{streams}"] = {"on_tok_s": on, "off_tok_s": off, "ratio": on / off, "rounds": rates}
    return out


def ttft(urls: dict[str, str], rounds: int, max_tokens: int) -> dict[str, float]:
    """Median time to the first streamed content, monitoring on (with the policy's hold-back) vs off."""
    times: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(rounds):
        for mode in ("on", "off"):
            with openai.OpenAI(base_url=urls[mode], api_key="x", max_retries=0, timeout=600) as client:
                t0 = time.perf_counter()
                stream = client.chat.completions.create(
                    model="smollm2-135m-instruct",
                    messages=[{"role": "user", "content": PROMPTS[1]}],
                    max_tokens=max_tokens,
                    temperature=0,
                    stream=True,
                )
                first = None
                for c in stream:
                    if first is None and c.choices and c.choices[0].delta.content:
                        first = time.perf_counter() - t0
                times[mode].append(first if first is not None else float("nan"))
    return {f"{m}_s": statistics.median(v) for m, v in times.items()}


def concurrency(url: str, max_tokens: int) -> dict[str, float]:
    return {str(n): _wave(url, n, max_tokens) for n in (1, 4, 8, 16)}


def scoring(url: str, n: int) -> dict[str, float]:
    convo = [
        {"role": "user", "content": PROMPTS[0]},
        {"role": "assistant", "content": "Thank you so much for your help with the quarterly report. " * 4},
    ]
    tokens = 0
    t0 = time.perf_counter()
    for _ in range(n):
        r = httpx.post(f"{url}/monitor/score", json={"messages": convo}, timeout=120)
        r.raise_for_status()
        tokens += len(r.json()["evidence"]["tokens"])
    dt = time.perf_counter() - t0
    return {"conversations_s": n / dt, "tokens_s": tokens / dt}


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() and device != "cpu" else "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None)
    # GPU runs use a random-init copy of the architecture (bench/gpu/make_random_model.py): same speed.
    ap.add_argument("--model", default="smollm2-135m-instruct", help="alias, folder or Hugging Face id")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    import torch

    results: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "max_tokens": args.max_tokens,
        "model": args.model,
        "device": _device_name(args.device),
    }
    with ExitStack() as stack:
        urls = {}
        for mode, flag in (("on", True), ("off", False)):
            rt, ctx = _server(flag, args.max_batch, args.model, args.device)
            stack.callback(rt.close)
            urls[mode] = stack.enter_context(ctx)
        _wave(urls["on"], 1, 8), _wave(urls["off"], 1, 8)  # warm-up
        results["overhead"] = overhead(urls, args.rounds, args.max_tokens)
        print(json.dumps(results["overhead"], indent=1), flush=True)
        results["ttft"] = ttft(urls, args.rounds, args.max_tokens)
        print(json.dumps(results["ttft"], indent=1), flush=True)
        results["concurrency_tok_s"] = concurrency(urls["on"], args.max_tokens)
        print(json.dumps(results["concurrency_tok_s"], indent=1), flush=True)
        results["scoring"] = scoring(urls["on"], 20)
        print(json.dumps(results["scoring"], indent=1), flush=True)
    c = results["concurrency_tok_s"]
    results["batching_gain_8_vs_1"] = c["8"] / c["1"]
    print(json.dumps({k: v for k, v in results.items() if k != "overhead"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    threading.excepthook = lambda a: print(a, file=sys.stderr)
    main()
