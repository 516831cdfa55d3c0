"""`featurewatch policy check` through typer's runner."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import monitor.cli_policy as cli_policy
from monitor.cli_policy import policy_app
from policies import DEFAULT_POLICY_PATH

runner = CliRunner()


@pytest.fixture
def detectors_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "detectors"
    folder.mkdir()
    for name in ("scam", "deception", "bias", "bias_sae", "falsehood"):
        (folder / f"{name}.yaml").write_text(f"name: {name}\n")
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


def test_default_detectors_from_the_default_sae(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cli_policy, "_default_known_detectors", lambda: ({"scam"}, "shipped"))
    res = runner.invoke(policy_app, ["check", str(DEFAULT_POLICY_PATH)])
    assert res.exit_code == 1 and "unknown detector 'deception' (valid: scam)" in res.stdout
    monkeypatch.setattr(cli_policy, "_default_known_detectors", lambda: (None, "not installed"))
    res = runner.invoke(policy_app, ["check", str(DEFAULT_POLICY_PATH)])
    assert res.exit_code == 0 and "detector names not checked" in res.stderr


def test_policy_group_is_registered() -> None:
    from monitor.cli import app

    res = runner.invoke(app, ["policy", "check", "--help"])
    assert res.exit_code == 0 and "--detectors-dir" in res.stdout
