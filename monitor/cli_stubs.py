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
    detectors = typer.Typer(
        help="Discover, train, calibrate and evaluate concept detectors.", no_args_is_help=True
    )
    policy = typer.Typer(help="Validate policy files.", no_args_is_help=True)
    audit = typer.Typer(help="Browse, label, export and replay the audit trail.", no_args_is_help=True)

    @detectors.command("discover")
    def discover() -> None:
        """Rank SAE latents that separate positive from negative examples."""
        _pending("detectors discover", "[3/7]")

    @detectors.command("train")
    def train() -> None:
        """Fit probe detectors."""
        _pending("detectors train", "[3/7]")

    @detectors.command("eval")
    def evaluate() -> None:
        """Evaluate detectors on held-out data."""
        _pending("detectors eval", "[3/7]")

    @policy.command("check")
    def check(file: str) -> None:
        """Validate a policy file."""
        _pending("policy check", "[4/7]")

    for name in ("list", "show", "label", "export", "replay"):
        audit.command(name)(lambda _n=name: _pending(f"audit {_n}", "[6/7]"))

    @app.command()
    def serve() -> None:
        """Run the OpenAI-compatible sidecar."""
        _pending("serve", "[4/7]")

    @app.command()
    def score(input: str) -> None:
        """Score a JSON Lines file of conversations."""
        _pending("score", "[3/7]")

    app.add_typer(detectors, name="detectors")
    app.add_typer(policy, name="policy")
    app.add_typer(audit, name="audit")
