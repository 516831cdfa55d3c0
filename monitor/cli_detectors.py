"""`featurewatch detectors …`: discover, train, calibrate, eval, list.

Detector specs live in `<SAE folder>/detectors/*.yaml`. Heavy imports stay inside the commands. Exit
codes: 0 ok, 1 problems found (list: invalid specs), 2 bad input (a path, name, record or option).
This module defines the group with `discover` and `list`; `train` lives in monitor.cli_detectors_train,
`calibrate` and `eval` in monitor.cli_detectors_eval, the helpers they share in monitor.cli_detectors_common.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from monitor.cli_detectors_common import FprOpt, MaxTokOpt, fmt, load_runtime, out, read_input
from monitor.cli_detectors_eval import calibrate_cmd, eval_cmd
from monitor.cli_detectors_train import train_cmd
from monitor.cli_score import (
    DEFAULT_MODEL,
    DEFAULT_SAE,
    BatchOpt,
    DeviceOpt,
    ModelOpt,
    ProgressOpt,
    SaeOpt,
    fail,
    load_labels,
    sae_folder,
)

detectors_app = typer.Typer(
    help="Discover, train, calibrate and evaluate concept detectors.", no_args_is_help=True
)
err = Console(stderr=True)


# ---- discover ------------------------------------------------------------------------------------
def discover_cmd(
    pos: Annotated[Path, typer.Option("--pos", help="JSON Lines of positive records.")],
    neg: Annotated[Path, typer.Option("--neg", help="JSON Lines of negative records.")],
    sae: SaeOpt = DEFAULT_SAE,
    model: ModelOpt = DEFAULT_MODEL,
    top: Annotated[int, typer.Option("--top", min=1, help="Latents to show.")] = 20,
    n_latents: Annotated[int, typer.Option("--n-latents", min=1, help="Latents in the written spec.")] = 16,
    spec_out: Annotated[
        Path | None, typer.Option("--out", help="Write an sae_features spec (NAME.yaml).")
    ] = None,
    pool: Annotated[str, typer.Option("--pool", help="max | mean over each record's completion.")] = "max",
    target_fpr: FprOpt = 0.01,
    max_tokens: MaxTokOpt = 256,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    progress: ProgressOpt = True,
) -> None:
    """Rank SAE latents that separate positive from negative records (completion tokens, pooled)."""
    if pool not in ("max", "mean"):
        raise fail(f"--pool: {pool!r} is not one of max, mean")
    pos_recs = [{**r, "label": 1} for r in read_input(pos, "--pos")]
    neg_recs = [{**r, "label": 0} for r in read_input(neg, "--neg")]
    folder, sae_obj, lm = load_runtime(sae, model, device)
    from detectors.corpus import extract_corpus, pooled_table
    from detectors.discover import make_sae_features_spec, rank_latents
    from detectors.errors import DetectorError
    from detectors.extract import sae_hook_point

    point = sae_hook_point(sae_obj)
    try:
        corpus = extract_corpus(
            lm.model,
            lm.tokenizer,
            pos_recs + neg_recs,
            [point],
            max_tokens=max_tokens,
            batch_size=batch_size,
            progress=progress,
            desc="discover",
        )
    except DetectorError as e:
        raise fail(str(e)) from e
    table = pooled_table(corpus, "latents", "max" if pool == "max" else "mean", point, sae_obj)
    xp, xn = table[corpus.labels == 1], table[corpus.labels == 0]
    ranked = rank_latents(xp, xn)
    labels = load_labels(folder)
    if labels is not None:
        from dataclasses import replace

        ranked = [replace(r, label=labels(r.latent_id)) for r in ranked[: max(top, n_latents)]]
    _print_ranks(ranked[:top], len(pos_recs), len(neg_recs))
    if spec_out is not None:
        try:
            spec = make_sae_features_spec(
                ranked,
                n_latents,
                xp,
                xn,
                name=spec_out.stem,
                target_fpr=target_fpr,
                out=spec_out,
                description=f"discovered from {pos.name} vs {neg.name}",
            )
        except DetectorError as e:
            raise fail(f"--out: {e}") from e
        err.print(
            Text(
                f"wrote {spec_out} (threshold {spec.threshold:.4f}, in-sample; recalibrate on held-out data)"
            )
        )


def _print_ranks(ranked: list[Any], n_pos: int, n_neg: int) -> None:
    t = Table(title=f"latents ranked by AUROC ({n_pos} positive, {n_neg} negative records)")
    for col in ("#", "latent", "AUROC", "mean +", "mean −", "diff", "fires +", "fires −", "label"):
        t.add_column(col, justify="left" if col == "label" else "right")
    for i, r in enumerate(ranked, 1):
        t.add_row(
            str(i),
            str(r.latent_id),
            f"{r.auroc:.3f}",
            f"{r.mean_pos:.3f}",
            f"{r.mean_neg:.3f}",
            f"{r.mean_diff:+.3f}",
            f"{r.fire_pos:.0%}",
            f"{r.fire_neg:.0%}",
            Text(r.label),
        )
    out.print(t)


# ---- list ----------------------------------------------------------------------------------------
def list_cmd(
    sae: SaeOpt = DEFAULT_SAE,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Detectors in <SAE>/detectors with kind, threshold and eval summary; exit 1 if a spec is invalid."""
    from detectors.errors import DetectorError
    from detectors.registry import available_detectors
    from detectors.spec import load_spec
    from policies.schema import format_aggregation

    folder = sae_folder(sae) / "detectors"
    rows: list[dict[str, Any]] = []
    problems = 0
    for name in available_detectors(folder) if folder.is_dir() else []:
        try:
            spec = load_spec(folder / f"{name}.yaml")
        except DetectorError as e:
            problems += 1
            rows.append({"name": name, "error": str(e)})
            continue
        ev = spec.eval
        rows.append(
            {
                "name": name,
                "kind": spec.kind,
                "threshold": spec.threshold,
                "target_fpr": spec.target_fpr,
                "scope": spec.scope,
                "aggregation": spec.aggregation.kind,
                "aggregation_spec": format_aggregation(spec.aggregation),
                # thresholds calibrated on stream peaks from this token (None: on final values)
                "stream_from": (ev.get("calibration") or {}).get("stream_from"),
                "variant_of": ev.get("variant_of"),
                "selected": ev.get("selected"),
                "auroc_test": ev.get("auroc_test"),
                "auroc_oof": ev.get("auroc_oof"),
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
    else:
        _print_list(rows, folder)
    if problems:
        raise typer.Exit(1)


def _print_list(rows: list[dict[str, Any]], folder: Path) -> None:
    if not rows:
        out.print(Text(f"no detectors in {folder}; build them with `featurewatch detectors train`"))
        return
    t = Table(title=f"detectors in {folder}")
    for col in (
        "name",
        "kind",
        "threshold",
        "FPR target",
        "scope",
        "aggregation",
        "calibrated on",
        "AUROC test",
        "AUROC oof",
        "role",
    ):
        t.add_column(col)
    for r in rows:
        if "error" in r:
            t.add_row(r["name"], Text(r["error"], style="red"))
            continue
        role = (
            f"alternative of {r['variant_of']}"
            if r["variant_of"]
            else f"shipped ({r['selected'] or 'hand-written'})"
        )
        fpr = "–" if r["target_fpr"] is None else f"{r['target_fpr']:.2%}"
        t.add_row(
            r["name"],
            r["kind"],
            f"{r['threshold']:.4f}",
            fpr,
            r["scope"],
            r["aggregation_spec"],
            "final value" if r["stream_from"] is None else f"peak from token {r['stream_from']}",
            fmt(r["auroc_test"]),
            fmt(r["auroc_oof"]),
            role,
        )
    out.print(t)


# ---- registration (this order is the order `detectors --help` lists) -----------------------------
detectors_app.command("discover")(discover_cmd)
detectors_app.command("train")(train_cmd)
detectors_app.command("calibrate")(calibrate_cmd)
detectors_app.command("eval")(eval_cmd)
detectors_app.command("list")(list_cmd)
