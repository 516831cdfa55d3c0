"""Training on the public datasets' train splits: disjoint from the eval's test suites, recorded in the spec,
and the TF-IDF baseline rebuilt from that record. Fake dataset files under tmp_path stand in for ../shared."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sae_testing import tiny_sae
from typer.testing import CliRunner

from detectors.build import source_weights
from detectors.datasets import (
    EVAL_SUITES,
    EvalSuite,
    TrainingData,
    group_key,
    public_train_records,
    read_records,
)
from detectors.spec import load_spec
from monitor.cli import app

runner = CliRunner()
SCAM = "Urgent: verify your bank password at this link or your account is closed"
HAM = "Meeting moved to three pm, see the agenda attached for the budget review"


def _write(path: Path, recs: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _fake_shared(root: Path) -> Path:
    """Files named like the real scam datasets (so the real EVAL_SUITES apply) plus a paired toy set."""
    emails = [
        {"id": f"e{k}{i}", "text": f"{SCAM if lab else HAM} {k} {i}", "label": lab, "meta": {"kind": k}}
        for k, lab, n in (("phishing", 1, 40), ("spam", 1, 30), ("ham", 0, 60))
        for i in range(n)
    ]
    sms = [
        {"id": f"s{i}", "text": f"{SCAM if i % 3 == 0 else HAM} sms {i}", "label": int(i % 3 == 0)}
        for i in range(60)
    ]
    pairs = [
        {"id": f"p{i}-{lab}", "text": f"{SCAM if lab else HAM} {i}", "label": lab, "meta": {"pair_id": i}}
        for i in range(30)
        for lab in (0, 1)
    ]
    _write(root / "datasets" / "scam_emails.jsonl", emails)
    _write(root / "datasets" / "scam_sms_spam.jsonl", sms)
    _write(root / "datasets" / "toy_pairs.jsonl", pairs)
    return root


@pytest.fixture()
def shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = _fake_shared(tmp_path / "shared")
    monkeypatch.setenv("FEATUREWATCH_SHARED_DIR", str(root))
    return root


def _test_ids(suites: list[EvalSuite]) -> dict[str, set[str]]:
    """Every test-split record id per dataset, over all suites (uncapped)."""
    out: dict[str, set[str]] = {}
    for s in suites:
        out.setdefault(s.dataset, set()).update(str(r["id"]) for r in s.load(max_n=10**6))
    return out


def test_public_train_never_sees_a_test_split_record(shared: Path) -> None:
    train = public_train_records("scam", 1000)
    test = _test_ids(EVAL_SUITES["scam"])
    assert train and test["scam_emails"] and test["scam_sms_spam"]
    for rec in train:
        ds = next(s.dataset for s in EVAL_SUITES["scam"] if s.name == rec["suite"])
        assert str(rec["id"]) not in test[ds], rec["id"]
    # Train + test cover each file exactly (the split partitions it); ham shared by two suites is kept once.
    ids = [(r["suite"] == "sms-spam", r["id"]) for r in train]
    assert len(ids) == len(set(ids))
    n_emails = len(read_records(shared / "datasets" / "scam_emails.jsonl"))
    assert sum(1 for r in train if r["suite"] != "sms-spam") + len(test["scam_emails"]) == n_emails
    # Every record is in chat form, its label describes the assistant turn.
    assert all(r["messages"][-1]["role"] == "assistant" for r in train)


def test_public_train_keeps_pairs_whole_balanced_and_deterministic(shared: Path) -> None:
    suites = {"toy": [EvalSuite("pairs", "toy_pairs", {}, 400, "Write a message.")]}
    train = public_train_records("toy", 10, suites=suites)
    assert len(train) == 10 and sum(r["label"] for r in train) == 5
    assert train == public_train_records("toy", 10, suites=suites)
    test_groups = {group_key(r) for r in suites["toy"][0].load(max_n=10**6)}
    assert not {group_key(r) for r in train} & test_groups  # a pair never straddles the split
    assert public_train_records("toy", 0, suites=suites) == []
    assert public_train_records("toy", 10, suites=suites, only=["other"]) == []
    small = public_train_records("scam", 8, only=["sms-spam"])
    assert {r["suite"] for r in small} == {"sms-spam"} and sum(r["label"] for r in small) == 4


def test_public_train_is_not_capped_by_the_test_suite_size(shared: Path) -> None:
    # The suite cap (max_n) sizes the eval's test records; `--public-train N` asks for N training records.
    suites = {"toy": [EvalSuite("pairs", "toy_pairs", {}, 4, "Write a message.")]}
    assert len(suites["toy"][0].load(max_n=100)) == 4
    train = public_train_records("toy", 16, suites=suites)
    assert len(train) == 16 and sum(r["label"] for r in train) == 8


def test_training_data_round_trips_and_defaults_to_seed_only(shared: Path) -> None:
    data = TrainingData(
        public_per_suite=6, public_suites=("sms-spam",), max_tokens=64, extra_files=("x.jsonl",)
    )
    assert TrainingData.from_dict(data.as_dict()) == data
    assert TrainingData.from_dict(None) == TrainingData()
    recs = data.records("scam")
    seed = [r for r in recs if "suite" not in r]
    assert seed and all(r["split"] == "train" for r in seed)  # the shipped seed train split, then public
    assert {r["suite"] for r in recs if "suite" in r} == {"sms-spam"}


def test_source_weights_give_every_source_the_same_total() -> None:
    w = source_weights(["seed", "seed", "seed", "pub", "other"])
    assert abs(float(w.mean()) - 1.0) < 1e-9
    totals = [float(w[:3].sum()), float(w[3]), float(w[4])]
    assert max(totals) - min(totals) < 1e-9


# ---- CLI end to end on the tiny model -----------------------------------------------------------------
@pytest.fixture()
def sae_dir(tmp_path: Path) -> Path:
    folder = tiny_sae(encoder=False).save(tmp_path / "sae")
    recs = []
    for i in range(12):
        for label, text in ((1, SCAM), (0, HAM)):
            msgs = [
                {"role": "user", "content": f"Ask {i} {label}"},
                {"role": "assistant", "content": f"{text} {i}."},
            ]
            split = "test" if i % 4 == 0 else "train"
            recs.append({"id": f"t{label}-{i}", "label": label, "split": split, "messages": msgs})
    _write(folder / "concepts" / "scam.jsonl", recs)
    return folder


def test_train_with_public_data_records_it_and_eval_uses_it(
    tmp_path: Path, shared: Path, sae_dir: Path, tiny_model_dir: Path
) -> None:
    common = ["--sae", str(sae_dir), "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress"]
    train = ["detectors", "train", "--concept", "scam", "--layers", "model.layers.1,model.layers.2"]
    res = runner.invoke(
        app, [*train, "--public-train", "6", "--max-tokens", "32", "--balance-sources", *common]
    )
    assert res.exit_code == 0, res.output
    spec = load_spec(sae_dir / "detectors" / "scam.yaml")
    assert spec.eval["train"]["balance_sources"] is True
    data = spec.eval["train"]["data"]
    assert data == TrainingData(public_per_suite=6, max_tokens=32).as_dict()
    n_public = len(public_train_records("scam", 6))
    assert spec.eval["train"]["n_pos"] + spec.eval["train"]["n_neg"] == 18 + n_public  # 18 seed train
    assert set(spec.eval["auroc_oof_by_source"]) == {
        "seed",
        "phishing-vs-ham",
        "enron-spam-vs-ham",
        "sms-spam",
    }
    assert spec.hook_points == ["model.layers.1", "model.layers.2"]  # type: ignore[attr-defined]
    out = tmp_path / "eval.json"
    res = runner.invoke(
        app,
        ["detectors", "eval", "--concepts", "scam", "--max-per-suite", "8", "--json-out", str(out), *common],
    )
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())
    trained = next(r for r in rows if r["suite"] == "train")
    assert trained["n_pos"] + trained["n_neg"] == 18 + n_public  # the baseline saw the detectors' records
    assert "6 public train records per suite (all suites)" in trained["note"]
    assert "Trained on: seed train split + 6 public train records" in res.output
    suites = {r["suite"] for r in rows if r["detector"] == "tfidf"}
    assert suites == {"seed-test", "phishing-vs-ham", "enron-spam-vs-ham", "sms-spam"}


def test_train_rejects_an_unknown_public_suite(sae_dir: Path, tiny_model_dir: Path) -> None:
    args = ["detectors", "train", "--concept", "scam", "--public-train", "4", "--public-suites", "nope"]
    res = runner.invoke(app, [*args, "--sae", str(sae_dir), "--model", str(tiny_model_dir)])
    assert res.exit_code == 2 and "nope" in res.output and "sms-spam" in res.output
