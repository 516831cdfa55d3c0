"""`sae_report` sanity checks, save/load round trips, and the `sae info` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from monitor.cli_sae import sae_app
from sae_assets.inspect import sae_report
from sae_assets.sae import SAE, SAEConfig, SAEMetadata
from sae_assets.train_kernels import unit_rows


def random_sae(architecture: str = "topk", d_in: int = 8, d_sae: int = 24) -> SAE:
    meta = SAEMetadata(
        model_name="tiny", hook_name="blocks.1.hook_resid_post", extra={"hf_hook_point": "model.layers.1"}
    )
    k = 4 if architecture == "topk" else None
    sae = SAE(SAEConfig(architecture=architecture, d_in=d_in, d_sae=d_sae, k=k, metadata=meta))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_dec.copy_(unit_rows(torch.randn(d_sae, d_in, generator=gen)))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.copy_(torch.randn(d_sae, generator=gen) * 0.1)
        sae.b_dec.copy_(torch.randn(d_in, generator=gen))
        if architecture == "jumprelu":
            sae.threshold.copy_(torch.rand(d_sae, generator=gen) + 0.1)
    return sae


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_saved_sae_reloads_equal_and_is_healthy(tmp_path: Path, architecture: str) -> None:
    sae = random_sae(architecture)
    sae.save(tmp_path)
    loaded = SAE.load(tmp_path)
    assert loaded.cfg == sae.cfg
    assert set(loaded.state_dict()) == set(sae.state_dict())
    for name, t in sae.state_dict().items():
        assert torch.allclose(loaded.state_dict()[name], t), name
    x = torch.randn(5, 8)
    assert torch.allclose(loaded(x), sae(x))

    report = sae_report(tmp_path)
    assert report["ok"] and report["problems"] == [] and report["warnings"] == []
    assert report["checks"]["decoder_row_norms"]["unit"] is True
    assert report["checks"]["shapes_match_cfg"] and report["checks"]["finite"]
    assert report["tensors"]["W_enc"] == {"shape": [8, 24], "dtype": "float32"}
    if architecture == "jumprelu":
        assert report["checks"]["threshold"]["min"] > 0.1 - 1e-6
    if architecture == "topk":
        assert report["checks"]["k"] == 4


def test_fp16_save_round_trip(tmp_path: Path) -> None:
    sae = random_sae("jumprelu")
    sae.save(tmp_path, dtype="float16")
    loaded = SAE.load(tmp_path, dtype="float32")
    for name, t in sae.state_dict().items():
        assert torch.allclose(loaded.state_dict()[name], t, atol=1e-3), name
    report = sae_report(tmp_path)
    assert report["ok"] and report["config"]["dtype"] == "float16" and report["checks"]["dtype_matches_cfg"]
    assert report["checks"]["decoder_row_norms"]["unit"]  # fp16 rounding stays within the 1% tolerance


def _break(folder: Path, **tensors: torch.Tensor) -> None:
    state = load_file(str(folder / "sae_weights.safetensors"))
    state.update(tensors)
    save_file(state, str(folder / "sae_weights.safetensors"))


def test_report_lists_problems(tmp_path: Path) -> None:
    assert "not a directory" in sae_report(tmp_path / "missing")["problems"][0]
    (tmp_path / "empty").mkdir()
    problems = sae_report(tmp_path / "empty")["problems"]
    assert any("cfg.json" in p for p in problems) and any("sae_weights" in p for p in problems)

    random_sae().save(tmp_path / "nan")
    _break(tmp_path / "nan", W_dec=torch.full((24, 8), float("nan")))
    assert any("W_dec has 192 non-finite" in p for p in sae_report(tmp_path / "nan")["problems"])

    random_sae().save(tmp_path / "shape")
    _break(tmp_path / "shape", b_enc=torch.zeros(23))
    assert any("b_enc has shape (23,)" in p for p in sae_report(tmp_path / "shape")["problems"])

    random_sae("jumprelu").save(tmp_path / "nothr")
    state = load_file(str(tmp_path / "nothr" / "sae_weights.safetensors"))
    del state["threshold"]
    save_file(state, str(tmp_path / "nothr" / "sae_weights.safetensors"))
    assert any("missing tensor threshold" in p for p in sae_report(tmp_path / "nothr")["problems"])

    random_sae().save(tmp_path / "badcfg")
    cfg = json.loads((tmp_path / "badcfg" / "cfg.json").read_text())
    (tmp_path / "badcfg" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    assert any("gated" in p for p in sae_report(tmp_path / "badcfg")["problems"])


def test_report_warns_on_unusual_but_loadable(tmp_path: Path) -> None:
    random_sae("jumprelu").save(tmp_path)
    _break(tmp_path, W_dec=torch.zeros(24, 8), threshold=torch.zeros(24))
    report = sae_report(tmp_path)
    assert report["ok"]
    assert report["checks"]["decoder_row_norms"]["unit"] is False
    assert any("24 decoder row(s) are all zero" in w for w in report["warnings"])
    assert any("threshold(s) are <= 0" in w for w in report["warnings"])


def test_info_cli(tmp_path: Path) -> None:
    random_sae().save(tmp_path / "good")
    runner = CliRunner()
    res = runner.invoke(sae_app, ["info", str(tmp_path / "good")])
    assert res.exit_code == 0, res.output
    assert "topk" in res.output and "ok" in res.output
    res = runner.invoke(sae_app, ["info", str(tmp_path / "good"), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["config"]["k"] == 4

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "cfg.json").write_text("{not json")
    res = runner.invoke(sae_app, ["info", str(tmp_path / "broken")])
    assert res.exit_code == 1
    assert "invalid JSON" in res.output and "sae_weights.safetensors" in res.output
    res = runner.invoke(sae_app, ["info", str(tmp_path / "broken"), "--json"])
    assert res.exit_code == 1 and json.loads(res.stdout)["ok"] is False
