"""A tiny SAE for the tiny Llama of tests/conftest.py (d_in 32, hook at model.layers.2), built the same
way everywhere: seed 0, then optional N(0, 1) encoder / decoder weights (so planted latents fire)."""

from __future__ import annotations

import torch

from sae_assets.sae import SAE, SAEConfig, SAEMetadata


def tiny_sae(d_sae: int = 16, *, encoder: bool = True, decoder: bool = False) -> SAE:
    meta = SAEMetadata(hook_name="blocks.2.hook_resid_post", extra={"hf_hook_point": "model.layers.2"})
    torch.manual_seed(0)
    sae = SAE(SAEConfig(architecture="standard", d_in=32, d_sae=d_sae, metadata=meta))
    with torch.no_grad():
        if encoder:
            sae.W_enc.normal_(0, 1.0)
        if decoder:
            sae.W_dec.normal_(0, 1.0)
    return sae
