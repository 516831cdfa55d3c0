"""Detector kinds by name, and loading detectors from a directory of YAML specs — failing closed.

Any problem (unknown detector or kind, broken spec or weights file, latent ids outside the SAE, probe
hook points or widths that do not match the SAE/model) raises DetectorError whose message names the file
and lists what is valid. Nothing is ever skipped silently: a monitor with a missing detector is unsafe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from detectors.base import Detector
from detectors.errors import DetectorError
from detectors.spec import SPEC_TYPES, BaseSpec, load_spec
from sae_assets.sae import SAE

SPEC_SUFFIX = ".yaml"
# kind -> builder(spec, sae=..., base_dir=..., model=...) -> Detector; filled by @register_kind.
_BUILDERS: dict[str, Callable[..., Detector]] = {}
T = TypeVar("T", bound=type)


def register_kind(kind: str, spec_type: type[BaseSpec] | None = None) -> Callable[[T], T]:
    """Class decorator: the class's `from_spec(spec, *, sae, base_dir, model)` builds detectors of `kind`.
    `spec_type` (a BaseSpec subclass) is how YAML of that kind is validated."""

    def deco(cls: T) -> T:
        builder = getattr(cls, "from_spec", None)
        if builder is None:
            raise TypeError(f"{cls.__name__} needs a from_spec classmethod to register as {kind!r}")
        old = _BUILDERS.get(kind)
        if old is not None and getattr(old, "__qualname__", None) != builder.__qualname__:
            raise ValueError(f"detector kind {kind!r} is already registered")
        _BUILDERS[kind] = builder
        if spec_type is not None:
            SPEC_TYPES[kind] = spec_type
        return cls

    return deco


def _ensure_builtin_kinds() -> None:
    """Import the built-in kinds so they register, however this package was imported. (Imported here,
    not at module top, because those modules import register_kind from this one.)"""
    import detectors.probe
    import detectors.sae_features  # noqa: F401


def registered_kinds() -> list[str]:
    _ensure_builtin_kinds()
    return sorted(_BUILDERS)


def build_detector(
    spec: BaseSpec,
    sae: SAE | None = None,
    base_dir: str | Path = ".",
    *,
    model: nn.Module | None = None,
) -> Detector:
    """A detector from a validated spec. `base_dir` resolves relative weight files (the YAML's folder).
    With `sae`/`model` given, latent ids and hook points/widths are checked against them."""
    _ensure_builtin_kinds()
    builder = _BUILDERS.get(spec.kind)
    if builder is None:
        raise DetectorError(
            f"detector {spec.name!r}: unknown kind {spec.kind!r}; registered kinds: "
            f"{', '.join(registered_kinds()) or 'none'}"
        )
    try:
        return builder(spec, sae=sae, base_dir=Path(base_dir), model=model)
    except DetectorError:
        raise
    except Exception as e:  # a corrupt weights file etc.: report it as a detector error, still failing
        raise DetectorError(f"detector {spec.name!r}: {type(e).__name__}: {e}") from e


def available_detectors(detectors_dir: str | Path) -> list[str]:
    """Names of the specs in `detectors_dir` (`<name>.yaml`), sorted."""
    folder = Path(detectors_dir)
    return sorted(p.stem for p in folder.glob(f"*{SPEC_SUFFIX}") if p.is_file())


def load_detector(name: str, detectors_dir: str | Path, sae: SAE | None = None, **kw: Any) -> Detector:
    folder = Path(detectors_dir)
    if not folder.is_dir():
        raise DetectorError(f"detectors directory {folder} does not exist")
    valid = available_detectors(folder)
    if name not in valid:
        raise DetectorError(
            f"unknown detector {name!r} in {folder}; valid: {', '.join(valid) or 'none (no *.yaml files)'}"
        )
    path = folder / f"{name}{SPEC_SUFFIX}"
    spec = load_spec(path)
    if spec.name != name:
        raise DetectorError(f"{path}: spec name {spec.name!r} differs from the file name {name!r}")
    try:
        return build_detector(spec, sae, base_dir=folder, **kw)
    except DetectorError as e:
        raise DetectorError(f"{path}: {e}") from e.__cause__


def load_detectors(
    names: Sequence[str], detectors_dir: str | Path, sae: SAE | None = None, *, model: nn.Module | None = None
) -> dict[str, Detector]:
    """{name: detector} for `names`, in order. The first problem raises DetectorError (fail closed)."""
    dup = sorted({n for n in names if list(names).count(n) > 1})
    if dup:
        raise DetectorError(f"detector(s) requested twice: {', '.join(dup)}")
    return {name: load_detector(name, detectors_dir, sae, model=model) for name in names}
