"""Pure policy evaluation: detector findings -> Verdict. No I/O, clock or randomness, so the same inputs
always give the same verdict (replayable from the audit trail).

A rule fires when `aggregate(scores in its scope, rule.aggregation) >= threshold`. Each rule aggregates the
raw token scores itself, so rules with different aggregations on one detector coexist. Scope `both` reads
the prompt scores followed by the completion scores. Anything that prevents deciding a rule (a failed or
missing detector, a non-finite score, no calibrated threshold or steering clamps to resolve) is a detector
error: the rule takes `defaults.action_on_detector_error` (block unless the policy says allow).
Scope `conversation` aggregates per-turn scores over a conversation (`policies.conversation`): its
earlier turns come in as a `conversation` Finding, the current turn is the completion's.

`PolicyState` is the streaming twin: fed one token score at a time, its verdict after each token equals
`evaluate` over the scores so far (see `PolicyState` for the exact finding set), at O(rules) per token.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from detectors.aggregate import Aggregation, RunningAggregate, aggregate
from policies import conversation as conv
from policies.conversation import CONVERSATION, NON_FINITE
from policies.schema import (
    ACTION_RANK,
    Action,
    Defaults,
    Policy,
    Rule,
    RuleScope,
    format_aggregation,
    threshold_key,
)

Phase = Literal["prompt", "completion"]
_STREAMS: dict[str, tuple[Phase, ...]] = {
    "prompt": ("prompt",),
    "completion": ("completion",),
    "both": ("prompt", "completion"),
    CONVERSATION: ("completion",),  # the token stream of the current turn
}


@dataclass(frozen=True)
class Finding:
    """One detector's output over one scope: token `scores` so far, and/or precomputed `values` per
    aggregation (used when a rule's aggregation is among them), or an `error` (the detector failed).

    scope is "prompt" or "completion"; "both" only for precomputed values over the whole conversation;
    "conversation" for the earlier turns' scores of a conversation (one per turn, oldest first).
    """

    detector: str
    scope: RuleScope
    scores: tuple[float, ...] | None = None
    values: Mapping[Aggregation, float] = field(default_factory=dict, hash=False)
    error: str | None = None

    def __post_init__(self) -> None:
        if self.scores is not None:  # accept lists and 1-D tensors; store plain floats
            object.__setattr__(self, "scores", tuple(float(s) for s in self.scores))


@dataclass(frozen=True)
class FiredRule:
    rule_id: str
    detector: str
    action: Action
    value: float | None  # None when the rule could not be evaluated (see error)
    threshold: float | None
    message: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Verdict:
    """`action` is the strongest fired action; `fired` lists every fired rule in policy order."""

    action: Action = "allow"
    fired: tuple[FiredRule, ...] = ()
    steer: Mapping[int, float] = field(default_factory=dict, hash=False)  # set only when action == steer
    message: str | None = None  # first fired block rule's message, when action == block

    @property
    def blocked(self) -> bool:
        return self.action == "block"

    @property
    def deciding(self) -> tuple[FiredRule, ...]:
        """The fired rules at the verdict's action (several on a tie)."""
        return tuple(f for f in self.fired if f.action == self.action)


def applicable_rules(policy: Policy, tenant: str | None, route: str | None, phase: Phase) -> list[Rule]:
    """Enabled rules for this tenant and route; while the prompt is evaluated, completion rules wait."""
    return [
        r
        for r in policy.rules
        if r.applies_to(tenant, route) and (phase == "completion" or r.scope != "completion")
    ]


def evaluate(
    policy: Policy,
    findings: Iterable[Finding],
    *,
    tenant: str | None = None,
    route: str | None = None,
    phase: Phase = "completion",
    thresholds: Mapping[str, float] | None = None,
    clamps: Mapping[str, Mapping[int, float]] | None = None,
    aggregations: Mapping[str, Aggregation] | None = None,
    final: bool = True,
) -> Verdict:
    """The verdict of `policy` on `findings` (at most one per detector and scope).

    `thresholds` maps detector -> its spec's calibrated threshold (for `threshold: calibrated`); `clamps`
    maps detector -> its `clamp_for_steering()` (for `steer: {latents: detector}`); `aggregations` maps
    detector -> its spec's aggregation (for `aggregation: detector`, and the per-turn score of conversation
    rules). A rule whose detector has no finding for a scope it reads fails closed like a detector error
    (a conversation rule without a `conversation` finding sees the current turn only). With `final` False
    (mid-stream) a rule with `min_tokens` waits until its scope has that many scores.
    """
    index: dict[tuple[str, str], Finding] = {}
    for f in findings:
        if (f.detector, f.scope) in index:
            raise ValueError(f"two findings for detector {f.detector!r}, scope {f.scope!r}")
        index[(f.detector, f.scope)] = f
    outcomes = []
    for rule in applicable_rules(policy, tenant, route, phase):
        agg, error = resolve_aggregation(rule, aggregations)
        value, n = None, None
        if agg is not None:
            value, error, n = _rule_value(rule, agg, index, phase, aggregations)
        if error is None and not final and n is not None and n < rule.min_tokens:
            continue  # not enough tokens yet to judge
        if error is None and not final and rule.final_only:
            continue  # judged once the message has ended
        outcomes.append(judge(rule, value, error, policy.defaults, thresholds, clamps))
    return combine(outcomes)


def resolve_aggregation(
    rule: Rule, aggregations: Mapping[str, Aggregation] | None
) -> tuple[Aggregation | None, str | None]:
    """The rule's aggregation, or for `aggregation: detector` its detector's (an error when unknown)."""
    if isinstance(rule.aggregation, Aggregation):
        return rule.aggregation, None
    agg = (aggregations or {}).get(rule.detector)
    return (agg, None) if agg is not None else (None, f"no aggregation known for detector {rule.detector!r}")


def _rule_value(
    rule: Rule,
    agg: Aggregation,
    index: Mapping[tuple[str, str], Finding],
    phase: Phase,
    aggregations: Mapping[str, Aggregation] | None = None,
) -> tuple[float | None, str | None, int | None]:
    """(value, error, number of scores it aggregates; None for a precomputed value)."""
    det = rule.detector
    if rule.scope == CONVERSATION:
        return conv.conversation_value(rule, agg, index, phase, aggregations)
    # A "both" finding (precomputed over the whole conversation) serves only scope-both rules.
    f = index.get((det, rule.scope))
    if rule.scope != "both" or f is not None:
        if f is None:
            return None, f"no {rule.scope} finding for detector {det!r}", None
        if f.error is not None:
            return None, f.error, None
        if agg in f.values:
            return f.values[agg], None, None
        if f.scores is None:
            msg = f"no {rule.scope} scores or {format_aggregation(agg)} value for detector {det!r}"
            return None, msg, None
        return (*_aggregate(f.scores, agg), len(f.scores))
    # scope both from the two halves: prompt scores, then (once generating) completion scores.
    parts = [index.get((det, scope)) for scope in _STREAMS["both"][: 2 if phase == "completion" else 1]]
    scores: list[float] = []
    for scope, f in zip(_STREAMS["both"], parts, strict=False):
        if f is None:
            return None, f"no {scope} finding for detector {det!r}", None
        if f.error is not None:
            return None, f.error, None
        if f.scores is None:
            return None, f"scope both needs {scope} token scores for detector {det!r}", None
        scores.extend(f.scores)
    return (*_aggregate(scores, agg), len(scores))


def _aggregate(scores: tuple[float, ...] | list[float], agg: Aggregation) -> tuple[float | None, str | None]:
    if not all(math.isfinite(s) for s in scores):
        return None, NON_FINITE
    return aggregate(scores, agg), None


def judge(
    rule: Rule,
    value: float | None,
    error: str | None,
    defaults: Defaults,
    thresholds: Mapping[str, float] | None,
    clamps: Mapping[str, Mapping[int, float]] | None,
) -> tuple[FiredRule | None, Mapping[int, float]]:
    """(fired rule or None, the steering clamps it asks for) for one rule given its value or error."""
    threshold: float | None = None
    if error is None:
        if isinstance(rule.threshold, str):  # calibrated or calibrated@FPR
            key = threshold_key(rule.detector, rule.threshold)
            threshold = (thresholds or {}).get(key)
            if threshold is None:
                what = "" if key == rule.detector else f" {key!r}"
                error = f"no calibrated threshold{what} for detector {rule.detector!r}"
        else:
            threshold = float(rule.threshold)
    if error is None and value is None:  # callers pass one of the two; treat a gap as an error
        error = f"no value for detector {rule.detector!r}"
    if error is None:
        assert value is not None and threshold is not None
        if value < threshold:
            return None, {}
        latents: Mapping[int, float] = {}
        if rule.steer is not None:
            latents = rule.steer.latents if isinstance(rule.steer.latents, dict) else {}
            if rule.steer.latents == "detector":
                source = rule.steer.detector or rule.detector
                latents = (clamps or {}).get(source) or {}
                if not latents:  # steering that clamps nothing would silently allow
                    error = f"no steering clamps for detector {source!r}"
        if error is None:
            message = (rule.message or defaults.block_message) if rule.action == "block" else rule.message
            return FiredRule(rule.id, rule.detector, rule.action, value, threshold, message), latents
    action = defaults.action_on_detector_error
    # The rule's own message describes its concept, not a failure: use the generic one.
    message = defaults.block_message if action == "block" else None
    return FiredRule(rule.id, rule.detector, action, None, threshold, message, error), {}


def combine(outcomes: Iterable[tuple[FiredRule | None, Mapping[int, float]]]) -> Verdict:
    """Strongest action wins; clamps of fired steer rules merge (an earlier rule wins a shared latent)."""
    fired: list[FiredRule] = []
    steer: dict[int, float] = {}
    for f, latents in outcomes:
        if f is None:
            continue
        fired.append(f)
        if f.action == "steer":
            for lid, v in latents.items():
                steer.setdefault(lid, v)
    action: Action = max((f.action for f in fired), key=ACTION_RANK.__getitem__, default="allow")
    message = next((f.message for f in fired if f.action == "block"), None) if action == "block" else None
    return Verdict(action, tuple(fired), steer if action == "steer" else {}, message)


class PolicyState:
    """Streaming evaluation for one request: feed token scores as they come, get the verdict so far.

    Equivalence: after any sequence of calls, `verdict` == `evaluate(policy, findings, tenant=, route=,
    phase=self.phase, thresholds=, clamps=, aggregations=, final=self.final)` where findings hold, for
    every detector in `detectors`, a prompt Finding and (in the completion phase) a completion Finding with
    all scores fed for it and the error passed to `fail` (if any). The phase switches to completion with
    the first completion score (or `start_completion()`); prompt scores after that are refused, so
    scope-both streams stay in order. `finish()` marks the message complete (final). `conversation` maps
    detector -> its earlier turns' scores, i.e. a `conversation` Finding per entry; `conversation_error`
    (they could not be loaded) stands for a `conversation` Finding with that error for every detector.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        tenant: str | None = None,
        route: str | None = None,
        thresholds: Mapping[str, float] | None = None,
        clamps: Mapping[str, Mapping[int, float]] | None = None,
        aggregations: Mapping[str, Aggregation] | None = None,
        conversation: Mapping[str, Sequence[float]] | None = None,
        conversation_error: str | None = None,
    ) -> None:
        self.policy, self.tenant, self.route = policy, tenant, route
        self.thresholds, self.clamps = dict(thresholds or {}), dict(clamps or {})
        self.final = False
        self.phase: Phase = "prompt"
        self._rules = [r for r in policy.rules if r.applies_to(tenant, route)]
        resolved = [resolve_aggregation(r, aggregations) for r in self._rules]
        self._agg_errors = [err for _, err in resolved]  # a rule whose aggregation is unknown fails closed
        self._aggs = [RunningAggregate(agg or Aggregation()) for agg, _ in resolved]
        self._prior, self._conv_error = conv.as_history(conversation), conversation_error
        for i, rule in enumerate(self._rules):  # their running aggregate is the current turn's score
            if rule.scope == CONVERSATION:
                own = (aggregations or {}).get(rule.detector)
                self._aggs[i] = RunningAggregate(own or Aggregation())
                self._agg_errors[i] = None if own is not None else conv.no_turn_aggregation(rule.detector)
        self._consumers: dict[tuple[str, str], list[int]] = {}  # stream -> rules whose aggregate reads it
        for i, rule in enumerate(self._rules):
            for scope in _STREAMS[rule.scope]:
                self._consumers.setdefault((rule.detector, scope), []).append(i)
        self._errors: dict[tuple[str, str], str] = {}  # from fail(): take precedence over NON_FINITE
        self._non_finite: set[tuple[str, str]] = set()
        self._verdict = self._compute()

    @property
    def detectors(self) -> list[str]:
        return list(dict.fromkeys(r.detector for r in self._rules))

    @property
    def verdict(self) -> Verdict:
        return self._verdict

    def update(self, detector: str, scope: Phase, score: float) -> Verdict:
        """Add one token score of `detector` in `scope`; returns the verdict over everything so far."""
        if scope not in ("prompt", "completion"):
            raise ValueError(f"scope must be 'prompt' or 'completion', got {scope!r}")
        if scope == "prompt" and self.phase == "completion":
            raise ValueError("prompt scores after the completion started")
        self.phase = scope
        key, s = (detector, scope), float(score)
        if not math.isfinite(s):
            self._non_finite.add(key)
        elif key not in self._non_finite and key not in self._errors:  # an errored stream is decided
            for i in self._consumers.get(key, ()):
                self._aggs[i].update(s)
        self._verdict = self._compute()
        return self._verdict

    def fail(self, detector: str, error: str, scope: Phase | None = None) -> Verdict:
        """Record that `detector` failed (in one scope, or both when scope is None)."""
        for s in (scope,) if scope else _STREAMS["both"]:
            self._errors[(detector, s)] = error
        self._verdict = self._compute()
        return self._verdict

    def finish(self) -> Verdict:
        """The message has ended: rules waiting for `min_tokens` are judged on what there is."""
        self.final = True
        self._verdict = self._compute()
        return self._verdict

    def start_completion(self) -> Verdict:
        self.phase = "completion"
        self._verdict = self._compute()
        return self._verdict

    def _compute(self) -> Verdict:
        outcomes = []
        for i, rule in enumerate(self._rules):
            if self.phase == "prompt" and rule.scope == "completion":
                continue
            if rule.scope == CONVERSATION:
                outcome = self._conversation(i, rule)
                if outcome is not None:
                    outcomes.append(outcome)
                continue
            error = self._agg_errors[i] or self._stream_error(rule)
            if error is None and not self.final and self._aggs[i].n_tokens < rule.min_tokens:
                continue  # not enough tokens yet to judge
            if error is None and not self.final and rule.final_only:
                continue  # judged once the message has ended
            value = None if error is not None else self._aggs[i].value
            outcomes.append(judge(rule, value, error, self.policy.defaults, self.thresholds, self.clamps))
        return combine(outcomes)

    def _conversation(self, i: int, rule: Rule) -> tuple[FiredRule | None, Mapping[int, float]] | None:
        """A conversation rule's outcome (None while it waits for min_tokens), as `evaluate` decides it."""
        completion = self.phase == "completion"
        error = self._agg_errors[i] or self._conv_error or (self._stream_error(rule) if completion else None)
        prior = self._prior.get(rule.detector, ())
        got = conv.running_outcome(rule, self._aggs[i], prior, error, completion=completion, final=self.final)
        if got is None:
            return None
        return judge(rule, got[0], got[1], self.policy.defaults, self.thresholds, self.clamps)

    def _stream_error(self, rule: Rule) -> str | None:
        scopes = _STREAMS[rule.scope] if self.phase == "completion" else ("prompt",)
        keys = [(rule.detector, s) for s in scopes]
        explicit = next((self._errors[k] for k in keys if k in self._errors), None)
        if explicit is not None:
            return explicit
        return NON_FINITE if any(k in self._non_finite for k in keys) else None


def fired_rules(v: Verdict) -> list[dict[str, Any]]:
    """The fired rules as the monitor reports them (responses, audit records; replay compares
    against these): values rounded to 4 decimals."""
    return [
        {
            "id": f.rule_id,
            "detector": f.detector,
            "action": f.action,
            "value": None if f.value is None else round(f.value, 4),
            "threshold": None if f.threshold is None else round(f.threshold, 4),
            **({"error": f.error} if f.error else {}),
        }
        for f in v.fired
    ]
