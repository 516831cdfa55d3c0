"""`featurewatch audit replay --policy DRAFT.yaml [filters]`: what a draft policy would have done to the
stored records (monitor.replay), as a table of the rows whose verdict changes and a happened × would count.

No model is loaded: the draft is checked, and replayed, against the detector specs of the configured SAE
(`<sae>/detectors/*.yaml`: calibrated thresholds, aggregations, which detectors can steer), the same
checks the sidecar makes on a policy reload. Exit 2 when the draft is unreadable or invalid (each issue
printed as file:line: path: message).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from monitor.cli_audit import (
    Action,
    AsJson,
    Config,
    Detector,
    End,
    Review,
    Start,
    Tenant,
    _fail,
    _filter,
    _redis,
    err,
    out,
)
from monitor.policy_checks import SpecSet, policy_issues


def spec_set(settings: Any) -> SpecSet | None:
    """Specs of the settings' SAE detectors folder; None (with a warning) when there is none."""
    from sae_assets.registry import resolve_sae_path

    try:
        folder = resolve_sae_path(settings.sae) / "detectors"
    except FileNotFoundError as e:
        err.print(Text(f"warning: {e}; calibrated thresholds cannot be resolved"), highlight=False)
        return None
    return SpecSet.from_folder(folder, lambda msg: err.print(Text(f"warning: {msg}"), highlight=False))


def _draft(path: Path, specs: SpecSet | None) -> Any:
    from policies.loader import check_policy

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(f"--policy: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    known = set(specs.detectors) if specs is not None else None
    policy, issues = check_policy(text, str(path), known)
    if policy is not None and specs is not None:
        issues = policy_issues(specs)(policy, str(path))
    if policy is None or issues:
        for issue in issues:
            err.print(Text(str(issue)), highlight=False, soft_wrap=True)
        raise _fail(f"--policy: {path} is not a valid policy ({len(issues)} issue(s))")
    return policy


def replay_command(
    policy: Annotated[Path, typer.Option("--policy", help="The draft policy YAML.")],
    config: Config = None,
    tenant: Tenant = None,
    start: Start = None,
    end: End = None,
    detector: Detector = None,
    action: Action = None,
    review: Review = None,
    limit: Annotated[int, typer.Option("--limit", help="Records to replay, newest first (1-1000).")] = 200,
    as_json: AsJson = False,
) -> None:
    """Replay a draft policy over stored records: the verdicts that change, and counts."""
    from monitor.audit_query import query
    from monitor.replay import ReplayContext, replay
    from monitor.settings import SettingsError, load_settings

    f = _filter(tenant, start, end, detector=detector, action=action, review=review, limit=limit)
    try:
        specs = spec_set(load_settings(config))
    except SettingsError as e:
        raise _fail(str(e)) from None
    draft = _draft(policy, specs)
    with _redis(config) as (_, client, keys):
        page = query(client, keys, f)
    ctx = ReplayContext(specs.thresholds, specs.aggregations, specs.clamps) if specs else ReplayContext()
    report = replay(draft, page.records, ctx)
    if as_json:
        rows = [r.as_dict() for r in report.rows]
        out.print_json(json.dumps({"counts": report.counts, "rows": rows, "note": report.note}))
        return
    _print_report(report, f"{draft.name}@{draft.version}", len(page.records))


def _print_report(report: Any, name: str, n: int) -> None:
    changes = Table(
        "id",
        "created (UTC)",
        "tenant",
        "happened",
        "would",
        "at token",
        "rules",
        "note",
        title=f"{name}: {len(report.changed)} of {n} record(s) change",
    )
    from monitor.cli_audit import _when

    for r in report.changed:
        rules = ", ".join(f"{x['id']}={x['action']}" for x in r.rules)
        at = "" if r.blocked_at is None else str(r.blocked_at)
        changes.add_row(r.id, _when(r.created), r.tenant or "-", r.happened, r.would, at, rules, r.note or "")
    out.print(changes)
    wouldes = sorted({w for by in report.counts.values() for w in by})
    counts = Table("happened \\ would", *wouldes, title="records by verdict")
    for happened, by in sorted(report.counts.items()):
        counts.add_row(happened, *(str(by.get(w, 0)) for w in wouldes))
    out.print(counts)
    approx = sum(1 for r in report.rows if r.note)
    if approx:
        err.print(f"{approx} row(s) are approximate: see their notes (--json)", highlight=False)
    err.print(Text(report.note), highlight=False, soft_wrap=True)


def register_replay(app: typer.Typer) -> None:
    app.command("replay")(replay_command)
