"""`featurewatch detectors …`: discover, train, calibrate, eval, list.

Detector specs live in `<SAE folder>/detectors/*.yaml`. Heavy imports stay inside the commands. Exit
codes: 0 ok, 1 problems found (list: invalid specs), 2 bad input (a path, name, record or option).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

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
    load_lm,
    load_named_detectors,
    load_sae,
    sae_folder,
)

detectors_app = typer.Typer(
    help="Discover, train, calibrate and evaluate concept detectors.", no_args_is_help=True
)
out = Console()
err = Console(stderr=True)

FilesOpt = Annotated[list[Path] | None, typer.Option(help="JSON Lines file; repeat for several.")]
MaxTokOpt = Annotated[
    int, typer.Option("--max-tokens", min=8, help="Cut completions/texts to this many tokens.")
]
FprOpt = Annotated[
    float, typer.Option("--target-fpr", min=1e-6, max=0.5, help="False-positive rate to calibrate.")
]


def _records(path: Path, what: str) -> list[dict[str, Any]]:
    from sae_assets.text import RecordError, read_jsonl

    if not path.is_file():
        raise fail(f"{what}: {path} does not exist")
    try:
        return [rec for _, rec in read_jsonl(path)]
    except RecordError as e:
        raise fail(f"{what}: {e}") from e


def _labelled(paths: list[Path] | None, what: str, *, message: bool = False) -> list[dict[str, Any]]:
    """The records of `what`'s files; each needs label 0 or 1 (and, with `message`, a message to read)."""
    from detectors.datasets import monitored_text

    recs = [r for p in paths or [] for r in _records(p, what)]
    bad = [r.get("id") for r in recs if r.get("label") not in (0, 1)]
    if bad:
        raise fail(f"{what}: records need label 0 or 1; first without: {bad[0]!r}")
    empty = [r.get("id") for r in recs if message and not monitored_text(r).strip()]
    if empty:
        raise fail(f"{what}: records need a message (an assistant turn or `text`); {empty[0]!r} has none")
    return recs


def _runtime(sae: str, model: str, device: str) -> tuple[Path, Any, Any]:
    folder = sae_folder(sae)
    sae_obj = load_sae(folder)
    lm = load_lm(model, device, sae_obj)
    return folder, sae_obj.to(lm.device), lm


def _seed_source(folder: Path) -> str | Path:
    """Seed data of this SAE folder when it has concepts/, else the shipped default SAE's."""
    return folder if (folder / "concepts").is_dir() else DEFAULT_SAE


def _names(raw: str) -> list[str]:
    return [n.strip() for n in raw.split(",") if n.strip()]


# ---- discover ------------------------------------------------------------------------------------
@detectors_app.command("discover")
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
    pos_recs = [{**r, "label": 1} for r in _records(pos, "--pos")]
    neg_recs = [{**r, "label": 0} for r in _records(neg, "--neg")]
    folder, sae_obj, lm = _runtime(sae, model, device)
    from detectors.build import extract_corpus, pooled_table
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


# ---- train ---------------------------------------------------------------------------------------
@detectors_app.command("train")
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
    from detectors.build import POOLS, SELECT_BY, TokenRows, valid_pool
    from detectors.datasets import DatasetError, TrainingData, as_text, load_seed, stable_hash

    concepts = _names(concept)
    _check_family_name(name, concepts)
    only = _public_suites(public_suites, concepts)  # before loading the model: fail fast
    pool_list = _names(pools)
    if not pool_list or not all(valid_pool(p) for p in pool_list):
        raise fail(f"--pools: {pools!r}; each must be one of {', '.join(POOLS)}")
    if select_by not in SELECT_BY:
        raise fail(f"--select-by: {select_by!r} is not one of {', '.join(SELECT_BY)}")
    op_fprs = _fprs(operating_points)
    extra = _labelled(train, "--train")
    extra += [as_text(r) for r in _labelled(train_as_text, "--train-as-text", message=True)]
    extra_test = _labelled(test, "--test")
    if (calib_only or select_by != "auroc_oof") and not calib:
        which = "--calib-only" if calib_only else f"--select-by {select_by}"
        raise fail(f"--calib: {which} needs calibration records")
    cal = []
    for path in calib or []:  # a deterministic sample of each file's negatives
        negs = [r for r in _records(path, "--calib") if r.get("label", 0) == 0]
        cal += sorted(negs, key=lambda r: stable_hash("calib", r.get("id")))[:max_calib]
    folder, sae_obj, lm = _runtime(sae, model, device)
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
            train_recs = data.records(c, sae=_seed_source(folder))
            seed_test = load_seed(c, "test", sae=_seed_source(folder)) if seed else []
            result = build_concept_detectors(
                lm.model,
                lm.tokenizer,
                sae_obj,
                c,
                train_recs + extra,
                cal,
                target,
                test_records=seed_test + extra_test,
                layers=_names(layers),
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
    for item in _names(raw or ""):
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
    names, valid = _names(raw), [n for c in concepts for n in _suite_names(c)]
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
            _f(ev.get("auroc_oof")),
            _f(ev.get("auroc_test")),
            f"{spec.threshold:.4f}",
            _f(test.get("recall_at_fpr")),
            _f(test.get("fpr")),
        )
    out.print(t)
    out.print(Text(f"wrote {', '.join(str(p) for p in result.paths)}"))


