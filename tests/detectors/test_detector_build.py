"""Datasets (splits, sampling, chat form), building both detector kinds, and the evaluation table."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_testing import tiny_sae

from detectors.build import BuildResult, build_concept_detectors, shipped_detectors
from detectors.datasets import (
    EVAL_SUITES,
    DatasetError,
    EvalSuite,
    load_public,
    load_seed,
    split_records,
    subsample,
    to_chat,
    truncate_records,
)
from detectors.evaluate import evaluate_detectors, render_markdown
from detectors.fitting import assign_folds
from detectors.registry import load_detectors
from sae_assets.sae import SAE

POS = [
    "Please verify your bank account password at this link.",
    "Your bank account is suspended, verify the password at this link.",
    "Click this link to verify your password and avoid suspension.",
]
NEG = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Write a haiku about the moon and the sea.",
]


def _chat(i: int, label: int) -> dict[str, Any]:
    text = (POS if label else NEG)[i % 3] + f" Ref {i}."
    msgs = [{"role": "user", "content": f"Request {i} {label}."}, {"role": "assistant", "content": text}]
    return {
        "id": f"toy-{label}-{i}",
        "label": label,
        "split": "test" if i % 4 == 0 else "train",
        "messages": msgs,
    }


def _pairs(n: int) -> list[dict[str, Any]]:
    """Public-style pairs: one positive and one negative text per pair_id."""
    out = []
    for i in range(n):
        for label, text in ((1, POS[i % 3]), (0, NEG[i % 3])):
            out.append(
                {"id": f"pub-{i}-{label}", "text": f"{text} {i}", "label": label, "meta": {"pair_id": i}}
            )
    return out


# ---- datasets ----------------------------------------------------------------------------------------
def test_split_is_deterministic_stratified_and_keeps_pairs_together() -> None:
    recs = _pairs(30) + [{"id": f"s{i}", "text": "x", "label": i % 2} for i in range(40)]
    test = split_records(recs, "test", salt="f")
    shuffled = recs[:]
    random.Random(1).shuffle(shuffled)
    assert {r["id"] for r in split_records(shuffled, "test", salt="f")} == {r["id"] for r in test}
    train = split_records(recs, "train", salt="f")
    assert len(test) + len(train) == len(recs) and not {r["id"] for r in test} & {r["id"] for r in train}
    pair_ids = [r["meta"]["pair_id"] for r in test if "meta" in r]
    assert all(pair_ids.count(p) == 2 for p in pair_ids) and len(pair_ids) == 2 * 9  # round(0.3 · 30) pairs
    singles = [r for r in test if "meta" not in r]
    assert sum(r["label"] for r in singles) == 6 and len(singles) == 12  # round(0.3 · 20) per label
    assert {r["id"] for r in split_records(recs, "test", salt="g")} != {r["id"] for r in test}


def test_subsample_balances_labels_and_keeps_groups_whole() -> None:
    recs = [{"id": f"n{i}", "label": 0} for i in range(50)] + [{"id": f"p{i}", "label": 1} for i in range(5)]
    sample = subsample(recs, 20, salt="x")
    assert len(sample) == 20 and sum(r["label"] for r in sample) == 5  # the small class gives its share away
    assert sample == subsample(list(reversed(recs)), 20, salt="x")[::-1]
    pairs = subsample(_pairs(20), 10, salt="x")
    assert len(pairs) == 10 and len({r["meta"]["pair_id"] for r in pairs}) == 5


def test_chat_forms() -> None:
    qa = to_chat({"id": 1, "text": "Q: Is the sky green?\nA: Yes, always.", "label": 1})
    assert [m["content"] for m in qa["messages"]] == [
        "Is the sky green?",
        "Yes, always.",
    ] and "text" not in qa
    bbq = to_chat(
        {"id": 2, "text": "Two people met.\nQuestion: Who forgot?\nAnswer: The old man", "label": 1}
    )
    assert bbq["messages"][0]["content"] == "Two people met.\nQuestion: Who forgot?"
    assert bbq["messages"][1]["content"] == "The old man"
    ss = to_chat({"id": 3, "text": "Ctx. Sent.", "meta": {"context": "Ctx.", "sentence": "Sent."}})
    assert ss["messages"][1]["content"] == "Sent." and ss["messages"][0]["content"] == "Continue: Ctx."
    plain = to_chat({"id": 4, "text": "Hello there."}, prompt="Write an email.")
    assert [m["role"] for m in plain["messages"]] == ["user", "assistant"]
    assert plain["messages"][0]["content"] == "Write an email."
    assert to_chat({"id": 5, "messages": qa["messages"]})["messages"] == qa["messages"]


def test_load_public_from_the_shared_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_lm: Any
) -> None:
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "toy_public.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _pairs(20)))
    monkeypatch.setenv("FEATUREWATCH_SHARED_DIR", str(tmp_path))
    test = load_public("toy_public", split="test", chat=True, prompt="Write a message.")
    assert len(test) == 12 and all(r["messages"][1]["content"].endswith(tuple("0123456789")) for r in test)
    assert len(load_public(str(tmp_path / "datasets" / "toy_public.jsonl"), split="train")) == 28
    with pytest.raises(DatasetError, match="toy_public"):
        load_public("missing")
    cut = truncate_records(test[:1], tiny_lm.tokenizer, 2)[0]["messages"][1]["content"]
    assert len(tiny_lm.tokenizer(cut, add_special_tokens=False)["input_ids"]) <= 3


def test_seed_data_and_suites() -> None:
    test = load_seed("scam", "test")
    assert test and all(r["split"] == "test" for r in test)
    with pytest.raises(DatasetError, match="available: bias, deception, falsehood, scam"):
        load_seed("nope")
    names = {s.name for s in EVAL_SUITES["scam"]}
    assert {"phishing-vs-ham", "enron-spam-vs-ham", "sms-spam"} <= names
    assert {"bbq-vs-unknown", "crows-pairs"} <= {s.name for s in EVAL_SUITES["bias"]}
    assert {"got-cities", "truthfulqa"} <= {s.name for s in EVAL_SUITES["falsehood"]}
    assert load_seed("falsehood", "train") and load_seed("falsehood", "test")


def test_folds_keep_groups_together() -> None:
    groups = ["a", "a", "b", "c", "d", "e", "f", "f"]
    labels = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0])
    fold = assign_folds(groups, labels, 3)
    assert fold[0] == fold[1] and fold[6] == fold[7] and int(fold.max()) + 1 <= 3
    for f in fold.unique().tolist():
        assert len(labels[fold != f].unique()) == 2


# ---- build and evaluate ---------------------------------------------------------------------------------
def _calib() -> list[dict[str, Any]]:
    return [{"id": f"c{i}", "text": f"{NEG[i % 3]} Calib {i}."} for i in range(10)]


def _build_toy(
    tiny_lm: Any, sae: SAE, seed_folder: Path, calib: list[dict[str, Any]], out: Path, **kw: Any
) -> BuildResult:
    """Both kinds for the toy concept at layer 2 (the seed's train split from `seed_folder`)."""
    return build_concept_detectors(
        tiny_lm.model,
        tiny_lm.tokenizer,
        sae,
        "toy",
        load_seed("toy", "train", sae=seed_folder),
        calib,
        out,
        layers=["model.layers.2"],
        n_latents=4,
        target_fpr=0.05,
        **kw,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Any) -> tuple[Path, SAE, Any]:
    folder = tmp_path_factory.mktemp("sae")
    sae = tiny_sae(24)
    sae.save(folder)
    recs = [_chat(i, label) for i in range(16) for label in (0, 1)]
    (folder / "concepts").mkdir()
    (folder / "concepts" / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    calib = [*_calib(), {"id": "prompt-only", "messages": [{"role": "user", "content": "Hi"}]}]
    result = _build_toy(
        tiny_lm,
        sae,
        folder,
        calib,
        folder / "detectors",
        test_records=load_seed("toy", "test", sae=folder),
        labels=lambda i: f"latent {i}",
    )
    return folder, sae, result


def test_build_writes_loadable_specs_and_picks_by_test_auroc(
    built: tuple[Path, SAE, Any], tiny_lm: Any
) -> None:
    folder, sae, result = built
    det_dir = folder / "detectors"
    assert sorted(p.name for p in det_dir.iterdir()) == [
        "toy.yaml",
        "toy_probe.safetensors",
        "toy_probe.yaml",
        "toy_sae.yaml",
    ]
    dets = load_detectors(["toy", "toy_probe", "toy_sae"], det_dir, sae, model=tiny_lm.model)
    assert shipped_detectors(det_dir) == ["toy"]
    for name, det in dets.items():
        assert 0.0 <= det.spec.threshold <= 1.0 and det.spec.target_fpr == 0.05, name
    primary, probe, sae_det = dets["toy"].spec.eval, dets["toy_probe"].spec.eval, dets["toy_sae"].spec.eval
    assert primary["selected"] == result.selected and primary["selected_by"] == "auroc_test"
    assert dets["toy"].spec.kind == result.selected and "variant_of" not in primary
    assert probe["variant_of"] == "toy" and sae_det["calibration"]["n_skipped_no_completion"] == 1
    assert probe["calibration"]["n_neg_extra"] == 10 and probe["calibration"]["n_neg_oof"] == 12
    loser = sae_det if result.selected == "probe" else probe
    assert primary["auroc_test"] >= loser["auroc_test"]
    assert probe["auroc_test"] > 0.8  # the toy concept is separable from mean-pooled residuals
    assert all(lat.label.startswith("latent ") for lat in dets["toy_sae"].spec.latents)  # type: ignore[attr-defined]


def test_evaluate_rows_include_the_tfidf_baseline(
    built: tuple[Path, SAE, Any], tiny_lm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, sae, result = built
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "toy_public.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _pairs(20)))
    monkeypatch.setenv("FEATUREWATCH_SHARED_DIR", str(tmp_path))
    suites = {
        "toy": [EvalSuite("pub", "toy_public", {}, 8, "Write a message."), EvalSuite("gone", "missing")]
    }
    rows = evaluate_detectors(
        tiny_lm.model, tiny_lm.tokenizer, sae, folder / "detectors", ["toy"], suites=suites, seed_sae=folder
    )
    got = {(r.suite, r.detector) for r in rows}
    assert got == {(s, d) for s in ("seed-test", "pub") for d in ("probe", "sae_features", "tfidf")} | {
        ("gone", "-"),
        ("train", "-"),
    }
    trained = next(r for r in rows if r.suite == "train")
    assert trained.note == "seed train split" and trained.n_pos + trained.n_neg == 24  # no data record
    seed = {r.detector: r for r in rows if r.suite == "seed-test"}
    assert seed["tfidf"].n_pos == 4 and seed["tfidf"].n_neg == 4 and seed["tfidf"].auroc is not None
    assert seed[result.selected].shipped and not seed["tfidf"].shipped
    pub = [r for r in rows if r.suite == "pub"]
    assert all(r.n_pos + r.n_neg == 8 for r in pub) and all(0 <= (r.auroc or 0) <= 1 for r in pub)
    md = render_markdown(rows)
    assert "## toy" in md and "| seed-test | 4 / 4 | tfidf |" in md and "skipped:" in md
    assert "Trained on: seed train split (12 positive / 12 negative records)." in md and "| train |" not in md


def test_a_second_family_is_written_under_its_name_and_evaluated_on_its_concept(
    built: tuple[Path, SAE, Any], tiny_lm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, sae, _ = built
    out = tmp_path / "detectors"
    result = _build_toy(tiny_lm, sae, folder, _calib(), out, name="toy_message")
    assert (result.name, result.concept) == ("toy_message", "toy")
    assert sorted(p.name for p in out.iterdir()) == [
        "toy_message.yaml",
        "toy_message_probe.safetensors",
        "toy_message_probe.yaml",
        "toy_message_sae.yaml",
    ]
    assert shipped_detectors(out) == ["toy_message"]
    names = ["toy_message", "toy_message_probe", "toy_message_sae"]
    dets = load_detectors(names, out, sae, model=tiny_lm.model)
    assert all(d.spec.eval["concept"] == "toy" for d in dets.values())
    assert dets["toy_message_probe"].spec.eval["variant_of"] == "toy_message"
    assert "toy_message (concept toy)" in dets["toy_message"].spec.description

    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "toy_public.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _pairs(20)))
    monkeypatch.setenv("FEATUREWATCH_SHARED_DIR", str(tmp_path))
    suites = {"toy": [EvalSuite("pub", "toy_public", {}, 8, "Write a message.")]}
    rows = evaluate_detectors(
        tiny_lm.model, tiny_lm.tokenizer, sae, out, ["toy_message"], suites=suites, seed_sae=folder
    )
    # The family's own name labels the rows; its concept's seed test split and suites are what it reads.
    assert {r.concept for r in rows} == {"toy_message"}
    assert {r.suite for r in rows} == {"train", "seed-test", "pub"}
    assert next(r for r in rows if r.suite == "seed-test" and r.detector == "tfidf").n_pos == 4
