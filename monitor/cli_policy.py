"""`featurewatch policy …`: check policy files; publish one to every replica (`publish`, `status`).

Exit codes: 0 valid, 1 the policy has issues (each printed as `file:line: path: message`), 2 bad input
(unreadable file, missing --detectors-dir). Imports of policies/detectors (torch) happen inside commands so
`--help` stays fast.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

policy_app = typer.Typer(help="Validate policy files and publish them to a fleet.", no_args_is_help=True)


@policy_app.callback()
def _group() -> None:
    """Validate policy files."""
    # An explicit callback keeps `policy` a group even with one command (typer would otherwise collapse a
    # single-command app into that command when invoked on its own, e.g. in tests).


out = Console()
err = Console(stderr=True)


def _fail(msg: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/] {msg}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _default_detectors_dir() -> tuple[Path | None, str]:
    """The default SAE's detectors folder, or None (skip detector checks) with the reason."""
    from sae_assets.registry import DEFAULT_SAE, resolve_sae_path

    try:
        folder = resolve_sae_path(DEFAULT_SAE) / "detectors"
    except FileNotFoundError:
        return None, f"the default SAE {DEFAULT_SAE!r} is not installed"
    if not folder.is_dir():
        return None, f"{folder} does not exist"
    return folder, str(folder)


@policy_app.command("check")
def check(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="Policy YAML file.")],
    detectors_dir: Annotated[
        Path | None,
        typer.Option(
            "--detectors-dir",
            help="Folder of detector specs the rules are checked against: names, operating points, "
            "aggregations, min_tokens (default: the default SAE's detectors folder, when present).",
        ),
    ] = None,
) -> None:
    """Validate a policy file: every issue as file:line: path: message (exit 1), or a summary (exit 0)."""
    from detectors.registry import available_detectors
    from policies import check_policy

    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise _fail(f"cannot read policy file {file}: {reason}") from None

    if detectors_dir is not None:
        if not detectors_dir.is_dir():
            raise _fail(f"--detectors-dir: {detectors_dir} is not a directory")
        folder: Path | None = detectors_dir
    else:
        folder, where = _default_detectors_dir()
    known = set(available_detectors(folder)) if folder is not None else None
    if folder is None:
        err.print(f"note: detectors not checked ({where}; pass --detectors-dir)", highlight=False)

    policy, issues = check_policy(text, str(file), known)
    if policy is not None and not issues and folder is not None:
        issues = _spec_issues(policy, str(file), folder)
    if issues or policy is None:
        for issue in issues:
            typer.echo(str(issue))
        err.print(f"[red]{len(issues)} issue(s)[/] in {file}", highlight=False)
        raise typer.Exit(1)

    from policies import format_aggregation

    # "applies to" only when some rule is scoped to tenants/routes: keeps the table narrow otherwise.
    scoped_any = any(r.tenants or r.routes for r in policy.rules)
    table = Table(title=f"policy {policy.name} (version {policy.version})")
    table.add_column("rule", no_wrap=True)  # ids are what users grep for: never truncate them
    for col in ("detector", "scope", "aggregation", "threshold", "action"):
        table.add_column(col, overflow="fold")  # wrap rather than hide values on narrow terminals
    if scoped_any:
        table.add_column("applies to")
    for r in policy.rules:
        scoped = [f"tenants: {', '.join(r.tenants)}"] if r.tenants else []
        scoped += [f"routes: {', '.join(r.routes)}"] if r.routes else []
        row = [r.id if r.enabled else f"[dim]{r.id} (disabled)[/]", r.detector, r.scope]
        row += [format_aggregation(r.aggregation), str(r.threshold), r.action]
        table.add_row(*row, *(["; ".join(scoped) or "all"] if scoped_any else []))
    out.print(table)
    actions = Counter(r.action for r in policy.rules if r.enabled)
    enabled = sum(r.enabled for r in policy.rules)
    # Plain echo: one unwrapped line that scripts can grep.
    detectors = ", ".join(policy.detectors) or "none"
    typer.echo(
        f"OK: {len(policy.rules)} rules ({enabled} enabled), detectors: {detectors}; "
        f"actions: {', '.join(f'{a} {n}' for a, n in actions.items()) or 'none'}; "
        f"on detector error: {policy.defaults.action_on_detector_error}"
    )


