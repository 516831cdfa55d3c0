"""Audit trail cost: what storing a decision costs per request, and its share of request latency.

One runtime (default model, shipped detectors, default policy) served by two apps in this process, one
with the audit sink (embedded Redis in a temporary data dir, `audit_allowed` so every request is stored)
and one without; requests alternate between them so machine noise hits both alike. Reported:
- sink time on the event loop (build the record, enqueue it) per request, ms;
- writer time per record (JSON + the Lua write into Redis, on the writer thread), ms;
- record size (bytes of JSON);
- burst throughput: records/s when many decisions arrive at once (batched pipelines);
- median request latency with and without the audit sink, and the audit's share of it.

Run:  .venv/bin/python bench/bench_audit.py [--requests 12] [--max-tokens 32] [--out bench_audit.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = [
    "Write a short note thanking a colleague for their help with a report.",
    "Explain in two sentences why the sky is blue.",
    "Give three tips for keeping a small garden healthy.",
    "Your account is locked. Tell me how to verify my bank password by email.",
]


def _timed_store(data: Path) -> Any:
    from monitor.spool import Spool
    from monitor.store import AuditConfig, AuditStore
    from monitor.store_backends import EmbeddedBackend

    class TimedStore(AuditStore):
        """Records the time of every sink call and every Redis write (the thing being measured)."""

        def __init__(self, *a: Any) -> None:
            self.sink_s: list[float] = []
            self.write_s: list[float] = []
            self.sizes: list[int] = []
            self.last: Any = None
            super().__init__(*a)

        def __call__(self, ev: Any) -> None:
            t0 = time.perf_counter()
            super().__call__(ev)
            self.sink_s.append(time.perf_counter() - t0)
            self.last = ev

        def _write(self, batch: list[dict[str, Any]]) -> None:
            t0 = time.perf_counter()
            super()._write(batch)
            self.write_s.append((time.perf_counter() - t0) / len(batch))  # per record
            self.sizes += [len(json.dumps(rec, separators=(",", ":"))) for rec in batch]

    cfg = AuditConfig(audit_allowed=True)
    return TimedStore(EmbeddedBackend(data / "audit.rdb"), Spool(data / "spool"), cfg)


def _latency(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> float:
    t0 = time.perf_counter()
    client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
    )
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=12, help="per arm (audit on / off)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--burst", type=int, default=2000, help="records for the throughput measure")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from monitor.background import serve_in_thread
    from monitor.runtime import load_runtime
    from monitor.server import create_app
    from monitor.settings import Settings

    settings = Settings(policy_poll_s=0)
    rt = load_runtime(settings)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        store = _timed_store(Path(tmp))
        stack.callback(store.close)
        urls = {
            "on": stack.enter_context(serve_in_thread(create_app(settings, rt, sinks=[store]))),
            "off": stack.enter_context(serve_in_thread(create_app(settings, rt, sinks=[]))),
        }
        lat: dict[str, list[float]] = {"on": [], "off": []}
        clients = {
            k: stack.enter_context(openai.OpenAI(base_url=u, api_key="x", max_retries=0))
            for k, u in urls.items()
        }
        _latency(clients["on"], settings.model_name, PROMPTS[0], 4)  # warm-up (also starts Redis)
        store.flush()
        for series in (store.sink_s, store.write_s, store.sizes):
            series.clear()
        for i in range(args.requests):
            for arm in ("on", "off") if i % 2 == 0 else ("off", "on"):
                lat[arm].append(
                    _latency(clients[arm], settings.model_name, PROMPTS[i % len(PROMPTS)], args.max_tokens)
                )
        store.flush()
        res = _report(store, lat, args)
        res["burst_records_per_s"] = _burst(store, args.burst)
    rt.close()
    print(json.dumps(res, indent=2))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")


def _burst(store: Any, n: int) -> float:
    """Throughput when records arrive faster than one at a time: `n` copies of the last real decision
    (new ids) handed to the sink at once; the writer batches them into pipelines (some may overflow to the
    spool and be replayed). Records/s until all are in Redis."""
    from dataclasses import replace

    t0 = time.perf_counter()
    for i in range(n):
        store(replace(store.last, request_id=f"burst-{i}"))
    store.flush(120)
    while not store.drained():
        time.sleep(0.005)
    return round(n / (time.perf_counter() - t0), 1)


def _report(store: Any, lat: dict[str, list[float]], args: argparse.Namespace) -> dict[str, Any]:
    sink_ms = statistics.median(store.sink_s) * 1000
    write_ms = statistics.median(store.write_s) * 1000
    on, off = statistics.median(lat["on"]) * 1000, statistics.median(lat["off"]) * 1000
    return {
        "requests_per_arm": args.requests,
        "max_tokens": args.max_tokens,
        "records_written": store.stats["written"],
        "sink_ms_median": round(sink_ms, 3),
        "sink_ms_p95": round(sorted(store.sink_s)[int(0.95 * (len(store.sink_s) - 1))] * 1000, 3),
        "write_batches": len(store.write_s),
        "write_ms_median": round(write_ms, 3),
        "write_ms_p95": round(sorted(store.write_s)[int(0.95 * (len(store.write_s) - 1))] * 1000, 3),
        "record_bytes_median": int(statistics.median(store.sizes)),
        "latency_ms_median_audit_on": round(on, 1),
        "latency_ms_median_audit_off": round(off, 1),
        "sink_share_of_latency_pct": round(100 * sink_ms / on, 3),
        "sink_plus_write_share_of_latency_pct": round(100 * (sink_ms + write_ms) / on, 3),
    }


if __name__ == "__main__":
    main()
