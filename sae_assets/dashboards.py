"""Feature dashboards stored with an SAE (like Scaling Monosemanticity's feature pages or Neuronpedia).

For every latent: density, mean/max activation, the top activating examples (a token window around the peak
token with that latent's per-token activations), the tokens it most promotes / suppresses through the
unembedding, its nearest neighbours by decoder cosine, and an automatic label that says it is automatic.

On disk, inside the SAE folder (gzip with mtime 0, so rebuilding identical data gives identical bytes):

    dashboards/summary.json             tokens scored, data sources, build config, format version
    dashboards/index.json.gz            per-latent columns (label, density, max act, top/promoted tokens)
    dashboards/features/NNNNN.jsonl.gz  one JSON line per latent, `shard_size` latents per shard
    dashboards/neighbours.npz           ids int32 (d_sae, n), cos float16 (d_sae, n)
    dashboards/labels.json              optional manual labels {"<id>": "label"}; survive rebuilds

A lookup reads the summary, then only the shard it needs (plus index/neighbours for the neighbours' labels).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from sae_assets.collect import MASSIVE_NORM_RATIO, keep_mask, pack_contexts
from sae_assets.hooks import hf_hook_point, run_to_hooks
from sae_assets.sae import SAE
from sae_assets.text import read_jsonl

FORMAT_VERSION = 1
DASHBOARDS_DIR = "dashboards"
SUMMARY_FILE = "summary.json"
INDEX_FILE = "index.json.gz"
NEIGHBOURS_FILE = "neighbours.npz"
LABELS_FILE = "labels.json"
FEATURES_DIR = "features"
SHARD_SIZE = 256  # latents per shard: a lookup decompresses ~100-200 kB, not the whole file
MASSIVE_RATIO = MASSIVE_NORM_RATIO  # residual-norm outliers (attention sinks) are not scored; see keep_mask
ENCODE_BUDGET = 1 << 23  # floats per SAE-encode chunk (32 MB fp32): bounds (contexts, T, d_sae) memory
_ROW_CHUNK = 512  # latents per logit-effect / neighbour matmul chunk
_SHARD_CACHE = 4
_INDEX_TOKENS = 5  # top / promoted tokens kept in the search index


class DashboardsError(ValueError):
    """Missing or unreadable dashboards, or a latent id out of range; the message says what to do."""


@dataclass(frozen=True)
class DashboardConfig:
    max_tokens: int
    context_size: int = 128
    batch_size: int = 8
    top_k_examples: int = 8
    window: tuple[int, int] = (-12, 4)  # token offsets around the peak, both ends inclusive
    n_promoted: int = 10
    n_neighbours: int = 8

    def __post_init__(self) -> None:
        lo, hi = self.window
        if lo > 0 or hi < 0:
            raise ValueError(f"window {self.window} must contain offset 0 (lo <= 0 <= hi)")
        if min(self.max_tokens, self.context_size, self.batch_size, self.top_k_examples) <= 0:
            raise ValueError("max_tokens, context_size, batch_size and top_k_examples must be positive")


# ---- streaming statistics -------------------------------------------------------------------------
class _Accumulator:
    """Per-latent firing counts, activation sums/maxima and a (d_sae, k) top-k buffer of examples.

    Examples are ranked by each context's peak activation, so a latent's top examples come from k distinct
    contexts instead of k neighbouring tokens of one context.
    """

    def __init__(self, d_sae: int, k: int, window: tuple[int, int], device: torch.device) -> None:
        self.offsets = torch.arange(window[0], window[1] + 1, device=device)  # (W,)
        w = len(self.offsets)
        self.n_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.act_max = torch.zeros(d_sae, device=device)
        self.val = torch.zeros(d_sae, k, device=device)  # (d_sae, k), sorted descending
        self.ctx = torch.full((d_sae, k), -1, dtype=torch.long, device=device)
        self.pos = torch.zeros(d_sae, k, dtype=torch.long, device=device)
        self.win_act = torch.zeros(d_sae, k, w, device=device)
        self.win_ids = torch.full((d_sae, k, w), -1, dtype=torch.long, device=device)

    def add(self, f: Tensor, ids: Tensor, ctx0: int) -> None:
        """f: (c, T, d_sae) activations, zero where not scored; ids: (c, T); ctx0: global index of row 0."""
        c, t, d_sae = f.shape
        self.n_fired += (f > 0).sum((0, 1))
        self.act_sum += f.clamp_min(0).sum((0, 1)).double()
        self.act_max = torch.maximum(self.act_max, f.amax((0, 1)))
        seq_max, seq_pos = f.max(dim=1)  # (c, d_sae)
        pos = seq_pos[:, :, None] + self.offsets  # (c, d_sae, W)
        valid = (pos >= 0) & (pos < t)
        pos_c = pos.clamp(0, t - 1)
        win_act = f.gather(1, pos_c.transpose(1, 2)).transpose(1, 2) * valid  # (c, d_sae, W)
        win_ids = ids[:, None, :].expand(c, d_sae, t).gather(2, pos_c)  # (c, d_sae, W)
        win_ids = win_ids.masked_fill(~valid, -1)
        cand_ctx = (torch.arange(c, device=f.device) + ctx0)[None, :].expand(d_sae, c)  # (d_sae, c)
        self._merge(seq_max.T, cand_ctx, seq_pos.T, win_act.transpose(0, 1), win_ids.transpose(0, 1))

    def _merge(self, val: Tensor, ctx: Tensor, pos: Tensor, win_act: Tensor, win_ids: Tensor) -> None:
        """Candidates are (d_sae, c) / (d_sae, c, W); keeps the k best of buffer ∪ candidates per latent."""
        all_val = torch.cat([self.val, val], dim=1)  # (d_sae, k + c)
        self.val, keep = all_val.topk(self.val.shape[1], dim=1)  # (d_sae, k)
        self.ctx = torch.cat([self.ctx, ctx], dim=1).gather(1, keep)
        self.pos = torch.cat([self.pos, pos], dim=1).gather(1, keep)
        keep_w = keep[:, :, None].expand(-1, -1, self.win_act.shape[2])  # (d_sae, k, W)
        self.win_act = torch.cat([self.win_act, win_act], dim=1).gather(1, keep_w)
        self.win_ids = torch.cat([self.win_ids, win_ids], dim=1).gather(1, keep_w)


def _batched(items: Iterable[list[int]], n: int) -> Iterator[list[list[int]]]:
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch


def _special_ids(tokenizer: Any | None) -> list[int]:
    return sorted(set(getattr(tokenizer, "all_special_ids", None) or []))


def _scan(
    model: Any,
    sae: SAE,
    contexts: Iterable[list[int]],
    hook_point: str,
    cfg: DashboardConfig,
    special: Sequence[int],
    progress: bool,
) -> tuple[_Accumulator, int, int]:
    """Runs contexts until `cfg.max_tokens` tokens are scored; returns (stats, tokens scored, contexts)."""
    device = sae.W_enc.device
    acc = _Accumulator(sae.d_sae, cfg.top_k_examples, cfg.window, device)
    model_device = next(model.parameters()).device
    scored, n_ctx = 0, 0
    bar = tqdm(total=cfg.max_tokens, unit="tok", desc="dashboards", disable=not progress)
    for batch in _batched(contexts, cfg.batch_size):
        if len({len(c) for c in batch}) != 1:
            raise ValueError("contexts in a batch must all have the same length")
        ids = torch.tensor(batch, dtype=torch.long, device=model_device)  # (B, T)
        h = run_to_hooks(model, [hook_point], input_ids=ids)[hook_point].to(device)  # (B, T, d_in)
        ids, mask = ids.to(device), keep_mask(ids, special, h, MASSIVE_RATIO).to(device)
        per_chunk = max(1, ENCODE_BUDGET // (ids.shape[1] * sae.d_sae))
        with torch.inference_mode():
            for s in range(0, len(batch), per_chunk):
                rows = slice(s, s + per_chunk)
                f = sae.encode(h[rows]).float() * mask[rows, :, None]  # (c, T, d_sae)
                acc.add(f, ids[rows], n_ctx + s)
        n = int(mask.sum())
        scored += n
        n_ctx += len(batch)
        bar.update(n)
        if scored >= cfg.max_tokens:
            break
    bar.close()
    return acc, scored, n_ctx


# ---- logit effects and neighbours ---------------------------------------------------------------
@dataclass(frozen=True)
class LogitEffects:
    """Top tokens per latent through W_dec[i] · diag(g) · W_Uᵀ; each tensor is (d_sae, n)."""

    promoted_ids: Tensor
    promoted: Tensor
    suppressed_ids: Tensor
    suppressed: Tensor


def final_norm_weight(model: Any) -> Tensor | None:
    """The final norm's elementwise weight (Llama: model.model.norm.weight), if the model has one we know."""
    for path in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm"):
        try:
            weight = getattr(model.get_submodule(path), "weight", None)
        except AttributeError:
            continue
        if isinstance(weight, Tensor):
            return weight
    return None


