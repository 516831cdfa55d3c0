"""Activation collection: corpus JSON Lines -> fixed-length contexts -> residual activations on disk.

Activations are written as fp16 shards (`acts_NNNNN.npy`, each (n_tokens, d_in)) with the token ids beside
them (`toks_NNNNN.npy`), so the trainer can memory-map them and sample shuffled batches without holding
everything in RAM, and dashboards can map a row back to its text. Special-token positions and position 0
of every context are left out: their norms are outliers (attention-sink behaviour) that would dominate the
reconstruction loss. Collection resumes from the last finished shard.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sae_assets.hooks import MASSIVE_NORM_RATIO, run_to_hooks
from sae_assets.text import read_jsonl, record_token_ids

MANIFEST = "collect.json"


@dataclass(frozen=True)
class CollectConfig:
    hook_point: str = "model.layers.15"
    context_size: int = 256  # tokens per context
    batch_size: int = 16  # contexts per forward pass
    max_tokens: int = 2_000_000  # stored tokens (after exclusions)
    shard_tokens: int = 131_072  # rows per shard file
    heldout_every: int = 50  # 1 record in 50 goes to the held-out eval file instead of training
    seed: int = 0


def split_of(record_id: str, every: int) -> str:
    """Deterministic train/held-out split by a hash of the record id (stable across runs and machines)."""
    h = int(hashlib.sha256(record_id.encode()).hexdigest()[:8], 16)
    return "heldout" if h % every == 0 else "train"


def load_records(
    paths: Sequence[str | Path], cfg: CollectConfig, heldout_out: Path | None
) -> list[dict[str, Any]]:
    """All training records of `paths`, shuffled with `cfg.seed`; held-out ones written to `heldout_out`."""
    train: list[dict[str, Any]] = []
    held: list[dict[str, Any]] = []
    for path in paths:
        for lineno, rec in read_jsonl(path):
            rid = str(rec.get("id", f"{Path(path).name}:{lineno}"))
            (held if split_of(rid, cfg.heldout_every) == "heldout" else train).append(rec)
    random.Random(cfg.seed).shuffle(train)
    if heldout_out is not None:
        heldout_out.parent.mkdir(parents=True, exist_ok=True)
        with open(heldout_out, "w", encoding="utf-8") as fh:
            for rec in held:
                fh.write(json.dumps({k: rec[k] for k in ("id", "text", "messages") if k in rec}) + "\n")
    return train


def pack_contexts(
    tokenizer: Any, records: Iterable[dict[str, Any]], context_size: int
) -> Iterator[list[int]]:
    """Concatenate records' token streams (each rendered as the model would see it) and cut into contexts."""
    buf: list[int] = []
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for rec in records:
        buf.extend(record_token_ids(tokenizer, rec))
        buf.extend(sep)
        while len(buf) >= context_size:
            yield buf[:context_size]
            buf = buf[context_size:]


def keep_mask(
    ids: torch.Tensor,
    special_ids: Sequence[int],
    hidden: torch.Tensor | None = None,
    ratio: float = MASSIVE_NORM_RATIO,
) -> torch.Tensor:
    """(B, T) bool: True where a position is trained on / scored: not special, not position 0 and, when the
    residual `hidden` (B, T, d_in) is given, not a massive-activation outlier."""
    mask = ~torch.isin(ids, torch.tensor(list(special_ids), dtype=ids.dtype, device=ids.device))
    mask[:, 0] = False
    if hidden is not None and bool(mask.any()):
        norms = hidden.float().norm(dim=-1)  # (B, T)
        mask &= norms <= ratio * norms[mask].median()
    return mask


def _done_shards(out: Path) -> list[dict[str, Any]]:
    man = out / MANIFEST
    return list(json.loads(man.read_text()).get("shards", [])) if man.is_file() else []


def _write_manifest(
    out: Path, cfg: CollectConfig, shards: list[dict[str, Any]], extra: dict[str, Any]
) -> None:
    body = {"config": asdict(cfg), "shards": shards, "tokens": sum(s["tokens"] for s in shards), **extra}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(body, indent=2))
    tmp.replace(out / MANIFEST)


