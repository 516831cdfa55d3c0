"""The shadow-scoring worker: consumes `featurewatch:score:requests` in the consumer group
`featurewatch-scorers`, scores batches with the detectors (`monitor.worker_scoring`) and appends one
result per request to `featurewatch:score:results`. Any number of workers on any machines share one
Redis (Redis ≥ 6.2: XAUTOCLAIM, exclusive XRANGE).

Exactly one result per request: the result is appended by a Lua script that, atomically, checks the
request is still pending in the group, XADDs the result, XACKs and XDELs the request. A worker killed
before the script ran leaves its requests pending; after `claim_idle_s` another worker (or itself,
restarted) takes them over with XAUTOCLAIM and scores them. A stalled worker whose requests were taken
over finds them no longer pending when it finishes, and writes nothing. Requests leave the stream once
scored, so conversation text does not stay in Redis and the stream holds only work not yet done.

A request handed out more than `max_deliveries` times (its workers kept dying on it) gets an error result
instead of another try; one that cannot be decoded gets an error result naming why. Logs carry counts and
ids, never conversation content.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from monitor.worker_protocol import GROUP, Rejected, Request, StreamKeys, decode_request, error_fields

log = logging.getLogger("featurewatch.worker")
BACKOFF_S, BACKOFF_MAX_S = 0.5, 10.0  # waits after a Redis failure, doubling
Entry = tuple[str, dict[str, str], int]  # (request entry id, fields, deliveries so far incl. this one)
ScoreFn = Callable[[Sequence[Request]], list[dict[str, str]]]

# KEYS: requests stream, results stream. ARGV: group, request entry id, results MAXLEN (approximate), then
# the result's field/value pairs. Nothing is written unless the request is still pending: of two workers
# holding one request (it was taken over from a stalled one), the first to finish writes and acks it.
WRITE_SCRIPT = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #pending == 0 then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"""


@dataclass(frozen=True)
class WorkerConfig:
    name: str  # this worker's consumer name in the group (default host-pid)
    batch_size: int = 8  # requests per XREADGROUP and per forward pass
    claim_idle_s: float = 30.0  # pending this long = its worker died; must exceed one batch's scoring time
    max_deliveries: int = 3  # handed out more often than this: an error result, no further try
    block_ms: int = 1000  # XREADGROUP BLOCK; a stop request is noticed within this (< the 2 s socket timeout)
    stats_every_s: float = 60.0  # progress log period
    results_maxlen: int = 1_000_000  # results kept on the results stream (approximate trim)
    keys: StreamKeys = field(default_factory=StreamKeys)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_deliveries < 1 or self.claim_idle_s <= 0:
            raise ValueError("batch_size and max_deliveries must be ≥ 1, claim_idle_s > 0")

    @property
    def reclaim_every_s(self) -> float:
        """How often to look for requests left by dead workers: they wait at most claim_idle_s + this."""
        return min(max(self.claim_idle_s / 2, 0.5), 30.0)


