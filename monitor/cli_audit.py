"""`featurewatch audit …`: list, show, label, export and replay the audit trail from the command line.

The CLI reads Redis directly (`monitor.redis_conn.open_redis`: REDIS_URL, or the embedded server, shared
with a running sidecar), so it acts as a local admin: every tenant, and labels carry the `--reviewer`
name with key id `cli`. Settings come from `--config`, FEATUREWATCH_* variables and defaults, as for
`serve`. Exit codes: 0 done, 1 no such record, 2 bad input (the message names the option), 3 no Redis.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

audit_app = typer.Typer(help="Browse, label, export and replay the audit trail.", no_args_is_help=True)
out = Console(soft_wrap=True)
err = Console(stderr=True)

Config = Annotated[Path | None, typer.Option("--config", help="YAML settings file (or FEATUREWATCH_CONFIG).")]
Tenant = Annotated[list[str] | None, typer.Option("--tenant", help="Only this tenant (repeatable).")]
Start = Annotated[str | None, typer.Option("--start", help="From this time: unix seconds or ISO 8601 (UTC).")]
End = Annotated[str | None, typer.Option("--end", help="Until this time: unix seconds or ISO 8601 (UTC).")]
Detector = Annotated[str | None, typer.Option("--detector", help="A fired rule read this detector.")]
Action = Annotated[
    str | None, typer.Option("--action", help="Verdict or a fired rule's action: log|flag|steer|block.")
]
Review = Annotated[str | None, typer.Option("--review", help="unreviewed | tp | fp | escalate.")]
AsJson = Annotated[bool, typer.Option("--json", help="JSON instead of a table.")]


def _fail(msg: str, code: int = 2) -> typer.Exit:
    err.print(Text.assemble(("error:", "red"), " ", msg), highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def _redis(config: Path | None) -> Iterator[tuple[Any, Any, Any]]:
    """(settings, redis client, Keys); exit 2 on bad settings, 3 when Redis cannot be reached."""
    import redis

    from monitor.audit_record import Keys
    from monitor.redis_conn import open_redis
    from monitor.settings import SettingsError, load_settings

    try:
        settings = load_settings(config)
    except SettingsError as e:
        raise _fail(str(e)) from None
    try:
        with open_redis(settings) as client:
            client.ping()
            yield settings, client, Keys()
    except redis.RedisError as e:
        raise _fail(f"the audit Redis cannot be reached: {e}", 3) from None


def _time(option: str, raw: str | None) -> float | None:
    from monitor.audit_query import parse_time

    try:
        return parse_time(raw)
    except ValueError as e:
        raise _fail(f"{option}: {e}") from None


def _filter(tenant: list[str] | None, start: str | None, end: str | None, **kw: Any) -> Any:
    from monitor.audit_query import AuditFilter, FilterError

    try:
        return AuditFilter(
            tenants=tuple(tenant) if tenant else None,
            start=_time("--start", start),
            end=_time("--end", end),
            **kw,
        )
    except FilterError as e:
        raise _fail(f"--{e}") from None


def _when(ts: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(ts or 0)))


def _num(x: Any) -> str:
    return "-" if x is None else f"{float(x):.3f}"


# ---- list, show --------------------------------------------------------------------------------------
@audit_app.command("list")
def list_(
    config: Config = None,
    tenant: Tenant = None,
    start: Start = None,
    end: End = None,
    detector: Detector = None,
    action: Action = None,
    review: Review = None,
    limit: Annotated[int, typer.Option("--limit", help="Records per page (1-1000).")] = 50,
    offset: Annotated[int, typer.Option("--offset", help="Skip this many matching records.")] = 0,
    as_json: AsJson = False,
) -> None:
    """Records newest first: time (UTC), id, tenant, verdict, fired rules, review."""
    from monitor.audit_query import query

    f = _filter(
        tenant, start, end, detector=detector, action=action, review=review, limit=limit, offset=offset
    )
    with _redis(config) as (_, client, keys):
        page = query(client, keys, f)
    if as_json:
        recs = [{k: v for k, v in r.items() if k != "evidence"} for r in page.records]
        doc = {"data": recs, "scanned": page.scanned, "has_more": page.has_more, "truncated": page.truncated}
        out.print_json(json.dumps(doc))
        return
    table = Table("created (UTC)", "id", "tenant", "verdict", "rules", "review")
    for r in page.records:
        rules = ", ".join(f"{x.get('id')}={x.get('action')}" for x in r.get("rules") or [])
        rv = r["review"]["verdict"] if r.get("review") else ""
        table.add_row(_when(r.get("created")), r["id"], r.get("tenant") or "-", r.get("verdict"), rules, rv)
    out.print(table)
    more = " (more: --offset)" if page.has_more else ""
    cut = "; scan bound reached, narrow --start/--end" if page.truncated else ""
    err.print(f"{len(page.records)} record(s), {page.scanned} scanned{more}{cut}", highlight=False)


@audit_app.command("show")
def show(
    record_id: Annotated[str, typer.Argument(metavar="ID", help="The record (request) id.")],
    config: Config = None,
    as_json: AsJson = False,
) -> None:
    """One record: verdict, rules, scores, messages, per-token top scores and latents, reviews."""
    from monitor.reviews import Reviews

    with _redis(config) as (_, client, keys):
        raw = client.get(keys.record(record_id))
        reviews = Reviews(client, keys)
        history = reviews.history(record_id) if raw else []
    if not raw:
        raise _fail(f"no audit record {record_id!r}", 1)
    rec = json.loads(raw)
    if as_json:
        out.print_json(json.dumps({**rec, "reviews": [r.as_dict() for r in history]}))
        return
    _print_record(rec)
    for r in history:
        out.print(Text(f"review {_when(r.at)}: {r.verdict} by {r.reviewer} ({r.key_id}) {r.comment}"))


def _print_record(rec: dict[str, Any]) -> None:
    fw = rec.get("featurewatch") or {}
    out.print(
        Text(
            f"{rec['id']}  {_when(rec.get('created'))} UTC  tenant {rec.get('tenant') or '-'}  "
            f"{rec.get('route')}  model {rec.get('model')}"
        )
    )
    out.print(
        Text(
            f"verdict {rec.get('verdict')} (prompt {fw.get('prompt_verdict')}), finish "
            f"{rec.get('finish_reason')}, policy {fw.get('policy')}, blocked_at {fw.get('blocked_at')}"
        )
    )
    rules = Table("rule", "detector", "action", "value", "threshold", title="rules fired")
    for r in rec.get("rules") or []:
        rules.add_row(
            str(r.get("id")),
            str(r.get("detector")),
            str(r.get("action")),
            r.get("error") or _num(r.get("value")),
            _num(r.get("threshold")),
        )
    out.print(rules)
    scores = Table("detector", "completion", "peak token", "prompt", title="scores")
    for d in sorted({*rec.get("scores", {}), *rec.get("prompt_scores", {})}):
        scores.add_row(
            d,
            _num(rec["scores"].get(d)),
            _num(rec.get("peak_token_scores", {}).get(d)),
            _num(rec.get("prompt_scores", {}).get(d)),
        )
    out.print(scores)
    for m in rec.get("messages") or []:
        content = m.get("content")
        out.print(
            Text(
                f"[{m.get('role')}] "
                + (content if content is not None else f"<redacted, {m.get('chars')} chars>")
            )
        )
    if rec.get("completion") is not None:
        out.print(Text(f"[completion] {rec['completion']}"))
    tokens = Table("#", "token", "scores", "top latents", title="per-token evidence")
    for t in rec.get("evidence") or []:
        sc = " ".join(f"{k}={v:.3f}" for k, v in (t.get("scores") or {}).items())
        top = " ".join(_latent_cell(x) for x in t.get("top") or [])
        if t.get("pushes"):
            top = f"→{t['pushes']}: {top}"  # the latents pushing that probe up, contributions in logits
        tokens.add_row(str(t.get("index")), repr(t["text"]) if "text" in t else "-", sc, top)
    out.print(tokens)


def _latent_cell(x: dict[str, Any]) -> str:
    value = f"+{x['contribution']}" if x.get("contribution") is not None else f"={x.get('activation')}"
    return f"{x['latent_id']}:{x.get('label') or ''}{value}"


# ---- label, export -----------------------------------------------------------------------------------
@audit_app.command("label")
def label(
    record_id: Annotated[str, typer.Argument(metavar="ID", help="The record (request) id.")],
    verdict: Annotated[str, typer.Option("--verdict", help="tp | fp | escalate.")],
    reviewer: Annotated[str, typer.Option("--reviewer", help="Your name, stored with the review.")],
    comment: Annotated[str, typer.Option("--comment", help="Why (optional).")] = "",
    config: Config = None,
) -> None:
    """Label a record as a true positive, false positive or for escalation (history is kept)."""
    from monitor.auth import Principal
    from monitor.reviews import MAX_COMMENT_CHARS, REVIEW_VERDICTS, Reviews, UnknownRecord

    if verdict not in REVIEW_VERDICTS:
        raise _fail(f"--verdict: must be one of {', '.join(REVIEW_VERDICTS)}, got {verdict!r}")
    if not reviewer.strip() or len(reviewer) > 64:
        raise _fail("--reviewer: 1-64 characters")
    if len(comment) > MAX_COMMENT_CHARS:
        raise _fail(f"--comment: longer than {MAX_COMMENT_CHARS} characters")
    me = Principal(key_id="cli", name=reviewer.strip(), role="admin", tenants=("*",))
    with _redis(config) as (_, client, keys):
        try:
            review = Reviews(client, keys).label(record_id, verdict, comment, me)
        except UnknownRecord as e:
            raise _fail(str(e), 1) from None
    err.print(f"{record_id}: {review.verdict} by {review.reviewer}", highlight=False)


@audit_app.command("export")
def export(
    config: Config = None,
    tenant: Tenant = None,
    start: Start = None,
    end: End = None,
    detector: Detector = None,
    action: Action = None,
    review: Review = None,
    out_file: Annotated[Path | None, typer.Option("--out", help="JSON Lines file (default: stdout).")] = None,
) -> None:
    """Every matching record (with its latest review) as JSON Lines, newest first."""
    from monitor.audit_query import Scan

    f = _filter(tenant, start, end, detector=detector, action=action, review=review)
    if out_file is not None and not out_file.parent.is_dir():
        raise _fail(f"--out: folder {out_file.parent} does not exist")
    with _redis(config) as (_, client, keys):
        sink = out_file.open("w", encoding="utf-8") if out_file is not None else sys.stdout
        n = 0
        try:
            for rec in Scan(client, keys, f, max_scan=None):
                sink.write(json.dumps(rec, separators=(",", ":"), ensure_ascii=False) + "\n")
                n += 1
        finally:
            if out_file is not None:
                sink.close()
    err.print(f"{n} record(s) exported" + (f" to {out_file}" if out_file else ""), highlight=False)


def register(app: typer.Typer) -> None:
    from monitor.cli_audit_replay import register_replay

    register_replay(audit_app)
    app.add_typer(audit_app, name="audit")