def logit_effects(
    model: Any, sae: SAE, n: int, *, vocab_size: int | None = None, progress: bool = False
) -> LogitEffects | None:
    """Direct-path logit effect of each decoder row. The final norm's weight is applied, its division by the
    residual RMS is not (it depends on the token), so values are relative, not real logit changes.
    None when the model has no output embedding of the SAE's width."""
    emb = model.get_output_embeddings()
    w_u = getattr(emb, "weight", None)
    if w_u is None or w_u.shape[1] != sae.d_in or n <= 0:
        return None
    w_u = w_u[:vocab_size] if vocab_size else w_u  # (vocab, d_in); padded vocab rows are not real tokens
    n = min(n, w_u.shape[0])
    g = final_norm_weight(model)
    with torch.inference_mode():
        dirs = sae.W_dec.float() * (g.float().to(sae.W_dec.device) if g is not None else 1.0)  # (d_sae, d_in)
        out: list[list[Tensor]] = [[], [], [], []]
        chunks = range(0, sae.d_sae, _ROW_CHUNK)
        for s in tqdm(chunks, desc="logit effects", unit="chunk", disable=not progress):
            logits = (dirs[s : s + _ROW_CHUNK].to(w_u.device, w_u.dtype) @ w_u.T).float().cpu()  # (c, vocab)
            top, bottom = logits.topk(n, dim=1), (-logits).topk(n, dim=1)
            for buf, t in zip(out, (top.indices, top.values, bottom.indices, -bottom.values), strict=True):
                buf.append(t)
    return LogitEffects(*(torch.cat(buf) for buf in out))


