"""The pure evaluator: strongest action wins, scoping, calibrated thresholds, failing closed, steering,
and the streaming PolicyState agreeing with evaluate() token by token."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from detectors.aggregate import Aggregation
from policies import NON_FINITE, Finding, Phase, Policy, PolicyState, evaluate, parse_policy
from policies.loader import PolicyError

POLICY = parse_policy(
    """
name: t
rules:
  - {id: scam-log, detector: scam, threshold: 0.2, action: log}
  - {id: scam-flag, detector: scam, aggregation: mean, threshold: 0.4, action: flag}
  - {id: scam-block, detector: scam, threshold: 0.8, action: block, message: no scams}
  - {id: scam-block2, detector: scam, threshold: 0.9, action: block, message: second}
  - {id: scam-prompt, detector: scam, scope: prompt, threshold: calibrated, action: flag}
  - {id: acme-only, detector: bias, threshold: 0.5, action: block, tenants: [acme]}
  - {id: chat-only, detector: bias, threshold: 0.5, action: flag, routes: [/v1/chat/completions]}
  - {id: disabled, detector: bias, threshold: 0.0, action: block, enabled: false}
""",
    "t.yaml",
)


def _fs(prompt: dict[str, list[float]], completion: dict[str, list[float]]) -> list[Finding]:
    return [Finding(d, "prompt", tuple(s)) for d, s in prompt.items()] + [
        Finding(d, "completion", tuple(s)) for d, s in completion.items()
    ]


BASE = {"scam": [0.1], "bias": [0.0]}
TH = {"scam": 0.7}


def test_strongest_action_wins_and_all_fired_are_listed() -> None:
    v = evaluate(POLICY, _fs(BASE, {"scam": [0.1, 0.95, 0.3], "bias": []}), thresholds=TH)
    assert v.action == "block" and v.blocked
    assert [f.rule_id for f in v.fired] == ["scam-log", "scam-flag", "scam-block", "scam-block2"]
    assert [f.rule_id for f in v.deciding] == ["scam-block", "scam-block2"]  # a tie keeps both
    assert v.message == "no scams"  # the first block rule's message
    flag = v.fired[1]
    assert flag.value == pytest.approx(0.45) and flag.threshold == 0.4 and flag.error is None
    assert v.steer == {}


def test_rules_on_one_detector_aggregate_independently() -> None:
    v = evaluate(POLICY, _fs(BASE, {"scam": [0.5, 0.0, 0.0, 0.0], "bias": []}), thresholds=TH)
    assert v.action == "log" and [f.rule_id for f in v.fired] == ["scam-log"]  # max 0.5, mean 0.125
    assert v.message is None
    assert evaluate(POLICY, _fs(BASE, {"scam": [], "bias": []}), thresholds=TH).action == "allow"


def test_tenant_and_route_scoping() -> None:
    fs = _fs(BASE, {"scam": [0.0], "bias": [0.6]})
    assert evaluate(POLICY, fs, thresholds=TH).fired == ()  # unscoped request: scoped rules skip
    assert evaluate(POLICY, fs, thresholds=TH, tenant="acme").action == "block"
    assert evaluate(POLICY, fs, thresholds=TH, tenant="globex").action == "allow"
    v = evaluate(POLICY, fs, thresholds=TH, tenant="globex", route="/v1/chat/completions")
    assert [f.rule_id for f in v.fired] == ["chat-only"]
    assert evaluate(POLICY, fs, thresholds=TH, route="/v1/completions").action == "allow"


def test_calibrated_threshold_resolved_from_the_caller() -> None:
    def prompt_verdict(score: float, th: dict[str, float] | None) -> tuple[str, tuple[str, ...]]:
        v = evaluate(POLICY, _fs({"scam": [score], "bias": []}, {}), phase="prompt", thresholds=th)
        return v.action, tuple(f.rule_id for f in v.fired)

    # (prompt phase: only the prompt-scope rule applies)
    assert prompt_verdict(0.69, {"scam": 0.7}) == ("allow", ())
    assert prompt_verdict(0.7, {"scam": 0.7}) == ("flag", ("scam-prompt",))
    assert prompt_verdict(0.7, {"scam": 0.71})[0] == "allow"
    action, _ = prompt_verdict(0.0, None)  # no calibrated threshold: cannot decide, fail closed
    assert action == "block"
    v = evaluate(POLICY, _fs({"scam": [0.0], "bias": []}, {}), phase="prompt")
    assert v.fired[0].error == "no calibrated threshold for detector 'scam'"


def test_detector_error_fails_closed_or_allows_as_configured() -> None:
    fs = [Finding("scam", "prompt", (0.0,)), Finding("scam", "completion", error="CUDA OOM")]
    fs.append(Finding("bias", "completion", ()))
    v = evaluate(POLICY, fs, thresholds=TH)
    assert v.action == "block" and v.message == POLICY.defaults.block_message
    errored = [f for f in v.fired if f.error]
    assert [f.rule_id for f in errored] == ["scam-log", "scam-flag", "scam-block", "scam-block2"]
    assert all(f.error == "CUDA OOM" and f.value is None and f.action == "block" for f in errored)

    lenient = POLICY.model_copy(
        update={"defaults": POLICY.defaults.model_copy(update={"action_on_detector_error": "allow"})}
    )
    v = evaluate(lenient, fs, thresholds=TH)
    assert v.action == "allow" and len(v.fired) == 4 and v.message is None


@pytest.mark.parametrize(
    ("findings", "error"),
    [
        ([Finding("scam", "prompt", ())], "no completion finding for detector 'scam'"),
        ([Finding("scam", "prompt", ()), Finding("scam", "completion", (0.1, math.nan))], NON_FINITE),
        ([Finding("scam", "prompt", ()), Finding("scam", "completion")], "no completion scores or max value"),
    ],
)
def test_undecidable_rules_fail_closed(findings: list[Finding], error: str) -> None:
    v = evaluate(POLICY, [*findings, Finding("bias", "completion", ())], thresholds=TH)
    assert v.action == "block"
    assert v.fired[0].error is not None and v.fired[0].error.startswith(error)


def test_precomputed_values_and_duplicate_findings() -> None:
    values = {Aggregation(kind="max"): 0.85, Aggregation(kind="mean"): 0.1}
    fs = [
        Finding("scam", "prompt", ()),
        Finding("scam", "completion", values=values),
        Finding("bias", "completion", ()),
    ]
    v = evaluate(POLICY, fs, thresholds=TH)
    assert [f.rule_id for f in v.fired] == ["scam-log", "scam-block"]
    # A whole-conversation value serves scope-both rules only, never prompt or completion ones.
    whole = Finding("scam", "both", values={Aggregation(kind="max"): 1.0})
    assert evaluate(POLICY, [*fs, whole], thresholds=TH) == v
    with pytest.raises(ValueError, match="two findings"):
        evaluate(POLICY, [*fs, Finding("scam", "prompt", ())])


STEER = parse_policy(
    """
