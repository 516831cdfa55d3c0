"""The shipped SAE's hand-written concept data: schema, unique ids, and pairs that stay pairs."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import pytest

from detectors.datasets import group_key, read_records, seed_dir


def _files() -> dict[str, list[dict[str, Any]]]:
    root = seed_dir()
    paths = sorted(root.glob("*.jsonl")) + sorted(root.glob("*/*.jsonl"))
    return {str(p.relative_to(root)): read_records(p) for p in paths}


def test_every_record_has_the_seed_schema_and_a_unique_id() -> None:
    files = _files()
    assert {
        "scam.jsonl",
        "heldout/scam_messages.jsonl",
        "heldout/scam_messages_b7.jsonl",
        "heldout/scam_messages_b9.jsonl",
        "heldout/scam_messages_b11.jsonl",
        "heldout/scam_messages_b12.jsonl",
        "heldout/scam_messages_b14.jsonl",
        "pairs/scam_pairs.jsonl",
    } <= set(files)
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
    assert len(pairs) == 320
    assert all(sorted(labels) == [0, 1] for labels in pairs.values())


@pytest.mark.parametrize(
    ("name", "n", "kinds"),
    [
        ("scam_messages_b7.jsonl", 120, ("legit_mail", "scam_mail", "legit_text", "scam_text")),
        ("scam_messages_b9.jsonl", 80, ("legit_text", "scam_text")),
        ("scam_messages_b11.jsonl", 100, ("legit_text", "scam_text")),
        ("scam_messages_b12.jsonl", 100, ("legit_text", "scam_text")),
        ("scam_messages_b14.jsonl", 100, ("legit_text", "scam_text")),
    ],
)
def test_later_heldout_sets_never_name_the_label_in_the_prompt(
    name: str, n: int, kinds: tuple[str, ...]
) -> None:
    """heldout/scam_messages_b7.jsonl, _b9, _b11, _b12 and _b14 test whether a detector reads the message,
    not the request: their user turns describe channel, sender and occasion only, alike for both labels."""
    recs = read_records(seed_dir() / "heldout" / name)
    assert len(recs) == n and sum(r["label"] for r in recs) == n // 2
    tell = re.compile(r"scam|phish|fake|fraud|suspicious|legit|\bcon\b|genuine|\breal\b", re.I)
    for r in recs:
        assert not tell.search(r["messages"][0]["content"]), r["id"]
        assert r["split"] == "test" and r["kind"] in kinds, r["id"]
        assert r["kind"].startswith("scam") == bool(r["label"]), r["id"]


def test_pairs_from_batches_8_10_and_13_share_one_request() -> None:
    """The twins of batches 8, 10 and 13 (and half of batch 6's) share one user turn that does not name the
    label, so only the message tells them apart."""
    tell = re.compile(r"scam|phish|fake|fraud|suspicious|legit|\bcon\b|genuine|\breal\b", re.I)
    prompts: dict[str, set[str]] = defaultdict(set)
    for r in read_records(seed_dir() / "pairs" / "scam_pairs.jsonl"):
        if int(r["meta"]["pair_id"].split("-")[0][1:]) in (8, 10, 13):
            prompts[r["meta"]["pair_id"]].add(r["messages"][0]["content"])
            assert not tell.search(r["messages"][0]["content"]), r["id"]
    assert len(prompts) == 170 and all(len(p) == 1 for p in prompts.values())
