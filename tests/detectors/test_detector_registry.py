"""Specs and the registry: validation messages name the field and file; loading fails closed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from detectors import registry as registry_mod
from detectors import spec as spec_mod
from detectors.aggregate import Aggregation
from detectors.base import Detector, TokenFeatures
from detectors.errors import DetectorError
from detectors.linear import LinearFit
from detectors.probe import ProbeDetector, save_probe
from detectors.registry import (
    available_detectors,
    build_detector,
    load_detectors,
    register_kind,
    registered_kinds,
)
from detectors.sae_features import SaeFeaturesDetector
from detectors.spec import BaseSpec, SaeFeaturesSpec, dump_spec, load_spec
from sae_assets.sae import SAE, SAEConfig, SAEMetadata


def _sae(d_in: int = 32, d_sae: int = 16) -> SAE:
    meta = SAEMetadata(hook_name="blocks.1.hook_resid_post", extra={"hf_hook_point": "model.layers.1"})
    return SAE(SAEConfig(architecture="standard", d_in=d_in, d_sae=d_sae, metadata=meta))


def _sae_spec(name: str = "phish", **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": name,
        "kind": "sae_features",
        "description": "phishing",
        "threshold": 0.7,
        "latents": [{"id": 3, "weight": 1.5, "label": "password"}, {"id": 5, "weight": -0.5}],
        "bias": -1.0,
    }
    body.update(kw)
    return body


def _write(folder: Path, body: dict[str, Any], name: str | None = None) -> Path:
    path = folder / f"{name or body['name']}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _probe_file(folder: Path, d: int, points: list[str]) -> str:
    fit = LinearFit(torch.ones(d), torch.tensor(0.0), torch.zeros(d), torch.ones(d))
    save_probe(fit, folder / "w.safetensors", hook_points=points)
    return "w.safetensors"


def test_spec_round_trip_and_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, _sae_spec(aggregation={"kind": "ema", "window": 4}))
    spec = load_spec(path)
    assert isinstance(spec, SaeFeaturesSpec)
    assert spec.scope == "completion" and spec.scale == 1.0
    assert spec.aggregation == Aggregation(kind="ema", window=4)
    again = load_spec(dump_spec(spec, tmp_path / "copy" / "phish.yaml"))
    assert again == spec


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"threshold": 1.5}, "threshold"),
        ({"colour": "red"}, "colour"),
        ({"latents": [{"id": -1, "weight": 1.0}]}, "latents.0.id"),
        ({"latents": [{"id": 1, "weight": 1.0}, {"id": 1, "weight": 2.0}]}, "listed twice"),
        ({"scope": "everything"}, "scope"),
        ({"aggregation": {"kind": "count_over", "threshold": 0.5}}, "count"),
    ],
)
def test_invalid_spec_names_file_and_field(tmp_path: Path, change: dict[str, Any], field: str) -> None:
    path = _write(tmp_path, _sae_spec(**change))
    with pytest.raises(DetectorError) as info:
        load_spec(path)
    assert str(path) in str(info.value) and field in str(info.value)


def test_unknown_kind_lists_registered_kinds(tmp_path: Path) -> None:
    path = _write(tmp_path, {**_sae_spec(), "kind": "regex"})
    with pytest.raises(DetectorError, match=r"unknown kind 'regex'; valid kinds: probe, sae_features"):
        load_spec(path)
    assert {"probe", "sae_features"} <= set(registered_kinds())


def test_unknown_detector_name_lists_valid_names(tmp_path: Path) -> None:
    _write(tmp_path, _sae_spec("phish"))
    _write(tmp_path, _sae_spec("malware"))
    assert available_detectors(tmp_path) == ["malware", "phish"]
    with pytest.raises(DetectorError, match=r"unknown detector 'fraud'.*valid: malware, phish"):
        load_detectors(["phish", "fraud"], tmp_path)
    with pytest.raises(DetectorError, match="does not exist"):
        load_detectors(["phish"], tmp_path / "nowhere")


def test_load_detectors_builds_in_order(tmp_path: Path) -> None:
    _write(tmp_path, _sae_spec("phish"))
    _write(tmp_path, _sae_spec("malware"))
    dets = load_detectors(["phish", "malware"], tmp_path, _sae())
    assert list(dets) == ["phish", "malware"]
    assert all(isinstance(d, Detector) for d in dets.values())
    assert isinstance(dets["phish"], SaeFeaturesDetector)


def test_file_name_must_match_spec_name(tmp_path: Path) -> None:
    _write(tmp_path, _sae_spec("phish"), name="other")
    with pytest.raises(DetectorError, match="differs from the file name"):
        load_detectors(["other"], tmp_path)


def test_latent_out_of_range_fails(tmp_path: Path) -> None:
    _write(tmp_path, _sae_spec(latents=[{"id": 16, "weight": 1.0}]))
    with pytest.raises(DetectorError, match=r"phish.yaml.*\[16\] out of range.*0\.\.15"):
        load_detectors(["phish"], tmp_path, _sae(d_sae=16))


def _probe_spec(tmp_path: Path, points: list[str], d: int) -> dict[str, Any]:
    return {
        "name": "probe1",
        "kind": "probe",
        "threshold": 0.5,
        "hook_points": points,
        "weights_file": _probe_file(tmp_path, d, points),
    }


def test_probe_d_in_mismatch_fails(tmp_path: Path, tiny_lm: Any) -> None:
    points = ["model.layers.1", "model.layers.2"]
    _write(tmp_path, _probe_spec(tmp_path, points, d=2 * 16))
    with pytest.raises(DetectorError, match=r"probe d_in 16 .* does not match the SAE/model width 32"):
        load_detectors(["probe1"], tmp_path, _sae(d_in=32))
    with pytest.raises(DetectorError, match="model width 32"):
        load_detectors(["probe1"], tmp_path, model=tiny_lm.model)


def test_probe_hook_point_checks(tmp_path: Path, tiny_lm: Any) -> None:
    _write(tmp_path, _probe_spec(tmp_path, ["model.layers.9"], d=32))
    with pytest.raises(DetectorError, match=r"model.layers.9.*valid: model.layers.0 … model.layers.3"):
        load_detectors(["probe1"], tmp_path, model=tiny_lm.model)
    # Weights trained at other hook points than the spec names are refused.
    body = _probe_spec(tmp_path, ["model.layers.1"], d=32)
    _write(tmp_path, {**body, "hook_points": ["blocks.2.hook_resid_post"]})
    with pytest.raises(DetectorError, match="trained on hook points"):
        load_detectors(["probe1"], tmp_path)


def test_broken_weights_file_fails(tmp_path: Path) -> None:
    body = _probe_spec(tmp_path, ["model.layers.1"], d=32)
    _write(tmp_path, body)
    (tmp_path / "w.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DetectorError, match=r"probe1.yaml.*w.safetensors.*not a readable"):
        load_detectors(["probe1"], tmp_path)
    (tmp_path / "w.safetensors").unlink()
    with pytest.raises(DetectorError, match="does not exist"):
        load_detectors(["probe1"], tmp_path)


def test_probe_round_trip_through_yaml(tmp_path: Path, tiny_lm: Any) -> None:
    _write(tmp_path, _probe_spec(tmp_path, ["model.layers.1"], d=32))
    det = load_detectors(["probe1"], tmp_path, _sae(), model=tiny_lm.model)["probe1"]
    assert isinstance(det, ProbeDetector)
    assert det.hook_points() == ["model.layers.1"] and det.latent_ids() == []
    feats = TokenFeatures(resid={"blocks.1.hook_resid_post": torch.ones(3, 32)})
    assert torch.allclose(det.score_tokens(feats), torch.sigmoid(torch.full((3,), 32.0)))
    assert det.clamp_for_steering() == {}


def test_register_custom_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_mod, "_BUILDERS", dict(registry_mod._BUILDERS))
    monkeypatch.setitem(spec_mod.SPEC_TYPES, "constant", SaeFeaturesSpec)

    @register_kind("constant")
    class Constant(SaeFeaturesDetector):
        @classmethod
        def from_spec(cls, spec: BaseSpec, **kw: Any) -> Constant:
            assert isinstance(spec, SaeFeaturesSpec)
            return cls(spec)

    spec = SaeFeaturesSpec.model_validate({**_sae_spec(), "kind": "sae_features"})
    spec = spec.model_copy(update={"kind": "constant"})
    assert isinstance(build_detector(spec), Constant)
    with pytest.raises(ValueError, match="already registered"):
        register_kind("constant")(SaeFeaturesDetector)
    bad = spec.model_copy(update={"kind": "nope"})
    with pytest.raises(DetectorError, match="registered kinds: constant, probe, sae_features"):
        build_detector(bad)
