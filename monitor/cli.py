"""`featurewatch` command line. Groups live in their own modules; this file only wires them."""

from __future__ import annotations

import typer

from monitor.cli_alerts import register as register_alerts
from monitor.cli_audit import register as register_audit
from monitor.cli_detectors import detectors_app
from monitor.cli_features import register as register_features
from monitor.cli_generate import register as register_generate
from monitor.cli_generate import register_demo
from monitor.cli_keys import keys_app
from monitor.cli_policy import policy_app
from monitor.cli_sae import sae_app
from monitor.cli_score import register as register_score
from monitor.cli_serve import register as register_serve
from monitor.cli_worker import register as register_worker

app = typer.Typer(
    name="featurewatch",
    help="Safety-monitoring sidecar that reads an LLM's SAE features while it serves.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
register_features(sae_app)
app.add_typer(sae_app, name="sae")
register_generate(app)
register_demo(app)
app.add_typer(detectors_app, name="detectors")
register_score(app)
register_serve(app)
register_audit(app)
app.add_typer(policy_app, name="policy")
app.add_typer(keys_app, name="keys")
register_alerts(app)
register_worker(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
