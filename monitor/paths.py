"""Where featurewatch keeps its data (model cache, embedded Redis file, spool)."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """`FEATUREWATCH_DATA_DIR`, else `~/.cache/featurewatch`. Created on first use."""
    raw = os.environ.get("FEATUREWATCH_DATA_DIR")
    path = Path(raw).expanduser() if raw else Path.home() / ".cache" / "featurewatch"
    path.mkdir(parents=True, exist_ok=True)
    return path