def _f(x: Any) -> str:
    return "–" if x is None else f"{float(x):.3f}"


# ---- calibrate -----------------------------------------------------------------------------------
@detectors_app.command("calibrate")
def calibrate_cmd(
    name: Annotated[str, typer.Argument(help="Detector name (a spec in <SAE>/detectors).")],
    neg: Annotated[list[Path], typer.Option("--neg", help="Negative records; repeatable.")],
    pos: Annotated[list[Path] | None, typer.Option("--pos", help="Positive records (for figures).")] = None,
    target_fpr: FprOpt = 0.01,
    spec_out: Annotated[Path | None, typer.Option("--out", help="Write here instead of in place.")] = None,
    operating_point: Annotated[
        bool,
        typer.Option(
            "--operating-point",
            help="Keep `threshold`; store this FPR's threshold as an operating point (calibrated@FPR).",
        ),
    ] = False,
    stream_from: Annotated[
        int | None,
        typer.Option(
            "--stream-from",
            min=0,
            help="Calibrate on each negative's peak running value from token N on; default: the spec's "
            "eval.calibration.stream_from (final values when it has none); 0: final values.",
        ),
    ] = None,
    sae: SaeOpt = DEFAULT_SAE,
    model: ModelOpt = DEFAULT_MODEL,
    max_tokens: MaxTokOpt = 256,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
) -> None:
    """Re-set a detector's threshold for --target-fpr on held-out negatives (scored as `score` does)."""
    import torch

    from detectors.build import recalibrate
    from detectors.datasets import truncate_records
    from detectors.errors import DetectorError
    from detectors.scoring import Scorer
    from detectors.spec import dump_spec
    from monitor.cli_score import detector_names

    neg_recs = [r for p in neg for r in _records(p, "--neg")]
    pos_recs = [r for p in pos or [] for r in _records(p, "--pos")]
    folder = sae_folder(sae)
    detector_names(name, folder)  # exit 2 listing the valid names
    _, sae_obj, lm = _runtime(sae, model, device)
    det = load_named_detectors([name], folder, sae_obj, lm.model)[name]
    calibration = dict(det.spec.eval.get("calibration") or {})
    basis = int(calibration.get("stream_from") or 0)  # 0: final values
    if stream_from is None:
        stream_from = basis  # thresholds of a spec calibrated on stream peaks stay on peaks
    if stream_from != basis and (operating_point or det.spec.operating_points):
        raise fail(
            f"--stream-from: {name}'s thresholds are calibrated on "
            + (f"stream peaks from token {basis}" if basis else "final values")
            + "; recalibrating one of them on another basis would mix the two (drop its operating points "
            "first)"
        )
    peak_from = stream_from or None
    scorer = Scorer(lm.model, lm.tokenizer, sae_obj, {name: det}, top_k=0, stream_from=peak_from)
    field = "scores" if peak_from is None else "stream_peaks"

    def values(recs: list[dict[str, Any]], what: str) -> torch.Tensor:
        res = list(scorer.score_records(truncate_records(recs, lm.tokenizer, max_tokens), batch_size))
        errors = [r["error"] for r in res if "error" in r]
        if errors:
            raise fail(f"{what}: {len(errors)} record(s) could not be scored; first: {errors[0]}")
        return torch.tensor([r[field][name] for r in res], dtype=torch.float64)

    try:
        spec = recalibrate(
            det, values(neg_recs, "--neg"), values(pos_recs, "--pos") if pos_recs else None, target_fpr
        )
    except (DetectorError, ValueError) as e:
        raise fail(str(e)) from e
    if operating_point:  # keep the main threshold; add (or replace) this FPR's operating point
        key = str(float(target_fpr))
        points = {**det.spec.operating_points, key: spec.threshold}
        ev = {
            **det.spec.eval,
            "operating_points": {**det.spec.eval.get("operating_points", {}), key: spec.eval["recalibrated"]},
        }
        spec = type(det.spec).model_validate(
            {
                **det.spec.model_dump(),
                "operating_points": points,
                "eval": {**ev, "recalibrated": spec.eval["recalibrated"]},
            }
        )
    if stream_from != basis:  # the basis the policy validator checks rules against (monitor.runtime)
        calibration.pop("stream_from", None)
        ev = {**spec.eval, "calibration": calibration | ({"stream_from": stream_from} if stream_from else {})}
        spec = type(spec).model_validate({**spec.model_dump(), "eval": ev})
    path = dump_spec(spec, spec_out or folder / "detectors" / f"{name}.yaml")
    fig = spec.eval["recalibrated"]
    change = f"threshold {det.spec.threshold:.4f} → {spec.threshold:.4f}"
    if operating_point:
        at = str(float(target_fpr))
        change = f"operating point calibrated@{at} = {spec.operating_points[at]:.4f}"
    out.print(Text(f"{name}: {change} ({json.dumps(fig)}); wrote {path}"))


