"""`featurewatch sae feature | search | dashboards`: read, search and build an SAE's feature dashboards."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from sae_assets.registry import resolve_sae_path

err = Console(stderr=True)

PathArg = Annotated[str, typer.Argument(metavar="PATH", help="SAE folder or shipped SAE name.")]
ModelOpt = Annotated[str, typer.Option("--model", help="Model id, local path, or smollm2-135m-instruct.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA if available), cpu, cuda, cuda:1 …")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
PEAK_OPEN, PEAK_CLOSE = "⟦", "⟧"  # marks the peak token, visible without colour too


def _fail(msg: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/] {msg}", highlight=False)
    return typer.Exit(code)


def _sae_folder(path: str) -> Path:
    try:
        return resolve_sae_path(path)
    except FileNotFoundError as e:
        raise _fail(str(e)) from e


def _load_dash(folder: Path) -> Any:
    from sae_assets.dashboards import Dashboards, DashboardsError

    try:
        return Dashboards.load(folder)
    except DashboardsError as e:
        raise _fail(str(e)) from e


def _load_model_and_sae(folder: Path, model: str, device: str) -> tuple[Any, Any, str]:
    from monitor.model import ModelLoadError, load_model
    from sae_assets.dashboards import DashboardsError
    from sae_assets.dashboards_build import sae_hook_point
    from sae_assets.sae import SAE, SAEFormatError

    try:
        sae = SAE.load(folder)
        point = sae_hook_point(sae)
    except (SAEFormatError, DashboardsError) as e:
        raise _fail(str(e)) from e
    try:
        lm = load_model(model, device=device)
    except ModelLoadError as e:
        raise _fail(f"--model: {e}") from e
    if sae.d_in != lm.hidden_size:
        raise _fail(f"SAE d_in={sae.d_in} but model {model!r} has hidden size {lm.hidden_size}; pass --model")
    return lm, sae.to(lm.device), point


# ---- rendering -----------------------------------------------------------------------------------
def _shown(tok: str) -> str:
    return tok.replace("\n", "↵").replace("\t", "→")


def example_text(ex: dict[str, Any], scale: float) -> Text:
    """One example: active tokens in green by strength, the peak token bracketed and highlighted."""
    out = Text()
    for k, (tok, act) in enumerate(zip(ex["tokens"], ex["acts"], strict=True)):
        if k == ex["peak"]:
            out.append(f"{PEAK_OPEN}{_shown(tok)}{PEAK_CLOSE}", style="bold black on yellow")
            continue
        frac = act / scale if scale > 0 else 0.0
        style = "bold green" if frac > 0.66 else "green" if frac > 0.33 else "dim green" if act > 0 else ""
        out.append(_shown(tok), style=style)
    return out


def _tokens_line(items: list[dict[str, Any]]) -> str:
    return "  ".join(f"{t['token']!r} {t['logit']:+.3g}" for t in items) or "(none)"


def print_feature(feat: dict[str, Any], console: Console) -> None:
    source = feat["label_source"]
    head = Text.assemble((f"latent {feat['id']}  ", "bold"), (feat["label"], "bold cyan"), f"  [{source}]")
    console.print(head)
    if "auto_label" in feat:
        console.print(Text(f"auto label: {feat['auto_label']}", style="dim"))
    stats = f"density {feat['density']:.3g} ({feat['n_fired']:,} tokens)"
    console.print(f"{stats}   mean act when active {feat['mean_act']:.3g}   max act {feat['max_act']:.3g}")
    table = Table(title="top activating examples", show_lines=False, title_justify="left")
    table.add_column("act", justify="right")
    table.add_column("ctx:pos", style="dim")
    table.add_column(f"context ({PEAK_OPEN}peak token{PEAK_CLOSE})")
    for ex in feat["examples"]:
        table.add_row(f"{ex['act']:.3g}", f"{ex['ctx']}:{ex['pos']}", example_text(ex, feat["max_act"]))
    console.print(table if feat["examples"] else Text("no activating examples", style="dim"))
    console.print(Text("promotes:   ", style="bold") + Text(_tokens_line(feat["promoted"])))
    console.print(Text("suppresses: ", style="bold") + Text(_tokens_line(feat["suppressed"])))
    nb = Table(title="nearest decoder neighbours", title_justify="left")
    nb.add_column("id", justify="right")
    nb.add_column("cos", justify="right")
    nb.add_column("label")
    for n in feat["neighbours"]:
        nb.add_row(str(n["id"]), f"{n['cos']:.3f}", Text(n["label"]))
    console.print(nb)


def _label_table(hits: list[Any]) -> Table:
    table = Table(title="label / top-token matches", title_justify="left")
    for col in ("id", "score", "density", "label", "matched"):
        table.add_column(col)
    for h in hits:
        table.add_row(str(h.latent), f"{h.score:.2f}", f"{h.density:.2g}", Text(h.label), Text(h.matched))
    return table


def _text_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="latents firing most on the text", title_justify="left")
    for col in ("id", "act", "% of max", "at token", "label"):
        table.add_column(col)
    for r in rows:
        pct = f"{100 * r['act'] / r['max_act']:.0f}%" if r.get("max_act") else "-"
        table.add_row(str(r["latent"]), f"{r['act']:.3g}", pct, Text(repr(r["token"])), Text(r["label"]))
    return table


# ---- commands ------------------------------------------------------------------------------------
def feature(
    path: PathArg,
    latent: Annotated[int, typer.Argument(metavar="ID", help="Latent id.")],
    as_json: JsonOpt = False,
) -> None:
    """Show one latent's dashboard: label, density, top examples, promoted tokens, neighbours."""
    from sae_assets.dashboards import DashboardsError

    dash = _load_dash(_sae_folder(path))
    try:
        feat = dash.feature(latent)
    except DashboardsError as e:
        raise _fail(str(e)) from e
    if as_json:
        typer.echo(json.dumps(feat, ensure_ascii=False))
        return
    print_feature(feat, Console(highlight=False))


