"""Detector specs: one YAML file per detector (`<detectors_dir>/<name>.yaml`), validated with pydantic v2.

Common fields: name, kind, description, scope (which tokens are scored by default), aggregation (how token
scores become a message value by default), threshold (calibrated decision threshold on that value: the
detector fires when value ≥ threshold), target_fpr (the false-positive rate it was calibrated for) and eval
(free-form figures from evaluation). Each kind adds its own parameters; unknown fields are errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from detectors.aggregate import Aggregation
from detectors.errors import DetectorError
from sae_assets.hooks import hf_hook_point

Scope = Literal["completion", "prompt", "both"]
SCOPES: tuple[str, ...] = ("completion", "prompt", "both")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class LatentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int = Field(ge=0)
    weight: float
    label: str = ""


class BaseSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    kind: str
    description: str = ""
    scope: Scope = "completion"
    aggregation: Aggregation = Field(default_factory=Aggregation)
    threshold: float = Field(ge=0.0, le=1.0)
    # Further calibrated thresholds by false-positive rate ("0.05": 0.61), for policies that want another
    # operating point than `threshold` (`threshold: calibrated@0.05`).
    operating_points: dict[str, float] = Field(default_factory=dict)
    target_fpr: float | None = Field(default=None, gt=0.0, lt=1.0)
    eval: dict[str, Any] = Field(default_factory=dict)

    @property
    def concept(self) -> str | None:
        """The labelled concept it was built for (eval.concept, written by `detectors train`; a second
        family such as scam_message differs from its name), None for specs from before it was recorded."""
        value = self.eval.get("concept")
        return value if isinstance(value, str) and value else None

    @field_validator("aggregation")
    @classmethod
    def _bounded_aggregation(cls, agg: Aggregation) -> Aggregation:
        # A spec's threshold lives in [0, 1]; count_over yields a count, so only policies may ask for it.
        if not agg.bounded:
            raise ValueError(f"{agg.kind} yields a count, not a [0, 1] score; use it in a policy instead")
        return agg


class SaeFeaturesSpec(BaseSpec):
    """score_t = sigmoid(scale · (Σ_i weight_i · f_i(t) + bias)) over SAE latent activations f_i(t)."""

    kind: Literal["sae_features"] = "sae_features"
    latents: list[LatentSpec] = Field(min_length=1)
    bias: float = 0.0
    scale: float = Field(default=1.0, gt=0.0)

    @field_validator("latents")
    @classmethod
    def _unique_ids(cls, latents: list[LatentSpec]) -> list[LatentSpec]:
        ids = [lat.id for lat in latents]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"latent id(s) listed twice: {dup}")
        return latents


class ProbeSpec(BaseSpec):
    """Logistic-regression probe; weights in a .safetensors file beside the YAML (see detectors.probe).

    Residual probe: `hook_points` (one or several, HF paths like model.layers.15) are standardised and
    concatenated in the listed order. Latent probe (`on_latents: true`): reads the SAE latents `latent_ids`
    (all of the SAE's latents when omitted) and needs no hook points of its own.
    """

    kind: Literal["probe"] = "probe"
    hook_points: list[str] = Field(default_factory=list)
    weights_file: str = Field(min_length=1)
    on_latents: bool = False
    latent_ids: list[int] | None = None

    @field_validator("hook_points")
    @classmethod
    def _normalise_points(cls, points: list[str]) -> list[str]:
        out = [hf_hook_point(p) for p in points]
        if len(set(out)) != len(out):
            raise ValueError(f"hook point listed twice: {points}")
        return out

    @model_validator(mode="after")
    def _inputs_match_mode(self) -> ProbeSpec:
        if self.on_latents and self.hook_points:
            raise ValueError("a probe with on_latents reads SAE latents; leave hook_points out")
        if not self.on_latents and not self.hook_points:
            raise ValueError("a residual probe needs at least one hook point in hook_points")
        if not self.on_latents and self.latent_ids is not None:
            raise ValueError("latent_ids is only for probes with on_latents: true")
        if self.latent_ids is not None and (
            len(set(self.latent_ids)) != len(self.latent_ids) or min(self.latent_ids, default=0) < 0
        ):
            raise ValueError("latent_ids must be distinct non-negative integers")
        return self


DetectorSpec = SaeFeaturesSpec | ProbeSpec
# kind -> spec model. detectors.registry.register_kind adds new kinds here.
SPEC_TYPES: dict[str, type[BaseSpec]] = {"sae_features": SaeFeaturesSpec, "probe": ProbeSpec}


def parse_spec(raw: Any, source: str = "<spec>") -> BaseSpec:
    """Validate a spec dict; errors name `source` and the field at fault."""
    if not isinstance(raw, dict):
        raise DetectorError(f"{source}: a detector spec must be a mapping, got {type(raw).__name__}")
    kind = raw.get("kind")
    if kind not in SPEC_TYPES:
        valid = ", ".join(sorted(SPEC_TYPES))
        what = "missing field `kind`" if kind is None else f"unknown kind {kind!r}"
        raise DetectorError(f"{source}: {what}; valid kinds: {valid}")
    try:
        return SPEC_TYPES[kind].model_validate(raw)
    except ValidationError as e:
        raise DetectorError(f"{source}: invalid {kind} detector spec: {e}") from None


def load_spec(path: str | Path) -> BaseSpec:
    """Read and validate one YAML spec; every error message starts with the file path."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DetectorError(f"{path}: cannot read detector spec: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise DetectorError(f"{path}: invalid YAML: {e}") from None
    return parse_spec(raw, str(path))


def dump_spec(spec: BaseSpec, path: str | Path) -> Path:
    """Write `spec` as YAML (fields in model order; defaults included so the file is self-describing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = spec.model_dump(mode="json", exclude_none=True)
    path.write_text(yaml.safe_dump(body, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