# ---- eval ----------------------------------------------------------------------------------------
@detectors_app.command("eval")
def eval_cmd(
    concepts: Annotated[
        str,
        typer.Option("--concepts", help="Comma-separated concepts or detector families (e.g. scam_message)."),
    ] = "scam,deception,bias,falsehood",
    max_per_suite: Annotated[
        int | None, typer.Option("--max-per-suite", min=2, help="Cap per suite.")
    ] = None,
    md_out: Annotated[Path | None, typer.Option("--out", help="Write the Markdown report here.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json-out", help="Write the rows as JSON here.")] = None,
    chat: Annotated[bool, typer.Option("--chat/--no-chat", help="Public texts as assistant turns.")] = True,
    neg_suite: Annotated[
        list[Path] | None,
        typer.Option(
            "--neg-suite",
            help="Negative records (label 0): adds a suite seed-test+<file stem> (seed test split + them).",
        ),
    ] = None,
    suite: Annotated[
        list[Path] | None,
        typer.Option("--suite", help="Labelled test records (e.g. a held-out file): a suite named after it."),
    ] = None,
    text_suite: Annotated[
        list[Path] | None,
        typer.Option(
            "--text-suite",
            help="Like --suite, each record's monitored message read alone as a `text` record (suite "
            "<file stem>:text): how a message arrives without the request that asked for it.",
        ),
    ] = None,
    sae: SaeOpt = DEFAULT_SAE,
    model: ModelOpt = DEFAULT_MODEL,
    max_tokens: MaxTokOpt = 192,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    progress: ProgressOpt = True,
) -> None:
    """Evaluate both detector kinds and a TF-IDF baseline per concept and suite.

    AUROC, recall at 1% FPR and F1 at the calibrated threshold, on the seed test split and the public
    datasets found under $FEATUREWATCH_SHARED_DIR/datasets.
    """
    from detectors.datasets import DatasetError
    from detectors.errors import DetectorError
    from detectors.evaluate import evaluate_detectors, render_markdown

    extra = {p.stem: _records(p, "--neg-suite") for p in neg_suite or []}
    labelled = _labelled_suites(suite or [], text_suite or [])
    folder, sae_obj, lm = _runtime(sae, model, device)
    try:
        rows = evaluate_detectors(
            lm.model,
            lm.tokenizer,
            sae_obj,
            folder / "detectors",
            _names(concepts),
            max_per_suite=max_per_suite,
            max_tokens=max_tokens,
            chat=chat,
            seed_sae=_seed_source(folder),
            batch_size=batch_size,
            progress=progress,
            extra_negatives=extra,
            extra_suites=labelled,
        )
    except (DatasetError, DetectorError) as e:
        raise fail(str(e)) from e
    report = render_markdown(rows)
    typer.echo(report)
    if md_out is not None:
        md_out.parent.mkdir(parents=True, exist_ok=True)
        md_out.write_text(report, encoding="utf-8")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps([r.as_dict() for r in rows], indent=1) + "\n", encoding="utf-8")


def _labelled_suites(
    files: list[Path], text_files: list[Path]
) -> dict[str, tuple[list[dict[str, Any]], str]]:
    """--suite / --text-suite files as eval suites (labelled records with a message each)."""
    from detectors.datasets import as_text

    out: dict[str, tuple[list[dict[str, Any]], str]] = {}
    for what, paths in (("--suite", files), ("--text-suite", text_files)):
        for path in paths:
            recs = _labelled([path], what, message=True)
            if not recs:
                raise fail(f"{what}: {path} holds no records")
            if what == "--suite":
                out[path.stem] = (recs, path.name)
            else:
                out[f"{path.stem}:text"] = (
                    [as_text(r) for r in recs],
                    f"{path.name}, each message read alone",
                )
    return out


# ---- list ----------------------------------------------------------------------------------------
@detectors_app.command("list")
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
            _f(r["auroc_test"]),
            _f(r["auroc_oof"]),
            role,
        )
    out.print(t)
