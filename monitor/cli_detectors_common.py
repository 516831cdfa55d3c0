"""Helpers shared by the `featurewatch detectors` commands (monitor.cli_detectors and its command modules).

Record files (`read_input`, `labelled_records`), the SAE + model runtime, comma-separated names, the
option types several commands share, and the stdout console. Heavy imports stay inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from monitor.cli_score import DEFAULT_SAE, fail, load_lm, load_sae, sae_folder

out = Console()

MaxTokOpt = Annotated[
    int, typer.Option("--max-tokens", min=8, help="Cut completions/texts to this many tokens.")
]
FprOpt = Annotated[
    float, typer.Option("--target-fpr", min=1e-6, max=0.5, help="False-positive rate to calibrate.")
]


def read_input(path: Path, what: str) -> list[dict[str, Any]]:
    from sae_assets.text import RecordError, read_jsonl

    if not path.is_file():
        raise fail(f"{what}: {path} does not exist")
    try:
        return [rec for _, rec in read_jsonl(path)]
    except RecordError as e:
        raise fail(f"{what}: {e}") from e


def labelled_records(paths: list[Path] | None, what: str, *, message: bool = False) -> list[dict[str, Any]]:
    """The records of `what`'s files; each needs label 0 or 1 (and, with `message`, a message to read)."""
    from detectors.datasets import monitored_text

    recs = [r for p in paths or [] for r in read_input(p, what)]
    bad = [r.get("id") for r in recs if r.get("label") not in (0, 1)]
    if bad:
        raise fail(f"{what}: records need label 0 or 1; first without: {bad[0]!r}")
    empty = [r.get("id") for r in recs if message and not monitored_text(r).strip()]
    if empty:
        raise fail(f"{what}: records need a message (an assistant turn or `text`); {empty[0]!r} has none")
    return recs


def load_runtime(sae: str, model: str, device: str) -> tuple[Path, Any, Any]:
    folder = sae_folder(sae)
    sae_obj = load_sae(folder)
    lm = load_lm(model, device, sae_obj)
    return folder, sae_obj.to(lm.device), lm


def seed_source(folder: Path) -> str | Path:
    """Seed data of this SAE folder when it has concepts/, else the shipped default SAE's."""
    return folder if (folder / "concepts").is_dir() else DEFAULT_SAE


def split_names(raw: str) -> list[str]:
    return [n.strip() for n in raw.split(",") if n.strip()]


def fmt(x: Any) -> str:
    return "–" if x is None else f"{float(x):.3f}"
