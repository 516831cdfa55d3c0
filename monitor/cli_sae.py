"""`featurewatch sae …`: info, collect, train, eval, feature, search.

Heavy imports (torch, transformers, the trainer) happen inside the commands so `--help` stays fast.
Exit codes: 0 ok, 1 `info` found problems, 2 bad input (config field, path, model, hook point).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

sae_app = typer.Typer(help="Inspect, train and evaluate sparse autoencoders.", no_args_is_help=True)

out = Console()
err = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", help="Model id, local path, or smollm2-135m-instruct.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA if available), cpu, cuda, cuda:1 …")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
DEFAULT_MODEL = "smollm2-135m-instruct"  # monitor.model.DEFAULT_MODEL, repeated to keep --help import-free


def _fail(msg: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/] {msg}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _load_model(name: str, device: str) -> Any:
    from monitor.model import ModelLoadError, load_model

    try:
        return load_model(name, device=device)
    except ModelLoadError as e:
        raise _fail(f"--model: {e}") from e


# ---- info ----------------------------------------------------------------------------------------
@sae_app.command("info")
def info(
    path: Annotated[
        Path, typer.Argument(metavar="PATH", help="SAE folder (cfg.json + sae_weights.safetensors).")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Show an SAE's config and sanity checks; exit code 1 when something is wrong."""
    from sae_assets.inspect import sae_report

    report = sae_report(path)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_report(report)
    if report["problems"]:
        raise typer.Exit(1)


def _print_report(report: dict[str, Any]) -> None:
    cfg = report["config"] or {}
    table = Table(title=f"SAE {report['path']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key in (
        "architecture",
        "d_in",
        "d_sae",
        "k",
        "dtype",
        "apply_b_dec_to_input",
        "normalize_activations",
    ):
        if key in cfg:
            table.add_row(key, str(cfg[key]))
    meta = cfg.get("metadata", {})
    for key in ("model_name", "hook_name", "hf_hook_point", "trained_architecture", "training_tokens"):
        if meta.get(key) is not None:
            table.add_row(key, str(meta[key]))
    for name, t in report["tensors"].items():
        table.add_row(f"tensor {name}", f"{tuple(t['shape'])} {t['dtype']}")
    for name, value in report["checks"].items():
        if isinstance(value, dict):
            value = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items()
            )
        table.add_row(name, str(value))
    last = (report.get("training") or {}).get("last_step")
    if last:
        table.add_row(
            "last train step",
            f"step {last['step']}: EV {last['explained_variance']:.4f}, L0 {last['l0']:.1f}",
        )
    if table.row_count:
        out.print(table)
    for w in report["warnings"]:
        out.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    for p in report["problems"]:
        err.print(f"[red]problem:[/] {p}", highlight=False, soft_wrap=True)
    out.print("[green]ok[/]" if report["ok"] else f"[red]{len(report['problems'])} problem(s)[/]")


