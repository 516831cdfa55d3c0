"""Feature dashboards stored with an SAE (like Scaling Monosemanticity's feature pages or Neuronpedia).

For every latent: density, mean/max activation, the top activating examples (a token window around the peak
token with that latent's per-token activations), the tokens it most promotes / suppresses through the
unembedding, its nearest neighbours by decoder cosine, and an automatic label that says it is automatic.

On disk, inside the SAE folder (gzip with mtime 0, so rebuilding identical data gives identical bytes):

    dashboards/summary.json             tokens scored, data sources, build config, format version
    dashboards/index.json.gz            per-latent columns (label, density, max act, top/promoted tokens)
    dashboards/features/NNNNN.jsonl.gz  one JSON line per latent, `shard_size` latents per shard
    dashboards/neighbours.npz           ids int32 (d_sae, n), cos float16 (d_sae, n)
    dashboards/labels.json              optional manual labels {"<id>": "label"}; survive rebuilds

A lookup reads the summary, then only the shard it needs (plus index/neighbours for the neighbours' labels).

This module is the format and its reader (`Dashboards`, manual labels). Building them is
`dashboards_build` (its statistics `dashboards_stats`); finding latents by label or text, `dashboards_search`.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
DASHBOARDS_DIR = "dashboards"
SUMMARY_FILE = "summary.json"
INDEX_FILE = "index.json.gz"
NEIGHBOURS_FILE = "neighbours.npz"
LABELS_FILE = "labels.json"
FEATURES_DIR = "features"
SHARD_SIZE = 256  # latents per shard: a lookup decompresses ~100-200 kB, not the whole file
_SHARD_CACHE = 4
INDEX_TOKENS = 5  # top / promoted tokens kept in the search index


class DashboardsError(ValueError):
    """Missing or unreadable dashboards, or a latent id out of range; the message says what to do."""


# ---- storage --------------------------------------------------------------------------------------
def _gz_write(path: Path, text: str) -> None:
    path.write_bytes(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0))


def _gz_read(path: Path) -> str:
    return gzip.decompress(path.read_bytes()).decode("utf-8")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def dashboards_dir(path: str | Path) -> Path:
    """`path` itself when it holds summary.json, else `path/dashboards` (the SAE folder's)."""
    folder = Path(path)
    return folder if (folder / SUMMARY_FILE).is_file() else folder / DASHBOARDS_DIR


def read_manual_labels(folder: Path) -> dict[int, str]:
    path = folder / LABELS_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DashboardsError(f"{path}: invalid JSON: {e}") from e
    return {int(k): str(v["label"] if isinstance(v, dict) else v) for k, v in raw.items()}


def write_label(sae_folder: str | Path, latent: int, label: str | None) -> None:
    """Set (or with None, remove) the manual label of `latent`; manual labels override auto ones on load."""
    folder = dashboards_dir(sae_folder)
    labels = read_manual_labels(folder)
    if label is None:
        labels.pop(latent, None)
    else:
        labels[latent] = label
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / LABELS_FILE, {str(k): labels[k] for k in sorted(labels)})


