"""A random-init copy of a model folder's architecture (config + tokenizer, no weights) for GPU timing.

The device machine cannot fetch the default model and only 64 MiB travel to it, so GPU throughput figures
use SmolLM2-135M's exact architecture with random weights: the same shapes and kernels, hence the same
speed; scores and text are meaningless. Run: python bench/gpu/make_random_model.py CONFIG_DIR OUT_DIR
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main(src: Path, out: Path) -> None:
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(src)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    for f in src.iterdir():  # tokenizer, chat template, generation config
        if f.name != "config.json":
            shutil.copy(f, out / f.name)
    n = sum(p.numel() for p in model.parameters())
    print(f"random-init {config.model_type} ({n / 1e6:.0f} M parameters) -> {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
