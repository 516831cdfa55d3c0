"""SAE module: encode paths, SAELens on-disk format both ways, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sae_assets.sae import SAE, SAEConfig, SAEFormatError, SAEMetadata


def random_sae(arch: str, d_in: int = 16, d_sae: int = 64, k: int | None = None, seed: int = 0) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(
        SAEConfig(
            architecture=arch,
            d_in=d_in,
            d_sae=d_sae,
            k=k,
            metadata=SAEMetadata(model_name="tiny", hook_name="blocks.1.hook_resid_post"),
        )
    )
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.5)
        if arch == "jumprelu":
            sae.threshold.uniform_(0.0, 0.5)
    return sae


@pytest.mark.parametrize(("arch", "k"), [("standard", None), ("relu", None), ("jumprelu", None), ("topk", 8)])
def test_watched_latents_match_full_encode(arch: str, k: int | None) -> None:
    sae = random_sae(arch, k=k)
    x = torch.randn(3, 5, 16)  # (B, T, d_in)
    ids = [0, 7, 13, 63, 31]
    full = sae.encode(x)
    assert full.shape == (3, 5, 64)
    watched = sae.encode_watched(x, ids)
    assert watched.shape == (3, 5, len(ids))
    torch.testing.assert_close(watched, full[..., ids], atol=1e-5, rtol=0)
    assert (full > 0).any(), "random SAE should fire somewhere, else the comparison is vacuous"


def test_topk_keeps_at_most_k() -> None:
    sae = random_sae("topk", k=4)
    f = sae.encode(torch.randn(10, 16))
    assert int((f > 0).sum(-1).max()) <= 4


def test_jumprelu_threshold_gates() -> None:
    sae = random_sae("jumprelu")
    x = torch.randn(50, 16)
    pre = sae.hidden_pre(x)
    f = sae.encode(x)
    assert torch.equal(f > 0, pre > sae.threshold)


@pytest.mark.parametrize(("arch", "k"), [("standard", None), ("jumprelu", None), ("topk", 8)])
def test_save_load_round_trip(tmp_path: Path, arch: str, k: int | None) -> None:
    sae = random_sae(arch, k=k)
    sae.save(tmp_path / "sae")
    again = SAE.load(tmp_path / "sae")
    assert again.cfg == sae.cfg
    for name, t in sae.state_dict().items():
        assert torch.equal(t, again.state_dict()[name]), name
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    # SAELens v6 field names, exactly.
    for key in (
        "architecture",
        "d_in",
        "d_sae",
        "dtype",
        "device",
        "apply_b_dec_to_input",
        "normalize_activations",
        "reshape_activations",
        "metadata",
    ):
        assert key in cfg
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert cfg["metadata"]["model_name"] == "tiny"
    assert "sae_lens_version" in cfg["metadata"]
    assert cfg["architecture"] == ("standard" if arch in ("standard", "relu") else arch)


def test_fp16_on_disk(tmp_path: Path) -> None:
    sae = random_sae("jumprelu")
    sae.save(tmp_path / "s", dtype="float16")
    half = SAE.load(tmp_path / "s", dtype="float16")
    assert half.W_enc.dtype == torch.float16
    torch.testing.assert_close(half.W_enc.float(), sae.W_enc, atol=2e-3, rtol=1e-2)
    cpu = SAE.load(tmp_path / "s")  # half on disk is computed in fp32 on CPU
    assert cpu.W_enc.dtype == torch.float32 and cpu.cfg.dtype == "float32"
    torch.testing.assert_close(cpu.W_enc, half.W_enc.float())


def _write_saelens_folder(folder: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "sae_weights.safetensors"))


def test_loads_folder_written_by_saelens_v6(tmp_path: Path) -> None:
    """Layout SAELens v6 `save_model` writes for a JumpReLU SAE (incl. keys we do not model)."""
    d_in, d_sae = 8, 24
    torch.manual_seed(1)
    w = {
        "W_enc": torch.randn(d_in, d_sae),
        "W_dec": torch.randn(d_sae, d_in),
        "b_enc": torch.randn(d_sae),
        "b_dec": torch.randn(d_in),
        "threshold": torch.rand(d_sae),
    }
    cfg = {
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "architecture": "jumprelu",
        "metadata": {
            "model_name": "gemma-2-2b",
            "hook_name": "blocks.12.hook_resid_post",
            "hook_head_index": None,
            "prepend_bos": True,
            "context_size": 1024,
            "neuronpedia_id": "gemma-2-2b/12-gemmascope-res-16k",
            "sae_lens_version": "6.5.1",
            "sae_lens_training_version": "6.5.1",
        },
    }
    _write_saelens_folder(tmp_path / "jr", cfg, w)
    sae = SAE.load(tmp_path / "jr")
    assert sae.cfg.architecture == "jumprelu"
    assert sae.cfg.metadata.neuronpedia_id == "gemma-2-2b/12-gemmascope-res-16k"
    x = torch.randn(4, d_in)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    torch.testing.assert_close(sae.encode(x), pre * (pre > w["threshold"]))
    # Re-saving keeps the metadata keys SAELens wrote.
    sae.save(tmp_path / "again")
    meta = json.loads((tmp_path / "again" / "cfg.json").read_text())["metadata"]
    assert meta["sae_lens_version"] == "6.5.1" and meta["context_size"] == 1024


def test_loads_legacy_flat_topk_config(tmp_path: Path) -> None:
    """SAELens < 6 kept hook_name at top level and topk's k in activation_fn_kwargs."""
    d_in, d_sae = 8, 16
    w = {
        "W_enc": torch.randn(d_in, d_sae),
        "W_dec": torch.randn(d_sae, d_in),
        "b_enc": torch.zeros(d_sae),
        "b_dec": torch.zeros(d_in),
    }
    cfg = {
        "architecture": "topk",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "torch.float32",
        "hook_name": "blocks.3.hook_resid_post",
        "model_name": "pythia-70m",
        "activation_fn_kwargs": {"k": 4},
        "normalize_activations": None,
    }
    _write_saelens_folder(tmp_path / "old", cfg, w)
    sae = SAE.load(tmp_path / "old")
    assert sae.cfg.k == 4 and sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post"