def decoder_neighbours(sae: SAE, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-n cosine neighbours of each decoder row, self excluded: (ids int32, cos float16), (d_sae, n)."""
    n = min(n, sae.d_sae - 1)
    with torch.inference_mode():
        w = torch.nn.functional.normalize(sae.W_dec.float(), dim=1)  # (d_sae, d_in)
        ids, cos = [], []
        for s in range(0, sae.d_sae, _ROW_CHUNK):
            sims = w[s : s + _ROW_CHUNK] @ w.T  # (c, d_sae)
            rows = torch.arange(sims.shape[0], device=sims.device)
            sims[rows, rows + s] = -torch.inf
            top = sims.topk(n, dim=1)
            ids.append(top.indices.cpu())
            cos.append(top.values.cpu())
    return torch.cat(ids).numpy().astype(np.int32), torch.cat(cos).numpy().astype(np.float16)


# ---- feature records ----------------------------------------------------------------------------
def _r(x: float) -> float:
    """3 significant digits: enough to read, and JSON stays small."""
    return float(f"{x:.3g}")


def token_namer(tokenizer: Any | None) -> Callable[[int], str]:
    """Token id -> display string (decoded alone, so ' bank' keeps its space), cached."""
    cache: dict[int, str] = {}

    def name(i: int) -> str:
        if i not in cache:
            cache[i] = tokenizer.decode([i]) if tokenizer is not None else f"[{i}]"
        return cache[i]

    return name


def auto_label(top_tokens: Sequence[str], promoted: Sequence[str], n_fired: int, tokens_scored: int) -> str:
    if n_fired == 0:
        return f"dead (never fired on {tokens_scored:,} tokens)"
    parts = []
    if top_tokens:
        parts.append("tokens: " + ", ".join(repr(t) for t in top_tokens[:3]))
    if promoted:
        parts.append("promotes: " + ", ".join(repr(t) for t in promoted[:3]))
    return " | ".join(parts) or "(no examples)"


def _examples(
    buf: dict[str, np.ndarray], i: int, lo: int, name: Callable[[int], str]
) -> list[dict[str, Any]]:
    out = []
    for j, v in enumerate(buf["val"][i].tolist()):
        if v <= 0:
            break  # sorted descending: the rest are empty slots or contexts where it never fired
        ids, acts = buf["win_ids"][i, j].tolist(), buf["win_act"][i, j].tolist()
        kept = [k for k, t in enumerate(ids) if t >= 0]
        out.append(
            {
                "act": _r(v),
                "ctx": int(buf["ctx"][i, j]),
                "pos": int(buf["pos"][i, j]),
                "peak": sum(1 for k in kept if k < -lo),  # index of the peak token in `tokens`
                "tokens": [name(ids[k]) for k in kept],
                "acts": [_r(acts[k]) if acts[k] > 0 else 0 for k in kept],
            }
        )
    return out


def _top_tokens(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Most frequent peak tokens across the top examples (ties broken by summed activation)."""
    count: Counter[str] = Counter()
    mass: Counter[str] = Counter()
    for ex in examples:
        tok = ex["tokens"][ex["peak"]]
        count[tok] += 1
        mass[tok] += ex["act"]
    ranked = sorted(count, key=lambda t: (-count[t], -mass[t]))
    return [{"token": t, "count": count[t]} for t in ranked[:_INDEX_TOKENS]]


def _token_list(ids: Tensor, vals: Tensor, name: Callable[[int], str]) -> list[dict[str, Any]]:
    pairs = zip(ids.tolist(), vals.tolist(), strict=True)
    return [{"token": name(t), "id": t, "logit": _r(v)} for t, v in pairs]


def _features(
    acc: _Accumulator,
    effects: LogitEffects | None,
    name: Callable[[int], str],
    cfg: DashboardConfig,
    scored: int,
) -> list[dict[str, Any]]:
    feats = []
    n_fired = acc.n_fired.tolist()
    act_sum, act_max = acc.act_sum.tolist(), acc.act_max.tolist()
    # One device->host copy up front: per-latent indexing of GPU tensors would sync ~100k times.
    buf = {k: getattr(acc, k).cpu().numpy() for k in ("val", "ctx", "pos", "win_act", "win_ids")}
    for i in range(len(n_fired)):
        examples = _examples(buf, i, cfg.window[0], name)
        top = _top_tokens(examples)
        promoted = _token_list(effects.promoted_ids[i], effects.promoted[i], name) if effects else []
        suppressed = _token_list(effects.suppressed_ids[i], effects.suppressed[i], name) if effects else []
        label = auto_label([t["token"] for t in top], [t["token"] for t in promoted], n_fired[i], scored)
        feats.append(
            {
                "id": i,
                "label": label,
                "label_source": "auto:top-tokens" if n_fired[i] else "auto:dead",
                "n_fired": n_fired[i],
                "density": float(f"{n_fired[i] / max(scored, 1):.4g}"),
                "mean_act": _r(act_sum[i] / n_fired[i]) if n_fired[i] else 0.0,
                "max_act": _r(act_max[i]),
                "top_tokens": top,
                "promoted": promoted,
                "suppressed": suppressed,
                "examples": examples,
            }
        )
    return feats


# ---- build ----------------------------------------------------------------------------------------
def sae_hook_point(sae: SAE) -> str:
    """The Hugging Face module path the SAE reads (metadata.extra.hf_hook_point, else from hook_name)."""
    meta = sae.cfg.metadata
    point = meta.extra.get("hf_hook_point") or (hf_hook_point(meta.hook_name) if meta.hook_name else None)
    if not point:
        raise DashboardsError("cfg.json has no metadata.hook_name (nor hf_hook_point): which layer to read?")
    return str(point)


def read_records(paths: Sequence[str | Path], seed: int = 0) -> list[dict[str, Any]]:
    """All records of `paths`, shuffled with `seed` so a token budget samples every file, not the first."""
    records = [rec for p in paths for _, rec in read_jsonl(p)]
    random.Random(seed).shuffle(records)
    return records


def build_dashboards(
    model: Any,
    tokenizer: Any | None,
    sae: SAE,
    records: Iterable[dict[str, Any]] | None,
    hook_point: str,
    *,
    max_tokens: int,
    context_size: int = 128,
    batch_size: int = 8,
    top_k_examples: int = 8,
    window: tuple[int, int] = (-12, 4),
    n_promoted: int = 10,
    n_neighbours: int = 8,
    progress: bool = True,
    contexts: Iterable[list[int]] | None = None,
    sources: Sequence[str] = (),
    model_name: str | None = None,
) -> Dashboards:
    """Dashboards for every latent from `records` (JSON Lines dicts with `text` or `messages`), packed into
    `context_size`-token contexts, or from pre-tokenized `contexts` (then `tokenizer` only names tokens and
    special tokens). Stops after the batch that reaches `max_tokens` scored tokens; special tokens and
    position 0 of each context are not scored (as in activation collection)."""
    if (records is None) == (contexts is None):
        raise ValueError("pass exactly one of `records` or `contexts`")
    cfg = DashboardConfig(
        max_tokens, context_size, batch_size, top_k_examples, window, n_promoted, n_neighbours
    )
    point = hf_hook_point(hook_point)
    t0 = time.time()
    if contexts is None:
        if tokenizer is None:
            raise ValueError("`records` need a tokenizer")
        assert records is not None
        contexts = pack_contexts(tokenizer, records, context_size)
    acc, scored, n_ctx = _scan(model, sae, contexts, point, cfg, _special_ids(tokenizer), progress)
    vocab = len(tokenizer) if tokenizer is not None else None
    effects = logit_effects(model, sae, n_promoted, vocab_size=vocab, progress=progress)
    nb_ids, nb_cos = decoder_neighbours(sae, n_neighbours)
    feats = _features(acc, effects, token_namer(tokenizer), cfg, scored)
    summary = {
        "format": FORMAT_VERSION,
        "d_sae": sae.d_sae,
        "d_in": sae.d_in,
        "hook_point": point,
        "model": model_name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""),
        "tokens_scored": scored,
        "contexts": n_ctx,
        "sources": [str(s) for s in sources],
        "dead_latents": sum(1 for f in feats if f["n_fired"] == 0),
        "config": {**asdict(cfg), "window": list(cfg.window)},  # as JSON will read it back
        "shard_size": SHARD_SIZE,
        "logit_effect": "W_dec[i] * final_norm.weight @ W_U.T (direct path; RMS scaling ignored)"
        if effects is not None
        else None,
        "build_seconds": round(time.time() - t0, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return Dashboards(summary, features=feats, neighbours=(nb_ids, nb_cos))


# ---- storage --------------------------------------------------------------------------------------
def _gz_write(path: Path, text: str) -> None:
    path.write_bytes(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0))


def _gz_read(path: Path) -> str:
    return gzip.decompress(path.read_bytes()).decode("utf-8")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def dashboards_dir(path: str | Path) -> Path:
    """`path` itself when it holds summary.json, else `path/dashboards` (the SAE folder's)."""
    folder = Path(path)
    return folder if (folder / SUMMARY_FILE).is_file() else folder / DASHBOARDS_DIR


def read_manual_labels(folder: Path) -> dict[int, str]:
    path = folder / LABELS_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DashboardsError(f"{path}: invalid JSON: {e}") from e
    return {int(k): str(v["label"] if isinstance(v, dict) else v) for k, v in raw.items()}


def write_label(sae_folder: str | Path, latent: int, label: str | None) -> None:
    """Set (or with None, remove) the manual label of `latent`; manual labels override auto ones on load."""
    folder = dashboards_dir(sae_folder)
    labels = read_manual_labels(folder)
    if label is None:
        labels.pop(latent, None)
    else:
        labels[latent] = label
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / LABELS_FILE, {str(k): labels[k] for k in sorted(labels)})


