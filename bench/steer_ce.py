"""Does clamping a concept latent to zero change anything else? CE loss on a held-out slice, clean vs clamped.

Run: .venv/bin/python bench/steer_ce.py --data HELDOUT.jsonl --latent ID [--latent ID…] [--max-tokens 20000]
Prints one JSON object: ce_clean, ce_clamped (latents forced to 0 wherever they fire), the difference, the
fraction of tokens where the latents were active, and the same CE restricted to tokens where they were not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from monitor.model import load_model
from sae_assets.collect import keep_mask, pack_contexts
from sae_assets.hooks import LatentWatch, Steering, sae_hooks
from sae_assets.registry import DEFAULT_SAE, resolve_sae_path
from sae_assets.sae import SAE
from sae_assets.text import read_jsonl


def token_ce(model, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """(B, T) ids -> (B, T-1) next-token cross-entropy in nats."""
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (B, T-1, vocab)
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--latent", type=int, action="append", required=True)
    ap.add_argument("--sae", default=DEFAULT_SAE)
    ap.add_argument("--max-tokens", type=int, default=20_000)
    ap.add_argument("--context-size", type=int, default=128)
    args = ap.parse_args()
    lm = load_model()
    sae = SAE.load(resolve_sae_path(args.sae))
    point = sae.cfg.metadata.extra.get("hf_hook_point", "model.layers.15")
    special = sorted(set(lm.tokenizer.all_special_ids))
    records = (rec for _, rec in read_jsonl(args.data))
    clean_all, clamp_all, active_all, _mask_all = [], [], [], []
    n = 0
    for ctx in pack_contexts(lm.tokenizer, records, args.context_size):
        ids = torch.tensor([ctx])
        watch = LatentWatch(sae, args.latent)
        with sae_hooks(lm.model, point, watch=watch):
            clean = token_ce(lm.model, ids)
        assert watch.latest is not None
        active = (watch.latest[0, 1:] > 0).any(-1)  # (T-1,) latent fired on the predicting token
        st = Steering(sae)
        st.set_all(1, dict.fromkeys(args.latent, 0.0))
        with sae_hooks(lm.model, point, steering=st):
            clamped = token_ce(lm.model, ids)
        mask = keep_mask(ids, special)[0, 1:]
        clean_all.append(clean[0][mask])
        clamp_all.append(clamped[0][mask])
        active_all.append(active[mask])
        n += int(mask.sum())
        if n >= args.max_tokens:
            break
    c, s, a = torch.cat(clean_all), torch.cat(clamp_all), torch.cat(active_all)
    out = {
        "latents": args.latent,
        "tokens": int(c.numel()),
        "active_fraction": float(a.float().mean()),
        "ce_clean": float(c.mean()),
        "ce_clamped": float(s.mean()),
        "ce_delta": float(s.mean() - c.mean()),
        "ce_delta_where_inactive": float((s[~a] - c[~a]).mean()) if (~a).any() else 0.0,
        "max_abs_delta_where_inactive": float((s[~a] - c[~a]).abs().max()) if (~a).any() else 0.0,
        "ce_delta_where_active": float((s[a] - c[a]).mean()) if a.any() else 0.0,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
