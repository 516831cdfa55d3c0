"""`featurewatch generate` / `steer` / stubs through the real CLI entry point (typer's runner)."""

from __future__ import annotations

from pathlib import Path

import torch
from typer.testing import CliRunner

from monitor.cli import app
from sae_assets.sae import SAE, SAEConfig, SAEMetadata

runner = CliRunner()


def _tiny_sae(folder: Path) -> Path:
    torch.manual_seed(0)
    sae = SAE(
        SAEConfig(
            architecture="standard",
            d_in=32,
            d_sae=48,
            metadata=SAEMetadata(
                hook_name="blocks.2.hook_resid_post", extra={"hf_hook_point": "model.layers.2"}
            ),
        )
    )
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3)
        sae.W_dec.copy_(sae.W_enc.T)
    return sae.save(folder / "sae")


def test_generate_streams_text(tiny_model_dir: Path) -> None:
    res = runner.invoke(
        app,
        ["generate", "Write a haiku", "--model", str(tiny_model_dir), "--max-tokens", "6", "--device", "cpu"],
    )
    assert res.exit_code == 0, res.output
    assert res.output.strip(), "some text must be printed"


def test_generate_with_watch_prints_table(tiny_model_dir: Path, tmp_path: Path) -> None:
    sae = _tiny_sae(tmp_path)
    res = runner.invoke(
        app,
        [
            "generate",
            "Write a haiku",
            "--model",
            str(tiny_model_dir),
            "--sae",
            str(sae),
            "--watch",
            "1,2,3",
            "--max-tokens",
            "5",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "watched latents per token" in res.output


def test_generate_bad_watch_ids(tiny_model_dir: Path) -> None:
    res = runner.invoke(app, ["generate", "x", "--model", str(tiny_model_dir), "--watch", "a,b"])
    assert res.exit_code != 0
    assert "--watch" in res.output


def test_generate_unknown_model() -> None:
    res = runner.invoke(app, ["generate", "x", "--model", "nobody/nothing-here"])
    assert res.exit_code == 2
    assert "--model" in res.output and "not found" in res.output


def test_generate_sae_dimension_mismatch(tiny_model_dir: Path, tmp_path: Path) -> None:
    sae = SAE(SAEConfig(architecture="standard", d_in=16, d_sae=8)).save(tmp_path / "small")
    res = runner.invoke(
        app, ["generate", "x", "--model", str(tiny_model_dir), "--sae", str(sae), "--watch", "1"]
    )
    assert res.exit_code == 2
    assert "d_in=16" in res.output and "hidden size is 32" in res.output


def test_steer_changes_text(tiny_model_dir: Path, tmp_path: Path) -> None:
    sae = _tiny_sae(tmp_path)
    res = runner.invoke(
        app,
        [
            "steer",
            "Write a haiku",
            "--model",
            str(tiny_model_dir),
            "--sae",
            str(sae),
            "--latent",
            "3",
            "--value",
            "60",
            "--max-tokens",
            "8",
        ],
    )
    assert res.exit_code == 0, res.output
    base = res.output.split("--- unsteered ---")[1].split("--- steered")[0].strip()
    steered = res.output.split("---\n", 2)[-1].strip()
    assert base != steered


def test_demo_prints_tokens_with_top_latents(tiny_model_dir: Path, tmp_path: Path) -> None:
    sae = _tiny_sae(tmp_path)
    res = runner.invoke(app, ["demo", "--model", str(tiny_model_dir), "--sae", str(sae), "--max-tokens", "4"])
    assert res.exit_code == 0, res.output
    assert "top latents" in res.output and "assistant:" in res.output
