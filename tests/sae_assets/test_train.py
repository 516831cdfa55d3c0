"""SAE training: config validation, building blocks, planted-dictionary recovery, resume, train CLI."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from monitor.cli_sae import sae_app
from sae_assets.collect import MANIFEST, ActivationStore
from sae_assets.sae import SAE
from sae_assets.train import LOG_FILENAME, TRAIN_CFG_FILENAME, store_batches, train_from_store, train_sae
from sae_assets.train_config import TrainConfig, TrainConfigError
from sae_assets.train_kernels import geometric_median, lr_factor, remove_parallel_grad, unit_rows

# 64 planted directions in 64 dims, 3 active per sample. With d_in=32 the encoder's interference between
# non-orthogonal directions caps EV near 0.9 and BatchTopK lands at 0.83-0.9 on some seeds; at 64 dims both
# architectures reach EV ~0.98 and recover 62-64 of 64 directions on every seed tried.
D_IN, N_TRUE, ACTIVE = 64, 64, 3


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny matmuls: a second intra-op thread only adds contention (10x slower on a busy 2-core box).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def planted_batches(
    n_batches: int, batch_size: int, seed: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """N_TRUE unit directions in D_IN dims (always the same ones); each sample a nonnegative combination of
    ACTIVE of them, drawn with `seed`."""
    D = unit_rows(torch.randn(N_TRUE, D_IN, generator=torch.Generator().manual_seed(0)))  # (N_TRUE, D_IN)
    gen = torch.Generator().manual_seed(1000 + seed)
    out = []
    for _ in range(n_batches):
        idx = torch.rand(batch_size, N_TRUE, generator=gen).argsort(-1)[:, :ACTIVE]  # (B, ACTIVE)
        coef = torch.zeros(batch_size, N_TRUE).scatter_(
            1, idx, 0.5 + torch.rand(batch_size, ACTIVE, generator=gen)
        )
        out.append(coef @ D)  # (B, D_IN)
    return D, out


def small_cfg(**kw: object) -> TrainConfig:
    base: dict[str, object] = {
        "d_sae": 128,
        "k": ACTIVE,
        "lr": 2e-3,
        "batch_size": 256,
        "warmup_steps": 20,
        "aux_k": 32,
        "b_dec_init_tokens": 256,
        "device": "cpu",
        "hook_point": "model.layers.1",
        "model_name": "tiny-test",
    }
    base.update(kw)
    return TrainConfig.from_dict(base)


# ---- config ------------------------------------------------------------------------------------------
def test_config_rejects_bad_fields_by_name() -> None:
    with pytest.raises(TrainConfigError, match="d_sae") as e:
        TrainConfig(d_sae=0)
    assert e.value.field == "d_sae"
    with pytest.raises(TrainConfigError, match="architecture"):
        TrainConfig(architecture="relu")
    with pytest.raises(TrainConfigError, match="k"):
        TrainConfig(d_sae=16, k=17)
    with pytest.raises(TrainConfigError, match="bogus"):
        TrainConfig.from_dict({"bogus": 1})
    with pytest.raises(TrainConfigError, match="batch_size"):
        TrainConfig.from_dict({"batch_size": "many"})


def test_config_coerces_yaml_strings_and_scales_lr() -> None:
    cfg = TrainConfig.from_dict({"lr": "2e-4", "total_tokens": "1_000_000", "dead_tokens": None})
    assert cfg.lr == 2e-4 and cfg.total_tokens == 1_000_000 and cfg.dead_tokens is None
    assert TrainConfig(d_sae=16_384).effective_lr == pytest.approx(2e-4)
    assert TrainConfig(d_sae=4 * 16_384).effective_lr == pytest.approx(1e-4)  # 1/sqrt(d_sae)
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


# ---- building blocks -----------------------------------------------------------------------------------
def test_lr_schedule_warmup_flat_decay() -> None:
    f = [lr_factor(s, total_steps=100, warmup_steps=10, decay_frac=0.2) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[50] == 1.0
    assert f[80] == 1.0 and f[90] == pytest.approx(0.5) and f[99] == pytest.approx(0.05)


def test_geometric_median_ignores_an_outlier() -> None:
    cluster = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    x = torch.cat([cluster, torch.tensor([[1000.0, 1000.0]])])
    assert x.mean(0).norm() > 100
    assert geometric_median(x, iters=200).norm() < 0.5


def test_parallel_gradient_is_removed() -> None:
    W = unit_rows(torch.randn(8, 5))
    g = remove_parallel_grad(W, torch.randn(8, 5))
    assert torch.allclose((g * W).sum(-1), torch.zeros(8), atol=1e-6)


# ---- training ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_training_recovers_planted_dictionary(tmp_path: Path, architecture: str) -> None:
    steps = 400
    D, batches = planted_batches(steps, 256)
    cfg = small_cfg(architecture=architecture, total_tokens=steps * 256, checkpoint_every=0)
    sae = train_sae(batches, cfg, D_IN, progress=False, out_dir=tmp_path)

    _, held = planted_batches(4, 512, seed=1)
    x = torch.cat(held)
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae.decode(f)
    ev = 1 - float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    cos = (D @ sae.W_dec.detach().T).max(-1).values  # (N_TRUE,) best match per planted direction
    assert ev > 0.9
    assert int((cos > 0.9).sum()) >= 0.9 * N_TRUE
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(cfg.d_sae), atol=1e-4)
    l0 = float((f > 0).sum(-1).float().mean())
    if architecture == "topk":
        assert sae.cfg.architecture == "topk" and sae.cfg.k == ACTIVE and l0 <= ACTIVE
    else:  # saved as JumpReLU with the learned global threshold; L0 close to k on average
        assert sae.cfg.architecture == "jumprelu"
        assert float(sae.threshold.min()) == float(sae.threshold.max()) > 0
        assert ACTIVE / 2 < l0 < ACTIVE * 2

    meta = sae.cfg.metadata
    assert meta.hook_name == "blocks.1.hook_resid_post" and meta.extra["hf_hook_point"] == "model.layers.1"
    assert meta.model_name == "tiny-test" and meta.extra["training_tokens"] == steps * 256
    loaded = SAE.load(tmp_path)
    assert loaded.cfg == sae.cfg
    for name, t in sae.state_dict().items():
        assert torch.allclose(loaded.state_dict()[name], t), name
    assert TrainConfig.from_dict(json.loads((tmp_path / TRAIN_CFG_FILENAME).read_text())) == cfg
    log = [json.loads(ln) for ln in (tmp_path / LOG_FILENAME).read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, steps + 1))
    assert {"loss", "explained_variance", "l0", "dead_fraction", "lr"} <= set(log[-1])


def test_resume_continues_exactly(tmp_path: Path) -> None:
    _, batches = planted_batches(20, 64)
    cfg = small_cfg(d_sae=32, batch_size=64, b_dec_init_tokens=64, warmup_steps=2, checkpoint_every=10)
    full = train_sae(batches, cfg, D_IN, progress=False, total_steps=20, out_dir=tmp_path / "a")
    # "Crash" after 10 steps: the stream ends there; the checkpoint at step 10 is what survives.
    train_sae(batches[:10], cfg, D_IN, progress=False, total_steps=20, out_dir=tmp_path / "b")
    resumed = train_sae(
        batches[10:], cfg, D_IN, progress=False, total_steps=20, out_dir=tmp_path / "b", resume=True
    )
    for name, t in full.state_dict().items():
        assert torch.allclose(resumed.state_dict()[name], t, atol=1e-6), name
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "b" / LOG_FILENAME).read_text().splitlines()]
    assert steps == list(range(1, 21))
    with pytest.raises(TrainConfigError, match="d_sae"):
        train_sae(
            batches,
            small_cfg(d_sae=64),
            D_IN,
            progress=False,
            total_steps=20,
            out_dir=tmp_path / "b",
            resume=True,
        )


def write_store(folder: Path, n_tokens: int, d_in: int = D_IN, seed: int = 0) -> None:
    """A fake `collect` output: one fp16 shard plus the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    _, batches = planted_batches(1, n_tokens, seed=seed)
    np.save(folder / "acts_00000.npy", batches[0].numpy().astype(np.float16))
    np.save(folder / "toks_00000.npy", np.zeros((n_tokens, 3), dtype=np.int32))
    manifest = {
        "config": {"hook_point": "model.layers.1", "context_size": 16},
        "shards": [{"index": 0, "tokens": n_tokens, "contexts": n_tokens // 16}],
        "tokens": n_tokens,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))


def test_store_batches_skip_without_changing_the_stream(tmp_path: Path) -> None:
    write_store(tmp_path, 300)
    store = ActivationStore(tmp_path)
    full = [b for _, b in zip(range(7), store_batches(store, 64, seed=3), strict=False)]
    skipped = [b for _, b in zip(range(3), store_batches(store, 64, seed=3, start_step=4), strict=False)]
    for a, b in zip(full[4:], skipped, strict=True):
        assert torch.equal(a, b)
    # 4 batches per epoch, then a fresh permutation: the order of ActivationStore.batches (which yields a
    # 5th batch from the second permutation because it counts 300 tokens, not whole epochs).
    ref = list(store.batches(64, seed=3, epochs=1.0))
    assert all(torch.equal(a, b) for a, b in zip(ref, full[: len(ref)], strict=True))


def test_train_from_store_writes_saelens_folder(tmp_path: Path) -> None:
    write_store(tmp_path / "acts", 512)
    cfg = small_cfg(d_sae=16, batch_size=128, b_dec_init_tokens=128, warmup_steps=1, epochs=2.0)
    sae = train_from_store(tmp_path / "acts", cfg, tmp_path / "sae", progress=False)
    assert sae.cfg.metadata.extra["training_steps"] == 8  # 2 epochs × 512 tokens / 128
    assert sae.cfg.metadata.context_size == 16
    assert {p.name for p in (tmp_path / "sae").iterdir()} >= {
        "cfg.json",
        "sae_weights.safetensors",
        TRAIN_CFG_FILENAME,
        LOG_FILENAME,
        "checkpoint",
    }


# ---- CLI -------------------------------------------------------------------------------------------------
def test_train_cli_rejects_bad_config_field(tmp_path: Path) -> None:
    bad = tmp_path / "cfg.json"
    bad.write_text(json.dumps({"d_sae": -5}))
    res = CliRunner().invoke(
        sae_app, ["train", "--config", str(bad), "--acts", str(tmp_path), "--out", str(tmp_path)]
    )
    assert res.exit_code == 2
    assert "d_sae" in res.output
    yaml_cfg = tmp_path / "cfg.yaml"
    yaml_cfg.write_text("architecture: topk\nlearning_rate: 1e-3\n")
    res = CliRunner().invoke(
        sae_app, ["train", "--config", str(yaml_cfg), "--acts", str(tmp_path), "--out", "x"]
    )
    assert res.exit_code == 2 and "learning_rate" in res.output
    res = CliRunner().invoke(sae_app, ["train", "--set", "aux_k=-1", "--acts", str(tmp_path), "--out", "x"])
    assert res.exit_code == 2 and "aux_k" in res.output


def test_train_cli_trains_and_refuses_to_overwrite_a_run(tmp_path: Path) -> None:
    write_store(tmp_path / "acts", 512)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("d_sae: 16\nk: 3\nbatch_size: 128\nb_dec_init_tokens: 128\nwarmup_steps: 1\nlr: 1e-3\n")
    args = ["train", "--config", str(cfg), "--acts", str(tmp_path / "acts"), "--out", str(tmp_path / "sae")]
    res = CliRunner().invoke(sae_app, [*args, "--steps", "3", "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    sae = SAE.load(tmp_path / "sae")
    assert sae.cfg.metadata.extra["training_steps"] == 3
    assert sae.cfg.metadata.extra["hf_hook_point"] == "model.layers.1"  # taken from collect.json
    res = CliRunner().invoke(sae_app, [*args, "--steps", "3", "--no-progress"])
    assert res.exit_code == 2 and "--resume" in res.output
    res = CliRunner().invoke(sae_app, [*args, "--steps", "4", "--device", "cpu", "--resume", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert SAE.load(tmp_path / "sae").cfg.metadata.extra["training_steps"] == 4
    res = CliRunner().invoke(sae_app, [*args, "--set", "hook_point=model.layers.3", "--resume"])
    assert res.exit_code == 2 and "hook_point" in res.output


def test_dead_window_scales_to_short_runs() -> None:
    from sae_assets.trainer import Trainer

    tr = Trainer(small_cfg(d_sae=16), D_IN, total_steps=1000)
    assert tr.dead_steps == math.ceil(1000 * 256 * 0.1 / 256)  # 10% of the run, not 10M tokens
    tr = Trainer(small_cfg(d_sae=16, dead_tokens=2560), D_IN, total_steps=1000)
    assert tr.dead_steps == 10
