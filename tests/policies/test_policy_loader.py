"""Policy loading: every issue reported, each with its dotted path and the YAML line it came from."""

from __future__ import annotations

from pathlib import Path

import pytest

from policies import (
    DEFAULT_POLICY_PATH,
    PolicyError,
    PolicyIssue,
    check_policy_text,
    load_policy,
    parse_policy,
)

KNOWN = {"scam", "deception", "bias", "bias_sae", "falsehood"}

GOOD = """\
name: test
version: 3
rules:
  - id: scam-block
    detector: scam
    threshold: calibrated
    action: block
    message: no scams
  - id: bias-steer
    detector: bias
    scope: both
    aggregation: {kind: ema, window: 8}
    threshold: 0.5
    action: steer
    steer: {latents: {12: 0.0, 7: -1.5}}
    tenants: [acme]
    routes: [/v1/chat/completions]
  - id: many
    detector: deception
    aggregation: {kind: count_over, threshold: 0.5}
    threshold: 3
    action: flag
"""

# One problem per marked line; the marker text finds the line so the expectation cannot drift.
BAD = """\
name: test
colour: blue                       # unknown top-level field
rules:
  - id: a
    detector: scam
    threshold: calibrated
    action: blok                   # unknown action
  - id: a                          # duplicate id
    detector: scamm                # unknown detector
    scope: prompts                 # unknown scope
    threshold: 1.5                 # out of [0, 1]
    action: block
  - id: c
    detector: bias
    aggregation: {kind: ema}       # ema needs window
    threshold: 0.5
    action: steer                  # steer: missing
  - id: d
    detector: bias
    aggregation: {kind: count_over, threshold: 0.5}
    threshold: 2.5                 # count must be whole
    action: flag
    steer: {latents: detector}     # steer without action steer
    tenants: []                    # empty list
  - id: e
    detector: deception
    threshold: calibrated
    action: log
    action: flag                   # duplicate key
defaults:
  action_on_detector_error: maybe  # unknown value
"""


def _line(text: str, marker: str) -> int:
    hits = [i for i, line in enumerate(text.splitlines(), 1) if marker in line]
    assert len(hits) == 1, f"marker {marker!r} must be on exactly one line"
    return hits[0]


def test_good_policy_parses() -> None:
    policy = parse_policy(GOOD, "good.yaml", KNOWN)
    assert [r.id for r in policy.rules] == ["scam-block", "bias-steer", "many"]
    assert policy.version == "3" and policy.defaults.action_on_detector_error == "block"
    steer = policy.rules[1].steer
    assert steer is not None and steer.latents == {12: 0.0, 7: -1.5}
    assert policy.rules[0].threshold == "calibrated" and policy.rules[2].threshold == 3.0
    assert policy.detectors == ["scam", "bias", "deception"]


def test_every_error_reported_with_its_line() -> None:
    issues = check_policy_text(BAD, "bad.yaml", KNOWN)
    got = {(i.line, i.path) for i in issues}
    expected = {
        (_line(BAD, "unknown top-level"), "colour"),
        (_line(BAD, "unknown action"), "rules[0].action"),
        (_line(BAD, "duplicate id"), "rules[1].id"),
        (_line(BAD, "unknown detector"), "rules[1].detector"),
        (_line(BAD, "unknown scope"), "rules[1].scope"),
        (_line(BAD, "out of [0, 1]"), "rules[1].threshold"),
        (_line(BAD, "ema needs window"), "rules[2].aggregation"),
        (_line(BAD, "- id: c"), "rules[2].steer"),  # missing: the rule's own line
        (_line(BAD, "count must be whole"), "rules[3].threshold"),
        (_line(BAD, "steer without"), "rules[3].steer"),
        (_line(BAD, "empty list"), "rules[3].tenants"),
        (_line(BAD, "duplicate key"), "rules[4].action"),
        (_line(BAD, "unknown value"), "defaults.action_on_detector_error"),
    }
    assert got == expected, "\n".join(map(str, issues))
    assert [i.line for i in issues] == sorted(i.line or 0 for i in issues)
    text = "\n".join(map(str, issues))
    n = _line(BAD, "unknown action")
    assert (
        f"bad.yaml:{n}: rules[0].action: unknown action 'blok' (valid: allow, log, flag, steer, block)"
        in text
    )
    assert "unknown detector 'scamm' (valid: bias, bias_sae, deception, falsehood, scam)" in text
    first = BAD.splitlines().index("  - id: a") + 1
    assert f"duplicate rule id 'a' (first at line {first})" in text
    assert "unknown field 'colour' (valid: name, version, description, defaults, rules)" in text
    assert "unknown scope 'prompts'" in text and "unknown action_on_detector_error 'maybe'" in text