def _index_of(feats: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """Column store of what search and neighbour listings need, without opening any shard."""
    return {
        "label": [f["label"] for f in feats],
        "label_source": [f["label_source"] for f in feats],
        "density": [f["density"] for f in feats],
        "max_act": [f["max_act"] for f in feats],
        "top_tokens": [[t["token"] for t in f["top_tokens"]] for f in feats],
        "promoted": [[t["token"] for t in f["promoted"][:_INDEX_TOKENS]] for f in feats],
    }


class Dashboards:
    """All latents' dashboards: in memory after `build_dashboards`, lazily read after `load`."""

    def __init__(
        self,
        summary: dict[str, Any],
        *,
        features: list[dict[str, Any]] | None = None,
        neighbours: tuple[np.ndarray, np.ndarray] | None = None,
        folder: Path | None = None,
        manual: dict[int, str] | None = None,
    ) -> None:
        self.summary = summary
        self.folder = folder
        self._features = features
        self._neighbours = neighbours
        self._index: dict[str, list[Any]] | None = _index_of(features) if features is not None else None
        self._shards: dict[int, list[str]] = {}
        self.manual = dict(manual or {})

    def __len__(self) -> int:
        return int(self.summary["d_sae"])

    # ---- lazy parts ----
    @property
    def index(self) -> dict[str, list[Any]]:
        if self._index is None:
            assert self.folder is not None
            self._index = json.loads(_gz_read(self.folder / INDEX_FILE))
        return self._index

    @property
    def neighbours(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32, cos float16), each (d_sae, n_neighbours)."""
        if self._neighbours is None:
            assert self.folder is not None
            with np.load(self.folder / NEIGHBOURS_FILE) as z:
                self._neighbours = (z["ids"], z["cos"])
        return self._neighbours

    def _raw_feature(self, i: int) -> dict[str, Any]:
        if self._features is not None:
            return self._features[i]
        assert self.folder is not None
        size = int(self.summary["shard_size"])
        shard = i // size
        if shard not in self._shards:
            if len(self._shards) >= _SHARD_CACHE:
                self._shards.pop(next(iter(self._shards)))
            self._shards[shard] = _gz_read(self.folder / FEATURES_DIR / f"{shard:05d}.jsonl.gz").splitlines()
        out: dict[str, Any] = json.loads(self._shards[shard][i % size])
        return out

    # ---- lookups ----
    def _check(self, i: int) -> None:
        if not 0 <= i < len(self):
            raise DashboardsError(f"latent {i} is out of range 0..{len(self) - 1}")

    def label(self, i: int) -> tuple[str, str]:
        """(label, label_source) with manual labels winning."""
        self._check(i)
        if i in self.manual:
            return self.manual[i], "manual"
        return self.index["label"][i], self.index["label_source"][i]

    def feature(self, i: int) -> dict[str, Any]:
        """One latent's dashboard, with its neighbours (and their labels) attached."""
        self._check(i)
        feat = dict(self._raw_feature(i))
        if i in self.manual:
            feat.update(label=self.manual[i], label_source="manual", auto_label=feat["label"])
        ids, cos = self.neighbours
        feat["neighbours"] = [
            {"id": int(j), "cos": round(float(c), 3), "label": self.label(int(j))[0]}
            for j, c in zip(ids[i], cos[i], strict=True)
        ]
        return feat

    def features(self) -> Iterator[dict[str, Any]]:
        """Every latent's stored record (no neighbours attached), in id order."""
        for i in range(len(self)):
            yield self._raw_feature(i)

    # ---- persistence ----
    def save(self, sae_folder: str | Path) -> Path:
        """Writes `sae_folder/dashboards/` atomically; existing manual labels are kept (and ours added)."""
        out = Path(sae_folder) / DASHBOARDS_DIR
        tmp = out.with_name(f".{DASHBOARDS_DIR}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / FEATURES_DIR).mkdir(parents=True)
        feats = list(self.features())
        for shard, s in enumerate(range(0, len(feats), SHARD_SIZE)):
            lines = "".join(_dumps(f) + "\n" for f in feats[s : s + SHARD_SIZE])
            _gz_write(tmp / FEATURES_DIR / f"{shard:05d}.jsonl.gz", lines)
        _gz_write(tmp / INDEX_FILE, _dumps(_index_of(feats)))
        ids, cos = self.neighbours
        np.savez_compressed(tmp / NEIGHBOURS_FILE, ids=ids.astype(np.int32), cos=cos.astype(np.float16))
        summary = {**self.summary, "shard_size": SHARD_SIZE}
        _write_json(tmp / SUMMARY_FILE, summary)
        labels = {**(read_manual_labels(out) if out.is_dir() else {}), **self.manual}
        if labels:
            _write_json(tmp / LABELS_FILE, {str(k): labels[k] for k in sorted(labels)})
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        return out

    @classmethod
    def load(cls, path: str | Path) -> Dashboards:
        """Reads summary.json and manual labels only; the index, neighbours and shards load on first use.
        `path` is the SAE folder or its dashboards/ folder."""
        folder = dashboards_dir(path)
        if not (folder / SUMMARY_FILE).is_file():
            raise DashboardsError(
                f"{path}: no dashboards; build them: `featurewatch sae dashboards {path} --data FILE.jsonl`"
            )
        summary = json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
        if int(summary.get("format", 0)) > FORMAT_VERSION:
            raise DashboardsError(f"{folder}: dashboards format {summary['format']} is newer than this code")
        return cls(summary, folder=folder, manual=read_manual_labels(folder))


# ---- search ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelHit:
    latent: int
    score: float
    label: str
    label_source: str
    matched: str  # why it matched, e.g. "top token 'bank'"
    density: float
    max_act: float


def _token_score(q: str, tokens: Sequence[str], exact: float, partial: float, what: str) -> tuple[float, str]:
    """Best match of `q` among ranked tokens: exact (stripped, case-insensitive) beats substring."""
    best, why = 0.0, ""
    for rank, tok in enumerate(tokens):
        t = tok.strip().lower()
        score = exact if t == q else partial if q in t and len(q) >= 2 else 0.0
        score -= 0.05 * rank * (score > 0)
        if score > best:
            best, why = score, f"{what} {tok!r}"
    return best, why


def _match(q: str, label: str, manual: bool, tops: Sequence[str], proms: Sequence[str]) -> tuple[float, str]:
    scores = [
        _token_score(q, tops, 3.0, 1.5, "top token"),
        _token_score(q, proms, 2.0, 1.0, "promotes"),
        # Auto labels only restate the tokens scored above; a human's words are worth matching.
        (4.0, "manual label") if manual and q in label.lower() else (0.0, ""),
    ]
    total = sum(s for s, _ in scores)
    return total, "; ".join(w for s, w in scores if s > 0)


def search_labels(dash: Dashboards, query: str, limit: int = 20) -> list[LabelHit]:
    """Latents whose manual label, top activating tokens or promoted tokens match `query`, best first.
    A multi-word query that matches nothing whole is scored word by word (at half weight)."""
    q = query.strip().lower()
    if not q:
        return []
    idx = dash.index
    hits = []
    for i in range(len(dash)):
        label, source = dash.label(i)
        args = (label, source == "manual", idx["top_tokens"][i], idx["promoted"][i])
        score, why = _match(q, *args)
        if score == 0 and len(q.split()) > 1:
            parts = [_match(w, *args) for w in q.split()]
            score, why = 0.5 * sum(s for s, _ in parts), "; ".join(w for s, w in parts if s > 0)
        if score > 0:
            hits.append(LabelHit(i, score, label, source, why, idx["density"][i], idx["max_act"][i]))
    hits.sort(key=lambda h: (-h.score, -h.max_act))
    return hits[:limit]


@dataclass(frozen=True)
class TextHit:
    latent: int
    act: float  # the latent's max activation over the text's scored tokens
    position: int  # token index (in the ids that were run) where it peaks
    token: str


def text_token_ids(tokenizer: Any, text: str) -> list[int]:
    """The text's ids, after an EOS when the tokenizer adds no BOS: position 0 is never scored (as in
    training), and in packed training contexts a record follows an EOS, so this mirrors that."""
    ids = list(tokenizer(text)["input_ids"])
    sep = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if sep is not None and (not ids or ids[0] not in _special_ids(tokenizer)):
        ids = [sep, *ids]
    return ids


def top_latents_for_text(
    model: Any, tokenizer: Any, sae: SAE, hook_point: str, text: str, limit: int = 10
) -> list[TextHit]:
    """Runs `text` (early exit at the hook) and returns latents ranked by their max activation on it."""
    point = hf_hook_point(hook_point)
    ids = torch.tensor([text_token_ids(tokenizer, text)], device=next(model.parameters()).device)  # (1, T)
    h = run_to_hooks(model, [point], input_ids=ids)[point].to(sae.W_enc.device)  # (1, T, d_in)
    mask = keep_mask(ids, _special_ids(tokenizer), h, MASSIVE_RATIO).to(sae.W_enc.device)
    with torch.inference_mode():
        f = (sae.encode(h).float() * mask[..., None])[0]  # (T, d_sae)
    peak, pos = f.max(dim=0)  # (d_sae,)
    top = peak.topk(min(limit, sae.d_sae))
    name = token_namer(tokenizer)
    flat = ids[0].tolist()
    return [
        TextHit(i, _r(v), int(pos[i]), name(flat[int(pos[i])]))
        for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        if v > 0
    ]


def label_fn(path: str | Path) -> Callable[[int], str] | None:
    """Latent id -> dashboard label for an SAE folder, or None when it has no dashboards."""
    try:
        dash = Dashboards.load(path)
    except DashboardsError:
        return None
    return lambda i: dash.label(i)[0]
