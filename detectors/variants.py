"""The variants a build tries for each kind, and the names that spell them.

A variant is a kind, a pool (the training unit: a record's pooled completion, "last:K" / "mix:K:A" pools of
its end, mean-pooled SAE latents, or every token as its own row), an aggregation (how the served detector
turns per-token scores into a message value) and the probe's C. Pools and aggregations are names, parsed
here, so that a spec's eval and the CLI can spell them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from detectors.aggregate import Aggregation


@dataclass(frozen=True)
class Variant:
    kind: str
    pool: str  # "mean" / "max" / "last:K" / "mix:K:A": one pooled row per record; "token": one per token
    agg: str  # "mean", "max", "topk_mean:K", "last_mean:K" or "mix:K:A"
    C: float = 1.0

    def as_dict(self) -> dict[str, Any]:
        return {"pool": self.pool, "aggregation": self.agg, "C": self.C}


def parse_agg(agg: str) -> Aggregation:
    """A variant's aggregation name as an Aggregation ("topk_mean:8" → top-8 mean, "last_mean:2",
    "mix:2:0.5")."""
    kind, *params = agg.split(":")
    if kind == "mix":
        return Aggregation(kind="mix", k=int(params[0]), alpha=float(params[1]))
    return Aggregation.model_validate({"kind": kind, "k": int(params[0])} if params else kind)


# C = 0.001 was added when public training data came in: with ~1,000 records of 576–1,152 features the
# layer sweep (bench/detector_layers.py) picked the smallest C of the old grid for most layers.
VARIANTS = [
    Variant("probe", p, a, c)
    for p in ("mean", "max")
    for a in ("mean", "max")
    for c in (0.001, 0.01, 0.1, 1.0)
]
VARIANTS += [Variant("sae_features", p, a) for p in ("max", "mean") for a in ("max", "mean")]
# Token-level training (pools=("token", …)): the served aggregation of per-token scores is the mean or a
# top-k mean, so those are the variants; a token-level fit has ~50× more rows, so its grid is smaller.
TOKEN_VARIANTS = [
    Variant("probe", "token", a, c) for a in ("mean", "topk_mean:8") for c in (0.001, 0.01, 0.1)
]
# "latents": a probe on mean-pooled SAE latents (ProbeSpec.on_latents) instead of residuals. It reads which
# features fired, closer to a bag of words than the residual is: on CrowS-Pairs (TF-IDF's strength) it
# scored 0.70 vs the residual probe's 0.62, lower on our chat seed (docs/benchmarks.md, [3/7], session 14).
LATENT_VARIANTS = [Variant("probe", "latents", a, c) for a in ("mean", "max") for c in (0.001, 0.01, 0.1)]
POOLS = ("mean", "max", "token", "last:K", "mix:K:A", "latents")


def last_pool_k(pool: str) -> int | None:
    """K of a "last:K" pool (the mean of a record's last K completion tokens), else None."""
    name, _, k = pool.partition(":")
    return int(k) if name == "last" and k.isdigit() and int(k) >= 1 else None


def mix_pool(pool: str) -> tuple[int, float] | None:
    """(K, A) of a "mix:K:A" pool, A·mean + (1 − A)·(mean of the last K tokens) with 0 < A < 1, else None.
    Served as the `mix` aggregation, which reproduces it exactly (detectors.aggregate)."""
    name, _, rest = pool.partition(":")
    k, _, a = rest.partition(":")
    if name != "mix" or not k.isdigit() or int(k) < 1:
        return None
    try:
        alpha = float(a)
    except ValueError:
        return None
    return (int(k), alpha) if 0.0 < alpha < 1.0 else None


def valid_pool(pool: str) -> bool:
    return (
        pool in ("mean", "max", "token", "latents")
        or last_pool_k(pool) is not None
        or mix_pool(pool) is not None
    )


def last_variants(pool: str) -> list[Variant]:
    """A "last:K" fit (a truth probe reads the end of a statement: bench/detector_falsehood.py) is served
    as the mean of the last K token scores, or as the max over tokens (for answers of several sentences)."""
    k = last_pool_k(pool)
    return [Variant("probe", pool, a, c) for a in (f"last_mean:{k}", "max") for c in (0.001, 0.01, 0.1)]


def mix_variants(pool: str) -> list[Variant]:
    """A "mix:K:A" fit (TruthfulQA reads best over the mean, cities at the end: both in one probe) is served
    only as the `mix` aggregation with the same K and A: any other would not be the fitted function."""
    return [Variant("probe", pool, f"mix:{pool.partition(':')[2]}", c) for c in (0.001, 0.01, 0.1)]


def variants_for(pools: Sequence[str]) -> list[Variant]:
    """Every variant a build with these probe `pools` tries (both kinds), in trial order."""
    variants = [v for v in VARIANTS if v.kind != "probe" or v.pool in pools]
    variants += [v for v in TOKEN_VARIANTS if "token" in pools]
    variants += [v for v in LATENT_VARIANTS if "latents" in pools]
    variants += [v for p in pools if last_pool_k(p) is not None for v in last_variants(p)]
    variants += [v for p in pools if mix_pool(p) is not None for v in mix_variants(p)]
    return variants
