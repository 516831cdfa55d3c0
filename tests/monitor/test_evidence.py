"""The audit trail names the SAE latents behind a residual probe: per generated token, the latents that
pushed the probe up (monitor.evidence), equal to what the shadow scorer reports for the same token."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
import yaml
from fw_testing import ALLOW_POLICY, make_settings, running

from detectors.base import TokenFeatures
from monitor.events import DecisionEvent
from monitor.evidence import Latent, TokenEvidence, attributed, most_active

CHAT: Any = [{"role": "user", "content": "Write a haiku about the moon."}]


@pytest.fixture(scope="module")
def server(
    tiny_model_dir: Path, tiny_sae_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """The tiny SAE plus `pushy`, a probe at the SAE's own layer whose direction mixes decoder rows."""
    from detectors.linear import LinearFit
    from detectors.probe import save_probe
    from monitor.runtime import load_runtime
    from monitor.server import create_app
    from sae_assets.sae import SAE

    folder = tmp_path_factory.mktemp("evidence-sae") / "sae"
    shutil.copytree(tiny_sae_dir, folder)
    w_dec = SAE.load(folder).W_dec.detach()
    w = w_dec[3] + 0.5 * w_dec[9] - 0.5 * w_dec[4]
    fit = LinearFit(w, torch.tensor(0.0), torch.zeros(32), torch.full((32,), 0.05))
    save_probe(fit, folder / "detectors" / "pushy.safetensors", hook_points=["model.layers.2"])
    spec = {"name": "pushy", "kind": "probe", "threshold": 0.5, "hook_points": ["model.layers.2"]}
    (folder / "detectors" / "pushy.yaml").write_text(
        yaml.safe_dump({**spec, "weights_file": "pushy.safetensors"})
    )
    policy = tmp_path_factory.mktemp("evidence-policy") / "policy.yaml"
    policy.write_text(ALLOW_POLICY)
    settings = make_settings(tiny_model_dir, folder, policy, detectors=["always", "never", "pushy"])
    rt = load_runtime(settings)
    rt.engine.gen.eos_ids = set()
    events: list[DecisionEvent] = []
    with running(create_app(settings, rt, sinks=[events.append])) as url:
        yield type("S", (), {"url": url, "rt": rt, "events": events, "w_dec": w_dec, "w": w})
    rt.close()


def test_generated_tokens_name_the_latents_behind_the_probe(server: Any) -> None:
    assert server.rt.dset.attributing == ("pushy",)
    with openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0) as client:
        resp = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0)
    ev = server.events[-1]
    assert ev.request_id == resp.id and len(ev.evidence) == 8
    for tok in ev.evidence:
        assert tok["pushes"] == "pushy" and 0 < len(tok["top"]) <= 3  # evidence_top_k = 3
        contribs = [lat["contribution"] for lat in tok["top"]]
        assert all(c > 0 for c in contribs) and contribs == sorted(contribs, reverse=True)
    # Each named latent's contribution is its activation times its push per unit, u = W_dec @ (w / std):
    # the latents named are the ones the probe reads, with the probe's own arithmetic.
    u = server.w_dec @ (server.w / 0.05)
    for tok in ev.evidence:
        for lat in tok["top"]:
            push = float(u[lat["latent_id"]])
            # activations are stored to 3 decimals: allow their rounding, times the push
            assert lat["contribution"] == pytest.approx(lat["activation"] * push, abs=6e-4 * abs(push) + 1e-3)
    assert {lat["latent_id"] for tok in ev.evidence for lat in tok["top"]} & {3, 9}
    assert 4 not in {lat["latent_id"] for tok in ev.evidence for lat in tok["top"]}  # it pushes down


def test_evidence_top_k_zero_keeps_no_latents(server: Any) -> None:
    s = server.rt.settings
    s.evidence_top_k = 0
    try:
        with openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0) as client:
            client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, temperature=0)
    finally:
        s.evidence_top_k = 3
    ev = server.events[-1]
    assert len(ev.evidence) == 4 and all(t["top"] == [] and "pushes" not in t for t in ev.evidence)
    assert all("pushy" in t["scores"] for t in ev.evidence)  # scores are still kept


def test_without_full_latents_the_most_active_watched_latents_are_kept() -> None:
    top = most_active(torch.tensor([0.5, 0.0, 2.0]), [7, 8, 9], k=5)
    assert top == [Latent(9, 2.0), Latent(7, 0.5)]  # silent latents are not evidence
    assert most_active(torch.tensor([1.0]), [7], k=0) == []
    ev = TokenEvidence(0, "x", {"a": 0.25}, top).as_dict(lambda i: f"L{i}")
    assert "pushes" not in ev and ev["top"][0] == {"latent_id": 9, "activation": 2.0, "label": "L9"}


def test_no_attribution_when_no_attributing_detector_scored() -> None:
    feats_args = (torch.zeros(4), {"model.layers.2": torch.zeros(32)}, list(range(4)))
    assert attributed({}, {"a": 0.9}, *feats_args, k=3) is None

    class Fixed:  # a detector whose top features are fixed, to check the choice of detector
        def __init__(self, lat: int) -> None:
            self.lat = lat

        def top_features(self, feats: TokenFeatures, k: int = 5) -> list[dict[str, Any]]:
            assert feats.n_tokens == 1 and feats.latent_ids == list(range(4))
            return [{"latent_id": self.lat, "activation": 1.0, "contribution": 0.5}]

    dets: Any = {"low": Fixed(1), "high": Fixed(2)}
    got = attributed(dets, {"low": 0.2, "high": 0.7}, *feats_args, k=3)
    assert got == ([Latent(2, 1.0, 0.5)], "high")  # the token's highest-scoring detector
    # … relative to its threshold: 0.2 of 0.25 is nearer firing than 0.7 of 0.9
    got = attributed(dets, {"low": 0.2, "high": 0.7}, *feats_args, k=3, thresholds={"low": 0.25, "high": 0.9})
    assert got is not None and got[1] == "low"
    assert attributed(dets, {"other": 0.9}, *feats_args, k=3) is None
