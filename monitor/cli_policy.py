"""`featurewatch policy …`: check policy files.

Exit codes: 0 valid, 1 the policy has issues (each printed as `file:line: path: message`), 2 bad input
(unreadable file, missing --detectors-dir). Imports of policies/detectors (torch) happen inside commands so
`--help` stays fast.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

policy_app = typer.Typer(help="Validate policy files.", no_args_is_help=True)


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


def _default_known_detectors() -> tuple[set[str] | None, str]:
    """Detectors shipped with the default SAE, or None (skip name checks) with the reason."""
    from detectors.registry import available_detectors
    from sae_assets.registry import DEFAULT_SAE, resolve_sae_path

    try:
        folder = resolve_sae_path(DEFAULT_SAE) / "detectors"
    except FileNotFoundError:
        return None, f"the default SAE {DEFAULT_SAE!r} is not installed"
    if not folder.is_dir():
        return None, f"{folder} does not exist"
    return set(available_detectors(folder)), str(folder)


@policy_app.command("check")
def check(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="Policy YAML file.")],
    detectors_dir: Annotated[
        Path | None,
        typer.Option(
            "--detectors-dir",
            help="Folder of detector specs whose names rules may use "
            "(default: the default SAE's detectors folder, when present).",
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
        known: set[str] | None = set(available_detectors(detectors_dir))
        where = str(detectors_dir)
    else:
        known, where = _default_known_detectors()
    if known is None:
        err.print(f"note: detector names not checked ({where}; pass --detectors-dir)", highlight=False)

    policy, issues = check_policy(text, str(file), known)
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
