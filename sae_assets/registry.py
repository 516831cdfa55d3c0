"""Shipped SAEs: each lives in `sae_assets/<name>/` (SAELens folder + dashboards + detectors + MANIFEST)."""

from __future__ import annotations

from pathlib import Path

from sae_assets.sae import CFG_FILENAME

ASSETS_DIR = Path(__file__).resolve().parent
# The default SAE the sidecar loads: SmolLM2-135M-Instruct, residual stream after decoder block 15.
DEFAULT_SAE = "smollm2-135m-l15"


def shipped_saes() -> list[str]:
    return sorted(p.parent.name for p in ASSETS_DIR.glob(f"*/{CFG_FILENAME}"))


def resolve_sae_path(name_or_path: str) -> Path:
    """A folder path, or the name of a shipped SAE. Raises FileNotFoundError listing what exists."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    shipped = ASSETS_DIR / name_or_path
    if (shipped / CFG_FILENAME).is_file():
        return shipped
    names = ", ".join(shipped_saes()) or "none shipped yet"
    raise FileNotFoundError(f"SAE {name_or_path!r} is neither a folder nor a shipped SAE (shipped: {names})")