# ---- fleet: publish to every replica through Redis (monitor.policy_sync) --------------------------------
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="YAML settings file (or FEATUREWATCH_CONFIG).")
]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Data dir with the embedded Redis (audit.rdb).")
]
RedisUrlOpt = Annotated[
    str | None, typer.Option("--redis-url", help="The fleet's Redis (default: embedded).")
]


@policy_app.command("publish")
def publish(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="Policy YAML file.")],
    by: Annotated[str, typer.Option("--by", help="Who publishes (recorded with the policy).")] = "cli",
    detectors_dir: Annotated[
        Path | None,
        typer.Option("--detectors-dir", help="Detector specs rules may use (default: the default SAE's)."),
    ] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    redis_url: RedisUrlOpt = None,
) -> None:
    """Publish a policy to every replica running with `policy_source: redis` (each checks it against
    its own detectors; see `policy status`). Exit 1 if the policy has issues or Redis is unreachable."""
    import redis

    from monitor.policy_sync import PolicyPublishError, publish_policy

    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(f"cannot read policy file {file}: {e}") from None
    known, where = _known_detectors(detectors_dir)
    if known is not None:  # refuse here what every replica would refuse
        from policies import check_policy

        policy, issues = check_policy(text, str(file), known)
        folder = detectors_dir or _default_detectors_dir()[0]
        if policy is not None and not issues and folder is not None:
            issues = _spec_issues(policy, str(file), folder)
        if issues:
            for issue in issues:
                typer.echo(str(issue))
            raise _fail(f"{len(issues)} issue(s) in {file}; nothing published", 1)
    try:
        with _redis(config, data_dir, redis_url) as client:
            pub = publish_policy(client, text, source=str(file), by=by, known_detectors=known)
    except PolicyPublishError as e:
        for issue in e.issues:
            typer.echo(str(issue))
        raise _fail(f"{len(e.issues)} issue(s) in {file}; nothing published", 1) from None
    except redis.RedisError as e:
        raise _fail(f"Redis unavailable: {e}", 1) from None
    if known is None:
        err.print(f"note: detector names not checked here ({where}); replicas check them", highlight=False)
    typer.echo(f"published {pub.name}@{pub.version} digest {pub.digest[:12]}")


@policy_app.command("status")
def status(config: ConfigOpt = None, data_dir: DataDirOpt = None, redis_url: RedisUrlOpt = None) -> None:
    """The published policy and what each replica runs (applied, or rejected with its issues)."""
    import redis

    from monitor.policy_sync import current, replica_status

    try:
        with _redis(config, data_dir, redis_url) as client:
            cur, replicas = current(client), replica_status(client)
    except redis.RedisError as e:
        raise _fail(f"Redis unavailable: {e}", 1) from None
    if cur is None:
        typer.echo("nothing published yet (replicas run their policy file)")
    else:
        typer.echo(
            f"published: {cur['name']}@{cur['version']} digest {cur['digest'][:12]} by {cur.get('by')} "
            f"from {cur.get('source')}"
        )
    table = Table(title="replicas")
    for col in ("replica", "policy", "state", "digest", "issues"):
        table.add_column(col, overflow="fold")
    for name, st in sorted(replicas.items()):
        digest = (st.get("digest") or "-")[:12]
        table.add_row(name, st["policy"], st["state"], digest, "; ".join(st.get("issues", [])))
    out.print(table)


def _spec_issues(policy: Any, source: str, folder: Path) -> list[Any]:
    """What the server would also refuse, from the detector specs alone (no weights): operating points,
    aggregations, stream-calibrated thresholds judged too early, steer sources that cannot steer."""
    from monitor.policy_checks import SpecSet, policy_issues

    specs = SpecSet.from_folder(folder, lambda msg: err.print(f"warning: {msg}", highlight=False))
    return policy_issues(specs)(policy, source)


def _known_detectors(folder: Path | None) -> tuple[set[str] | None, str]:
    from detectors.registry import available_detectors

    if folder is None:
        default, where = _default_detectors_dir()
        return (set(available_detectors(default)) if default is not None else None), where
    if not folder.is_dir():
        raise _fail(f"--detectors-dir: {folder} is not a directory")
    return set(available_detectors(folder)), str(folder)


def _redis(config: Path | None, data_dir: Path | None, redis_url: str | None) -> Any:
    from monitor.redis_conn import open_redis
    from monitor.settings import SettingsError, load_settings

    try:
        settings = load_settings(config, data_dir=data_dir, redis_url=redis_url)
    except SettingsError as e:
        raise _fail(str(e)) from None
    return open_redis(settings)
