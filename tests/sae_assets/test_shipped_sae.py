"""The shipped default SAE: intact files, healthy weights, and real quality on text it never saw."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sae_assets.evaluate import evaluate_sae
from sae_assets.inspect import sae_report
from sae_assets.manifest import MANIFEST_FILE, verify_manifest
from sae_assets.registry import DEFAULT_SAE, resolve_sae_path
from sae_assets.sae import SAE

# Written for this test (not from the training corpus): mixed chat, prose, code and a phishing-style email.
HELDOUT = [
    {
        "messages": [
            {"role": "user", "content": "Can you suggest a quick vegetarian dinner for two?"},
            {
                "role": "assistant",
                "content": "Try a chickpea curry: fry an onion with garlic and ginger, "
                "add curry powder, a tin of chickpeas and a tin of coconut milk, simmer for fifteen minutes "
                "and serve with rice and fresh coriander.",
            },
        ]
    },
    {
        "text": "The lighthouse stood on a granite outcrop at the mouth of the bay. Built in 1871, it guided "
        "fishing boats past the reef for more than a century before an automatic beacon replaced it."
    },
    {
        "text": "def mean(values):\n    if not values:\n        raise ValueError('empty')\n"
        "    return sum(values) / len(values)\n"
    },
    {
        "messages": [
            {"role": "user", "content": "Write a message from a bank about a locked account."},
            {
                "role": "assistant",
                "content": "Dear customer, we detected unusual activity on your "
                "account and have temporarily locked it. To restore access, confirm your password and card "
                "number within 24 hours using the secure link below, or your account will be closed.",
            },
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "If a train travels 60 km in 45 minutes, what is its speed?"},
            {
                "role": "assistant",
                "content": "45 minutes is 0.75 hours, so the speed is 60 / 0.75 = 80 kilometres per hour.",
            },
        ]
    },
] * 3


@pytest.fixture(scope="module")
def shipped() -> Any:
    return resolve_sae_path(DEFAULT_SAE)


def test_manifest_hashes_match(shipped: Any) -> None:
    assert (shipped / MANIFEST_FILE).is_file()
    assert verify_manifest(shipped) == []


def test_report_is_healthy_and_meets_shape_targets(shipped: Any) -> None:
    report = sae_report(shipped)
    assert report["problems"] == []
    cfg = report["config"]
    assert cfg["d_in"] == 576 and cfg["d_sae"] >= 8192
    assert cfg["architecture"] == "jumprelu", "watched-latents fast path needs per-latent thresholds"
    man = json.loads((shipped / MANIFEST_FILE).read_text())
    assert man["corpus"]["train_tokens"] >= 2_000_000


@pytest.mark.real_model
def test_reconstructs_unseen_text(real_lm: Any, shipped: Any) -> None:
    sae = SAE.load(shipped)
    m = evaluate_sae(
        real_lm.model,
        real_lm.tokenizer,
        sae,
        HELDOUT,
        sae.cfg.metadata.extra["hf_hook_point"],
        max_tokens=1500,
        context_size=128,
    )
    assert m["tokens"] >= 500
    assert m["explained_variance"] >= 0.7, m
    assert m["l0"] <= 64, m
    assert m["ce_loss_recovered"] >= 0.8, m