def test_detector_names_checked_only_when_known() -> None:
    assert not [i for i in check_policy_text(BAD, "bad.yaml") if "unknown detector" in i.message]
    issues = check_policy_text(GOOD, "good.yaml", {"scam"})
    assert [(i.path, i.line) for i in issues] == [
        ("rules[1].detector", _line(GOOD, "detector: bias")),
        ("rules[2].detector", _line(GOOD, "detector: deception")),
    ]
    assert "valid: scam" in issues[0].message


@pytest.mark.parametrize(
    ("text", "line", "column", "fragment"),
    [
        ("name: x\nrules: [\n  - a\n", 3, 3, "invalid YAML"),
        ("name: x\nrules:\n  - id: a\n   detector: b\n", 4, 4, "invalid YAML"),
        ("name: x\nrules: []\nfoo: !!python/object:os.system 1\n", 3, 6, "could not determine a constructor"),
    ],
)
def test_yaml_syntax_errors_have_line_and_column(text: str, line: int, column: int, fragment: str) -> None:
    [issue] = check_policy_text(text, "s.yaml")
    assert (issue.line, issue.column) == (line, column)
    assert fragment in issue.message and str(issue).startswith(f"s.yaml:{line}:{column}: invalid YAML")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty policy file"),
        ("# only a comment\n", "empty policy file"),
        ("- 1\n", "a policy must be a mapping, got list"),
    ],
)
def test_documents_that_are_not_policies(text: str, message: str) -> None:
    assert [str(i) for i in check_policy_text(text, "p.yaml")] == [f"p.yaml:1: {message}"]


def test_missing_fields_point_at_their_parent() -> None:
    text = "name: x\nrules:\n  - id: a\n    detector: scam\n"
    issues = {(i.line, i.path, i.message) for i in check_policy_text(text, "p.yaml")}
    assert issues == {
        (3, "rules[0].threshold", "missing required field"),
        (3, "rules[0].action", "missing required field"),
    }


def test_load_policy_raises_with_all_issues(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    with pytest.raises(PolicyError) as exc:
        load_policy(path, KNOWN)
    assert len(exc.value.issues) == 13 and str(path) in str(exc.value)
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path / "missing.yaml")


def test_issue_format() -> None:
    assert str(PolicyIssue("f.yaml", 3, "rules[0].id", "bad")) == "f.yaml:3: rules[0].id: bad"
    assert str(PolicyIssue("f.yaml", 3, "", "bad", column=7)) == "f.yaml:3:7: bad"
    assert str(PolicyIssue("f.yaml", None, "", "gone")) == "f.yaml: gone"


def test_default_policy_loads() -> None:
    policy = load_policy(DEFAULT_POLICY_PATH, KNOWN)
    assert policy.name == "default" and policy.defaults.action_on_detector_error == "block"
    assert set(policy.detectors) == KNOWN - {"bias_sae"} and policy.steer_sources == ["bias_sae"]
    actions = {r.id: r.action for r in policy.rules}
    assert actions["scam-completion-block"] == "block" and actions["bias-steer"] == "steer"
    assert {"log", "flag"} <= set(actions.values())
    assert all(r.message for r in policy.rules if r.action == "block")
