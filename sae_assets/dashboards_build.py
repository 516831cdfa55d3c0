"""Build every latent's dashboard from a corpus (the stored format: `sae_assets.dashboards`).

`build_dashboards` packs records into contexts, scans them (`sae_assets.dashboards_stats`), and turns each
latent's statistics into one JSON-ready record: density, mean/max activation, top examples, top tokens,
promoted / suppressed tokens and an automatic label.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from sae_assets.collect import pack_contexts
from sae_assets.dashboards import FORMAT_VERSION, INDEX_TOKENS, SHARD_SIZE, Dashboards, DashboardsError
from sae_assets.dashboards_stats import (
    Accumulator,
    DashboardConfig,
    LogitEffects,
    decoder_neighbours,
    logit_effects,
    scan,
    special_ids,
)
from sae_assets.hooks import hf_hook_point
from sae_assets.sae import SAE
from sae_assets.text import read_jsonl


# ---- feature records ----------------------------------------------------------------------------
def sig3(x: float) -> float:
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
                "act": sig3(v),
                "ctx": int(buf["ctx"][i, j]),
                "pos": int(buf["pos"][i, j]),
                "peak": sum(1 for k in kept if k < -lo),  # index of the peak token in `tokens`
                "tokens": [name(ids[k]) for k in kept],
                "acts": [sig3(acts[k]) if acts[k] > 0 else 0 for k in kept],
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
    return [{"token": t, "count": count[t]} for t in ranked[:INDEX_TOKENS]]


def _token_list(ids: Tensor, vals: Tensor, name: Callable[[int], str]) -> list[dict[str, Any]]:
    pairs = zip(ids.tolist(), vals.tolist(), strict=True)
    return [{"token": name(t), "id": t, "logit": sig3(v)} for t, v in pairs]


def _features(
    acc: Accumulator,
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
                "mean_act": sig3(act_sum[i] / n_fired[i]) if n_fired[i] else 0.0,
                "max_act": sig3(act_max[i]),
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
    acc, scored, n_ctx = scan(model, sae, contexts, point, cfg, special_ids(tokenizer), progress)
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
