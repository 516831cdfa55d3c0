"""Train a TopK or BatchTopK sparse autoencoder on residual activations: the drivers.

`train_sae` runs a `Trainer` (`sae_assets.trainer`, which has the recipe) over (batch, d_in) tensors, and
`train_from_store` over an activation folder written by `collect`; both checkpoint, log and save. The config
is `sae_assets.train_config`.

The output folder holds the SAE in SAELens format (`cfg.json`, `sae_weights.safetensors`), the config
(`train_cfg.json`), per-step metrics (`train_log.jsonl`) and a resumable checkpoint (`checkpoint/`).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from tqdm import tqdm

from sae_assets.collect import ActivationStore
from sae_assets.sae import SAE
from sae_assets.train_config import TrainConfig, TrainConfigError
from sae_assets.trainer import CHECKPOINT_DIR, CHECKPOINT_FILENAME, Trainer, checkpoint_path, checkpoint_step

TRAIN_CFG_FILENAME = "train_cfg.json"
LOG_FILENAME = "train_log.jsonl"


# ---- logging -------------------------------------------------------------------------------------
def _open_log(out_dir: Path, resume_step: int | None) -> TextIO:
    """train_log.jsonl for appending; on resume, drops lines logged after the checkpoint (redone next)."""
    path = out_dir / LOG_FILENAME
    if resume_step is None or not path.is_file():
        return open(path, "w", encoding="utf-8")
    kept = [
        ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step
    ]
    path.write_text("".join(ln + "\n" for ln in kept))
    return open(path, "a", encoding="utf-8")


# ---- entry points --------------------------------------------------------------------------------
def _resolve_steps(cfg: TrainConfig, total_steps: int | None, batches: Iterable[torch.Tensor]) -> int:
    if total_steps is not None:
        return total_steps
    if cfg.total_tokens is not None:
        return cfg.total_tokens // cfg.batch_size
    if hasattr(batches, "__len__"):
        return len(batches)  # type: ignore[arg-type]
    raise TrainConfigError("total_tokens", "must be set when training from an iterator of unknown length")


def train_sae(
    batches: Iterable[torch.Tensor],
    cfg: TrainConfig,
    d_in: int,
    *,
    progress: bool = True,
    total_steps: int | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> SAE:
    """Train on (batch, d_in) float tensors; returns the exported SAE (on CPU, fp32).

    Steps: `total_steps`, else total_tokens // batch_size, else len(batches); training also stops when
    `batches` runs out. With `out_dir`, checkpoints every `cfg.checkpoint_every` steps and at the end, logs
    every step to train_log.jsonl, and saves the SAE + train_cfg.json. With `resume`, state comes from
    out_dir's checkpoint and `batches` must continue the stream from the checkpoint's step (see
    `store_batches(start_step=...)`). `metadata` adds SAEMetadata fields (context_size, dataset_path …).
    """
    steps = _resolve_steps(cfg, total_steps, batches)
    out = Path(out_dir) if out_dir is not None else None
    trainer = Trainer(cfg, d_in, steps)
    it: Iterator[torch.Tensor] = iter(batches)
    if resume:
        if out is None or not checkpoint_path(out).is_file():
            raise FileNotFoundError(f"nothing to resume: no {CHECKPOINT_DIR}/{CHECKPOINT_FILENAME} in {out}")
        trainer.load_state(torch.load(checkpoint_path(out), map_location="cpu", weights_only=True))
    else:
        it = _init_from_head(trainer, it)
    if out is None:
        _run_steps(trainer, it, steps, None, progress)
        return trainer.export(metadata)
    out.mkdir(parents=True, exist_ok=True)
    (out / TRAIN_CFG_FILENAME).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    with _open_log(out, trainer.step if resume else None) as log:
        try:
            _run_steps(trainer, it, steps, (out, log), progress)
        except KeyboardInterrupt:
            log.flush()
            trainer.save_checkpoint(out)  # Ctrl-C keeps the progress; `--resume` continues from here
            raise
    trainer.save_checkpoint(out)
    sae = trainer.export(metadata)
    sae.save(out, dtype=cfg.dtype)
    return sae


def _init_from_head(trainer: Trainer, it: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Initialise b_dec from the first batches (>= b_dec_init_tokens rows); they are trained on too."""
    cfg = trainer.cfg
    head = list(itertools.islice(it, max(1, math.ceil(cfg.b_dec_init_tokens / cfg.batch_size))))
    if not head:
        raise ValueError("no activation batches to train on")
    trainer.init_b_dec(torch.cat(head))
    return itertools.chain(head, it)