name: s
rules:
  - {id: a, detector: bias, scope: both, threshold: 0.5, action: steer, steer: {latents: {1: 0.0, 2: -1.0}}}
  - {id: b, detector: bias, aggregation: {kind: ema, window: 4}, threshold: 0.3, action: steer,
     steer: {latents: detector}}
  - {id: c, detector: scam, threshold: 0.9, action: block}
""",
    "s.yaml",
)


def test_steer_rules_merge_clamps_earlier_rule_wins() -> None:
    clamps = {"bias": {2: 5.0, 3: 0.0}}
    fs = _fs({"bias": [0.0], "scam": []}, {"bias": [0.9, 0.9], "scam": [0.1]})
    v = evaluate(STEER, fs, clamps=clamps)
    assert v.action == "steer" and [f.rule_id for f in v.deciding] == ["a", "b"]
    assert v.steer == {1: 0.0, 2: -1.0, 3: 0.0}
    blocked = evaluate(
        STEER, _fs({"bias": [0.0], "scam": []}, {"bias": [0.9], "scam": [0.95]}), clamps=clamps
    )
    assert blocked.action == "block" and blocked.steer == {}  # steer clamps only accompany a steer verdict
    no_clamps = evaluate(STEER, fs, clamps={"bias": {}})  # steering that clamps nothing: fail closed
    assert (
        no_clamps.action == "block" and no_clamps.fired[1].error == "no steering clamps for detector 'bias'"
    )


def test_phases_and_scope_both() -> None:
    # Prompt phase: completion rules wait, scope both sees the prompt only.
    v = evaluate(STEER, [Finding("bias", "prompt", (0.6,))], phase="prompt")
    assert [f.rule_id for f in v.fired] == ["a"]
    # Completion phase: scope both reads prompt then completion; scope completion the completion only.
    v = evaluate(
        STEER, _fs({"bias": [0.9], "scam": []}, {"bias": [0.1], "scam": []}), clamps={"bias": {9: 0.0}}
    )
    assert [(f.rule_id, f.value) for f in v.fired] == [("a", 0.9)] and v.steer == {1: 0.0, 2: -1.0}
    # A precomputed whole-conversation value serves the scope-both rule.
    whole = Finding("bias", "both", values={Aggregation(kind="max"): 0.6})
    v = evaluate(STEER, [whole, Finding("bias", "completion", (0.0,)), Finding("scam", "completion", ())])
    assert [(f.rule_id, f.value) for f in v.fired] == [("a", 0.6)]


# ---- streaming == batch ----------------------------------------------------------------------------------
STREAM = parse_policy(
    """
