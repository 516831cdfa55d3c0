"""Policy checks that need the detectors: what `policies.check_policy` (schema, names) cannot know.

Used by the server at start-up and on every reload, by `featurewatch audit replay --policy` and by
`featurewatch policy check` — the last two from the specs alone (`SpecSet`, no weights loaded), so an
edited policy is refused by the same rules everywhere. Light on purpose: no model code is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from detectors.aggregate import Aggregation
from policies.loader import PolicyIssue
from policies.schema import Policy, format_aggregation, threshold_key

PolicyCheck = Callable[[Policy, str], list[PolicyIssue]]


class DetectorSetLike(Protocol):
    """What the checks read (`monitor.monitoring.DetectorSet`, or a `SpecSet` built from specs)."""

    @property
    def detectors(self) -> Mapping[str, Any]: ...  # name -> object with .spec
    @property
    def thresholds(self) -> Mapping[str, float]: ...
    @property
    def aggregations(self) -> Mapping[str, Any]: ...
    @property
    def clamps(self) -> Mapping[str, Mapping[int, float]]: ...


@dataclass(frozen=True)
class _Spec:
    spec: Any


@dataclass(frozen=True)
class SpecSet:
    """`DetectorSetLike` from specs alone: calibrated thresholds, aggregations and clamps as
    `monitor.replay.ReplayContext.from_specs` derives them."""

    detectors: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    aggregations: dict[str, Any] = field(default_factory=dict)
    clamps: dict[str, dict[int, float]] = field(default_factory=dict)

    @classmethod
    def from_folder(cls, folder: Path, warn: Callable[[str], None]) -> SpecSet:
        """Every spec in a detectors folder; a spec that cannot be read is skipped with `warn`."""
        from detectors.errors import DetectorError
        from detectors.registry import available_detectors
        from detectors.spec import load_spec
        from monitor.replay import ReplayContext

        specs = {}
        for name in available_detectors(folder) if folder.is_dir() else []:
            try:
                specs[name] = load_spec(folder / f"{name}.yaml")
            except DetectorError as e:
                warn(f"skipping detector {name}: {e}")
        ctx = ReplayContext.from_specs(specs)
        return cls(
            {n: _Spec(s) for n, s in specs.items()},
            dict(ctx.thresholds),
            dict(ctx.aggregations),
            {n: dict(c) for n, c in ctx.clamps.items()},
        )


def policy_issues(dset: DetectorSetLike) -> PolicyCheck:
    """A policy validator for what only the loaded detectors know: every `steer: {latents: detector}`
    source can steer, and a `calibrated` threshold is used with the aggregation it was calibrated for."""

    def check(policy: Policy, source: str) -> list[PolicyIssue]:
        issues = []
        for i, rule in enumerate(policy.rules):
            own = dset.aggregations.get(rule.detector)
            agg = rule.aggregation
            if isinstance(rule.threshold, str) and rule.detector in dset.detectors:
                key = threshold_key(rule.detector, rule.threshold)
                if key not in dset.thresholds:
                    have = sorted(dset.detectors[rule.detector].spec.operating_points) or ["none"]
                    issues.append(
                        PolicyIssue(
                            source,
                            None,
                            f"rules[{i}].threshold",
                            f"{rule.detector!r} has no operating point {rule.threshold!r} (has: "
                            f"{', '.join(have)}); add one with `featurewatch detectors calibrate "
                            f"{rule.detector} --operating-point --target-fpr FPR`",
                        )
                    )
            if (
                isinstance(rule.threshold, str)
                and isinstance(agg, Aggregation)
                and own is not None
                and agg != own
            ):
                issues.append(
                    PolicyIssue(
                        source,
                        None,
                        f"rules[{i}].aggregation",
                        f"the calibrated threshold of {rule.detector!r} is for {format_aggregation(own)}; "
                        "use `aggregation: detector` or a numeric threshold",
                    )
                )
            issue = _stream_issue(dset, rule, i, source)
            if issue is not None:
                issues.append(issue)
        for src in policy.steer_sources:
            if src not in dset.detectors:
                issues.append(PolicyIssue(source, None, "rules", f"steer source {src!r} is not loaded"))
            elif not dset.clamps.get(src):
                kind = dset.detectors[src].spec.kind
                issues.append(
                    PolicyIssue(
                        source,
                        None,
                        "rules",
                        f"detector {src!r} ({kind}) cannot steer (no latents to clamp); name an "
                        "sae_features detector with `steer: {latents: detector, detector: NAME}`",
                    )
                )
        return issues

    return check


def _stream_issue(dset: DetectorSetLike, rule: Any, i: int, source: str) -> PolicyIssue | None:
    """A `calibrated` threshold set on stream peaks from token N (detectors train --stream-from N) holds
    its false-positive rate only for mid-stream rules that wait for N tokens: earlier, a running mean
    is noisier and fires more often."""
    det = dset.detectors.get(rule.detector)
    if det is None or not isinstance(rule.threshold, str) or rule.final_only:
        return None
    if rule.scope in ("prompt", "conversation"):  # judged on the prefill / per turn, not per token
        return None
    n = (det.spec.eval.get("calibration") or {}).get("stream_from")
    if not isinstance(n, int) or rule.min_tokens >= n:
        return None
    return PolicyIssue(
        source,
        None,
        f"rules[{i}].min_tokens",
        f"the calibrated thresholds of {rule.detector!r} hold from token {n} on (calibrated on stream "
        f"peaks); set `min_tokens: {n}` or more, or use a numeric threshold",
    )
