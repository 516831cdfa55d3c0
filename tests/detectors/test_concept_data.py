"""The shipped SAE's hand-written concept data: schema, unique ids, and pairs that stay pairs."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from detectors.datasets import group_key, read_records, seed_dir


def _files() -> dict[str, list[dict[str, Any]]]:
    root = seed_dir()
    paths = sorted(root.glob("*.jsonl")) + sorted(root.glob("*/*.jsonl"))
    return {str(p.relative_to(root)): read_records(p) for p in paths}


def test_every_record_has_the_seed_schema_and_a_unique_id() -> None:
    files = _files()
    assert {"scam.jsonl", "heldout/scam_messages.jsonl", "pairs/scam_pairs.jsonl"} <= set(files)
    seen: dict[str, str] = {}
    for name, recs in files.items():
        for r in recs:
            where = f"{name}:{r.get('id')}"
            assert r["id"] not in seen, f"{where} also in {seen.get(r['id'])}"
            seen[r["id"]] = name
            assert r["label"] in (0, 1) and r["split"] in ("train", "test"), where
            msgs = r.get("messages")
            if msgs is None:
                assert isinstance(r.get("text"), str) and r["text"].strip(), where
                continue
            assert msgs[0]["role"] == "user" and msgs[-1]["role"] == "assistant", where
            assert all(m["content"].strip() for m in msgs), where


def test_contrast_pairs_hold_one_genuine_message_and_its_scam_twin() -> None:
    recs = read_records(seed_dir() / "pairs" / "scam_pairs.jsonl")
    pairs: dict[str, list[int]] = defaultdict(list)
    for r in recs:
        # group_key is what keeps twins in one cross-validation fold.
        assert group_key(r) == f"pair_id={r['meta']['pair_id']}", r["id"]
        pairs[r["meta"]["pair_id"]].append(r["label"])
        assert r["kind"] == ("pair_scam" if r["label"] else "pair_genuine"), r["id"]
    assert len(pairs) == 100
    assert all(sorted(labels) == [0, 1] for labels in pairs.values())