def search(
    path: PathArg,
    text: Annotated[str, typer.Argument(help="Words to match against labels/tokens, and text to run.")],
    limit: Annotated[int, typer.Option("--limit", min=1, help="Rows per list.")] = 10,
    model: ModelOpt = "smollm2-135m-instruct",
    labels_only: Annotated[
        bool, typer.Option("--labels-only", help="Don't run the model on the text.")
    ] = False,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Find latents two ways: labels / top tokens matching TEXT, and latents that fire most on TEXT."""
    from sae_assets.dashboards import Dashboards, DashboardsError
    from sae_assets.dashboards_search import search_labels

    folder = _sae_folder(path)
    try:
        dash: Dashboards | None = Dashboards.load(folder)
    except DashboardsError as e:
        if labels_only:
            raise _fail(str(e)) from e
        err.print(f"[yellow]note:[/] {e}; showing only latents that fire on the text", highlight=False)
        dash = None
    label_hits = search_labels(dash, text, limit) if dash is not None else []
    console = Console(highlight=False)
    if dash is not None and not as_json:  # shown before the (slow) model load, and even if it fails
        console.print(_label_table(label_hits) if label_hits else Text("no label/token matches", style="dim"))
    fired = [] if labels_only else _text_matches(folder, text, limit, model, device, dash)
    if as_json:
        body = {"query": text, "label_matches": [asdict(h) for h in label_hits], "text_matches": fired}
        typer.echo(json.dumps(body, ensure_ascii=False))
    elif not labels_only:
        console.print(_text_table(fired) if fired else Text("no latent fires on the text", style="dim"))


def _text_matches(
    folder: Path, text: str, limit: int, model: str, device: str, dash: Any
) -> list[dict[str, Any]]:
    """Latents that fire most on `text`, with their dashboard labels and max activations when known."""
    from sae_assets.dashboards_search import top_latents_for_text

    lm, sae, point = _load_model_and_sae(folder, model, device)
    rows = []
    for h in top_latents_for_text(lm.model, lm.tokenizer, sae, point, text, limit):
        row: dict[str, Any] = {"latent": h.latent, "act": h.act, "position": h.position, "token": h.token}
        row.update(label="", label_source="", max_act=None)
        if dash is not None and h.latent < len(dash):
            row["label"], row["label_source"] = dash.label(h.latent)
            row["max_act"] = dash.index["max_act"][h.latent]
        rows.append(row)
    return rows


def dashboards(
    path: PathArg,
    data: Annotated[list[Path], typer.Option("--data", help="JSON Lines (`text`/`messages`), repeatable.")],
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Tokens to score.")] = 250_000,
    model: ModelOpt = "smollm2-135m-instruct",
    context_size: Annotated[int, typer.Option("--context-size", min=8)] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Examples kept per latent.")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Shuffle of the corpus records.")] = 0,
    device: DeviceOpt = "auto",
) -> None:
    """Build every latent's dashboard from a corpus and store it in PATH/dashboards/ (manual labels kept)."""
    from sae_assets.dashboards_build import build_dashboards, read_records
    from sae_assets.text import RecordError

    folder = _sae_folder(path)
    missing = [str(p) for p in data if not p.is_file()]
    if missing:
        raise _fail(f"--data: no such file(s): {', '.join(missing)}")
    try:
        records = read_records(data, seed=seed)
    except RecordError as e:
        raise _fail(f"--data: {e}") from e
    lm, sae, point = _load_model_and_sae(folder, model, device)
    try:
        dash = build_dashboards(
            lm.model,
            lm.tokenizer,
            sae,
            records,
            point,
            max_tokens=max_tokens,
            context_size=context_size,
            batch_size=batch_size,
            top_k_examples=top_k,
            sources=[str(p) for p in data],
            model_name=model,
        )
    except RecordError as e:
        raise _fail(f"--data: {e}") from e
    out = dash.save(folder)
    s = dash.summary
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    if s["tokens_scored"] < max_tokens:
        err.print(f"[yellow]note:[/] the corpus ran out after {s['tokens_scored']:,} tokens", highlight=False)
    typer.echo(
        f"wrote {out} ({size / 1e6:.1f} MB): {s['d_sae']:,} latents, {s['tokens_scored']:,} tokens scored, "
        f"{s['dead_latents']:,} dead, {s['build_seconds']:.0f}s"
    )


def register(sae_app: typer.Typer) -> None:
    sae_app.command("feature")(feature)
    sae_app.command("search")(search)
    sae_app.command("dashboards")(dashboards)
