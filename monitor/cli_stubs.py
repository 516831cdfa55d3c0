"""Command groups whose implementation lands with later issues. Each exits non-zero with a clear message
instead of pretending to work, so scripts never mistake a missing feature for success."""

from __future__ import annotations

import typer
from rich.console import Console

err = Console(stderr=True)


def _pending(what: str, issue: str) -> None:
    err.print(f"[yellow]{what} is not available in this release yet[/] (tracked in issue {issue}).")
    raise typer.Exit(3)


def register(app: typer.Typer) -> None:
    audit = typer.Typer(help="Browse, label, export and replay the audit trail.", no_args_is_help=True)

    for name in ("list", "show", "label", "export", "replay"):
        audit.command(name)(lambda _n=name: _pending(f"audit {_n}", "[6/7]"))

    app.add_typer(audit, name="audit")