# ---- collect -------------------------------------------------------------------------------------
@sae_app.command("collect")
def collect_cmd(
    corpus: Annotated[
        list[Path], typer.Option("--corpus", help="JSON Lines corpus file; repeat for several.")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Activation folder (re-running resumes it).")],
    hook: Annotated[
        str, typer.Option("--hook", help="Hook point, e.g. model.layers.15.")
    ] = "model.layers.15",
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Tokens to store.")] = 2_000_000,
    model: ModelOpt = DEFAULT_MODEL,
    context_size: Annotated[int, typer.Option("--context-size", min=2)] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Contexts per forward pass.")] = 16,
    device: DeviceOpt = "auto",
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Collect residual activations at a hook point into fp16 shards (resumable)."""
    from sae_assets.collect import MANIFEST, CollectConfig, collect
    from sae_assets.hooks import HookPointError, hf_hook_point

    for path in corpus:
        if not path.is_file():
            raise _fail(f"--corpus: {path} does not exist")
    cfg = CollectConfig(
        hook_point=hf_hook_point(hook),
        context_size=context_size,
        batch_size=batch_size,
        max_tokens=max_tokens,
    )
    _check_collect_resume(out_dir / MANIFEST, cfg)
    lm = _load_model(model, device)
    try:
        manifest = collect(lm.model, lm.tokenizer, corpus, out_dir, cfg, progress=progress)
    except HookPointError as e:
        raise _fail(f"--hook: {e}") from e
    # Recorded beside collect.json so `sae train` can label the SAE with the model it came from.
    (out_dir / "source.json").write_text(
        json.dumps({"model_name": model, "hook_point": cfg.hook_point}) + "\n"
    )
    err.print(
        f"{manifest['tokens']} tokens in {len(manifest['shards'])} shard(s) at {out_dir}", highlight=False
    )


def _check_collect_resume(manifest: Path, cfg: Any) -> None:
    """Resuming with another hook point or context size would mix incompatible rows into one store."""
    if not manifest.is_file():
        return
    old = json.loads(manifest.read_text()).get("config", {})
    for name in ("hook_point", "context_size"):
        if name in old and old[name] != getattr(cfg, name):
            raise _fail(
                f"{manifest.parent} holds activations with {name}={old[name]!r}, not {getattr(cfg, name)!r}; "
                "use another --out"
            )


# ---- train ---------------------------------------------------------------------------------------
@sae_app.command("train")
def train_cmd(
    acts: Annotated[Path, typer.Option("--acts", help="Activation folder written by `sae collect`.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output SAE folder.")],
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML/JSON file of TrainConfig fields.")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from --out's checkpoint.")] = False,
    architecture: Annotated[str | None, typer.Option("--architecture", help="topk | batchtopk")] = None,
    d_sae: Annotated[int | None, typer.Option("--d-sae")] = None,
    k: Annotated[int | None, typer.Option("--k")] = None,
    lr: Annotated[float | None, typer.Option("--lr")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,
    total_tokens: Annotated[int | None, typer.Option("--total-tokens")] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="Sets total_tokens = steps × batch_size.")
    ] = None,
    epochs: Annotated[float | None, typer.Option("--epochs")] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    device: Annotated[str | None, typer.Option("--device")] = None,
    checkpoint_every: Annotated[int | None, typer.Option("--checkpoint-every")] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="FIELD=VALUE for any TrainConfig field; repeatable.")
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Train a TopK/BatchTopK SAE: config file < --set < explicit flags. Exit 2 on a bad config field."""
    from sae_assets.train_config import TrainConfigError, load_train_config
    from sae_assets.trainer import checkpoint_path

    raw: dict[str, Any] = {}
    try:
        if config is not None:
            if not config.is_file():
                raise _fail(f"--config: {config} does not exist")
            raw.update(load_train_config(config))
        raw.update(_parse_sets(overrides or []))
        flags = {
            "architecture": architecture,
            "d_sae": d_sae,
            "k": k,
            "lr": lr,
            "batch_size": batch_size,
            "total_tokens": total_tokens,
            "epochs": epochs,
            "seed": seed,
            "device": device,
            "checkpoint_every": checkpoint_every,
        }
        raw.update({key: v for key, v in flags.items() if v is not None})
        _fill_from_acts(raw, acts)
        cfg = _build_config(raw)
        if steps is not None:
            cfg = _build_config({**cfg.to_dict(), "total_tokens": steps * cfg.batch_size})
    except TrainConfigError as e:
        raise _fail(str(e)) from e
    except (ValueError, OSError) as e:  # unreadable YAML/JSON
        raise _fail(f"--config: {e}") from e
    if not resume and checkpoint_path(out_dir).is_file():
        raise _fail(f"{out_dir} already holds a training checkpoint; pass --resume or choose another --out")
    _run_training(acts, cfg, out_dir, resume, progress)


def _parse_sets(items: list[str]) -> dict[str, Any]:
    from sae_assets.train_config import TrainConfigError

    parsed: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise TrainConfigError(name, f"--set expects FIELD=VALUE, got {item!r}")
        parsed[name.strip()] = None if value.strip().lower() in ("null", "none") else value.strip()
    return parsed


def _fill_from_acts(raw: dict[str, Any], acts: Path) -> None:
    """Default hook_point/model_name to what `sae collect` recorded; refuse a contradicting hook point."""
    from sae_assets.collect import MANIFEST
    from sae_assets.hooks import hf_hook_point
    from sae_assets.train_config import TrainConfigError

    manifest, source = acts / MANIFEST, acts / "source.json"
    recorded: dict[str, Any] = json.loads(source.read_text()) if source.is_file() else {}
    if manifest.is_file():
        recorded.setdefault(
            "hook_point", json.loads(manifest.read_text()).get("config", {}).get("hook_point")
        )
    for name in ("hook_point", "model_name"):
        if recorded.get(name) and name not in raw:
            raw[name] = recorded[name]
    got, want = raw.get("hook_point"), recorded.get("hook_point")
    if got and want and hf_hook_point(str(got)) != hf_hook_point(str(want)):
        raise TrainConfigError("hook_point", f"{got!r} but the activations in {acts} come from {want!r}")


def _build_config(raw: dict[str, Any]) -> Any:
    from sae_assets.train_config import TrainConfig

    return TrainConfig.from_dict(raw)


def _run_training(acts: Path, cfg: Any, out_dir: Path, resume: bool, progress: bool) -> None:
    from sae_assets.collect import MANIFEST
    from sae_assets.train import train_from_store
    from sae_assets.train_config import TrainConfigError

    if not (acts / MANIFEST).is_file():
        raise _fail(f"--acts: {acts} has no {MANIFEST} (run `featurewatch sae collect` first)")
    try:
        sae = train_from_store(acts, cfg, out_dir, resume=resume, progress=progress)
    except TrainConfigError as e:
        raise _fail(str(e)) from e
    except (FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from e
    err.print(f"saved {sae.cfg.architecture} SAE (d_sae={sae.d_sae}) to {out_dir}", highlight=False)


# ---- eval ----------------------------------------------------------------------------------------
@sae_app.command("eval")
def eval_cmd(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="SAE folder.")],
    data: Annotated[Path, typer.Option("--data", help="JSON Lines of `text` or `messages` records.")],
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="Scored tokens to evaluate.")
    ] = 50_000,
    model: Annotated[
        str | None, typer.Option("--model", help="Model id or path; default: the SAE's metadata.model_name.")
    ] = None,
    hook: Annotated[
        str | None, typer.Option("--hook", help="Hook point; default: from the SAE's metadata.")
    ] = None,
    context_size: Annotated[int, typer.Option("--context-size", min=2)] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Explained variance, L0, dead/dense latents and CE loss (clean / spliced / zero-ablated)."""
    from sae_assets.evaluate import evaluate_sae
    from sae_assets.hooks import HookPointError, hf_hook_point
    from sae_assets.sae import SAE, SAEFormatError
    from sae_assets.text import RecordError, read_jsonl

    try:
        sae = SAE.load(path)
    except SAEFormatError as e:
        raise _fail(str(e)) from e
    if not data.is_file():
        raise _fail(f"--data: {data} does not exist")
    meta = sae.cfg.metadata
    point = (
        hook or meta.extra.get("hf_hook_point") or (hf_hook_point(meta.hook_name) if meta.hook_name else None)
    )
    if not point:
        raise _fail("the SAE's metadata names no hook point; pass --hook")
    lm = _load_model(model or meta.model_name or DEFAULT_MODEL, device)
    sae = sae.to(lm.device)
    try:
        records = [rec for _, rec in read_jsonl(data)]
        result = evaluate_sae(
            lm.model,
            lm.tokenizer,
            sae,
            records,
            hf_hook_point(point),
            max_tokens,
            context_size=context_size,
            batch_size=batch_size,
            progress=not as_json,
        )
    except (RecordError, HookPointError, ValueError) as e:
        raise _fail(str(e)) from e
    if as_json:
        typer.echo(json.dumps(result))
        return
    table = Table(title=f"SAE eval: {path} on {data}", show_header=False)
    for key, value in result.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    out.print(table)


# ---- manifest ------------------------------------------------------------------------------------
@sae_app.command("manifest")
def manifest_cmd(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="SAE folder to write MANIFEST.json into.")],
    acts: Annotated[Path | None, typer.Option(help="Activation folder the SAE was trained on.")] = None,
    eval_json: Annotated[
        Path | None, typer.Option("--eval-json", help="Output of `sae eval --json`.")
    ] = None,
    notes: Annotated[Path | None, typer.Option(help="JSON file of extra sections (timings, sweep…).")] = None,
    verify: Annotated[
        bool, typer.Option("--verify", help="Only check the hashes of an existing manifest.")
    ] = False,
) -> None:
    """Write (or --verify) MANIFEST.json: model, hook, corpus, tokens, training config, eval, sha256s."""
    from sae_assets.manifest import verify_manifest, write_manifest

    if verify:
        problems = verify_manifest(path)
        for p in problems:
            err.print(f"[red]{p}[/]")
        if problems:
            raise typer.Exit(1)
        out.print("MANIFEST.json matches the files.")
        return
    sections: dict[str, Any] = {}
    if acts is not None:
        man = json.loads((acts / "collect.json").read_text())
        sections["corpus"] = {
            "sources": [Path(p).name for p in man.get("corpus", [])],
            "train_tokens": man.get("tokens"),
            "records": man.get("records"),
            "collect_config": man.get("config"),
            "heldout": "1 record in heldout_every by sha256 of its id (sae_assets.collect.split_of)",
        }
    if eval_json is not None:
        sections["eval"] = json.loads(eval_json.read_text())
    if notes is not None:
        sections.update(json.loads(notes.read_text()))
    out.print(f"wrote {write_manifest(path, **sections)}")