def _index_of(feats: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """Column store of what search and neighbour listings need, without opening any shard."""
    return {
        "label": [f["label"] for f in feats],
        "label_source": [f["label_source"] for f in feats],
        "density": [f["density"] for f in feats],
        "max_act": [f["max_act"] for f in feats],
        "top_tokens": [[t["token"] for t in f["top_tokens"]] for f in feats],
        "promoted": [[t["token"] for t in f["promoted"][:INDEX_TOKENS]] for f in feats],
    }


class Dashboards:
    """All latents' dashboards: in memory after `build_dashboards`, lazily read after `load`."""

    def __init__(
        self,
        summary: dict[str, Any],
        *,
        features: list[dict[str, Any]] | None = None,
        neighbours: tuple[np.ndarray, np.ndarray] | None = None,
        folder: Path | None = None,
        manual: dict[int, str] | None = None,
    ) -> None:
        self.summary = summary
        self.folder = folder
        self._features = features
        self._neighbours = neighbours
        self._index: dict[str, list[Any]] | None = _index_of(features) if features is not None else None
        self._shards: dict[int, list[str]] = {}
        self.manual = dict(manual or {})

    def __len__(self) -> int:
        return int(self.summary["d_sae"])

    # ---- lazy parts ----
    @property
    def index(self) -> dict[str, list[Any]]:
        if self._index is None:
            assert self.folder is not None
            self._index = json.loads(_gz_read(self.folder / INDEX_FILE))
        return self._index

    @property
    def neighbours(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32, cos float16), each (d_sae, n_neighbours)."""
        if self._neighbours is None:
            assert self.folder is not None
            with np.load(self.folder / NEIGHBOURS_FILE) as z:
                self._neighbours = (z["ids"], z["cos"])
        return self._neighbours

    def _raw_feature(self, i: int) -> dict[str, Any]:
        if self._features is not None:
            return self._features[i]
        assert self.folder is not None
        size = int(self.summary["shard_size"])
        shard = i // size
        if shard not in self._shards:
            if len(self._shards) >= _SHARD_CACHE:
                self._shards.pop(next(iter(self._shards)))
            self._shards[shard] = _gz_read(self.folder / FEATURES_DIR / f"{shard:05d}.jsonl.gz").splitlines()
        out: dict[str, Any] = json.loads(self._shards[shard][i % size])
        return out

    # ---- lookups ----
    def _check(self, i: int) -> None:
        if not 0 <= i < len(self):
            raise DashboardsError(f"latent {i} is out of range 0..{len(self) - 1}")

    def label(self, i: int) -> tuple[str, str]:
        """(label, label_source) with manual labels winning."""
        self._check(i)
        if i in self.manual:
            return self.manual[i], "manual"
        return self.index["label"][i], self.index["label_source"][i]

    def feature(self, i: int) -> dict[str, Any]:
        """One latent's dashboard, with its neighbours (and their labels) attached."""
        self._check(i)
        feat = dict(self._raw_feature(i))
        if i in self.manual:
            feat.update(label=self.manual[i], label_source="manual", auto_label=feat["label"])
        ids, cos = self.neighbours
        feat["neighbours"] = [
            {"id": int(j), "cos": round(float(c), 3), "label": self.label(int(j))[0]}
            for j, c in zip(ids[i], cos[i], strict=True)
        ]
        return feat

    def features(self) -> Iterator[dict[str, Any]]:
        """Every latent's stored record (no neighbours attached), in id order."""
        for i in range(len(self)):
            yield self._raw_feature(i)

    # ---- persistence ----
    def save(self, sae_folder: str | Path) -> Path:
        """Writes `sae_folder/dashboards/` atomically; existing manual labels are kept (and ours added)."""
        out = Path(sae_folder) / DASHBOARDS_DIR
        tmp = out.with_name(f".{DASHBOARDS_DIR}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / FEATURES_DIR).mkdir(parents=True)
        feats = list(self.features())
        for shard, s in enumerate(range(0, len(feats), SHARD_SIZE)):
            lines = "".join(_dumps(f) + "\n" for f in feats[s : s + SHARD_SIZE])
            _gz_write(tmp / FEATURES_DIR / f"{shard:05d}.jsonl.gz", lines)
        _gz_write(tmp / INDEX_FILE, _dumps(_index_of(feats)))
        ids, cos = self.neighbours
        np.savez_compressed(tmp / NEIGHBOURS_FILE, ids=ids.astype(np.int32), cos=cos.astype(np.float16))
        summary = {**self.summary, "shard_size": SHARD_SIZE}
        _write_json(tmp / SUMMARY_FILE, summary)
        labels = {**(read_manual_labels(out) if out.is_dir() else {}), **self.manual}
        if labels:
            _write_json(tmp / LABELS_FILE, {str(k): labels[k] for k in sorted(labels)})
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        return out

    @classmethod
    def load(cls, path: str | Path) -> Dashboards:
        """Reads summary.json and manual labels only; the index, neighbours and shards load on first use.
        `path` is the SAE folder or its dashboards/ folder."""
        folder = dashboards_dir(path)
        if not (folder / SUMMARY_FILE).is_file():
            raise DashboardsError(
                f"{path}: no dashboards; build them: `featurewatch sae dashboards {path} --data FILE.jsonl`"
            )
        summary = json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
        if int(summary.get("format", 0)) > FORMAT_VERSION:
            raise DashboardsError(f"{folder}: dashboards format {summary['format']} is newer than this code")
        return cls(summary, folder=folder, manual=read_manual_labels(folder))


def label_fn(path: str | Path) -> Callable[[int], str] | None:
    """Latent id -> dashboard label for an SAE folder, or None when it has no dashboards."""
    try:
        dash = Dashboards.load(path)
    except DashboardsError:
        return None
    return lambda i: dash.label(i)[0]
