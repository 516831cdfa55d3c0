"""`featurewatch detectors calibrate` and `detectors eval`: re-set a detector's threshold on held-out
negatives; evaluate the detectors and a TF-IDF baseline per concept and suite.

monitor.cli_detectors registers both commands on the `detectors` group. Heavy imports stay inside them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from monitor.cli_detectors_common import (
    FprOpt,
    MaxTokOpt,
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
    load_named_detectors,
    sae_folder,
)


# ---- calibrate -----------------------------------------------------------------------------------
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

    neg_recs = [r for p in neg for r in read_input(p, "--neg")]
    pos_recs = [r for p in pos or [] for r in read_input(p, "--pos")]
    folder = sae_folder(sae)
    detector_names(name, folder)  # exit 2 listing the valid names
    _, sae_obj, lm = load_runtime(sae, model, device)
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

    extra = {p.stem: read_input(p, "--neg-suite") for p in neg_suite or []}
    labelled = _labelled_suites(suite or [], text_suite or [])
    folder, sae_obj, lm = load_runtime(sae, model, device)
    try:
        rows = evaluate_detectors(
            lm.model,
            lm.tokenizer,
            sae_obj,
            folder / "detectors",
            split_names(concepts),
            max_per_suite=max_per_suite,
            max_tokens=max_tokens,
            chat=chat,
            seed_sae=seed_source(folder),
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
            recs = labelled_records([path], what, message=True)
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