name: stream
defaults: {action_on_detector_error: block}
rules:
  - {id: s-max, detector: scam, threshold: calibrated, action: block, message: stop}
  - {id: s-mean, detector: scam, aggregation: mean, threshold: 0.5, action: log}
  - {id: s-topk, detector: scam, aggregation: {kind: topk_mean, k: 3}, threshold: 0.7, action: flag}
  - {id: s-prompt, detector: scam, scope: prompt, threshold: 0.8, action: flag}
  - {id: d-sus, detector: deception, aggregation: {kind: sustained, threshold: 1.0, n: 3}, threshold: 0.6,
     action: flag}
  - {id: d-count, detector: deception, scope: both, aggregation: {kind: count_over, threshold: 0.7},
     threshold: 4, action: steer, steer: {latents: {5: 0.0}}}
  - {id: b-ema, detector: bias, scope: both, aggregation: {kind: ema, window: 8}, threshold: calibrated,
     action: steer, steer: {latents: detector}}
  - {id: b-allow, detector: bias, scope: prompt, aggregation: mean, threshold: 0.2, action: allow}
  - {id: b-tenant, detector: bias, threshold: 0.5, action: block, tenants: [acme]}
  - {id: s-det, detector: scam, aggregation: detector, threshold: calibrated, action: flag, min_tokens: 4}
  - {id: d-min, detector: deception, aggregation: mean, threshold: 0.3, action: log, min_tokens: 6}
