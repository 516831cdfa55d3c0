"""`featurewatch detectors train`: build a residual probe and an SAE-feature detector per concept.

The command and its own option checks (`--name`, `--operating-points`, `--public-suites`) and result
table; monitor.cli_detectors registers it on the `detectors` group. Heavy imports stay inside the command.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from monitor.cli_detectors_common import (
    FprOpt,
    MaxTokOpt,
    fmt,
    labelled_records,
    load_runtime,
    out,
    read_input,
    seed_source,
    split_names,
)
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
)

FilesOpt = Annotated[list[Path] | None, typer.Option(help="JSON Lines file; repeat for several.")]


# ---- train ---------------------------------------------------------------------------------------
def train_cmd(
    concept: Annotated[
        str,
        typer.Option("--concept", help="Concept name(s), comma-separated: scam,deception,bias,falsehood."),
    ],
    train: FilesOpt = None,
    train_as_text: Annotated[
        list[Path] | None,
        typer.Option(
            "--train-as-text",
            help="Also train on these labelled records' monitored messages alone, as `text` records (the "
            "conversation dropped), so the detector must read the message, not a request naming the label.",
        ),
    ] = None,
    calib: Annotated[
        list[Path] | None,
        typer.Option(
            help="Extra calibration negatives (label 0 or unlabelled records ending in an assistant turn)."
        ),
    ] = None,
    seed: Annotated[bool, typer.Option("--seed/--no-seed", help="Use the seed train/test splits.")] = True,
    public_train: Annotated[
        int,
        typer.Option(
            "--public-train",
            min=0,
            help="Also train on N records per public eval suite of the concept (their train splits only).",
        ),
    ] = 0,
    balance_sources: Annotated[
        bool,
        typer.Option(
            "--balance-sources/--no-balance-sources",
            help="Weight probe training so the seed data and each public suite count equally.",
        ),
    ] = False,
    public_suites: Annotated[
        str | None,
        typer.Option("--public-suites", help="Only these eval suites for --public-train (comma-separated)."),
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Output folder; default <SAE>/detectors.")
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="Write the detectors as NAME.yaml, NAME_probe.yaml, NAME_sae.yaml (one --concept only): a "
            "second detector family for a concept, e.g. scam_message for standalone emails and texts.",
        ),
    ] = None,
    test: Annotated[
        list[Path] | None,
        typer.Option(
            "--test",
            help="Extra held-out labelled records (e.g. hard negatives' test split) for the test figures.",
        ),
    ] = None,
    pools: Annotated[
        str,
        typer.Option(
            "--pools",
            help="Probe training units: mean, max (pooled per record), last:K (mean of the last K tokens), "
            "mix:K:A (A·mean + (1−A)·last:K, served as the mix aggregation), "
            "token (each completion token a row), latents (a probe on mean-pooled SAE latents).",
        ),
    ] = "mean,max",
    token_skip: Annotated[
        int, typer.Option("--token-skip", min=0, help="Token-level: leave out each record's first N tokens.")
    ] = 0,
    token_rows: Annotated[
        int,
        typer.Option("--token-rows", min=1, help="Token-level: ≤ N rows per record, evenly spaced."),
    ] = 32,
    select_by: Annotated[
        str,
        typer.Option(
            "--select-by",
            help="Variant choice: auroc_oof; calib_recall (held-out seed recall at --select-fpr on --calib); "
            "hard_recall (the same, with held-out seed negatives added to the --calib negatives)",
        ),
    ] = "auroc_oof",
    select_fpr: Annotated[
        float, typer.Option("--select-fpr", min=1e-6, max=0.5, help="FPR for --select-by *_recall.")
    ] = 0.05,
    calib_only: Annotated[
        bool,
        typer.Option(
            "--calib-only/--no-calib-only",
            help="Thresholds from the --calib records alone (not the out-of-fold training negatives).",
        ),
    ] = False,
    operating_points: Annotated[
        str | None,
        typer.Option("--operating-points", help="Extra calibrated FPRs, comma-separated (e.g. 0.05)."),
    ] = None,
    stream_from: Annotated[
        int | None,
        typer.Option(
            "--stream-from",
            min=1,
            help="Calibrate on each negative's peak running value from token N on (what a mid-stream rule "
            "with min_tokens: N sees); default: final values.",
        ),
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option("--cache", help="Activation cache folder (reruns skip the forward passes)."),
    ] = None,
    sae: SaeOpt = DEFAULT_SAE,
    model: ModelOpt = DEFAULT_MODEL,
    layers: Annotated[
        str, typer.Option("--layers", help="Probe hook points, comma-separated.")
    ] = "model.layers.15",
    n_latents: Annotated[int, typer.Option("--n-latents", min=1)] = 16,
    max_calib: Annotated[
        int, typer.Option("--max-calib", min=1, help="Records sampled from each --calib file.")
    ] = 200,
    target_fpr: FprOpt = 0.01,
    max_tokens: MaxTokOpt = 256,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    progress: ProgressOpt = True,
) -> None:
    """Build a residual probe and an SAE-feature detector per concept.

    Held-out AUROC (seed test split) picks the kind written as <concept>.yaml; both stay as
    <concept>_probe.yaml and <concept>_sae.yaml. With --public-train N the training records also include N
    per public eval suite from the datasets' train splits (never their test splits, which `detectors eval`
    reports); the spec records this so that eval trains its TF-IDF baseline on the same records.
    """
    from detectors.build import SELECT_BY
    from detectors.corpus import TokenRows
    from detectors.datasets import DatasetError, TrainingData, as_text, load_seed, stable_hash
    from detectors.variants import POOLS, valid_pool

    concepts = split_names(concept)
    _check_family_name(name, concepts)
    only = _public_suites(public_suites, concepts)  # before loading the model: fail fast
    pool_list = split_names(pools)
    if not pool_list or not all(valid_pool(p) for p in pool_list):
        raise fail(f"--pools: {pools!r}; each must be one of {', '.join(POOLS)}")
    if select_by not in SELECT_BY:
        raise fail(f"--select-by: {select_by!r} is not one of {', '.join(SELECT_BY)}")
    op_fprs = _fprs(operating_points)
    extra = labelled_records(train, "--train")
    extra += [as_text(r) for r in labelled_records(train_as_text, "--train-as-text", message=True)]
    extra_test = labelled_records(test, "--test")
    if (calib_only or select_by != "auroc_oof") and not calib:
        which = "--calib-only" if calib_only else f"--select-by {select_by}"
        raise fail(f"--calib: {which} needs calibration records")
    cal = []
    for path in calib or []:  # a deterministic sample of each file's negatives
        negs = [r for r in read_input(path, "--calib") if r.get("label", 0) == 0]
        cal += sorted(negs, key=lambda r: stable_hash("calib", r.get("id")))[:max_calib]
    folder, sae_obj, lm = load_runtime(sae, model, device)
    from detectors.build import build_concept_detectors
    from detectors.errors import DetectorError

    target = out_dir or folder / "detectors"
    labels = load_labels(folder)
    for c in concepts:
        data = TrainingData(
            seed=seed,
            public_per_suite=public_train,
            public_suites=None if only is None else tuple(s for s in only if s in _suite_names(c)),
            max_tokens=max_tokens,
            extra_files=tuple(p.name for p in train or [])
            + tuple(f"{p.name} (as text)" for p in train_as_text or []),
        )
        try:
            train_recs = data.records(c, sae=seed_source(folder))
            seed_test = load_seed(c, "test", sae=seed_source(folder)) if seed else []
            result = build_concept_detectors(
                lm.model,
                lm.tokenizer,
                sae_obj,
                c,
                train_recs + extra,
                cal,
                target,
                test_records=seed_test + extra_test,
                layers=split_names(layers),
                n_latents=n_latents,
                target_fpr=target_fpr,
                labels=labels,
                max_tokens=max_tokens,
                batch_size=batch_size,
                progress=progress,
                data=data.as_dict(),
                balance_sources=balance_sources,
                pools=pool_list,
                token_rows=TokenRows(skip=token_skip, max_rows=token_rows),
                select_by=select_by,
                select_fpr=select_fpr,
                calib_only=calib_only,
                operating_fprs=op_fprs,
                stream_from=stream_from,
                cache_dir=cache,
                name=name,
            )
        except (DatasetError, DetectorError) as e:
            raise fail(f"{c}: {e}") from e
        _print_build(result)


def _check_family_name(name: str | None, concepts: list[str]) -> None:
    """--name: one concept, a valid spec name, not a kind alternative's or another concept's name."""
    if name is None:
        return
    from detectors.build import SUFFIX
    from detectors.datasets import SEED_CONCEPTS
    from detectors.spec import NAME_PATTERN

    if len(concepts) != 1:
        raise fail(f"--name: needs exactly one --concept (got {', '.join(concepts) or 'none'})")
    if not re.fullmatch(NAME_PATTERN, name) or name.endswith(tuple(SUFFIX.values())):
        raise fail(f"--name: {name!r} must match {NAME_PATTERN} and not end in _probe / _sae")
    if name in SEED_CONCEPTS and name != concepts[0]:
        raise fail(f"--name: {name!r} is another concept's detector name")


def _fprs(raw: str | None) -> list[float]:
    """--operating-points as floats in (0, 0.5] (exit 2 otherwise)."""
    out = []
    for item in split_names(raw or ""):
        try:
            f = float(item)
        except ValueError:
            f = -1.0
        if not 0.0 < f <= 0.5:
            raise fail(f"--operating-points: {item!r} is not a false-positive rate in (0, 0.5]")
        out.append(f)
    return out


def _suite_names(concept: str) -> list[str]:
    from detectors.datasets import EVAL_SUITES

    return [s.name for s in EVAL_SUITES.get(concept, [])]


def _public_suites(raw: str | None, concepts: list[str]) -> list[str] | None:
    """--public-suites as a list; every name must be an eval suite of one of the concepts (exit 2)."""
    if raw is None:
        return None
    names, valid = split_names(raw), [n for c in concepts for n in _suite_names(c)]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise fail(f"--public-suites: unknown suite(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return names


def _print_build(result: Any) -> None:
    how = result.specs[result.name].eval["selected_by"]
    t = Table(title=f"{result.name}: ships {result.selected} (chosen by {how})")
    for col in ("detector", "variant", "AUROC oof", "AUROC test", "threshold", "test recall", "test FPR"):
        t.add_column(col)
    for name, spec in result.specs.items():
        if name == result.name:
            continue
        ev, test = spec.eval, spec.eval.get("test") or {}
        v = ev["train"]["variant"]
        variant = f"{v['pool']}-pool, {v['aggregation']}" + (f", C={v['C']}" if spec.kind == "probe" else "")
        t.add_row(
            name,
            variant,
            fmt(ev.get("auroc_oof")),
            fmt(ev.get("auroc_test")),
            f"{spec.threshold:.4f}",
            fmt(test.get("recall_at_fpr")),
            fmt(test.get("fpr")),
        )
    out.print(t)
    out.print(Text(f"wrote {', '.join(str(p) for p in result.paths)}"))
