"""Policies: which detector values log, flag, steer or block a generation (milestone [4/7]).

Schema (`Policy`, `Rule`), a loader that reports every issue with its YAML line (`load_policy`,
`check_policy_text`), the pure evaluator (`evaluate`, streaming `PolicyState`) and hot reload
(`PolicyHolder`). Semantics: policies/README.md. This package may import detectors, never monitor.
"""

from pathlib import Path

from policies.evaluate import (
    NON_FINITE,
    Finding,
    FiredRule,
    Phase,
    PolicyState,
    Verdict,
    applicable_rules,
    evaluate,
)
from policies.loader import (
    PolicyError,
    PolicyIssue,
    check_policy,
    check_policy_text,
    load_policy,
    parse_policy,
)
from policies.reload import PolicyHolder, PolicyWatcher
from policies.schema import (
    ACTION_RANK,
    ACTIONS,
    CALIBRATED,
    Action,
    Defaults,
    Policy,
    Rule,
    Steer,
    format_aggregation,
)

# The policy that ships with the package (over the scam, deception and bias detectors).
DEFAULT_POLICY_PATH = Path(__file__).resolve().parent / "default.yaml"

__all__ = [
    "ACTIONS",
    "ACTION_RANK",
    "CALIBRATED",
    "DEFAULT_POLICY_PATH",
    "NON_FINITE",
    "Action",
    "Defaults",
    "Finding",
    "FiredRule",
    "Phase",
    "Policy",
    "PolicyError",
    "PolicyHolder",
    "PolicyIssue",
    "PolicyState",
    "PolicyWatcher",
    "Rule",
    "Steer",
    "Verdict",
    "applicable_rules",
    "check_policy",
    "check_policy_text",
    "evaluate",
    "format_aggregation",
    "load_policy",
    "parse_policy",
]