class Worker:
    """`run(stop)` until `stop` is set: the batch in hand is finished (scored, written, acked) first.
    `stats` counts scored, errors, reclaimed, abandoned, duplicates (results another worker wrote first),
    vanished (pending requests trimmed off the stream by someone else), redis_errors."""

    def __init__(self, client: redis.Redis, score: ScoreFn, config: WorkerConfig) -> None:
        self.client, self.score, self.config = client, score, config
        self.stats: Counter[str] = Counter()
        self._write = client.register_script(WRITE_SCRIPT)
        self._group_ready = False
        self._cursor = "0-0"  # XAUTOCLAIM scan position
        self._next_reclaim = 0.0  # monotonic; 0: at once (requests a previous run of this name left)
        self._started = time.monotonic()

    def run(self, stop: threading.Event) -> None:
        delay, down = BACKOFF_S, False
        next_stats = time.monotonic() + self.config.stats_every_s
        while not stop.is_set():
            try:
                self.step(stop)
            except redis.RedisError as e:
                if isinstance(e, redis.ResponseError) and "NOGROUP" in str(e):
                    self._group_ready = False  # the stream was deleted: recreate the group at once
                    continue
                self.stats["redis_errors"] += 1
                if not down:
                    log.warning("worker %s: Redis failed (%s: %s); retrying", self.name, type(e).__name__, e)
                down = True
                stop.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            if down:
                log.info("worker %s: Redis is reachable again", self.name)
            delay, down = BACKOFF_S, False
            if time.monotonic() >= next_stats:
                self.log_stats()
                next_stats = time.monotonic() + self.config.stats_every_s
        self._leave()

    @property
    def name(self) -> str:
        return self.config.name

    def step(self, stop: threading.Event | None = None) -> int:
        """One reclaim or one read, and the batch it returned: requests handled (0: nothing to do)."""
        c, cfg = self.client, self.config
        if not self._group_ready:
            self._ensure_group()
        if time.monotonic() >= self._next_reclaim:
            n = self._reclaim()
            if n:
                return n
        if stop is not None and stop.is_set():
            return 0
        resp: Any = c.xreadgroup(
            GROUP, cfg.name, {cfg.keys.requests: ">"}, count=cfg.batch_size, block=cfg.block_ms
        )
        entries = [(sid, fields, 1) for _stream, got in resp or [] for sid, fields in got]
        if entries:
            self._handle(entries)
        return len(entries)

    def log_stats(self) -> None:
        s, elapsed = self.stats, max(time.monotonic() - self._started, 1e-9)
        log.info(
            "worker %s: scored %d, errors %d, reclaimed %d, abandoned %d, duplicates %d (%.1f requests/s)",
            self.name, s["scored"], s["errors"], s["reclaimed"], s["abandoned"], s["duplicates"],
            (s["scored"] + s["errors"]) / elapsed,
        )  # fmt: skip

    # ---- group membership ---------------------------------------------------------------------------
    def _ensure_group(self) -> None:
        try:  # from the start of the stream: requests submitted before any worker ran are scored too
            self.client.xgroup_create(self.config.keys.requests, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):  # BUSYGROUP: another worker (or an earlier run) made it
                raise
        # Listed in the group at once (`worker status`), not only once a read hands it something.
        self.client.xgroup_createconsumer(self.config.keys.requests, GROUP, self.name)
        self._group_ready = True

    def _leave(self) -> None:
        """Remove this consumer from the group on a clean stop (names are per process; without this the
        group would list one consumer per restart). Never while it holds requests: they would be lost."""
        try:
            pending: Any = self.client.xpending_range(
                self.config.keys.requests, GROUP, min="-", max="+", count=1, consumername=self.name
            )
            if not pending:
                self.client.xgroup_delconsumer(self.config.keys.requests, GROUP, self.name)
        except redis.RedisError as e:
            log.warning("worker %s: could not leave the group: %s", self.name, e)

    # ---- taking over requests of dead workers -----------------------------------------------------------
    def _reclaim(self) -> int:
        c, cfg = self.client, self.config
        self._next_reclaim = time.monotonic() + cfg.reclaim_every_s
        resp: Any = c.xautoclaim(
            cfg.keys.requests, GROUP, cfg.name, int(cfg.claim_idle_s * 1000),
            start_id=self._cursor, count=cfg.batch_size,
        )  # fmt: skip
        self._cursor = str(resp[0])
        if self._cursor != "0-0":
            self._next_reclaim = 0.0  # more to scan: go on with the next step
        live = [(sid, fields) for sid, fields in resp[1] if sid is not None and fields is not None]
        if len(live) < len(resp[1]):  # Redis 6.2 hands over deleted entries as nil, ids unknown
            self._drop_vanished()
        if not live:
            return 0
        with c.pipeline(transaction=False) as pipe:
            for sid, _ in live:
                pipe.xpending_range(cfg.keys.requests, GROUP, min=sid, max=sid, count=1)
            counts = [int(p[0]["times_delivered"]) if p else 1 for p in pipe.execute()]
        self.stats["reclaimed"] += len(live)
        log.info("worker %s: took over %d request(s) idle > %.1f s", self.name, len(live), cfg.claim_idle_s)
        self._handle([(sid, f, n) for (sid, f), n in zip(live, counts, strict=True)])
        return len(live)

    def _drop_vanished(self) -> None:
        """Ack this worker's pending requests that are no longer on the stream (trimmed or deleted)."""
        c, stream = self.client, self.config.keys.requests
        pending: Any = c.xpending_range(stream, GROUP, min="-", max="+", count=100, consumername=self.name)
        with c.pipeline(transaction=False) as pipe:
            for p in pending:
                pipe.xrange(stream, p["message_id"], p["message_id"], count=1)
            found = pipe.execute()
        gone = [p["message_id"] for p, f in zip(pending, found, strict=True) if not f]
        if gone:
            c.xack(stream, GROUP, *gone)
            self.stats["vanished"] += len(gone)

    # ---- one batch ----------------------------------------------------------------------------------
    def _handle(self, entries: list[Entry]) -> None:
        results: dict[str, dict[str, str]] = {}
        requests: list[Request] = []
        for sid, fields, n in entries:
            if n > self.config.max_deliveries:
                reason = (
                    f"abandoned after {n - 1} deliveries: the workers holding it stopped before finishing"
                )
                results[sid] = error_fields(fields.get("id"), reason)
                self.stats["abandoned"] += 1
                continue
            req = decode_request(sid, fields)
            if isinstance(req, Rejected):
                results[sid] = error_fields(req.id, req.error)
            else:
                requests.append(req)
        for req, res in zip(requests, self._score(requests), strict=True):
            results[req.entry_id] = res
        self._append([(sid, n, results[sid]) for sid, _fields, n in entries])

    def _score(self, requests: list[Request]) -> list[dict[str, str]]:
        if not requests:
            return []
        try:
            return self.score(requests)
        except Exception as e:  # e.g. out of memory on a long batch: one at a time, so only the culprit fails
            log.warning(
                "worker %s: a batch of %d failed (%s); one at a time",
                self.name,
                len(requests),
                type(e).__name__,
            )
        out: list[dict[str, str]] = []
        for req in requests:
            try:
                out += self.score([req])
            except Exception as e:
                log.warning("worker %s: request %s failed: %s", self.name, req.entry_id, type(e).__name__)
                out.append(error_fields(req.id, f"scoring failed: {type(e).__name__}: {e}"))
        return out

    def _append(self, items: list[tuple[str, int, dict[str, str]]]) -> None:
        """Results and acks for a batch: one atomic script per request, one round trip for all."""
        cfg = self.config
        with self.client.pipeline(transaction=False) as pipe:
            for sid, n, res in items:
                head = {"id": res.get("id", ""), "request": sid, "worker": cfg.name, "deliveries": str(n)}
                flat = [x for kv in {**head, **res}.items() for x in kv]
                self._write(
                    keys=[cfg.keys.requests, cfg.keys.results],
                    args=[GROUP, sid, cfg.results_maxlen, *flat],
                    client=pipe,
                )
            written = pipe.execute()
        for (_sid, _n, res), ok in zip(items, written, strict=True):
            self.stats["duplicates" if not ok else "errors" if "error" in res else "scored"] += 1
