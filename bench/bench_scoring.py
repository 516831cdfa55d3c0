"""Scoring throughput: `featurewatch score`-style batched early-exit scoring with the shipped detectors,
side by side with a full forward pass (all 30 blocks + LM head) over the same batches.

Run: .venv/bin/python bench/bench_scoring.py [--rounds 3] [--batch-size 8] [--records 96] [--json out.json]
     [--model NAME|FOLDER] [--device auto|cpu|cuda] [--dtype auto|float32|bfloat16] [--without NAMES]

"with_top" times the same scorer with `--top-k 5`, what `featurewatch score` runs by default: naming each
detector's top latents makes a residual probe's scorer encode all SAE latents (detectors.attribution).

When some shipped detectors read deeper than the SAE's layer, the detectors that read only the SAE's layer
are timed as well ("shallow"): the price of the deeper hook point. `--without a,b` times the shipped set
less those detectors in the same rounds ("without"): the price of shipping them.

Records: the seed test splits of every shipped concept (chat transcripts; the last assistant turn is the
monitored completion), cycled to `--records`. "tokens" are every rendered token the model reads (prompt +
completion, what the forward pass costs), not only the scored ones. Both paths include rendering and
tokenizing. They are interleaved round by round in one process and medians reported, because this machine
is noisy (±30 % between runs).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from detectors.build import shipped_detectors
from detectors.datasets import load_seed
from detectors.extract import sae_hook_point, scoped_positions
from detectors.registry import load_detectors
from detectors.scoring import Scorer
from monitor.model import load_model
from sae_assets.registry import DEFAULT_SAE, resolve_sae_path
from sae_assets.sae import SAE


def _records(concepts: list[str], n: int) -> list[dict[str, Any]]:
    pool = [r for c in concepts for r in load_seed(c, "test")]
    return [{**r, "id": f"{r['id']}#{i}"} for i, r in enumerate(itertools.islice(itertools.cycle(pool), n))]


def _batches(tokenizer: Any, records: list[dict[str, Any]], size: int) -> list[tuple[Any, Any]]:
    """Right-padded (input_ids, attention_mask) per batch, exactly as the scorer's extraction pads them."""
    out = []
    for i in range(0, len(records), size):
        ids = [scoped_positions(tokenizer, r, "both")[0] for r in records[i : i + size]]
        width = max(len(x) for x in ids)
        input_ids = torch.zeros((len(ids), width), dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for j, x in enumerate(ids):
            input_ids[j, : len(x)] = torch.tensor(x)
            mask[j, : len(x)] = 1
        out.append((input_ids, mask))
    return out


def _time_scoring(scorer: Scorer, records: list[dict[str, Any]], batch_size: int) -> float:
    t0 = time.perf_counter()
    results = list(scorer.score_records(records, batch_size))
    secs = time.perf_counter() - t0
    assert not [r for r in results if "error" in r]
    return secs


def _time_full(model: Any, tokenizer: Any, records: list[dict[str, Any]], batch_size: int) -> float:
    """Rendering + full forward passes, so that both paths pay for the chat template and tokenizer."""
    t0 = time.perf_counter()
    batches = _batches(tokenizer, records, batch_size)
    with torch.inference_mode():
        for input_ids, mask in batches:
            model(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False)
    if model.device.type == "cuda":
        torch.cuda.synchronize()  # kernels are asynchronous: time them, not their launch
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--records", type=int, default=96)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="alias, folder or Hugging Face id")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16")
    ap.add_argument("--without", default="", help="also time the shipped set less these (comma-separated)")
    a = ap.parse_args()
    lm = load_model(a.model, device=a.device, dtype=a.dtype)
    folder = resolve_sae_path(DEFAULT_SAE)
    sae = SAE.load(folder).to(lm.device)
    names = shipped_detectors(folder / "detectors")
    dets = load_detectors(names, folder / "detectors", sae, model=lm.model)
    scorer = Scorer(lm.model, lm.tokenizer, sae, dets, top_k=0)
    with_top = Scorer(lm.model, lm.tokenizer, sae, dets, top_k=5)
    # The detectors that read only the SAE's layer: what scoring costs if no detector went deeper.
    sae_point = sae_hook_point(sae)
    shallow = {n: d for n, d in dets.items() if set(d.hook_points()) <= {sae_point}}
    subset = Scorer(lm.model, lm.tokenizer, sae, shallow, top_k=0) if 0 < len(shallow) < len(dets) else None
    left_out = [n.strip() for n in a.without.split(",") if n.strip()]
    unknown = [n for n in left_out if n not in dets]
    if unknown:
        raise SystemExit(f"--without: not shipped: {', '.join(unknown)}; shipped: {', '.join(dets)}")
    rest = {n: d for n, d in dets.items() if n not in left_out}
    without = Scorer(lm.model, lm.tokenizer, sae, rest, top_k=0) if left_out and rest else None
    # Seed records of each detector's concept (a second family such as scam_message names its own).
    concepts = list(dict.fromkeys(d.spec.concept or n for n, d in dets.items()))
    records = _records(concepts, a.records)
    batches = _batches(lm.tokenizer, records, a.batch_size)
    n_tok = sum(int(m.sum()) for _, m in batches)
    _time_full(lm.model, lm.tokenizer, records[: a.batch_size], a.batch_size)  # warm-up allocations
    times: dict[str, list[float]] = {k: [] for k in ("early_exit", "full", "with_top", "shallow", "without")}
    for _ in range(a.rounds):
        times["early_exit"].append(_time_scoring(scorer, records, a.batch_size))
        times["with_top"].append(_time_scoring(with_top, records, a.batch_size))
        times["full"].append(_time_full(lm.model, lm.tokenizer, records, a.batch_size))
        if subset is not None:
            times["shallow"].append(_time_scoring(subset, records, a.batch_size))
        if without is not None:
            times["without"].append(_time_scoring(without, records, a.batch_size))
    med = {k: statistics.median(v) for k, v in times.items() if v}
    out: dict[str, Any] = {
        "detectors": names,
        "hook_points": scorer.points,
        "n_layers": int(lm.model.config.num_hidden_layers),
        "model": a.model,
        "device": str(lm.device),
        "dtype": str(next(lm.model.parameters()).dtype),
        "records": len(records),
        "tokens": n_tok,
        "batch_size": a.batch_size,
        "torch_threads": torch.get_num_threads(),
        "score_texts_s": len(records) / med["early_exit"],
        "score_tokens_s": n_tok / med["early_exit"],
        "full_texts_s": len(records) / med["full"],
        "full_tokens_s": n_tok / med["full"],
        "speedup": med["full"] / med["early_exit"],
        "top5_texts_s": len(records) / med["with_top"],
        "top5_cost": med["with_top"] / med["early_exit"],
    }
    if "shallow" in med:
        out.update(
            shallow_detectors=list(shallow),
            shallow_point=sae_point,
            shallow_texts_s=len(records) / med["shallow"],
            shallow_tokens_s=n_tok / med["shallow"],
            shallow_speedup=med["full"] / med["shallow"],
        )
    if "without" in med:
        out.update(
            without=left_out,
            without_texts_s=len(records) / med["without"],
            without_tokens_s=n_tok / med["without"],
            cost_of_them=med["early_exit"] / med["without"],
        )
    for k, v in out.items():
        print(f"{k:18s} {v:.2f}" if isinstance(v, float) else f"{k:18s} {v}")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
