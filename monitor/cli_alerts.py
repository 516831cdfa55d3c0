"""`featurewatch alerts tail | dead | run`: watch the alerts stream, list dead letters, run the consumers.

Settings as for `featurewatch serve` (`--config`, FEATUREWATCH_* env): the same Redis (REDIS_URL, or the
embedded server on `<data dir>/audit.rdb`, shared with a running sidecar). `tail` reads with plain XREAD,
not a consumer group, so watching never takes an alert away from the webhook or log consumers.
Exit codes: 0 ok, 1 Redis unreachable, 2 bad settings or nothing to run.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import redis
import typer
from rich.console import Console
from rich.text import Text

from monitor.alerts_handlers import alert_payload, rule_ids
from monitor.audit_record import Keys
from monitor.settings import Settings

err = Console(stderr=True)
alerts_app = typer.Typer(
    help="Alerts: tail the alerts stream, list dead letters, run the consumers.", no_args_is_help=True
)
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="YAML settings file (or FEATUREWATCH_CONFIG).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per line instead of text.")]
FOLLOW_BLOCK_MS = 1000  # XREAD BLOCK per call while following; Ctrl-C is noticed within this


@alerts_app.command("tail")
def tail(
    follow: Annotated[bool, typer.Option("--follow/--no-follow", help="Keep printing new alerts.")] = True,
    count: Annotated[int, typer.Option("--count", "-n", min=0, help="Recent alerts shown first.")] = 20,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Print the latest alerts (time, tenant, verdict, rules, scores), then new ones as they arrive."""
    emit = _printer(as_json)
    stream = Keys().alerts
    with _redis(config) as client:
        recent: Any = client.xrevrange(stream, count=count) if count else []
        for sid, fields in reversed(recent):
            emit(alert_payload(sid, fields))
        if not follow:
            return
        last: Any = client.xrevrange(stream, count=1)
        with suppress(KeyboardInterrupt):  # Ctrl-C ends a tail normally
            follow_stream(client, stream, str(last[0][0]) if last else "0-0", threading.Event(), emit)


def follow_stream(
    client: redis.Redis,
    stream: str,
    last_id: str,
    stop: threading.Event,
    emit: Callable[[dict[str, Any]], None],
    block_ms: int = FOLLOW_BLOCK_MS,
) -> None:
    """Call `emit` for every entry after `last_id` until `stop` is set (plain XREAD: steals nothing)."""
    while not stop.is_set():
        resp: Any = client.xread({stream: last_id}, count=100, block=block_ms)
        for _stream, entries in resp or []:
            for sid, fields in entries:
                emit(alert_payload(sid, fields))
                last_id = sid


@alerts_app.command("dead")
def dead(
    count: Annotated[int, typer.Option("--count", "-n", min=1, help="Most recent dead letters.")] = 50,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """List alerts that could not be delivered (oldest first), with their error and attempt count."""
    with _redis(config) as client:
        entries: Any = client.xrevrange(f"{Keys().alerts}:dead", count=count)
    for dead_id, fields in reversed(entries):
        alert = alert_payload(fields.get("stream_id", dead_id), fields)
        if as_json:
            typer.echo(json.dumps({**alert, "dead_id": dead_id}, separators=(",", ":")))
            continue
        when = _when(float(fields.get("dead_at") or 0))
        typer.echo(
            f"{when}  dead after {fields.get('attempts')} attempt(s) in {fields.get('group')}: "
            f"{fields.get('error')}\n    {format_alert(alert)}"
        )
    if not entries:
        err.print("no dead-lettered alerts")


@alerts_app.command("run")
def run(config: ConfigOpt = None) -> None:
    """Run the configured consumers (webhook, log) in the foreground until SIGTERM or Ctrl-C."""
    from monitor.alerts import start_alert_consumers, stop_alert_consumers

    settings = _settings(config)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not (settings.alerts_webhook_url or settings.alerts_log):
        err.print(
            Text.assemble(
                ("error:", "red"),
                " no alert consumer configured: set FEATUREWATCH_ALERTS_WEBHOOK_URL"
                " or FEATUREWATCH_ALERTS_LOG",
            )
        )
        raise typer.Exit(2)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with _redis_from(settings) as client:
            consumers = start_alert_consumers(settings, client)
            try:
                while not stop.wait(1.0):
                    pass
            except KeyboardInterrupt:
                pass
            finally:
                stop_alert_consumers(consumers)
    finally:
        signal.signal(signal.SIGTERM, previous)
    for c in consumers:
        err.print(f"{c.config.group}: {dict(sorted(c.stats.items()))}")


# ---- output -----------------------------------------------------------------------------------------------
def format_alert(a: dict[str, Any]) -> str:
    """One line: time, tenant, verdict, rule ids, scores, request id, stream id. Never content."""
    created = a.get("created")
    when = _when(float(created)) if isinstance(created, int | float) else str(created)
    scores = " ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(a["scores"].items())
    )
    return (
        f"{when}  {a.get('tenant') or '-'}  {a.get('verdict')}  rules={','.join(rule_ids(a)) or '-'}  "
        f"scores[{scores}]  id={a.get('id')}  stream={a.get('stream_id')}"
    )


def _printer(as_json: bool) -> Callable[[dict[str, Any]], None]:
    def emit(alert: dict[str, Any]) -> None:
        line = json.dumps(alert, separators=(",", ":")) if as_json else format_alert(alert)
        typer.echo(line)

    return emit


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="seconds") if ts else "-"


# ---- settings and Redis -------------------------------------------------------------------------------
def _settings(config: Path | None) -> Settings:
    from monitor.settings import SettingsError, load_settings

    try:
        return load_settings(config)
    except SettingsError as e:
        err.print(Text.assemble(("error:", "red"), f" {e}"))
        raise typer.Exit(2) from None


@contextmanager
def _redis(config: Path | None) -> Iterator[redis.Redis]:
    with _redis_from(_settings(config)) as client:
        yield client


@contextmanager
def _redis_from(settings: Settings) -> Iterator[redis.Redis]:
    """The settings' Redis; a connection failure is exit 1 with a message (URL masked), not a traceback."""
    from monitor.redis_conn import open_redis

    try:
        with open_redis(settings) as client:
            yield client
    except redis.RedisError as e:
        err.print(Text.assemble(("error:", "red"), f" Redis unavailable: {type(e).__name__}: {e}"))
        raise typer.Exit(1) from None


def register(app: typer.Typer) -> None:
    app.add_typer(alerts_app, name="alerts")