@pytest.mark.parametrize(
    ("cfg_patch", "tensor_patch", "message"),
    [
        ({"architecture": "gated"}, {}, "architecture 'gated' is not supported"),
        ({"d_sae": 10}, {}, "W_enc has shape"),
        ({}, {"drop": "b_dec"}, "missing tensor(s) b_dec"),
        ({"architecture": "topk"}, {}, "topk needs 0 < k"),
        ({"dtype": "int8"}, {}, "dtype 'int8' is not supported"),
    ],
)
def test_bad_folders_give_clear_errors(
    tmp_path: Path, cfg_patch: dict, tensor_patch: dict, message: str
) -> None:
    d_in, d_sae = 4, 8
    w = {
        "W_enc": torch.zeros(d_in, d_sae),
        "W_dec": torch.zeros(d_sae, d_in),
        "b_enc": torch.zeros(d_sae),
        "b_dec": torch.zeros(d_in),
    }
    if "drop" in tensor_patch:
        del w[tensor_patch["drop"]]
    cfg = {"architecture": "standard", "d_in": d_in, "d_sae": d_sae, **cfg_patch}
    _write_saelens_folder(tmp_path / "bad", cfg, w)
    with pytest.raises(SAEFormatError) as exc:
        SAE.load(tmp_path / "bad")
    assert message in str(exc.value)


def test_missing_folder_parts(tmp_path: Path) -> None:
    with pytest.raises(SAEFormatError, match=r"no cfg\.json"):
        SAE.load(tmp_path)
