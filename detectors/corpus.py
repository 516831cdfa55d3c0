"""A build's records as training data: completion-scope residuals per record (extracted once, optionally
cached on disk), their labels and fold groups, and the pooled and token-level tables fitted on.

Shapes: N records, D features (residual width times hook points, or d_sae latents), R token rows.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from detectors.base import TokenFeatures
from detectors.datasets import group_key, truncate_records
from detectors.errors import DetectorError
from detectors.extract import iter_token_features
from detectors.variants import last_pool_k, mix_pool
from sae_assets.hooks import hf_hook_point
from sae_assets.sae import SAE


@dataclass(frozen=True)
class TokenRows:
    """Token-level training: which completion tokens become rows (`skip` first tokens of each record
    left out when it has more; at most `max_rows` per record, evenly spaced)."""

    skip: int = 0
    max_rows: int = 32

    def as_dict(self) -> dict[str, int]:
        return {"skip": self.skip, "max_rows": self.max_rows}


@dataclass
class Corpus:
    """Per record: completion-scope residuals, label, fold group; pooled tables filled on demand."""

    feats: list[TokenFeatures]
    labels: Tensor  # (N,) long
    groups: list[str]
    pooled: dict[tuple[str, ...], Tensor]  # (what, hook point, pool) -> (N, D); token tables (token_table)
    weights: Tensor | None = None  # (N,) per-record probe training weights; None = all 1

    def rows(self, idx: Tensor, label: int) -> Tensor:
        return idx[self.labels[idx] == label]


def _groups(records: Sequence[dict[str, Any]], max_shared: int = 5) -> list[str]:
    """Fold groups: records sharing a specific final user prompt (the seed data's mirror pairs) or a
    pair/group/question id. A prompt shared by more than `max_shared` records is a generic instruction
    (like the chat form's "Write an email.") and groups nothing."""
    prompts = []
    for rec in records:
        users = [m.get("content") for m in rec.get("messages") or [] if m.get("role") == "user"]
        prompts.append(str(users[-1]) if users else None)
    count = Counter(prompts)
    return [
        f"prompt={p}" if p is not None and count[p] <= max_shared else group_key(rec)
        for p, rec in zip(prompts, records, strict=True)
    ]


def extract_corpus(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    points: Sequence[str],
    *,
    default_label: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = False,
    desc: str = "extract",
    cache_dir: str | Path | None = None,
) -> Corpus:
    """Residuals of every record's completion (the whole text for `text` records). Records need a label
    (0/1) unless `default_label` is given, and a completion (a chat must end with the assistant).
    `cache_dir`: a disk cache of each record's residuals (float32, keyed by the model, the hook points and
    the record's content after truncation), so that a rerun or another concept skips the forward pass."""
    for rec in records:
        msgs = rec.get("messages")
        if isinstance(msgs, list) and msgs and msgs[-1].get("role") != "assistant":
            raise DetectorError(
                f"record {rec.get('id')!r}: a chat must end with the assistant turn to train on"
            )
        if rec.get("label", default_label) not in (0, 1):
            raise DetectorError(f"record {rec.get('id')!r}: label must be 0 or 1, got {rec.get('label')!r}")
    recs = truncate_records(records, tokenizer, max_tokens) if max_tokens else list(records)
    labels = torch.tensor([int(r.get("label", default_label) or 0) for r in recs], dtype=torch.long)
    if cache_dir is None:
        it = iter_token_features(model, tokenizer, recs, points, scope="completion", batch_size=batch_size)
        feats = list(tqdm(it, total=len(recs), desc=desc, disable=not progress, leave=False))
        return Corpus(feats, labels, _groups(recs), {})
    cache = ActivationCache(cache_dir, model, points)
    found: dict[int, TokenFeatures] = {}
    for i, r in enumerate(recs):
        hit = cache.get(r)
        if hit is not None:
            found[i] = hit
    todo = [i for i in range(len(recs)) if i not in found]
    it = iter_token_features(
        model, tokenizer, [recs[i] for i in todo], points, scope="completion", batch_size=batch_size
    )
    bar = tqdm(total=len(recs), initial=len(found), desc=desc, disable=not progress, leave=False)
    for i, f in zip(todo, it, strict=True):
        cache.put(recs[i], f)
        found[i] = f
        bar.update(1)
    bar.close()
    return Corpus([found[i] for i in range(len(recs))], labels, _groups(recs), {})


class ActivationCache:
    """Completion-scope residuals per record on disk (`<dir>/<key[:2]>/<key>.safetensors`, float32, so a
    cached corpus gives the same numbers as a live one)."""

    def __init__(self, folder: str | Path, model: Any, points: Sequence[str]) -> None:
        self.folder = Path(folder).expanduser()
        self.points = [hf_hook_point(p) for p in points]
        cfg = getattr(model, "config", None)
        ident = {
            "model": str(getattr(cfg, "_name_or_path", "")),
            "arch": cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else None,
            "n_params": sum(int(p.numel()) for p in model.parameters()),
        }
        self._model = json.dumps(ident, sort_keys=True, default=str)

    def key(self, rec: dict[str, Any]) -> str:
        body = {"m": rec.get("messages"), "t": rec.get("text"), "p": self.points, "model": self._model}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def _path(self, rec: dict[str, Any]) -> Path:
        k = self.key(rec)
        return self.folder / k[:2] / f"{k}.safetensors"

    def get(self, rec: dict[str, Any]) -> TokenFeatures | None:
        path = self._path(rec)
        if not path.is_file():
            return None
        try:
            state = load_file(str(path))
        except Exception:  # a half-written file from an interrupted run: extract again
            return None
        return TokenFeatures(resid={p: state[p].float() for p in self.points})

    def put(self, rec: dict[str, Any], feats: TokenFeatures) -> None:
        path = self._path(rec)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({p: feats.resid_at(p).float().contiguous() for p in self.points}, str(tmp))
        tmp.replace(path)


def pooled_table(corpus: Corpus, what: str, pool: str, point: str, sae: SAE | None = None) -> Tensor:
    """(N, D) pooled residuals at `point` (what="resid") or all SAE latents (what="latents"), cached."""
    key = (what, point)
    mixed = mix_pool(pool)
    if mixed is not None and (*key, pool) not in corpus.pooled:
        k, alpha = mixed
        whole = pooled_table(corpus, what, "mean", point, sae)  # (N, D)
        end = pooled_table(corpus, what, f"last:{k}", point, sae)  # (N, D)
        corpus.pooled[(*key, pool)] = alpha * whole + (1.0 - alpha) * end  # (N, D)
    k_last = last_pool_k(pool)
    if k_last is not None and (*key, pool) not in corpus.pooled:
        last = [_last_rows(f, what, point, k_last, sae) for f in corpus.feats]
        corpus.pooled[(*key, pool)] = torch.stack(last) if last else torch.zeros(0, 0)
    if (*key, pool) not in corpus.pooled:
        rows: dict[str, list[Tensor]] = {"max": [], "mean": []}
        for f in corpus.feats:  # both pools in one pass: encoding all latents is the costly part
            x = f.resid_at(point).float()
            if what == "latents":
                assert sae is not None
                with torch.inference_mode():
                    x = sae.encode(x.to(sae.W_enc.device)).float().cpu()
            empty = x.shape[0] == 0
            rows["max"].append(torch.zeros(x.shape[1]) if empty else x.max(dim=0).values)
            rows["mean"].append(torch.zeros(x.shape[1]) if empty else x.mean(dim=0))
        for p, r in rows.items():
            corpus.pooled[(*key, p)] = torch.stack(r) if r else torch.zeros(0, 0)
    return corpus.pooled[(*key, pool)]


def _last_rows(f: TokenFeatures, what: str, point: str, k: int, sae: SAE | None) -> Tensor:
    """(D,) mean of the last k tokens' residuals (or SAE latents) of one record."""
    x = f.resid_at(point).float()[-k:]  # (≤k, d_in)
    if what == "latents":
        assert sae is not None
        with torch.inference_mode():
            x = sae.encode(x.to(sae.W_enc.device)).float().cpu()  # (≤k, d_sae)
    return x.mean(dim=0) if x.shape[0] else torch.zeros(x.shape[1])


def token_table(corpus: Corpus, points: Sequence[str], rows: TokenRows) -> tuple[Tensor, Tensor, Tensor]:
    """Token-level training rows, cached: (X (R, D) residuals at `points` concatenated, record index (R,),
    row weight (R,)). A record's rows share its weight (corpus.weights, else 1) equally, so every record
    counts the same however long it is."""
    key = ("token", "|".join(points), f"{rows.skip},{rows.max_rows}")
    if key not in corpus.pooled:
        xs, owner, weight = [], [], []
        for i, f in enumerate(corpus.feats):
            x = torch.cat([f.resid_at(p).float() for p in points], dim=1)
            if x.shape[0] > rows.skip:
                x = x[rows.skip :]
            if x.shape[0] > rows.max_rows:
                x = x[torch.linspace(0, x.shape[0] - 1, rows.max_rows).round().long().unique()]
            if x.shape[0] == 0:
                continue
            w = 1.0 if corpus.weights is None else float(corpus.weights[i])
            xs.append(x)
            owner.append(torch.full((x.shape[0],), i, dtype=torch.long))
            weight.append(torch.full((x.shape[0],), w / x.shape[0], dtype=torch.float64))
        corpus.pooled[key] = torch.cat(xs)
        corpus.pooled[(*key, "owner")] = torch.cat(owner)
        corpus.pooled[(*key, "weight")] = torch.cat(weight)
    return corpus.pooled[key], corpus.pooled[(*key, "owner")], corpus.pooled[(*key, "weight")]