""",
    "stream.yaml",
)
SCOPED = ("scam", "deception", "bias", "unused")


def _replay(seed: int, tenant: str | None) -> int:
    """Random interleaved token scores (with rare NaNs and detector failures); after every call the state's
    verdict must equal evaluate() over the findings so far. Returns the number of calls checked."""
    rng = random.Random(seed)
    # Sometimes a calibrated threshold is missing: both sides must fail closed the same way.
    thresholds = {"scam": 0.9} if seed % 5 == 0 else {"scam": 0.9, "bias": 0.4}
    clamps = {"bias": {1: 0.0, 5: 2.0}}
    # Sometimes the detector's own aggregation is unknown: `aggregation: detector` rules fail closed.
    aggs = {} if seed % 7 == 0 else {"scam": Aggregation(kind="mean")}
    kw: dict[str, Any] = {"thresholds": thresholds, "clamps": clamps, "aggregations": aggs}
    state = PolicyState(STREAM, tenant=tenant, **kw)
    seen: dict[tuple[str, str], list[float]] = {}
    errors: dict[tuple[str, str], str] = {}
    steps = 0
    scopes: tuple[tuple[Phase, int], ...] = (
        ("prompt", rng.randint(0, 8)),
        ("completion", rng.randint(1, 40)),
    )
    for scope, n in scopes:
        if scope == "completion" and rng.random() < 0.3:
            state.start_completion()
        for _ in range(n):
            for det in rng.sample(SCOPED, k=rng.randint(1, len(SCOPED))):
                r = rng.random()
                if r < 0.004:
                    which = scope if rng.random() < 0.5 else None
                    got = state.fail(det, f"{det} broke at {steps}", which)
                    for s in (which,) if which else ("prompt", "completion"):
                        errors[(det, s)] = f"{det} broke at {steps}"
                else:
                    score = math.nan if r < 0.006 else rng.random() ** 2
                    seen.setdefault((det, scope), []).append(score)
                    got = state.update(det, scope, score)
                phases: tuple[Phase, ...] = (
                    ("prompt", "completion") if state.phase == "completion" else ("prompt",)
                )
                fs = [
                    Finding(d, s, tuple(seen.get((d, s), ())), error=errors.get((d, s)))
                    for d in state.detectors
                    for s in phases
                ]
                want = evaluate(STREAM, fs, tenant=tenant, phase=state.phase, final=False, **kw)
                assert got == want, (seed, steps)
                steps += 1
    phases = ("prompt", "completion") if state.phase == "completion" else ("prompt",)
    fs = [
        Finding(d, s, tuple(seen.get((d, s), ())), error=errors.get((d, s)))
        for d in state.detectors
        for s in phases
    ]
    assert state.finish() == evaluate(STREAM, fs, tenant=tenant, phase=state.phase, final=True, **kw)
    return steps + 1


def test_policy_state_equals_evaluate_on_every_prefix() -> None:
    steps = sum(_replay(seed, tenant) for seed in range(40) for tenant in (None, "acme"))
    assert steps > 1000


def test_policy_state_order_and_scope_checks() -> None:
    state = PolicyState(STREAM, thresholds={"scam": 0.75, "bias": 0.4})
    assert state.verdict.action == "allow"  # (no phase assert: mypy would narrow it for good)
    assert state.update("scam", "prompt", 0.9).action == "flag"
    assert state.update("scam", "completion", 0.8).action == "block" and state.phase == "completion"
    assert state.verdict.message == "stop"
    with pytest.raises(ValueError, match="prompt scores after"):
        state.update("scam", "prompt", 0.1)
    with pytest.raises(ValueError, match="scope must be"):
        state.update("scam", "both", 0.1)  # type: ignore[arg-type]


def test_policy_state_verdicts_are_values() -> None:
    p: Policy = STREAM
    a, b = PolicyState(p), PolicyState(p)
    assert a.verdict == b.verdict and hash(a.verdict) == hash(b.verdict)


def test_steer_clamps_can_come_from_another_detector() -> None:
    from policies.evaluate import Finding, evaluate
    from policies.loader import parse_policy

    text = (
        "name: p\nrules:\n  - id: s\n    detector: probe\n    threshold: 0.5\n    action: steer\n"
        "    steer: {latents: detector, detector: twin}\n"
    )
    policy = parse_policy(text, known_detectors={"probe", "twin"})
    assert policy.steer_sources == ["twin"]
    findings = [Finding("probe", "completion", scores=(0.9,))]
    v = evaluate(policy, findings, clamps={"probe": {}, "twin": {7: 0.0}})
    assert v.action == "steer" and dict(v.steer) == {7: 0.0}
    # The rule's own detector has no clamps: without the twin's, the rule fails closed.
    assert evaluate(policy, findings, clamps={"probe": {1: 0.0}}).action == "block"


def test_steer_detector_is_checked_against_known_detectors() -> None:
    from policies.loader import check_policy_text

    text = (
        "name: p\nrules:\n  - id: s\n    detector: probe\n    threshold: 0.5\n    action: steer\n"
        "    steer: {latents: detector, detector: twn}\n"
    )
    issues = check_policy_text(text, "p.yaml", {"probe", "twin"})
    assert [str(i) for i in issues] == [
        "p.yaml:7: rules[0].steer.detector: unknown detector 'twn' (valid: probe, twin)"
    ]
    fixed = text.replace("detector: twn}", "detector: twin}").replace(
        "latents: detector,", "latents: {1: 0},"
    )
    assert "use it with `latents: detector`" in str(check_policy_text(fixed, "p.yaml", {"probe", "twin"}))


def test_min_tokens_waits_mid_stream_but_not_at_the_end() -> None:
    policy = parse_policy(
        "name: p\nrules:\n  - {id: m, detector: scam, aggregation: mean, threshold: 0.5, action: block,"
        " min_tokens: 3}\n"
    )
    state = PolicyState(policy)
    assert state.update("scam", "completion", 0.9).action == "allow"  # 1 token: too few to judge
    assert state.finish().action == "block"  # the message ended: judged on what there is
    one = [Finding("scam", "completion", (0.9,))]
    assert evaluate(policy, one, final=False).action == "allow" and evaluate(policy, one).action == "block"


def test_final_only_is_judged_when_the_message_ends() -> None:
    """last_mean reads the end of a statement: mid-stream its value is the newest tokens', so a
    final_only rule ignores it until the message has ended, then judges the whole message."""
    policy = parse_policy(
        "name: p\nrules:\n  - {id: f, detector: truth, aggregation: {kind: last_mean, k: 2}, threshold: 0.5,"
        " action: flag, final_only: true}\n"
    )
    state = PolicyState(policy)
    assert state.update("truth", "completion", 0.9).action == "allow"  # would fire mid-stream
    assert state.update("truth", "completion", 0.9).action == "allow"
    assert state.update("truth", "completion", 0.1).action == "allow"
    assert state.update("truth", "completion", 0.1).action == "allow"
    assert state.finish().action == "allow"  # the end of the message (0.1, 0.1) is what counts
    high = [Finding("truth", "completion", (0.1, 0.9, 0.9))]
    assert evaluate(policy, high, final=False).action == "allow" and evaluate(policy, high).action == "flag"
    for bad, match in (("action: block", "only for action log or flag"), ("scope: prompt", "scope")):
        with pytest.raises(PolicyError, match=match):
            parse_policy(
                "name: p\nrules:\n  - {id: f, detector: t, threshold: 0.5, final_only: true, "
                + ("action: flag, " if "action" not in bad else "")
                + bad
                + "}\n"
            )


def test_detector_aggregation_resolves_to_the_spec() -> None:
    policy = parse_policy(
        "name: p\nrules:\n  - {id: d, detector: scam, aggregation: detector, threshold: 0.5, action: flag}\n"
    )
    f = [Finding("scam", "completion", (0.9, 0.1, 0.1))]
    assert evaluate(policy, f, aggregations={"scam": Aggregation(kind="max")}).action == "flag"
    assert evaluate(policy, f, aggregations={"scam": Aggregation(kind="mean")}).action == "allow"
    failed = evaluate(policy, f)  # unknown: fails closed
    assert failed.action == "block" and "no aggregation known" in str(failed.fired[0].error)


def test_calibrated_operating_points() -> None:
    policy = parse_policy(
        "name: p\nrules:\n"
        "  - {id: f, detector: scam, aggregation: mean, threshold: calibrated@0.05, action: flag}\n"
        "  - {id: b, detector: scam, aggregation: mean, threshold: calibrated, action: block}\n"
    )
    f = [Finding("scam", "completion", (0.7,))]
    v = evaluate(policy, f, thresholds={"scam": 0.9, "scam@0.05": 0.6})
    assert v.action == "flag" and [r.rule_id for r in v.fired] == ["f"]
    missing = evaluate(policy, f, thresholds={"scam": 0.9})  # no such operating point: fails closed
    assert missing.action == "block" and "scam@0.05" in str(missing.fired[0].error)
    with pytest.raises(Exception, match="calibrated@FPR"):
        parse_policy(
            "name: p\nrules:\n  - {id: f, detector: scam, threshold: calibrated@five, action: flag}\n"
        )
