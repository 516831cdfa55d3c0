"""MANIFEST.json of a shipped SAE: what it is, how it was made, how good it is, and file hashes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST_FILE = "MANIFEST.json"
# Derived or volatile files are not hashed: the manifest itself, and a training checkpoint if one is left.
_SKIP = {MANIFEST_FILE}
_SKIP_DIRS = {"checkpoint", "concepts", "detectors"}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hashed_files(folder: Path) -> dict[str, str]:
    """{relative path: sha256} for the SAE's own files (detectors and concept data version separately)."""
    out: dict[str, str] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and rel.name not in _SKIP and rel.parts[0] not in _SKIP_DIRS:
            out[rel.as_posix()] = sha256_file(p)
    return out


def build_manifest(folder: str | Path, **sections: Any) -> dict[str, Any]:
    """Collect cfg.json, train_cfg.json and the given sections (corpus, eval, timings…) plus hashes."""
    folder = Path(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    train_cfg_path = folder / "train_cfg.json"
    body: dict[str, Any] = {
        "name": folder.name,
        "model": cfg.get("metadata", {}).get("model_name"),
        "hook_name": cfg.get("metadata", {}).get("hook_name"),
        "hf_hook_point": cfg.get("metadata", {}).get("hf_hook_point"),
        "architecture": cfg.get("architecture"),
        "d_in": cfg.get("d_in"),
        "d_sae": cfg.get("d_sae"),
        "training_config": json.loads(train_cfg_path.read_text()) if train_cfg_path.is_file() else None,
        **sections,
        "files": hashed_files(folder),
    }
    return body


def write_manifest(folder: str | Path, **sections: Any) -> Path:
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    path.write_text(json.dumps(build_manifest(folder, **sections), indent=2) + "\n")
    return path


def verify_manifest(folder: str | Path) -> list[str]:
    """Problems found comparing MANIFEST.json's hashes with the files on disk (empty when intact)."""
    folder = Path(folder)
    man = json.loads((folder / MANIFEST_FILE).read_text())
    listed: dict[str, str] = man.get("files", {})
    actual = hashed_files(folder)
    problems = [f"{f}: sha256 differs" for f in listed if f in actual and actual[f] != listed[f]]
    problems += [f"{f}: listed but missing" for f in listed if f not in actual]
    problems += [f"{f}: present but not listed" for f in actual if f not in listed]
    return problems
