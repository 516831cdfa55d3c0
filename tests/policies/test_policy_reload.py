"""Hot reload: a bad policy never replaces a good one; the watcher applies edits and always stops."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from policies import PolicyError, PolicyHolder, PolicyIssue

KNOWN = {"scam", "bias"}


def _policy(version: int, action: str = "block", detector: str = "scam") -> str:
    return (
        f"name: p\nversion: {version}\nrules:\n"
        f"  - id: r\n    detector: {detector}\n    threshold: 0.5\n    action: {action}\n"
    )


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(_policy(1))
    return path


def test_start_up_fails_closed_on_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(_policy(1, action="blok"))
    with pytest.raises(PolicyError, match=r"bad.yaml:7: rules\[0\].action: unknown action 'blok'"):
        PolicyHolder(path, KNOWN)
    with pytest.raises(PolicyError, match="cannot read"):
        PolicyHolder(tmp_path / "missing.yaml")


def test_reload_rejects_bad_keeps_old_accepts_good(policy_file: Path) -> None:
    seen: list[list[PolicyIssue]] = []
    holder = PolicyHolder(policy_file, KNOWN, on_reload=seen.append)
    assert holder.policy.version == "1" and holder.generation == 1

    policy_file.write_text(_policy(2, detector="nope"))
    issues = holder.reload()
    assert [i.path for i in issues] == ["rules[0].detector"] and "valid: bias, scam" in issues[0].message
    assert holder.policy.version == "1" and holder.generation == 1 and holder.last_issues == issues

    policy_file.unlink()
    assert "cannot read" in holder.reload()[0].message and holder.policy.version == "1"

    policy_file.write_text(_policy(3, action="flag"))
    assert holder.reload() == []
    assert holder.policy.version == "3" and holder.policy.rules[0].action == "flag"
    assert holder.generation == 2 and holder.last_issues == []
    assert [bool(s) for s in seen] == [True, True, False]


def test_apply_text_seam(policy_file: Path) -> None:
    holder = PolicyHolder(policy_file)
    issues = holder.apply_text("name: p\nrules: {}\n", "redis:policy")
    assert [str(i) for i in issues] == ["redis:policy:2: rules: Input should be a valid list"]
    assert holder.policy.version == "1"
    assert holder.apply_text(_policy(7), "redis:policy") == [] and holder.policy.version == "7"


def _wait(cond: object, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_watch_applies_changes_and_stops(policy_file: Path) -> None:
    holder = PolicyHolder(policy_file, KNOWN)
    with holder.watch(0.01) as watcher:
        assert watcher.running
        policy_file.write_text(_policy(1, action="blok"))  # rejected: old stays
        assert _wait(lambda: bool(holder.last_issues))
        assert holder.policy.version == "1"
        policy_file.write_text(_policy(2))
        assert _wait(lambda: holder.policy.version == "2")
        assert holder.generation == 2
    assert not watcher.running
    watcher.stop()  # idempotent


def test_watcher_stops_when_the_body_raises(policy_file: Path) -> None:
    holder = PolicyHolder(policy_file)
    with pytest.raises(RuntimeError), holder.watch(0.01) as watcher:
        raise RuntimeError("boom")
    assert not watcher.running
    with pytest.raises(ValueError, match="interval_s"):
        holder.watch(0)
