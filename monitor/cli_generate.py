"""`featurewatch generate` and `featurewatch steer`: monitored generation from the terminal."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from sae_assets.registry import DEFAULT_SAE, resolve_sae_path

err = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", help="Model id, local path, or smollm2-135m-instruct.")]
SaeOpt = Annotated[
    str, typer.Option("--sae", help=f"SAE folder or shipped SAE name (default: {DEFAULT_SAE}, when present).")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA if available), cpu, cuda, cuda:1 …")]


def parse_ids(raw: str, field: str) -> list[int]:
    try:
        return [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{field} must be comma-separated integers, got {raw!r}") from None


def _load(model: str, sae: str | None, device: str) -> tuple[Any, Any]:
    from monitor.model import ModelLoadError, load_model
    from sae_assets.sae import SAE, SAEFormatError

    try:
        lm = load_model(model, device=device)
    except ModelLoadError as e:
        err.print(f"[red]error:[/] --model: {e}")
        raise typer.Exit(2) from e
    loaded = None
    if sae:
        try:
            loaded = SAE.load(resolve_sae_path(sae), device=lm.device)
        except (SAEFormatError, FileNotFoundError) as e:
            err.print(f"[red]error:[/] --sae: {e}")
            raise typer.Exit(2) from e
        if loaded.d_in != lm.hidden_size:
            err.print(
                f"[red]error:[/] --sae: SAE d_in={loaded.d_in} but the model's "
                f"hidden size is {lm.hidden_size}"
            )
            raise typer.Exit(2)
    return lm, loaded


def _prompt_ids(lm: Any, prompt: str, raw: bool) -> list[int]:
    if raw:
        return list(lm.tokenizer(prompt)["input_ids"])
    return list(lm.chat_ids([{"role": "user", "content": prompt}]))


def register(app: typer.Typer) -> None:
    @app.command()
    def generate(
        prompt: Annotated[str, typer.Argument(help="User message (chat template applied unless --raw).")],
        model: ModelOpt = "smollm2-135m-instruct",
        sae: SaeOpt = "",
        watch: Annotated[
            str, typer.Option("--watch", help="Latent ids to print per token, e.g. 12,345.")
        ] = "",
        max_tokens: Annotated[int, typer.Option(min=1, max=4096)] = 64,
        temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
        top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
        seed: int | None = None,
        raw: Annotated[
            bool, typer.Option("--raw", help="Send the prompt as plain text, no chat template.")
        ] = False,
        device: DeviceOpt = "auto",
    ) -> None:
        """Generate text, streaming it; with --watch, print watched latent activations per token."""
        from monitor.generate import Generator, SamplingParams

        ids = parse_ids(watch, "--watch")
        sae_name = sae or (DEFAULT_SAE if ids else "")
        lm, loaded = _load(model, sae_name or None, device)
        gen = Generator(lm.model, lm.tokenizer, loaded)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        rows: list[tuple[str, list[float]]] = []
        for ev in gen.stream([_prompt_ids(lm, prompt, raw)], params, watch=ids):
            sys.stdout.write(ev.text)
            sys.stdout.flush()
            rows.append((lm.tokenizer.decode([ev.token_id]), ev.latents.tolist()))
        sys.stdout.write("\n")
        if ids:
            _print_watch(rows, ids)

    @app.command()
    def steer(
        prompt: Annotated[str, typer.Argument(help="User message.")],
        latent: Annotated[list[int], typer.Option("--latent", help="Latent id to clamp (repeatable).")],
        value: Annotated[list[float], typer.Option("--value", help="Clamp value for each --latent.")],
        model: ModelOpt = "smollm2-135m-instruct",
        sae: SaeOpt = DEFAULT_SAE,
        max_tokens: Annotated[int, typer.Option(min=1, max=4096)] = 64,
        compare: Annotated[bool, typer.Option(help="Also print the unsteered text.")] = True,
        device: DeviceOpt = "auto",
    ) -> None:
        """Generate with SAE latents clamped to values (e.g. Golden-Gate-style topic steering)."""
        from monitor.generate import Generator, SamplingParams, generate_text
        from sae_assets.hooks import Steering

        if len(latent) != len(value):
            err.print("[red]error:[/] --latent and --value must be given the same number of times")
            raise typer.Exit(2)
        lm, loaded = _load(model, sae, device)
        assert loaded is not None
        bad = [i for i in latent if not 0 <= i < loaded.d_sae]
        if bad:
            err.print(f"[red]error:[/] --latent {bad} out of range 0..{loaded.d_sae - 1}")
            raise typer.Exit(2)
        gen = Generator(lm.model, lm.tokenizer, loaded)
        ids = _prompt_ids(lm, prompt, raw=False)
        params = SamplingParams(max_tokens=max_tokens)
        if compare:
            base = generate_text(gen, ids, params)
            typer.echo(f"--- unsteered ---\n{base.text}")
        st = Steering(loaded)
        st.set_all(1, dict(zip(latent, value, strict=True)))
        out = generate_text(gen, ids, params, steering=st)
        clamp = ", ".join(f"{i}={v:g}" for i, v in zip(latent, value, strict=True))
        typer.echo(f"--- steered ({clamp}) ---\n{out.text}")


DEMO_PROMPTS = (
    "Write a short email telling a customer their bank account is locked "
    "and they must confirm their password.",
    "Write a haiku about the sea.",
)


def _labeller(sae_name: str) -> Any:
    """Label lookup from the SAE's stored dashboards; ids only when it has none."""
    from sae_assets.dashboards import Dashboards, DashboardsError

    try:
        dash = Dashboards.load(resolve_sae_path(sae_name))
    except (DashboardsError, FileNotFoundError):
        return lambda i: ""
    return lambda i: dash.label(i)[0]


