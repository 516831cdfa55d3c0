"""`featurewatch score` and `featurewatch detectors …` end to end on the tiny model and a tiny SAE folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from sae_testing import tiny_sae
from typer.testing import CliRunner

from detectors.registry import load_detectors
from monitor.cli import app

runner = CliRunner()
GOOD = [
    {
        "id": "a",
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The lazy dog."}],
    },
    {"id": "b", "text": "Please verify your bank account password at this link."},
    {"id": "c", "messages": [{"role": "user", "content": "Write a haiku about the moon."}]},
]


@pytest.fixture()
def sae_dir(tmp_path: Path) -> Path:
    """An SAE folder (d_in 32 at model.layers.2) with a planted sae_features detector."""
    folder = tiny_sae().save(tmp_path / "sae")
    spec = {
        "name": "planted",
        "kind": "sae_features",
        "threshold": 0.6,
        "latents": [{"id": 3, "weight": 1.0, "label": "three"}, {"id": 5, "weight": 0.5}],
        "bias": -0.5,
    }
    (folder / "detectors").mkdir()
    (folder / "detectors" / "planted.yaml").write_text(yaml.safe_dump(spec))
    return folder


def _write(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _score(tmp_path: Path, sae_dir: Path, model: Path, lines: list[Any], *extra: str) -> Any:
    inp = _write(tmp_path / "in.jsonl", lines)
    args = [
        "score",
        str(inp),
        "--out",
        str(tmp_path / "out.jsonl"),
        "--sae",
        str(sae_dir),
        "--model",
        str(model),
    ]
    return runner.invoke(app, [*args, "--device", "cpu", "--batch-size", "2", "--no-progress", *extra])


def test_score_keeps_ids_and_order_and_reports_bad_lines(
    tmp_path: Path, sae_dir: Path, tiny_model_dir: Path
) -> None:
    lines = [GOOD[0], "{not json", GOOD[1], "", GOOD[2]]
    res = _score(tmp_path, sae_dir, tiny_model_dir, lines, "--detectors", "planted")
    assert res.exit_code == 1, res.output
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(out) == len(lines)
    assert [o["id"] for o in out] == ["a", None, "b", None, "c"]
    assert out[1]["error"].startswith("line 2: invalid JSON") and out[3]["error"] == "line 4: empty line"
    assert "warning: line 2: invalid JSON" in res.output and "warning: line 4" in res.output
    for o in (out[0], out[2], out[4]):
        assert 0.0 <= o["scores"]["planted"] <= 1.0
        assert o["fired"]["planted"] == (o["scores"]["planted"] >= 0.6)
        assert isinstance(o["top_features"]["planted"], list) and o["tokens"] > 0
    assert [out[0]["scope"], out[2]["scope"], out[4]["scope"]] == ["completion", "text", "prompt"]


def test_score_all_good_exits_0_with_default_detectors(
    tmp_path: Path, sae_dir: Path, tiny_model_dir: Path
) -> None:
    res = _score(tmp_path, sae_dir, tiny_model_dir, GOOD)
    assert res.exit_code == 0, res.output
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["id"] for o in out] == ["a", "b", "c"] and all("planted" in o["scores"] for o in out)


def test_score_says_which_detectors_name_no_latents(
    tmp_path: Path, sae_dir: Path, tiny_model_dir: Path
) -> None:
    """A residual probe at a layer the SAE does not read cannot name latents: the CLI says so, so its
    empty top_features are not read as "nothing drove the score"."""
    import torch

    from detectors.linear import LinearFit
    from detectors.probe import save_probe

    fit = LinearFit(torch.ones(32), torch.tensor(0.0), torch.zeros(32), torch.ones(32))
    save_probe(fit, sae_dir / "detectors" / "offlayer.safetensors", hook_points=["model.layers.1"])
    spec = {"name": "offlayer", "kind": "probe", "threshold": 0.5, "hook_points": ["model.layers.1"]}
    spec["weights_file"] = "offlayer.safetensors"
    (sae_dir / "detectors" / "offlayer.yaml").write_text(yaml.safe_dump(spec))
    res = _score(tmp_path, sae_dir, tiny_model_dir, GOOD, "--detectors", "planted,offlayer")
    assert res.exit_code == 0, res.output
    note = " ".join(res.output.split())
    assert "note: offlayer read(s) no SAE latents (the SAE reads model.layers.2)" in note
    assert "planted read" not in note
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert all(o["top_features"]["offlayer"] == [] for o in out)
    quiet = _score(tmp_path, sae_dir, tiny_model_dir, GOOD, "--detectors", "offlayer", "--top-k", "0")
    assert quiet.exit_code == 0 and "note:" not in quiet.output


def test_score_unknown_detector_exits_2_listing_valid(
    tmp_path: Path, sae_dir: Path, tiny_model_dir: Path
) -> None:
    res = _score(tmp_path, sae_dir, tiny_model_dir, GOOD, "--detectors", "planted,nope")
    assert res.exit_code == 2
    assert "unknown detector(s) nope" in res.output and "valid: planted" in res.output
    missing = runner.invoke(app, ["score", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o.jsonl")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_discover_writes_a_loadable_spec_and_list_shows_it(
    tmp_path: Path, sae_dir: Path, tiny_model_dir: Path
) -> None:
    pos = _write(
        tmp_path / "pos.jsonl", [{"id": f"p{i}", "text": f"Verify your bank password {i}."} for i in range(6)]
    )
    neg = _write(
        tmp_path / "neg.jsonl", [{"id": f"n{i}", "text": f"The lazy dog sleeps {i}."} for i in range(6)]
    )
    spec_path = sae_dir / "detectors" / "found.yaml"
    args = ["detectors", "discover", "--pos", str(pos), "--neg", str(neg), "--sae", str(sae_dir)]
    args += ["--model", str(tiny_model_dir), "--device", "cpu", "--top", "5", "--n-latents", "3"]
    res = runner.invoke(app, [*args, "--out", str(spec_path), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "AUROC" in res.output and spec_path.is_file()
    det = load_detectors(["found"], sae_dir / "detectors")["found"]
    assert len(det.latent_ids()) == 3 and 0.0 <= det.spec.threshold <= 1.0

    listed = runner.invoke(app, ["detectors", "list", "--sae", str(sae_dir), "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {r["name"]: r for r in json.loads(listed.output)}
    assert set(rows) == {"found", "planted"} and rows["planted"]["threshold"] == 0.6
    assert rows["planted"]["stream_from"] is None  # calibrated (if at all) on final values
    (sae_dir / "detectors" / "broken.yaml").write_text("name: broken\nkind: nope\n")
    assert runner.invoke(app, ["detectors", "list", "--sae", str(sae_dir)]).exit_code == 1


def test_calibrate_resets_the_threshold(tmp_path: Path, sae_dir: Path, tiny_model_dir: Path) -> None:
    neg = _write(
        tmp_path / "neg.jsonl", [{"id": f"n{i}", "text": f"The lazy dog sleeps {i}."} for i in range(20)]
    )
    args = ["detectors", "calibrate", "planted", "--neg", str(neg), "--sae", str(sae_dir)]
    res = runner.invoke(
        app, [*args, "--model", str(tiny_model_dir), "--device", "cpu", "--target-fpr", "0.1"]
    )
    assert res.exit_code == 0, res.output
    spec = yaml.safe_load((sae_dir / "detectors" / "planted.yaml").read_text())
    assert spec["target_fpr"] == 0.1 and spec["eval"]["recalibrated"]["fpr"] <= 0.1
    assert spec["threshold"] != 0.6
    bad = runner.invoke(app, ["detectors", "calibrate", "nope", "--neg", str(neg), "--sae", str(sae_dir)])
    assert bad.exit_code == 2 and "valid: planted" in bad.output


def test_calibrate_operating_point_keeps_the_threshold(
    tmp_path: Path, sae_dir: Path, tiny_model_dir: Path
) -> None:
    neg = _write(
        tmp_path / "neg.jsonl", [{"id": f"n{i}", "text": f"The lazy dog sleeps {i}."} for i in range(20)]
    )
    before = yaml.safe_load((sae_dir / "detectors" / "planted.yaml").read_text())["threshold"]
    args = [
        "detectors",
        "calibrate",
        "planted",
        "--neg",
        str(neg),
        "--sae",
        str(sae_dir),
        "--operating-point",
    ]
    res = runner.invoke(
        app, [*args, "--model", str(tiny_model_dir), "--device", "cpu", "--target-fpr", "0.2"]
    )
    assert res.exit_code == 0, res.output
    spec = yaml.safe_load((sae_dir / "detectors" / "planted.yaml").read_text())
    assert spec["threshold"] == before and set(spec["operating_points"]) == {"0.2"}
    assert (
        0.0 <= spec["operating_points"]["0.2"] <= 1.0
        and spec["eval"]["operating_points"]["0.2"]["fpr"] <= 0.2
    )


def test_calibrate_on_stream_peaks_keeps_that_basis(
    tmp_path: Path, sae_dir: Path, tiny_model_dir: Path
) -> None:
    """--stream-from N calibrates on each negative's highest running value from token N on and records
    the basis; a later recalibration keeps it, and mixing bases with operating points is refused."""
    path = sae_dir / "detectors" / "planted.yaml"
    path.write_text(path.read_text() + "aggregation: mean\n")  # a running mean can peak early
    neg = _write(
        tmp_path / "neg.jsonl",
        [{"id": f"n{i}", "text": f"Verify the lazy dog {i} sleeps at home tonight."} for i in range(30)],
    )
    base = ["detectors", "calibrate", "planted", "--neg", str(neg), "--sae", str(sae_dir)]
    base += ["--model", str(tiny_model_dir), "--device", "cpu", "--target-fpr", "0.1"]

    def run(*extra: str, out: Path | None = None) -> dict[str, Any]:
        res = runner.invoke(app, [*base, *extra, *(["--out", str(out)] if out else [])])
        assert res.exit_code == 0, res.output
        return dict(yaml.safe_load((out or path).read_text()))

    final = run("--stream-from", "0", out=tmp_path / "final.yaml")
    assert "calibration" not in final["eval"]
    peaks = run("--stream-from", "2")
    assert peaks["eval"]["calibration"] == {"stream_from": 2}
    assert peaks["threshold"] > final["threshold"]  # peaks from token 2 lie at or above the final means
    again = run()  # no flag: the spec's basis
    assert again["threshold"] == peaks["threshold"] and again["eval"]["calibration"] == {"stream_from": 2}
    run("--operating-point")  # same basis: fine
    mixed = runner.invoke(app, [*base, "--operating-point", "--stream-from", "0"])
    assert mixed.exit_code == 2 and "stream peaks from token 2" in " ".join(mixed.output.split())
    listed = runner.invoke(app, ["detectors", "list", "--sae", str(sae_dir), "--json"])
    row = {r["name"]: r for r in json.loads(listed.output)}["planted"]
    assert row["stream_from"] == 2 and row["aggregation_spec"] == "mean"


def _toy_records(n: int = 16, prefix: str = "t") -> list[dict[str, Any]]:
    phrases = {1: "Verify your bank password at this link", 0: "The quick brown fox jumps over the lazy dog"}
    recs = []
    for i in range(n):
        for label, text in phrases.items():
            msgs = [
                {"role": "user", "content": f"Ask {i} {label}"},
                {"role": "assistant", "content": f"{text} {i}."},
            ]
            split = "test" if i % 4 == 0 else "train"
            recs.append({"id": f"{prefix}{label}-{i}", "label": label, "split": split, "messages": msgs})
    return recs


def test_train_then_eval_then_list(tmp_path: Path, sae_dir: Path, tiny_model_dir: Path) -> None:
    (sae_dir / "concepts").mkdir()
    _write(sae_dir / "concepts" / "toy.jsonl", _toy_records())
    common = ["--sae", str(sae_dir), "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress"]
    res = runner.invoke(
        app, ["detectors", "train", "--concept", "toy", "--layers", "model.layers.2", *common]
    )
    assert res.exit_code == 0, res.output
    assert "ships" in res.output and (sae_dir / "detectors" / "toy.yaml").is_file()
    report = tmp_path / "eval.md"
    held = _write(tmp_path / "held.jsonl", _toy_records(3, prefix="h"))  # 3 scams, 3 others
    suites = ["--suite", str(held), "--text-suite", str(held)]
    res = runner.invoke(
        app, ["detectors", "eval", "--concepts", "toy", "--out", str(report), *suites, *common]
    )
    assert res.exit_code == 0, res.output
    text = report.read_text()
    assert "| seed-test | 4 / 4 | tfidf |" in text
    assert "| held | 3 / 3 | tfidf |" in text and "| held:text | 3 / 3 | tfidf |" in text
    assert "held.jsonl, each message read alone" in text
    unlabelled = _write(tmp_path / "unlabelled.jsonl", [{"id": "u1", "text": "hello"}])
    bad = runner.invoke(app, ["detectors", "eval", "--concepts", "toy", "--suite", str(unlabelled), *common])
    assert bad.exit_code == 2 and "--suite" in bad.output and "'u1'" in bad.output
    listed = runner.invoke(app, ["detectors", "list", "--sae", str(sae_dir), "--json"])
    roles = {r["name"]: r["variant_of"] for r in json.loads(listed.output)}
    assert roles == {"planted": None, "toy": None, "toy_probe": "toy", "toy_sae": "toy"}
    scored = _score(tmp_path, sae_dir, tiny_model_dir, GOOD)  # default: the shipped ones, not alternatives
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert scored.exit_code == 0 and set(out[0]["scores"]) == {"planted", "toy"}
    bad = runner.invoke(app, ["detectors", "train", "--concept", "nope", *common])
    assert bad.exit_code == 2 and "nope" in bad.output


def test_train_as_text_adds_the_messages_alone(tmp_path: Path, sae_dir: Path, tiny_model_dir: Path) -> None:
    """--train-as-text trains on each record's monitored message without its conversation, alongside
    the other records, and the spec names the file; a record without a message is refused by name."""
    (sae_dir / "concepts").mkdir()
    _write(sae_dir / "concepts" / "toy.jsonl", _toy_records())
    extra = _write(tmp_path / "pairs.jsonl", _toy_records(6, prefix="p"))
    common = ["--sae", str(sae_dir), "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress"]
    base = [
        "detectors",
        "train",
        "--concept",
        "toy",
        "--layers",
        "model.layers.2",
        "--pools",
        "mean",
        *common,
    ]

    def spec(*args: str) -> dict[str, Any]:
        out = tmp_path / f"out{len(args)}"
        res = runner.invoke(app, [*base, *args, "--out", str(out)])
        assert res.exit_code == 0, res.output
        return dict(yaml.safe_load((out / "toy.yaml").read_text())["eval"]["train"])

    plain = spec("--train", str(extra))
    both = spec("--train", str(extra), "--train-as-text", str(extra))
    assert (both["n_pos"], both["n_neg"]) == (plain["n_pos"] + 6, plain["n_neg"] + 6)
    assert both["data"]["extra_files"] == ["pairs.jsonl", "pairs.jsonl (as text)"]
    empty = _write(tmp_path / "empty.jsonl", [{"id": "e1", "label": 1, "messages": []}])
    bad = runner.invoke(app, [*base, "--train-as-text", str(empty), "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--train-as-text" in bad.output and "'e1'" in bad.output
    unlabelled = _write(tmp_path / "unlabelled.jsonl", [{"id": "u1", "label": 2, "text": "hello"}])
    for flag in ("--train", "--train-as-text", "--test"):
        bad = runner.invoke(app, [*base, flag, str(unlabelled), "--out", str(tmp_path / "bad")])
        assert (
            bad.exit_code == 2 and f"{flag}: records need label 0 or 1" in bad.output and "'u1'" in bad.output
        )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--concept", "scam,bias", "--name", "two"], "needs exactly one --concept"),
        (["--concept", "scam", "--name", "scam_probe"], "not end in _probe / _sae"),
        (["--concept", "scam", "--name", "bad name"], "must match"),
        (["--concept", "scam", "--name", "bias"], "another concept's detector name"),
    ],
)
def test_train_name_is_checked_before_anything_loads(
    sae_dir: Path, tiny_model_dir: Path, args: list[str], message: str
) -> None:
    common = ["--sae", str(sae_dir), "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress"]
    res = runner.invoke(app, ["detectors", "train", *args, *common])
    assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