def collect(
    model: Any,
    tokenizer: Any,
    corpus: Sequence[str | Path],
    out: str | Path,
    cfg: CollectConfig,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Collect activations into `out`; returns the manifest. Re-running resumes after the last shard."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = _done_shards(out)
    have = sum(s["tokens"] for s in shards)
    contexts_done = sum(s["contexts"] for s in shards)
    records = load_records(corpus, cfg, out / "heldout.jsonl")
    special = sorted(set(tokenizer.all_special_ids))
    extra = {"corpus": [str(p) for p in corpus], "special_ids": special, "records": len(records)}
    device = next(model.parameters()).device
    ctx_iter = pack_contexts(tokenizer, records, cfg.context_size)
    for _ in range(contexts_done):  # resume: skip contexts already stored (tokenizing is cheap)
        next(ctx_iter, None)
    bar = tqdm(total=cfg.max_tokens, initial=have, unit="tok", desc="collect", disable=not progress)
    acts_buf: list[np.ndarray] = []
    toks_buf: list[np.ndarray] = []
    buffered, buffered_ctx = 0, 0
    while have + buffered < cfg.max_tokens:
        batch = [c for _, c in zip(range(cfg.batch_size), ctx_iter, strict=False)]
        if not batch:
            break
        ids = torch.tensor(batch, dtype=torch.long, device=device)  # (B, T)
        h = run_to_hooks(model, [cfg.hook_point], input_ids=ids)[cfg.hook_point]  # (B, T, d_in)
        mask = keep_mask(ids, special, h)
        acts_buf.append(h[mask].float().cpu().numpy().astype(np.float16))  # (n_kept, d_in)
        # Keep (context index, position, token id) so dashboards can rebuild the text around a row.
        ctx_idx = (
            torch.arange(len(batch), device=device)[:, None].expand_as(ids) + contexts_done + buffered_ctx
        )
        pos = torch.arange(ids.shape[1], device=device)[None, :].expand_as(ids)
        toks_buf.append(
            torch.stack([ctx_idx[mask], pos[mask], ids[mask]], dim=1).cpu().numpy().astype(np.int32)
        )
        n = int(mask.sum())
        buffered += n
        buffered_ctx += len(batch)
        bar.update(n)
        if buffered >= cfg.shard_tokens or have + buffered >= cfg.max_tokens:
            shards.append(_flush(out, len(shards), acts_buf, toks_buf, buffered_ctx))
            have += buffered
            contexts_done += buffered_ctx
            acts_buf, toks_buf, buffered, buffered_ctx = [], [], 0, 0
            _write_manifest(out, cfg, shards, extra)
    if buffered:
        shards.append(_flush(out, len(shards), acts_buf, toks_buf, buffered_ctx))
        _write_manifest(out, cfg, shards, extra)
    bar.close()
    _write_manifest(out, cfg, shards, extra)
    return dict(json.loads((out / MANIFEST).read_text()))


def _flush(
    out: Path, index: int, acts: list[np.ndarray], toks: list[np.ndarray], n_ctx: int
) -> dict[str, Any]:
    a = np.concatenate(acts)
    t = np.concatenate(toks)
    np.save(out / f"acts_{index:05d}.npy", a)
    np.save(out / f"toks_{index:05d}.npy", t)
    return {"index": index, "tokens": int(a.shape[0]), "contexts": n_ctx}


class ActivationStore:
    """Memory-mapped view over collected shards; `batches` yields shuffled (batch, d_in) float32 tensors."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        man = json.loads((self.folder / MANIFEST).read_text())
        self.manifest = man
        self.shards = [
            np.load(self.folder / f"acts_{s['index']:05d}.npy", mmap_mode="r") for s in man["shards"]
        ]
        self.offsets = np.cumsum([0] + [s.shape[0] for s in self.shards])
        self.n_tokens = int(self.offsets[-1])
        self.d_in = int(self.shards[0].shape[1]) if self.shards else 0

    def rows(self, index: np.ndarray) -> torch.Tensor:
        """Rows by global index -> (len(index), d_in) float32."""
        out = np.empty((len(index), self.d_in), dtype=np.float32)
        shard_of = np.searchsorted(self.offsets, index, side="right") - 1
        for s in np.unique(shard_of):
            sel = shard_of == s
            local = index[sel] - self.offsets[s]
            order = np.argsort(local)  # sorted reads are much faster on a memory map
            out[np.flatnonzero(sel)[order]] = self.shards[s][local[order]]
        return torch.from_numpy(out)

    def batches(self, batch_size: int, *, seed: int = 0, epochs: float = 1.0) -> Iterator[torch.Tensor]:
        rng = np.random.default_rng(seed)
        total = int(self.n_tokens * epochs)
        done = 0
        while done < total:
            perm = rng.permutation(self.n_tokens)
            for start in range(0, self.n_tokens - batch_size + 1, batch_size):
                if done >= total:
                    return
                yield self.rows(perm[start : start + batch_size])
                done += batch_size