def register_demo(app: typer.Typer) -> None:
    @app.command()
    def demo(
        model: ModelOpt = "smollm2-135m-instruct",
        sae: SaeOpt = DEFAULT_SAE,
        max_tokens: Annotated[int, typer.Option(min=1, max=512)] = 40,
        top: Annotated[int, typer.Option(min=1, max=10, help="Latents shown per token.")] = 3,
        device: DeviceOpt = "auto",
    ) -> None:
        """A monitored generation: each token with the SAE latents that fire most on it, and their labels."""
        from monitor.generate import Generator, SamplingParams

        lm, loaded = _load(model, sae, device)
        assert loaded is not None
        label = _labeller(sae)
        gen = Generator(lm.model, lm.tokenizer, loaded)
        out = Console()
        out.print(
            f"[bold]model[/] {lm.name} ({lm.device}, loaded in {lm.load_seconds:.1f} s) · "
            f"[bold]SAE[/] {sae} ({loaded.d_sae} latents at {gen.hook_point})"
        )
        for prompt in DEMO_PROMPTS:
            table = Table(title=f"user: {prompt}", title_justify="left")
            table.add_column("#", justify="right")
            table.add_column("token")
            table.add_column("top latents (activation, label)")
            text = ""
            ids = lm.chat_ids([{"role": "user", "content": prompt}])
            for ev in gen.stream([ids], SamplingParams(max_tokens=max_tokens), watch_all=True):
                text += ev.text
                assert ev.full_latents is not None
                vals, idx = ev.full_latents.topk(top)
                cells = [
                    f"{int(i)} ({float(v):.1f}) {label(int(i))[:48]}"
                    for v, i in zip(vals, idx, strict=True)
                    if float(v) > 0
                ]
                table.add_row(str(ev.index), repr(lm.tokenizer.decode([ev.token_id])), "\n".join(cells))
            out.print(table)
            out.print(f"[bold]assistant:[/] {text}\n")
        out.print(
            "Next: `featurewatch sae feature SAE ID` shows a latent's dashboard; "
            "`featurewatch generate PROMPT --watch ID,ID` watches chosen latents."
        )


def _print_watch(rows: list[tuple[str, list[float]]], ids: list[int]) -> None:
    table = Table(title="watched latents per token")
    table.add_column("#", justify="right")
    table.add_column("token")
    for i in ids:
        table.add_column(str(i), justify="right")
    for n, (tok, acts) in enumerate(rows):
        table.add_row(str(n), repr(tok), *(f"{a:.2f}" if a else "·" for a in acts))
    Console().print(table)


def default_sae_exists() -> bool:
    try:
        return Path(resolve_sae_path(DEFAULT_SAE)).is_dir()
    except FileNotFoundError:
        return False
