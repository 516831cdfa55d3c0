"""Load benchmark: concurrent OpenAI clients against a real `featurewatch serve` process on loopback.

Two phases of `--duration` seconds against one sidecar (`max_queue` = `--max-queue`):
1. below capacity: `--clients` clients (fewer than the batch size): every request must succeed;
2. overload: `--overload-clients` clients, more than a batch plus the queue can hold: the excess must get
   429 (clients wait its Retry-After), nothing else.
Each client loops over requests, alternating streamed (with usage) and plain ones. Reported per phase:
requests/s, completion tokens/s, latency p50/p99, time to first text p50/p99 (streams), errors by status.
The sidecar's RSS (psutil, every 0.5 s; its embedded redis-server apart) at start, end and peak of
each phase, measured after a warm-up batch; growth over both phases beyond `--rss-bound-mb` is flagged,
not asserted. The sidecar is stopped with SIGTERM at the end (exit status and drain time reported).

Run:  .venv/bin/python bench/bench_load.py [--duration 60] [--clients 4] [--overload-clients 24]
      [--max-queue 8] [--max-tokens 32] [--model NAME | --tiny] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.load_common import PROMPTS, Sampler, Sidecar, percentile, rss_mb, tiny_assets


@dataclass
class Outcome:
    status: int  # 200, an HTTP error status, or 0 for a connection error
    latency_s: float
    ttft_s: float | None  # streams only: until the first text
    tokens: int
    ended: float  # monotonic


def _request(
    client: openai.OpenAI, model: str, i: int, stream: bool, max_tokens: int
) -> tuple[int, float | None]:
    """One chat completion; (completion tokens, time to first text or None)."""
    messages: Any = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
    t0 = time.perf_counter()
    if not stream:
        r = client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0
        )
        return (r.usage.completion_tokens if r.usage else 0), None
    first, tokens = None, 0
    chunks = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for c in chunks:
        if first is None and c.choices and c.choices[0].delta.content:
            first = time.perf_counter() - t0
        if c.usage is not None:
            tokens = c.usage.completion_tokens
    return tokens, first


def _client(url: str, model: str, k: int, until: float, max_tokens: int, out: list[Outcome]) -> None:
    with openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=600) as client:
        n = 0
        while time.monotonic() < until:
            n += 1
            t0 = time.perf_counter()
            wait = 0.0
            try:
                tokens, ttft = _request(client, model, k + n, (k + n) % 2 == 0, max_tokens)
                status = 200
            except openai.APIStatusError as e:
                status, tokens, ttft = e.status_code, 0, None
                wait = float(e.response.headers.get("retry-after", 1)) if status == 429 else 0.0
            except openai.APIConnectionError:
                status, tokens, ttft = 0, 0, None
                wait = 1.0
            out.append(Outcome(status, time.perf_counter() - t0, ttft, tokens, time.monotonic()))
            time.sleep(wait)  # honour Retry-After, as a well-behaved client does


def warm_up(url: str, model: str, rows: int, max_tokens: int) -> float:
    """One full batch (`rows` requests at once), so that memory is measured from a warmed-up server:
    weights paged in, the allocator grown to a batch's working set, the embedded Redis started."""
    t0 = time.monotonic()
    with openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=600) as client:
        threads = [
            threading.Thread(target=_request, args=(client, model, i, i % 2 == 0, max_tokens))
            for i in range(rows)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return time.monotonic() - t0


def phase(url: str, model: str, clients: int, duration_s: float, max_tokens: int) -> dict[str, Any]:
    out: list[Outcome] = []
    t0 = time.monotonic()
    until = t0 + duration_s
    threads = [
        threading.Thread(target=_client, args=(url, model, k, until, max_tokens, out)) for k in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0  # includes the requests still running when the time was up
    ok = [o for o in out if o.status == 200]
    ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
    lat = [o.latency_s for o in ok]
    errors = Counter(str(o.status) for o in out if o.status != 200)
    return {
        "clients": clients,
        "wall_s": round(wall, 1),
        "requests_ok": len(ok),
        "requests_per_s": round(len(ok) / wall, 3),
        "completion_tokens_per_s": round(sum(o.tokens for o in ok) / wall, 2),
        "latency_s": _dist(lat),
        "ttft_s": _dist(ttft),
        "errors_by_status": dict(errors),
        "unexpected_errors": {k: v for k, v in errors.items() if k != "429"},
        "t": (t0, time.monotonic()),
    }


def _dist(values: list[float]) -> dict[str, float | None]:
    p50, p99 = percentile(values, 50), percentile(values, 99)
    return {
        "n": len(values),
        "p50": None if p50 is None else round(p50, 3),
        "p99": None if p99 is None else round(p99, 3),
        "mean": round(statistics.fmean(values), 3) if values else None,
    }


def _rss(sampler: Sampler, t0: float, t1: float) -> dict[str, float | None]:
    pts = sampler.between(t0, t1)
    if not pts:
        return {"start": None, "end": None, "peak": None}
    side = [p["sidecar"] for p in pts]
    return {
        "start": round(side[0], 1),
        "end": round(side[-1], 1),
        "peak": round(max(side), 1),
        "redis_peak": round(max(p["redis"] for p in pts), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--overload-clients", type=int, default=24)
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tiny", action="store_true", help="a random tiny model (quick runs, meaningless text)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rss-bound-mb", type=float, default=200.0, help="flag RSS growth beyond this")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        settings: dict[str, Any] = {
            "model": args.model,
            "device": args.device,
            "max_queue": args.max_queue,
            "max_batch_size": args.max_batch,
        }
        if args.tiny:
            settings.update(tiny_assets(folder))
            policy = folder / "policy.yaml"
            policy.write_text(
                "name: tiny\nrules:\n  - {id: f, detector: never, threshold: 0.5, action: flag}\n"
            )
            settings["policy"] = str(policy)
        served = settings.get("served_model_name", args.model)
        side = Sidecar(folder, settings)
        results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
        results["ready_s"] = round(side.wait_ready(), 1)
        sampler = Sampler(lambda: rss_mb(side.proc.pid, folder / "data"))
        url = f"{side.url}/v1"
        results["warmup_s"] = round(warm_up(url, served, args.max_batch, args.max_tokens), 1)
        t_warm = time.monotonic()
        for name, clients in (("below_capacity", args.clients), ("overload", args.overload_clients)):
            res = phase(url, served, clients, args.duration, args.max_tokens)
            res["rss_mb"] = _rss(sampler, *res.pop("t"))
            results[name] = res
            print(name, json.dumps(res, indent=1), flush=True)
        sampler.stop()
        results["rss_mb"] = _rss(sampler, t_warm, time.monotonic())
        growth = (results["rss_mb"]["end"] or 0) - (results["rss_mb"]["start"] or 0)
        results["rss_growth_mb"] = round(growth, 1)
        results["rss_flag"] = (
            f"RSS grew {growth:.0f} MB > {args.rss_bound_mb:.0f} MB" if growth > args.rss_bound_mb else None
        )
        code, took = side.terminate()
        results["sigterm"] = {"exit": code, "seconds": round(took, 1)}
    print(json.dumps({k: v for k, v in results.items() if k not in ("below_capacity", "overload")}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
