"""`featurewatch score`: score a JSON Lines file of conversations with concept detectors.

Also holds the loaders the `detectors` group shares (SAE folder, model, detectors, labels). Heavy imports
stay inside functions so `--help` is fast. Exit codes: 0 every line scored, 1 some lines had errors (each
has an `error` field in the output and a warning on stderr), 2 bad arguments.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

err = Console(stderr=True)

DEFAULT_SAE = "smollm2-135m-l15"  # sae_assets.registry.DEFAULT_SAE, repeated to keep --help import-free
DEFAULT_MODEL = "smollm2-135m-instruct"  # monitor.model.DEFAULT_MODEL
SaeOpt = Annotated[
    str, typer.Option("--sae", help="Shipped SAE name or SAE folder (detectors in <folder>/detectors).")
]
ModelOpt = Annotated[str, typer.Option("--model", help="Model id, local path, or smollm2-135m-instruct.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA if available), cpu, cuda, cuda:1 …")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Records per forward pass.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar on stderr.")]


def fail(msg: str, code: int = 2) -> typer.Exit:
    # As Text, not markup: messages quote user input and lists like [3, 5] that rich would parse as tags.
    err.print(Text.assemble(("error:", "red"), " ", msg), highlight=False, soft_wrap=True)
    return typer.Exit(code)


def sae_folder(name_or_path: str) -> Path:
    from sae_assets.registry import resolve_sae_path

    try:
        return resolve_sae_path(name_or_path)
    except FileNotFoundError as e:
        raise fail(f"--sae: {e}") from e


def detector_names(raw: str | None, folder: Path) -> list[str]:
    """Names from `--detectors a,b` checked against the folder (exit 2 listing the valid ones); without
    the option, every shipped detector (build alternatives left out)."""
    from detectors.build import shipped_detectors
    from detectors.errors import DetectorError
    from detectors.registry import available_detectors

    det_dir = folder / "detectors"
    valid = available_detectors(det_dir) if det_dir.is_dir() else []
    if raw is None:
        try:
            names = shipped_detectors(det_dir) if valid else []
        except DetectorError as e:
            raise fail(str(e)) from e
        if not names:
            raise fail(f"no detectors in {det_dir}; build them with `featurewatch detectors train`")
        return names
    names = [n.strip() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        what = f"unknown detector(s) {', '.join(unknown)}" if unknown else "no detector names given"
        raise fail(f"--detectors: {what}; valid: {', '.join(valid) or f'none (no *.yaml in {det_dir})'}")
    return names


def load_sae(folder: Path) -> Any:
    from sae_assets.sae import SAE, SAEFormatError

    try:
        return SAE.load(folder)
    except SAEFormatError as e:
        raise fail(f"--sae: {e}") from e


def load_lm(model: str, device: str, sae: Any = None) -> Any:
    from monitor.model import ModelLoadError, load_model

    try:
        lm = load_model(model, device=device)
    except ModelLoadError as e:
        raise fail(f"--model: {e}") from e
    if sae is not None and sae.d_in != lm.hidden_size:
        raise fail(f"--model: the SAE reads width {sae.d_in} but {model!r} has hidden size {lm.hidden_size}")
    return lm


def load_labels(folder: Path) -> Callable[[int], str] | None:
    """Latent id -> dashboard label, when the SAE folder has dashboards."""
    from sae_assets.dashboards import label_fn

    return label_fn(folder)


def load_named_detectors(names: list[str], folder: Path, sae: Any, model: Any) -> dict[str, Any]:
    from detectors.errors import DetectorError
    from detectors.registry import load_detectors

    try:
        return load_detectors(names, folder / "detectors", sae, model=model)
    except DetectorError as e:
        raise fail(str(e)) from e


def input_items(path: Path) -> Iterator[Any]:
    """One item per physical line: the parsed object, or a Malformed naming what is wrong."""
    from detectors.scoring import Malformed

    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                yield Malformed("empty line")
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                yield Malformed(f"invalid JSON: {e.msg} (column {e.colno})")


def _count_lines(path: Path) -> int:
    with path.open("rb") as fh:
        return sum(1 for _ in fh)


def score(
    input_path: Annotated[
        Path, typer.Argument(metavar="INPUT.jsonl", help="Records with `id` and `text`/`messages`.")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Output JSON Lines: one result per input line, in order.")
    ],
    detectors: Annotated[
        str | None, typer.Option("--detectors", help="Comma-separated names; default: all shipped detectors.")
    ] = None,
    sae: SaeOpt = DEFAULT_SAE,
    model: ModelOpt = DEFAULT_MODEL,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    top_k: Annotated[
        int,
        typer.Option(
            "--top-k",
            min=0,
            help="Top features (SAE latents) reported per detector; a probe's need every latent encoded "
            "(~1.2× the time); 0 skips them.",
        ),
    ] = 5,
    progress: ProgressOpt = True,
) -> None:
    """Score a JSON Lines file of conversations with concept detectors.

    Per record: each detector's score, whether it fired, and the SAE features behind it. Exit 1 when some
    lines could not be scored, 2 on bad arguments.
    """
    if not input_path.is_file():
        raise fail(f"INPUT: {input_path} does not exist")
    if out.resolve() == input_path.resolve():
        raise fail("--out: must differ from INPUT (it would be overwritten while being read)")
    folder = sae_folder(sae)
    names = detector_names(detectors, folder)
    sae_obj = load_sae(folder)
    lm = load_lm(model, device, sae_obj)
    sae_obj = sae_obj.to(lm.device)
    dets = load_named_detectors(names, folder, sae_obj, lm.model)
    from tqdm import tqdm

    from detectors.scoring import Scorer

    scorer = Scorer(lm.model, lm.tokenizer, sae_obj, dets, load_labels(folder), top_k=top_k)
    if top_k > 0:
        _note_silent(dets, sae_obj)
    total, errors = _count_lines(input_path), 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        out.open("w", encoding="utf-8") as fh,
        tqdm(total=total, desc="score", unit="rec", file=sys.stderr, disable=not progress) as bar,
    ):
        for result in scorer.score_records(input_items(input_path), batch_size):
            if "error" in result:
                errors += 1
                bar.write(f"warning: {result['error']}", file=sys.stderr)
            fh.write(json.dumps(result, ensure_ascii=False) + "\n")
            bar.update(1)
    err.print(Text(f"scored {total - errors} of {total} line(s) with {', '.join(names)} → {out}"))
    if errors:
        err.print(Text(f"{errors} line(s) had errors (see the `error` field)", style="yellow"))
        raise typer.Exit(1)


def _note_silent(dets: dict[str, Any], sae: Any) -> None:
    """Say which detectors cannot name latents, so their empty `top_features` is not read as "nothing
    drove the score"."""
    from detectors.base import wants_all_latents
    from detectors.extract import sae_hook_point

    silent = [n for n, d in dets.items() if not wants_all_latents(d) and not d.latent_ids()]
    if silent:
        err.print(
            Text(
                f"note: {', '.join(silent)} read(s) no SAE latents (the SAE reads {sae_hook_point(sae)}): "
                "top_features stays empty for them"
            )
        )


def register(app: typer.Typer) -> None:
    app.command("score")(score)
