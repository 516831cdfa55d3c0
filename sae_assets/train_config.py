"""The SAE training config: every knob of `featurewatch sae train`, validated field by field, read from a
JSON or YAML file and saved next to the SAE as `train_cfg.json` (see `sae_assets.train`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from sae_assets.sae import DTYPES

TRAIN_ARCHITECTURES = ("topk", "batchtopk")
B_DEC_INITS = ("geometric_median", "mean")
# sparsify's default: lr = 2e-4 / sqrt(d_sae / 2**14), i.e. 2e-4 at 16384 latents, scaled as 1/sqrt(d_sae)
# (Gao et al. 2024 fit the optimal lr to fall roughly with the square root of the number of latents).
BASE_LR = 2e-4
BASE_LR_LATENTS = 16_384


class TrainConfigError(ValueError):
    """A bad training-config field; `.field` names it and the message says what is valid."""

    def __init__(self, field_name: str, problem: str) -> None:
        self.field = field_name
        super().__init__(f"train config field {field_name!r}: {problem}")


@dataclass(frozen=True)
class TrainConfig:
    """Every training knob. Drives `featurewatch sae train` options and is saved as `train_cfg.json`."""

    architecture: str = "topk"  # topk | batchtopk (batchtopk is saved as jumprelu)
    d_sae: int = 9216  # 16 × 576, SmolLM2-135M's d_model
    k: int = 32  # active latents per token (batchtopk: on average)
    lr: float | None = None  # None: BASE_LR / sqrt(d_sae / BASE_LR_LATENTS)
    batch_size: int = 4096  # tokens per step
    total_tokens: int | None = None  # None: `epochs` passes over the activation store
    epochs: float = 1.0
    warmup_steps: int = 100  # linear lr warm-up from 0
    decay_frac: float = 0.2  # lr decays linearly to 0 over this final fraction of the steps
    aux_k: int = 512  # dead latents used by the AuxK loss (Gao et al.)
    aux_coef: float = 1 / 32  # AuxK loss coefficient (Gao et al.)
    dead_tokens: int | None = None  # None: min(10M, 10% of the run's tokens)
    b_dec_init: str = "geometric_median"  # geometric_median | mean
    b_dec_init_tokens: int = 32_768  # sample size for the b_dec initialisation
    seed: int = 0
    device: str = "auto"  # auto = cuda when available
    dtype: str = "float32"  # dtype of the saved weights; training keeps fp32 weights
    checkpoint_every: int = 1000  # steps; 0 = only at the end
    hook_point: str = "model.layers.15"  # Hugging Face module path (SAELens names are accepted)
    model_name: str = "smollm2-135m-instruct"

    def __post_init__(self) -> None:
        for name, ok, problem in self._checks():
            if not ok:
                raise TrainConfigError(name, f"{problem} (got {getattr(self, name)!r})")

    def _checks(self) -> list[tuple[str, bool, str]]:
        return [
            (
                "architecture",
                self.architecture in TRAIN_ARCHITECTURES,
                f"must be one of {TRAIN_ARCHITECTURES}",
            ),
            ("d_sae", self.d_sae > 0, "must be > 0"),
            ("k", 0 < self.k <= self.d_sae, "must satisfy 0 < k <= d_sae"),
            ("lr", self.lr is None or self.lr > 0, "must be > 0 (or null for the d_sae-scaled default)"),
            ("batch_size", self.batch_size > 0, "must be > 0"),
            (
                "total_tokens",
                self.total_tokens is None or self.total_tokens >= self.batch_size,
                ">= batch_size",
            ),
            ("epochs", self.epochs > 0, "must be > 0"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
            ("decay_frac", 0 <= self.decay_frac <= 1, "must be in [0, 1]"),
            ("aux_k", self.aux_k >= 0, "must be >= 0 (0 disables AuxK)"),
            ("aux_coef", self.aux_coef >= 0, "must be >= 0"),
            ("dead_tokens", self.dead_tokens is None or self.dead_tokens > 0, "must be > 0 or null"),
            ("b_dec_init", self.b_dec_init in B_DEC_INITS, f"must be one of {B_DEC_INITS}"),
            ("b_dec_init_tokens", self.b_dec_init_tokens > 0, "must be > 0"),
            (
                "device",
                self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
                "auto|cpu|cuda",
            ),
            ("dtype", self.dtype in DTYPES, f"must be one of {tuple(DTYPES)}"),
            ("checkpoint_every", self.checkpoint_every >= 0, "must be >= 0"),
            ("hook_point", bool(self.hook_point), "must not be empty"),
            ("model_name", bool(self.model_name), "must not be empty"),
        ]

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else BASE_LR / math.sqrt(self.d_sae / BASE_LR_LATENTS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TrainConfig:
        """Build from a JSON/YAML mapping; unknown fields and wrong types raise TrainConfigError."""
        known = {f.name: str(f.type) for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, value in raw.items():
            if name not in known:
                raise TrainConfigError(str(name), f"unknown field; valid: {', '.join(known)}")
            values[name] = _coerce(name, known[name], value)
        return cls(**values)


def _coerce(name: str, type_name: str, value: Any) -> Any:
    """YAML reads `2e-4` as a string and JSON has no int/float split; convert to the field's type."""
    if value is None:
        if "None" in type_name:
            return None
        raise TrainConfigError(name, "must not be null")
    base = type_name.replace(" | None", "")
    try:
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(str(value).replace("_", "")) if isinstance(value, str) else int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
    except ValueError:
        raise TrainConfigError(name, f"expected {base}, got {value!r}") from None
    if not isinstance(value, str):
        raise TrainConfigError(name, f"expected a string, got {value!r}")
    return value


def load_train_config(path: str | Path) -> dict[str, Any]:
    """Raw fields of a `.json`, `.yaml` or `.yml` config file (validated later by `TrainConfig.from_dict`)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from e
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise TrainConfigError("<file>", f"{path} must hold a mapping of field: value")
    return raw
