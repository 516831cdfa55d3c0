"""`featurewatch policy check` through typer's runner."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import monitor.cli_policy as cli_policy
from monitor.cli_policy import policy_app
from policies import DEFAULT_POLICY_PATH

runner = CliRunner()


SHIPPED = Path(__file__).resolve().parents[2] / "sae_assets" / "smollm2-135m-l15" / "detectors"


@pytest.fixture
def detectors_dir(tmp_path: Path) -> Path:
    """The shipped specs the default policy uses (YAML only: the checks need no weights)."""
    folder = tmp_path / "detectors"
    folder.mkdir()
    for name in ("scam", "deception", "bias", "bias_sae", "falsehood"):
        (folder / f"{name}.yaml").write_text((SHIPPED / f"{name}.yaml").read_text())
    return folder


def test_check_default_policy_ok(detectors_dir: Path) -> None:
    res = runner.invoke(
        policy_app, ["check", str(DEFAULT_POLICY_PATH), "--detectors-dir", str(detectors_dir)]
    )
    assert res.exit_code == 0, res.output
    assert "OK: 8 rules" in res.stdout and "scam-completion-block" in res.stdout


def test_check_bad_policy_lists_every_issue(tmp_path: Path, detectors_dir: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrules:\n  - id: a\n    detector: scamm\n    threshold: 0.5\n    action: blok\n")
    res = runner.invoke(policy_app, ["check", str(bad), "--detectors-dir", str(detectors_dir)])
    assert res.exit_code == 1
    lines = res.stdout.splitlines()
    assert lines == [
        f"{bad}:4: rules[0].detector: unknown detector 'scamm' "
        "(valid: bias, bias_sae, deception, falsehood, scam)",
        f"{bad}:6: rules[0].action: unknown action 'blok' (valid: allow, log, flag, steer, block)",
    ]
    assert "2 issue(s)" in res.stderr


def test_check_exit_codes_for_bad_input(tmp_path: Path) -> None:
    res = runner.invoke(policy_app, ["check", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "cannot read policy file" in res.stderr
    res = runner.invoke(
        policy_app, ["check", str(DEFAULT_POLICY_PATH), "--detectors-dir", str(tmp_path / "no")]
    )
    assert res.exit_code == 2 and "--detectors-dir" in res.stderr


def test_default_detectors_from_the_default_sae(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, detectors_dir: Path
) -> None:
    (detectors_dir / "deception.yaml").unlink()
    monkeypatch.setattr(cli_policy, "_default_detectors_dir", lambda: (detectors_dir, "shipped"))
    res = runner.invoke(policy_app, ["check", str(DEFAULT_POLICY_PATH)])
    assert res.exit_code == 1 and "unknown detector 'deception' (valid: bias, bias_sae, falsehood, scam)" in (
        " ".join(res.stdout.split())
    )
    monkeypatch.setattr(cli_policy, "_default_detectors_dir", lambda: (None, "not installed"))
    res = runner.invoke(policy_app, ["check", str(DEFAULT_POLICY_PATH)])
    assert res.exit_code == 0 and "detectors not checked" in res.stderr


def test_check_and_publish_refuse_what_the_server_refuses(tmp_path: Path, detectors_dir: Path) -> None:
    """Beyond names: the spec-level checks the server runs (here: the scam flag judged at token 8 while
    the shipped scam thresholds are calibrated on stream peaks from token 16; an operating point the
    spec lacks). `publish` refuses before it touches Redis, so nothing reaches the replicas."""
    text = DEFAULT_POLICY_PATH.read_text()
    early = tmp_path / "early.yaml"
    early.write_text(text.replace("min_tokens: 16", "min_tokens: 8"))
    res = runner.invoke(policy_app, ["check", str(early), "--detectors-dir", str(detectors_dir)])
    out = " ".join(res.stdout.split())
    assert res.exit_code == 1 and "rules[2].min_tokens" in out and "from token 16 on" in out
    assert "rules[0]" not in out  # the block rule's numeric threshold carries no calibration claim
    no_point = tmp_path / "no_point.yaml"
    no_point.write_text(
        text.replace(
            "threshold: calibrated@0.05\n    final_only", "threshold: calibrated@0.2\n    final_only"
        )
    )
    res = runner.invoke(policy_app, ["check", str(no_point), "--detectors-dir", str(detectors_dir)])
    assert res.exit_code == 1 and "no operating point 'calibrated@0.2'" in " ".join(res.stdout.split())
    unreachable = ["--redis-url", "redis://127.0.0.1:1/0"]  # never contacted
    res = runner.invoke(
        policy_app, ["publish", str(early), "--detectors-dir", str(detectors_dir), *unreachable]
    )
    assert res.exit_code == 1 and "nothing published" in res.stderr and "Redis" not in res.stderr


def test_policy_group_is_registered() -> None:
    from monitor.cli import app

    res = runner.invoke(app, ["policy", "check", "--help"])
    assert res.exit_code == 0 and "--detectors-dir" in res.stdout
