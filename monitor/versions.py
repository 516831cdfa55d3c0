"""Version fingerprints for audit records: which model, SAE and policy produced a decision.

Hashes are sha256 hex digests. Weight files are large (the default model's converted safetensors are
~540 MB, ~1-2 s to hash on 2 CPU cores), so a file's digest is cached under the data dir, keyed by its
path, size and mtime: only the first start after a change pays. The SAE's digest comes from its
MANIFEST.json when it ships one (no hashing at all). The policy's digest is over its canonical parsed
form (JSON of the pinned `Policy`), so it names exactly the rules a request ran under, whatever the
file's comments or layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
_CHUNK = 1 << 20  # bytes read per hashing step
_WEIGHT_GLOBS = ("config.json", "*.safetensors", "*.bin", "*.gguf")
_CACHE_NAME = "file-hashes.json"
_cache_lock = threading.Lock()


def file_sha256(path: Path, cache_dir: Path | None = None) -> str:
    """sha256 of a file's content, cached in `cache_dir` by (path, size, mtime)."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = cache_dir / _CACHE_NAME if cache_dir is not None else None
    cache = _read_cache(cache_file)
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    digest = h.hexdigest()
    if cache_file is not None:
        _write_cache(cache_file, key, digest)
    return digest


def folder_sha256(folder: Path, cache_dir: Path | None = None) -> str | None:
    """One digest over a model folder's config and weight files (name + content digest, sorted)."""
    files = sorted({p for pattern in _WEIGHT_GLOBS for p in folder.glob(pattern) if p.is_file()})
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}:{file_sha256(p, cache_dir)}\n".encode())
    return h.hexdigest()


def sae_sha256(folder: Path, cache_dir: Path | None = None) -> str | None:
    """The SAE weights' digest: from MANIFEST.json when present, else hashed."""
    manifest = folder / "MANIFEST.json"
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text()).get("files", {})
            if isinstance(files.get("sae_weights.safetensors"), str):
                return str(files["sae_weights.safetensors"])
        except (OSError, ValueError):
            log.warning("sae: unreadable %s; hashing the weights instead", manifest)
    weights = folder / "sae_weights.safetensors"
    return file_sha256(weights, cache_dir) if weights.is_file() else None


def model_versions(
    name: str, source: str, sae_name: str, sae_folder: Path, cache_dir: Path
) -> dict[str, str]:
    """Static versions of a running sidecar (the policy's are added per request)."""
    src = Path(source)
    model_hash = folder_sha256(src, cache_dir) if src.is_dir() else None
    sae_hash = sae_sha256(sae_folder, cache_dir)
    return {
        "model": name,
        "model_sha256": model_hash or "unknown",
        "sae": sae_name,
        "sae_sha256": sae_hash or "unknown",
    }


_last_policy: tuple[Any, dict[str, str]] | None = None


def policy_versions(policy: Any) -> dict[str, str]:
    """`policy` (name@version) and `policy_sha256` of a `policies.schema.Policy`. The last answer is kept:
    every request under the same pinned policy object reuses it."""
    global _last_policy
    last = _last_policy
    if last is not None and last[0] is policy:
        return last[1]
    canonical = json.dumps(policy.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    out = {
        "policy": f"{policy.name}@{policy.version}",
        "policy_sha256": hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
    }
    _last_policy = (policy, out)
    return out


def _read_cache(cache_file: Path | None) -> dict[str, str]:
    if cache_file is None or not cache_file.is_file():
        return {}
    try:
        data = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _write_cache(cache_file: Path, key: str, digest: str) -> None:
    with _cache_lock:
        # entries for files that are gone (old temp folders, replaced weights) are dropped
        cache = {k: v for k, v in _read_cache(cache_file).items() if Path(k.split("|")[0]).exists()}
        cache[key] = digest
        tmp = cache_file.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
            tmp.replace(cache_file)
        except OSError:  # a read-only data dir only costs a re-hash next start
            log.warning("could not cache file digests in %s", cache_file.parent)
