"""Probe attribution fidelity: how much of each shipped probe's logit the SAE latents explain, and whether
the latents `top_features` names (detectors.attribution) are the ones its score rests on.

Run: .venv/bin/python bench/probe_attribution.py [--per-concept 200] [--json docs/probe_attribution.json]

For every shipped residual probe that reads the SAE's layer and each record of its concept's seed test split
(chat transcripts; the completion is scored), with the spec's token weights ω_t:
  z       = Σ_t ω_t z_t                   the probe's aggregate logit
  latents = Σ_t ω_t g_t Σ_i a_ti u_i      the part the SAE latents write (u = W_dec @ w̃)
  error   = Σ_t ω_t w̃ · (x_t − x̂_t)       the part in the SAE's reconstruction error
  (the rest: b_dec, the probe's bias and mean, and blocks at other layers, e.g. deception's layer 18)
Reported per detector: R² of z on the latent part across records (how much of the variation between
records the latents carry) and var(error) / var(z); then a deletion test on the records it fires on:
subtract the named latents' decoder writes a_ti·g_t·W_dec[i] from the residual at the SAE's layer and
rescore (the direct effect on the probe; later layers are not re-run), against deleting the 5 most active
latents (what naming by activation would show) and 5 random latents among those that pushed the score up.
The drops are in score units (the spec's aggregation of per-token probabilities).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from detectors.aggregate import aggregate
from detectors.attribution import decoder_attribution, token_weights
from detectors.base import TokenFeatures
from detectors.build import shipped_detectors
from detectors.datasets import load_seed
from detectors.extract import iter_token_features, sae_hook_point
from detectors.probe import ProbeDetector
from detectors.registry import load_detectors
from monitor.model import load_model
from sae_assets.registry import DEFAULT_SAE, resolve_sae_path
from sae_assets.sae import SAE

K = 5  # latents named per detector, as `featurewatch score --top-k` defaults


def _r2(y: list[float], x: list[float]) -> float:
    if len(y) < 3 or statistics.pvariance(x) == 0 or statistics.pvariance(y) == 0:
        return float("nan")
    return statistics.correlation(x, y) ** 2


def _score(det: ProbeDetector, feats: TokenFeatures, point: str, x: torch.Tensor) -> float:
    swapped = TokenFeatures(
        resid={**feats.resid, point: x}, latents=feats.latents, latent_ids=feats.latent_ids
    )
    return aggregate(det.score_tokens(swapped), det.spec.aggregation)


def _delete(x: torch.Tensor, a: torch.Tensor, g: torch.Tensor, sae: SAE, ids: list[int]) -> torch.Tensor:
    """The residual less the decoder writes of latents `ids`: x − Σ_i a_ti·g_t·W_dec[i]  (T, d_in)."""
    if not ids:
        return x
    idx = torch.tensor(ids, dtype=torch.long)
    return x - (a[:, idx] * g[:, None]) @ sae.W_dec.detach().float()[idx]


def _measure(
    det: ProbeDetector, feats: TokenFeatures, sae: SAE, point: str, rng: random.Random
) -> dict[str, Any]:
    x = feats.resid_at(point).float()  # (T, d_in)
    a = feats.latents.float() if feats.latents is not None else torch.zeros(0)  # (T, d_sae)
    g = sae.decode_gain(x)  # (T,)
    s = det.score_tokens(feats)
    w = token_weights(s, det.spec.aggregation).float()  # (T,)
    fit = det.fit
    d_in = x.shape[1]
    block = det.spec.hook_points.index(point)
    w_tilde = (fit.weight / fit.std)[block * d_in : (block + 1) * d_in].float()
    u = decoder_attribution(sae, w_tilde)  # (d_sae,)
    z_t = torch.logit(s.double().clamp(1e-12, 1 - 1e-12)).float()
    x_hat = sae.decode(a, x_for_norm=x).detach().float()
    per_latent = (w[:, None] * a * g[:, None] * u).sum(dim=0)  # (d_sae,) weighted contribution
    value = aggregate(s, det.spec.aggregation)
    out = {
        "z": float((w * z_t).sum()),
        "latents": float(per_latent.sum()),
        "error": float((w * ((x - x_hat) @ w_tilde)).sum()),
        "value": value,
        "fired": value >= det.spec.threshold,
    }
    if not out["fired"]:
        return out
    named = [int(t["latent_id"]) for t in det.top_features(feats, K)]
    active = (w[:, None] * a).sum(dim=0)  # (d_sae,) weighted activation
    by_activation = torch.argsort(active, descending=True)[:K].tolist()
    pushers = [i for i in torch.nonzero(per_latent > 0).flatten().tolist() if i not in named]
    random_ids = rng.sample(pushers, min(K, len(pushers)))
    for key, ids in (
        ("drop_named", named),
        ("drop_most_active", by_activation),
        ("drop_random_pushers", random_ids),
    ):
        out[key] = value - _score(det, feats, point, _delete(x, a, g, sae, ids))
    out["named_share"] = float(per_latent[named].sum() / per_latent.clamp_min(0).sum()) if named else 0.0
    return out


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    z = [r["z"] for r in rows]
    fired = [r for r in rows if r["fired"]]
    res: dict[str, Any] = {
        "records": len(rows),
        "r2_latents": round(_r2(z, [r["latents"] for r in rows]), 3),
        "error_var_share": round(
            statistics.pvariance([r["error"] for r in rows]) / statistics.pvariance(z), 3
        ),
        "fired": len(fired),
    }
    for key in ("drop_named", "drop_most_active", "drop_random_pushers", "named_share"):
        if fired:
            res[key] = round(statistics.mean(r[key] for r in fired), 4)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-concept", type=int, default=200, help="seed test records per concept (at most)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    a = ap.parse_args()
    lm = load_model(a.model, device="cpu")
    folder = resolve_sae_path(DEFAULT_SAE)
    sae = SAE.load(folder)
    point = sae_hook_point(sae)
    names = shipped_detectors(folder / "detectors")
    dets = load_detectors(names, folder / "detectors", sae, model=lm.model)
    probes = {n: d for n, d in dets.items() if isinstance(d, ProbeDetector) and d.attributes_latents()}
    rng = random.Random(0)
    report: dict[str, Any] = {"sae": str(folder.name), "k": K, "detectors": {}}
    for name, det in probes.items():
        concept = det.spec.concept or name
        recs = [r for r in load_seed(concept, "test") if r.get("messages")][: a.per_concept]
        feats_iter = iter_token_features(
            lm.model, lm.tokenizer, recs, det.hook_points(), scope=det.spec.scope, sae=sae, latent_ids=None
        )
        rows = [
            _measure(det, f, sae, point, rng)
            for f in tqdm(feats_iter, total=len(recs), desc=name, unit="rec")
            if f.n_tokens
        ]
        report["detectors"][name] = {"concept": concept, "hook_points": det.hook_points(), **_summary(rows)}
        print(name, json.dumps(report["detectors"][name]))
    if a.json:
        a.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
