"""Scope `conversation`: rules over a detector's per-turn scores (policies.conversation), in the pure
evaluator and in the streaming PolicyState, which must agree with it after every token."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

import pytest

from detectors.aggregate import Aggregation
from policies import (
    NON_FINITE,
    Finding,
    Phase,
    Policy,
    PolicyError,
    PolicyState,
    Verdict,
    evaluate,
    parse_policy,
)

OWN = {"dec": Aggregation(kind="mean"), "bias": Aggregation(kind="max")}  # each detector's per-turn score


def _policy(*rules: str, on_error: str = "block") -> Policy:
    body = "\n".join(f"  - {r}" for r in rules)
    return parse_policy(
        f"name: c\ndefaults: {{action_on_detector_error: {on_error}}}\nrules:\n{body}\n", "c.yaml"
    )


def _findings(
    prior: Mapping[str, Sequence[float]] | None,
    completion: Mapping[str, Sequence[float]] | None,
    prompt: Sequence[float] = (0.0,),
    error: str | None = None,
) -> list[Finding]:
    out = [Finding(d, "prompt", tuple(prompt)) for d in OWN]
    out += [Finding(d, "completion", tuple(s)) for d, s in (completion or {}).items()]
    if error is not None:
        return out + [Finding(d, "conversation", error=error) for d in OWN]
    return out + [Finding(d, "conversation", tuple(s)) for d, s in (prior or {}).items()]


def _value(v: Verdict, rule_id: str) -> float | None:
    return next(f.value for f in v.fired if f.rule_id == rule_id)


def test_the_prompt_phase_sees_earlier_turns_only() -> None:
    p = _policy(
        "{id: two-turns, detector: dec, scope: conversation, "
        "aggregation: {kind: count_over, threshold: 0.5}, threshold: 2, action: block}"
    )
    prior = {"dec": [0.9, 0.2, 0.7]}  # two earlier turns at or over 0.5
    v = evaluate(p, _findings(prior, None), phase="prompt", aggregations=OWN)
    assert v.blocked and _value(v, "two-turns") == 2.0
    # One earlier turn over: allowed at the prompt, blocked once this turn's score (mean 0.8) joins.
    prior = {"dec": [0.9, 0.2]}
    assert evaluate(p, _findings(prior, None), phase="prompt", aggregations=OWN).action == "allow"
    v = evaluate(p, _findings(prior, {"dec": [0.6, 1.0]}), aggregations=OWN)
    assert v.blocked and _value(v, "two-turns") == 2.0


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        ("max", 0.9),
        ("mean", (0.1 + 0.9 + 0.3 + 0.5) / 4),
        ("{kind: topk_mean, k: 2}", (0.9 + 0.5) / 2),
        # ema(window 3): α = 0.5 from 0: 0.05, 0.475, 0.3875, 0.44375 -> the highest
        ("{kind: ema, window: 3}", 0.475),
        ("{kind: sustained, threshold: 0.3, n: 2}", 1.0),  # turns 2-3 both >= 0.3
    ],
)
def test_turn_aggregations(aggregation: str, expected: float) -> None:
    p = _policy(
        f"{{id: r, detector: dec, scope: conversation, aggregation: {aggregation}, "
        "threshold: 0.0, action: flag}"
    )
    # earlier turns 0.1, 0.9, 0.3; this turn's score is its tokens' mean: 0.5
    v = evaluate(p, _findings({"dec": [0.1, 0.9, 0.3]}, {"dec": [0.2, 0.8]}), aggregations=OWN)
    assert _value(v, "r") == pytest.approx(expected, abs=1e-12)


def test_the_turn_score_is_the_detectors_own_aggregation() -> None:
    p = _policy(
        "{id: r, detector: bias, scope: conversation, aggregation: mean, threshold: 0.0, action: log}"
    )
    v = evaluate(p, _findings({"bias": [0.2]}, {"bias": [0.1, 0.6, 0.3]}), aggregations=OWN)
    assert _value(v, "r") == pytest.approx((0.2 + 0.6) / 2)  # bias scores a turn by its max token


def test_without_a_conversation_only_the_current_turn_counts() -> None:
    p = _policy(
        "{id: r, detector: dec, scope: conversation, aggregation: mean, threshold: 0.5, action: flag}"
    )
    assert evaluate(p, _findings(None, None), phase="prompt", aggregations=OWN).action == "allow"
    v = evaluate(p, _findings(None, {"dec": [0.4, 0.8]}), aggregations=OWN)
    assert v.action == "flag" and _value(v, "r") == pytest.approx(0.6)
    # Nothing generated (yet): the current turn does not join, so an empty turn never dilutes a mean.
    v = evaluate(p, _findings({"dec": [0.7]}, {"dec": []}), aggregations=OWN)
    assert _value(v, "r") == pytest.approx(0.7)


def test_unloadable_history_and_unknown_turn_score_fail_closed() -> None:
    rule = "{id: r, detector: dec, scope: conversation, aggregation: max, threshold: 0.9, action: flag}"
    err = "conversation state unavailable: ConnectionError"
    v = evaluate(_policy(rule), _findings(None, None, error=err), phase="prompt", aggregations=OWN)
    assert v.blocked and v.fired[0].error == err and v.fired[0].value is None
    v = evaluate(_policy(rule, on_error="allow"), _findings(None, None, error=err), aggregations=OWN)
    assert v.action == "allow" and v.fired[0].error == err
    v = evaluate(_policy(rule), _findings({"dec": [0.1]}, {"dec": [0.1]}), aggregations={})
    assert v.blocked and "no aggregation known for detector 'dec'" in str(v.fired[0].error)
    v = evaluate(_policy(rule), _findings({"dec": [math.nan]}, None), phase="prompt", aggregations=OWN)
    assert v.blocked and v.fired[0].error == NON_FINITE
    v = evaluate(_policy(rule), _findings({}, {"bias": [0.1]}), aggregations=OWN)
    assert v.blocked and v.fired[0].error == "no completion finding for detector 'dec'"


def test_min_tokens_waits_mid_stream_but_not_at_the_prompt() -> None:
    p = _policy(
        "{id: r, detector: dec, scope: conversation, aggregation: max, threshold: 0.5, "
        "action: block, min_tokens: 3}"
    )
    hot = {"dec": [0.8]}
    assert evaluate(p, _findings(hot, None), phase="prompt", final=False, aggregations=OWN).blocked
    assert evaluate(p, _findings(hot, {"dec": [0.1, 0.1]}), final=False, aggregations=OWN).action == "allow"
    assert evaluate(p, _findings(hot, {"dec": [0.1, 0.1]}), final=True, aggregations=OWN).blocked


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("aggregation: detector, threshold: 0.5", "scope conversation aggregates per-turn scores"),
        ("threshold: calibrated", "scope conversation needs a number"),
        ("aggregation: {kind: count_over, threshold: 0.5}, threshold: 1.5", "count_over counts turns"),
    ],
)
def test_schema_refuses_what_has_no_per_turn_meaning(rule: str, message: str) -> None:
    with pytest.raises(PolicyError) as e:
        _policy(f"{{id: r, detector: dec, scope: conversation, {rule}, action: flag}}")
    assert message in str(e.value.issues[0])


RULES = [
    "{id: c-max, detector: dec, scope: conversation, aggregation: max, threshold: 0.8, action: block}",
    "{id: c-ema, detector: dec, scope: conversation, aggregation: {kind: ema, window: 2}, threshold: 0.6, "
    "action: flag, min_tokens: 2}",
    "{id: c-count, detector: bias, scope: conversation, aggregation: {kind: count_over, threshold: 0.5}, "
    "threshold: 2, action: steer, steer: {latents: {1: 0.0}}}",
    "{id: c-sus, detector: bias, scope: conversation, aggregation: {kind: sustained, threshold: 0.4, n: 2}, "
    "threshold: 1.0, action: log, min_tokens: 1}",
    "{id: tok, detector: dec, aggregation: mean, threshold: 0.7, action: log}",
]


@pytest.mark.parametrize("seed", range(40))
def test_policy_state_agrees_with_evaluate_token_by_token(seed: int) -> None:
    rng = random.Random(seed)
    policy = _policy(*RULES)
    prior = {d: [rng.random() for _ in range(rng.randrange(0, 5))] for d in OWN if rng.random() < 0.8}
    error = "state unavailable" if rng.random() < 0.1 else None
    state = PolicyState(policy, aggregations=OWN, conversation=prior, conversation_error=error)
    prompt = [rng.random() for _ in range(3)]
    for d in OWN:
        for s in prompt:
            state.update(d, "prompt", s)

    def check(phase: Phase, completion: dict[str, list[float]] | None, final: bool) -> None:
        want = evaluate(
            policy, _findings(prior, completion, prompt, error), phase=phase, final=final, aggregations=OWN
        )
        assert state.verdict == want

    check("prompt", None, False)
    tokens: dict[str, list[float]] = {d: [] for d in OWN}
    for _ in range(rng.randrange(0, 8)):
        for d in OWN:
            s = math.inf if rng.random() < 0.02 else rng.random()
            tokens[d].append(s)
            state.update(d, "completion", s)
            check("completion", {k: list(v) for k, v in tokens.items()}, False)
    if state.phase == "prompt":
        state.start_completion()
    state.finish()
    check("completion", tokens, True)
