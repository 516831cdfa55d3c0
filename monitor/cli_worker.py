"""`featurewatch worker run | submit | results | status`: shadow scoring from a Redis Stream.

`run` joins the consumer group and scores requests until SIGTERM or Ctrl-C (the batch in hand is finished
and acked first; exit 0). `submit` adds a JSON Lines file in the `featurewatch score` input format to the
requests stream; `results` prints results as JSON lines (`--follow` for new ones); `status` shows the queue
and the workers. Settings as for `featurewatch serve` (`--config`, FEATUREWATCH_* env), but a Redis URL is
required: workers and producers on several machines must share one Redis, and the embedded one belongs to
a single sidecar. Exit codes: 0 ok, 1 Redis unreachable, start-up failure or rejected input lines, 2 bad
settings (a missing `redis_url` included).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import redis
import typer
from rich.console import Console
from rich.text import Text

from monitor.cli_score import fail
from monitor.settings import Settings
from monitor.worker_protocol import GROUP, StreamKeys

err = Console(stderr=True)
worker_app = typer.Typer(
    help="Shadow scoring workers: score conversations from a Redis Stream, at scale.", no_args_is_help=True
)
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="YAML settings file (or FEATUREWATCH_CONFIG).")
]
RedisUrlOpt = Annotated[
    str | None,
    typer.Option("--redis-url", help="Shared Redis, redis://host:6379/0 (or FEATUREWATCH_REDIS_URL)."),
]
FOLLOW_BLOCK_MS = 1000  # XREAD BLOCK while following; a stop is noticed within this


@worker_app.command("run")
def run(
    name: Annotated[str | None, typer.Option("--name", help="Consumer name (default host-pid).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Requests per read and pass.")] = 8,
    claim_idle_s: Annotated[
        float, typer.Option("--claim-idle-s", min=0.1, help="Take over requests pending this long (s).")
    ] = 30.0,
    max_deliveries: Annotated[
        int, typer.Option("--max-deliveries", min=1, help="Deliveries before an error result.")
    ] = 3,
    stats_every_s: Annotated[
        float, typer.Option("--stats-every-s", min=0.1, help="Progress log period.")
    ] = 60.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Top features reported per detector.")] = 5,
    detectors: Annotated[
        str | None,
        typer.Option("--detectors", help="Default detectors, comma-separated (requests may name others)."),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Model alias, local folder or cached HF id.")
    ] = None,
    sae: Annotated[str | None, typer.Option("--sae", help="Shipped SAE name or SAE folder.")] = None,
    policy: Annotated[Path | None, typer.Option("--policy", help="Policy YAML: adds a verdict.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda | cuda:N")] = None,
    redis_url: RedisUrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Score requests from the stream until SIGTERM or Ctrl-C; progress (counts only) is logged."""
    from monitor.runtime import StartupError
    from monitor.settings import mask_url
    from monitor.worker import Worker, WorkerConfig
    from monitor.worker_scoring import BatchScorer, load_setup

    names = [n.strip() for n in detectors.split(",") if n.strip()] if detectors is not None else None
    settings = _settings(
        config, redis_url, model=model, sae=sae, policy=policy, device=device, detectors=names
    )
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = WorkerConfig(
        name=name or f"{socket.gethostname()}-{os.getpid()}",
        batch_size=batch_size,
        claim_idle_s=claim_idle_s,
        max_deliveries=max_deliveries,
        stats_every_s=stats_every_s,
    )
    with _client(settings) as client:
        try:
            setup = load_setup(settings)
        except StartupError as e:
            raise fail(f"cannot start: {e}", 1) from None
        worker = Worker(client, BatchScorer(setup, top_k), cfg)
        pol = setup.holder.policy if setup.holder is not None else None
        where = mask_url(settings.redis_url.get_secret_value()) if settings.redis_url else "-"
        err.print(
            Text(
                f"worker {cfg.name}: model {settings.model} on {setup.lm.device}; SAE {setup.folder.name}; "
                f"detectors {', '.join(setup.default_detectors())}; "
                f"policy {f'{pol.name}@{pol.version}' if pol else 'none (no verdicts)'}; "
                f"group {GROUP} on {cfg.keys.requests} at {where}"
            ),
            soft_wrap=True,
        )
        stop = threading.Event()
        try:
            with _stop_on_signals(stop):
                worker.run(stop)
        finally:
            setup.close()
            worker.log_stats()