def _run_steps(
    trainer: Trainer,
    it: Iterator[torch.Tensor],
    steps: int,
    sink: tuple[Path, TextIO] | None,
    progress: bool,
) -> None:
    """Train until `steps` or the end of `it`; with `sink` = (out_dir, log), log and checkpoint."""
    every = trainer.cfg.checkpoint_every
    desc = f"train {trainer.cfg.architecture}"
    with tqdm(total=steps, initial=trainer.step, unit="step", desc=desc, disable=not progress) as bar:
        while trainer.step < steps and (x := next(it, None)) is not None:
            m = trainer.train_step(x)
            bar.update(1)
            bar.set_postfix(
                loss=f"{m['loss']:.4f}",
                ev=f"{m['explained_variance']:.3f}",
                l0=f"{m['l0']:.1f}",
                dead=f"{m['dead_fraction']:.3f}",
                refresh=False,
            )
            if sink is None:
                continue
            out, log = sink
            log.write(json.dumps(m) + "\n")
            if every and trainer.step % every == 0:
                log.flush()
                trainer.save_checkpoint(out)


def store_batches(
    store: ActivationStore, batch_size: int, *, seed: int = 0, start_step: int = 0
) -> Iterator[torch.Tensor]:
    """Endless shuffled (batch_size, d_in) float32 batches: a fresh permutation each epoch, its tail dropped
    (the order of `ActivationStore.batches`). The first `start_step` batches are skipped without being read,
    so a resumed run sees exactly the stream it would have seen."""
    per_epoch = store.n_tokens // batch_size
    if per_epoch == 0:
        raise ValueError(f"{store.folder}: {store.n_tokens} tokens is fewer than one batch of {batch_size}")
    rng = np.random.default_rng(seed)
    step = 0
    while True:
        perm = rng.permutation(store.n_tokens)
        for b in range(per_epoch):
            if step >= start_step:
                yield store.rows(perm[b * batch_size : (b + 1) * batch_size])
            step += 1


def train_from_store(
    acts_dir: str | Path,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
) -> SAE:
    """Train on an activation folder written by `collect` (total_tokens, else epochs × its tokens)."""
    store = ActivationStore(acts_dir)
    n_tokens = cfg.total_tokens if cfg.total_tokens is not None else int(store.n_tokens * cfg.epochs)
    steps = n_tokens // cfg.batch_size
    if steps == 0:
        raise TrainConfigError("batch_size", f"{cfg.batch_size} exceeds the {n_tokens} training tokens")
    start = 0
    if resume:
        done = checkpoint_step(out_dir)
        if done is None:
            raise FileNotFoundError(
                f"nothing to resume: no {CHECKPOINT_DIR}/{CHECKPOINT_FILENAME} in {out_dir}"
            )
        start = done
    collect_cfg = store.manifest.get("config", {})
    metadata = {
        "context_size": collect_cfg.get("context_size"),
        "exclude_special_tokens": True,  # collect drops special tokens and position 0
        "dataset_path": str(acts_dir),
    }
    batches = store_batches(store, cfg.batch_size, seed=cfg.seed, start_step=start)
    return train_sae(
        batches,
        cfg,
        store.d_in,
        progress=progress,
        total_steps=steps,
        out_dir=out_dir,
        resume=resume,
        metadata=metadata,
    )
