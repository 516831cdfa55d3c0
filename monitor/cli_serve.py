"""`featurewatch serve`: start the sidecar (FastAPI + uvicorn).

Options override FEATUREWATCH_* environment variables, which override the YAML file (`--config`). The
effective settings are printed (secrets masked) before the model loads. Exit 2 on invalid settings, 1 when
start-up fails (model, SAE, detectors or policy, naming the setting at fault; or the port). SIGTERM drains
and exits 0 (`monitor.lifecycle`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

err = Console(stderr=True)


def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML settings file (or FEATUREWATCH_CONFIG).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model alias, local folder or cached HF id.")] = None,
    sae: Annotated[str | None, typer.Option(help="Shipped SAE name or SAE folder.")] = None,
    policy: Annotated[Path | None, typer.Option(help="Policy YAML (default: the shipped default).")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
) -> None:
    """Run the OpenAI-compatible sidecar with per-token monitoring."""
    from monitor.settings import SettingsError, load_settings

    try:
        settings = load_settings(
            config, host=host, port=port, model=model, sae=sae, policy=policy, device=device
        )
    except SettingsError as e:
        err.print(Text.assemble(("error:", "red"), f" {e}"))
        raise typer.Exit(2) from None
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    err.print(Text("featurewatch settings: " + json.dumps(settings.masked(), default=str)), soft_wrap=True)

    import uvicorn

    from monitor.lifecycle import HALT_WAIT_S, GracefulServer
    from monitor.runtime import StartupError, load_runtime
    from monitor.server import create_app

    try:
        runtime = load_runtime(settings)
    except StartupError as e:
        err.print(Text.assemble(("error:", "red"), f" cannot start: {e}"))
        raise typer.Exit(1) from None
    pol = runtime.policy
    err.print(
        Text(
            f"model {settings.model_name} on {runtime.lm.device}; SAE {runtime.sae_folder.name}; "
            f"detectors {', '.join(runtime.dset.report)}; policy {pol.name}@{pol.version} "
            f"({len(pol.rules)} rules); http://{settings.host}:{settings.port}/v1"
        ),
        soft_wrap=True,
    )
    # SIGTERM/SIGINT drain first (monitor.lifecycle: 503 for new requests, in-flight ones finish within
    # shutdown_grace_s), then uvicorn stops and the lifespan closes the runtime and flushes the audit trail.
    app = create_app(settings, runtime, close_runtime=True)
    uv_config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(HALT_WAIT_S),  # after the drain: anything left is cancelled
    )
    server = GracefulServer(uv_config, app.state.lifecycle)
    server.run()
    if not server.started:  # e.g. the port is taken (uvicorn logged why)
        err.print(Text.assemble(("error:", "red"), f" cannot serve on {settings.host}:{settings.port}"))
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