@worker_app.command("submit")
def submit(
    input_path: Annotated[
        Path, typer.Argument(metavar="INPUT.jsonl", help="Records: `id`, `text`/`messages`.")
    ],
    redis_url: RedisUrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Add each line of a JSON Lines file to the requests stream (optional fields: tenant, route,
    detectors). Bad lines are reported by number and not sent (exit 1)."""
    from monitor.worker_protocol import add_encoded, encode_request

    if not input_path.is_file():
        raise fail(f"INPUT: {input_path} does not exist")
    settings = _settings(config, redis_url)
    encoded, total, bad = [], 0, 0
    with input_path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            total += 1
            try:
                encoded.append(encode_request(json.loads(line)))
            except json.JSONDecodeError as e:
                bad += _warn(lineno, f"invalid JSON: {e.msg} (column {e.colno})")
            except ValueError as e:
                bad += _warn(lineno, str(e))
    with _client(settings) as client:
        add_encoded(client, encoded)
    err.print(Text(f"submitted {len(encoded)} of {total} line(s) to {StreamKeys().requests}"))
    if bad:
        raise fail(f"{bad} line(s) rejected (see the warnings above)", 1)


@worker_app.command("results")
def results(
    follow: Annotated[bool, typer.Option("--follow/--no-follow", help="Keep printing new results.")] = False,
    last: Annotated[int | None, typer.Option("--last", min=0, help="Only the last N results first.")] = None,
    after: Annotated[str, typer.Option("--after", help="Only results after this stream id.")] = "0-0",
    redis_url: RedisUrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Print results as JSON lines (id, request, worker, deliveries, scores … or error, stream_id)."""
    from monitor.worker_protocol import parse_result, read_results

    settings, stream = _settings(config, redis_url), StreamKeys().results
    with _client(settings) as client:
        if last is not None:
            recent: Any = client.xrevrange(stream, min=f"({after}", count=last) if last else []
            items = [parse_result(sid, f) for sid, f in reversed(recent)]
        else:
            items = list(read_results(client, after))
        for item in items:
            _emit(item)
        if not follow:
            return
        if items:
            after = items[-1]["stream_id"]
        elif last is not None:  # nothing shown: follow from the newest entry, not the whole history
            newest: Any = client.xrevrange(stream, count=1)
            after = str(newest[0][0]) if newest else after
        stop = threading.Event()
        with _stop_on_signals(stop):
            while not stop.is_set():
                resp: Any = client.xread({stream: after}, count=100, block=FOLLOW_BLOCK_MS)
                for _s, entries in resp or []:
                    for sid, fields in entries:
                        _emit(parse_result(sid, fields))
                        after = sid


@worker_app.command("status")
def status(redis_url: RedisUrlOpt = None, config: ConfigOpt = None) -> None:
    """Requests waiting and in progress, results written, and each worker's pending count and idle time."""
    keys = StreamKeys()
    with _client(_settings(config, redis_url)) as client:
        queued, done = int(client.xlen(keys.requests)), int(client.xlen(keys.results))
        try:
            groups: Any = client.xinfo_groups(keys.requests)
        except redis.ResponseError:  # no stream yet
            groups = []
        group = next((g for g in groups if g["name"] == GROUP), None)
        consumers: Any = client.xinfo_consumers(keys.requests, GROUP) if group else []
    pending = int(group["pending"]) if group else 0
    # Scored requests are deleted from the stream, so what remains is either pending or not yet read.
    typer.echo(f"requests waiting {queued - pending}, in progress {pending}; results {done}")
    if group is None:
        typer.echo(f"no worker has joined {GROUP} yet")
    for c in consumers:
        typer.echo(f"  {c['name']:<32} pending {c['pending']:>5}  idle {int(c['idle']) / 1000:.1f} s")


# ---- helpers ------------------------------------------------------------------------------------------
def _settings(config: Path | None, redis_url: str | None, **overrides: Any) -> Settings:
    from monitor.settings import SettingsError, load_settings

    try:
        settings = load_settings(config, redis_url=redis_url, **overrides)
    except SettingsError as e:
        raise fail(str(e)) from None
    if settings.redis_url is None:
        raise fail(
            "redis_url: workers need a Redis that every worker and producer can reach; set --redis-url or "
            "FEATUREWATCH_REDIS_URL (redis://host:6379/0, unix:///path/redis.sock). The embedded Redis "
            "belongs to one sidecar on one machine."
        )
    return settings


@contextmanager
def _client(settings: Settings) -> Iterator[redis.Redis]:
    """A client on the settings' Redis; exit 1 when it cannot be reached (now or later in the block)."""
    from monitor.redis_conn import open_redis

    try:
        with open_redis(settings) as client:
            client.ping()
            yield client
    except redis.RedisError as e:
        raise fail(f"Redis unavailable: {e}", 1) from None


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set `stop` (the loop finishes what it holds); a second one acts as usual."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, _frame: Any) -> None:
        stop.set()
        for s, h in previous.items():
            signal.signal(s, h)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _warn(lineno: int, msg: str) -> int:
    err.print(Text(f"warning: line {lineno}: {msg}", style="yellow"))
    return 1


def _emit(item: dict[str, Any]) -> None:
    typer.echo(json.dumps(item, ensure_ascii=False))


def register(app: typer.Typer) -> None:
    app.add_typer(worker_app, name="worker")
