"""Replaying draft policies over audit records (monitor.replay).

Histories are made by the real monitor (`audit_testing.monitored`: `RequestMonitor` over chosen token
scores, driven the way `monitor.engine` drives it) and `build_record` stores the result as the audit
trail would. The ground truth for a draft is the same live run under the draft. The last test runs the
real tiny-model server and replays what it stored.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import httpx
import pytest
from audit_testing import Scores, monitored, scripted_set
from fw_testing import make_settings, policy_text, rule, running

from monitor.audit_record import build_record
from monitor.replay import AUDITED_ONLY, ReplayContext, replay
from policies import Policy, parse_policy

ACTIONS = ("log", "flag", "steer", "block")
DSET = scripted_set(("a", "max"), ("b", "mean"))  # a reads latent 0 (own aggregation max), b latent 1
CTX = ReplayContext.from_detector_set(DSET)


def live(
    policy: Policy,
    prompt: Scores,
    completion: Scores,
    tenant: str | None = "acme",
    verdicts: tuple[str, ...] = ACTIONS,
) -> dict[str, Any] | None:
    """The audit record of one request as the engine runs it (None when its verdict is not in
    `verdicts`: the store skips allow unless AUDIT_ALLOWED)."""
    ev = monitored(DSET, policy, prompt, completion, tenant)
    return build_record(ev, redact=False) if ev.verdict in verdicts else None


def pol(*rules: str, version: int = 1) -> Policy:
    return parse_policy(policy_text(*rules, version=version))


FLAG_A = rule("flag-a", "a", "flag", 0.5)
BLOCK_A_3 = rule("block-a-3", "a", "block", 3, aggregation="{kind: count_over, threshold: 0.5}")
BLOCK_B_MEAN = rule("block-b", "b", "block", "calibrated", aggregation="detector", min_tokens="4")
LOG_B = rule("log-b", "b", "log", "calibrated@0.05", aggregation="detector")
PROMPT_FLAG_B = rule("prompt-b", "b", "flag", 0.5, scope="prompt", aggregation="detector")
STEER_A = rule("steer-a", "a", "steer", 0.75, steer="{latents: detector}")
POLICIES = [
    pol(FLAG_A),
    pol(BLOCK_A_3, LOG_B),
    pol(BLOCK_B_MEAN, FLAG_A),
    pol(PROMPT_FLAG_B, LOG_B),
    pol(rule("prompt-block-a", "a", "block", 0.9, scope="prompt"), FLAG_A),
]
GRID = [i / 8 for i in range(9)]  # exact in float32 and at 4 decimals: stored scores equal live ones


def history(seed: int, n: int = 40) -> list[tuple[list[tuple[float, float]], list[tuple[float, float]]]]:
    rng = random.Random(seed)

    def scores(k: int) -> list[tuple[float, float]]:
        return [(rng.choice(GRID), rng.choice(GRID)) for _ in range(k)]

    return [(scores(rng.randint(1, 5)), scores(rng.randint(0, 10))) for _ in range(n)]


@pytest.mark.parametrize("index", range(len(POLICIES)))
def test_the_live_policy_reproduces_every_stored_verdict(index: int) -> None:
    policy = POLICIES[index]
    recs = [r for p, c in history(index) if (r := live(policy, p, c, verdicts=("allow", *ACTIONS)))]
    report = replay(policy, recs, CTX)
    assert len(report.rows) == len(recs) == 40
    for rec, row in zip(recs, report.rows, strict=True):
        assert (row.happened, row.would, row.changed) == (rec["verdict"], rec["verdict"], False), rec["id"]
        assert row.blocked_at == rec["featurewatch"]["blocked_at"], rec["id"]
        assert [r["id"] for r in row.rules] == [r["id"] for r in rec["rules"]]
    assert sum(sum(by.values()) for by in report.counts.values()) == 40
    assert all(set(by) == {h} for h, by in report.counts.items())  # nothing moves off the diagonal


@pytest.mark.parametrize(
    ("live_i", "draft_i"), [(i, j) for i in range(len(POLICIES)) for j in range(len(POLICIES)) if i != j]
)
def test_a_draft_matches_a_live_run_under_the_draft_where_the_trail_suffices(
    live_i: int, draft_i: int
) -> None:
    live_policy, draft = POLICIES[live_i], POLICIES[draft_i]
    runs = history(100 + live_i)
    recs = [live(live_policy, p, c, verdicts=("allow", *ACTIONS)) for p, c in runs]
    report = replay(draft, [r for r in recs if r], CTX)
    exact = 0
    for row, (p, c) in zip(report.rows, runs, strict=True):
        truth = live(draft, p, c, verdicts=("allow", *ACTIONS))
        assert truth is not None
        if row.note is None:
            exact += 1
            assert row.would == truth["verdict"], (row, truth["featurewatch"])
            assert row.blocked_at == truth["featurewatch"]["blocked_at"]
        else:  # approximate only where the trail lacks what the draft would have needed
            assert "never generated" in row.note or "prompt" in row.note
    assert exact > 0


def test_a_stricter_draft_blocks_at_the_right_token() -> None:
    completion = [(0.875, 0.0), (0.125, 0.0), (0.75, 0.0), (0.625, 0.0), (1.0, 0.0)]
    flagged = live(pol(FLAG_A), [(0.0, 0.0)], completion)
    allowed = live(pol(rule("never", "b", "block", 0.9)), [(0.0, 0.0)], completion, verdicts=("allow",))
    assert flagged is not None and allowed is not None
    assert flagged["verdict"] == "flag" and allowed["verdict"] == "allow"
    report = replay(pol(BLOCK_A_3), [flagged, allowed], CTX)
    for row in report.rows:
        assert row.would == "block" and row.changed and row.note is None
        assert row.blocked_at == 3  # the third token scoring >= 0.5 is token 3 (token 1 scores 0.125)
        assert row.rules == [
            {"id": "block-a-3", "detector": "a", "action": "block", "value": 3.0, "threshold": 3.0}
        ]
    assert report.counts == {"flag": {"block": 1}, "allow": {"block": 1}}
    assert report.note == AUDITED_ONLY and "AUDIT_ALLOWED" in report.note


def test_a_looser_draft_cannot_see_past_the_live_block() -> None:
    completion = [(1.0, 0.0)] * 6
    rec = live(pol(BLOCK_A_3), [(0.0, 0.0)], completion)
    assert rec is not None and rec["verdict"] == "block" and rec["featurewatch"]["blocked_at"] == 2
    assert len(rec["evidence"]) == 3  # tokens 3-5 were never generated
    row = replay(pol(FLAG_A), [rec], CTX).rows[0]
    assert (row.happened, row.would, row.changed, row.blocked_at) == ("block", "flag", True, None)
    assert row.note is not None and "blocked at token 2" in row.note and "never generated" in row.note


def test_prompt_rules_note_when_one_stored_score_is_approximate() -> None:
    rec = live(pol(FLAG_A), [(0.5, 0.5), (0.75, 0.25)], [(1.0, 0.0)])
    assert rec is not None
    exact = replay(pol(PROMPT_FLAG_B), [rec], CTX).rows[0]  # b's own aggregation (mean), kind mean
    assert exact.note is None
    for draft in (
        rule("ema-b", "b", "flag", 0.5, scope="prompt", aggregation="{kind: ema, window: 4}"),
        rule("both-a", "a", "flag", 0.5, scope="both"),
        rule("slow-a", "a", "flag", 0.5, scope="prompt", min_tokens="2"),
    ):
        row = replay(pol(draft), [rec], CTX).rows[0]
        assert row.note is not None and "approximate" in row.note and draft.split()[2] in row.note


def test_rules_on_detectors_the_server_did_not_score_are_left_out_with_a_note() -> None:
    rec = live(pol(FLAG_A), [(0.0, 0.0)], [(1.0, 1.0)])
    assert rec is not None
    row = replay(pol(FLAG_A, rule("c-block", "c", "block", 0.0)), [rec], CTX).rows[0]
    assert row.would == "flag" and row.note is not None and "c-block" in row.note and "not scored" in row.note


def test_calibrated_thresholds_need_the_detectors_and_fail_closed_without() -> None:
    rec = live(pol(LOG_B), [(0.0, 0.0)], [(0.0, 0.375)])
    assert rec is not None and rec["verdict"] == "log"
    assert replay(pol(LOG_B), [rec], CTX).rows[0].would == "log"
    specs = {name: det.spec for name, det in DSET.detectors.items()}
    assert replay(pol(LOG_B), [rec], ReplayContext.from_specs(specs)).rows[0].would == "log"
    bare = replay(pol(LOG_B), [rec]).rows[0]  # no detector knowledge: the rule fails closed (block)
    assert bare.would == "block" and "no aggregation known" in bare.rules[0]["error"]


def test_steering_differences_are_noted() -> None:
    steered = live(pol(STEER_A), [(0.0, 0.0)], [(0.5, 0.0), (0.875, 0.0), (0.0, 0.0)])
    assert steered is not None and steered["verdict"] == "steer" and steered["featurewatch"]["steered"]
    row = replay(pol(FLAG_A), [steered], CTX).rows[0]
    assert row.note is not None and "steered" in row.note
    flagged = live(pol(FLAG_A), [(0.0, 0.0)], [(0.5, 0.0), (0.875, 0.0), (0.0, 0.0)])
    assert flagged is not None
    row = replay(pol(STEER_A), [flagged], CTX).rows[0]
    assert row.would == "steer" and row.note is not None and "from token 2" in row.note


# ---- end to end: records the real server stored -------------------------------------------------------
def test_replay_of_records_the_server_stored(
    tiny_model_dir: Path, tiny_sae_dir: Path, tmp_path: Path
) -> None:
    from monitor.runtime import load_runtime
    from monitor.server import create_app

    live_rule = rule("flag-4", "always", "flag", 4, aggregation="{kind: count_over, threshold: 0.5}")
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(live_rule))
    settings = make_settings(tiny_model_dir, tiny_sae_dir, policy)
    rt = load_runtime(settings)
    rt.engine.gen.eos_ids = set()  # the random model may pick EOS any time; full lengths wanted
    app = create_app(settings, rt, close_runtime=True)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "temperature": 0}
    with running(app) as url:
        ids = [
            httpx.post(f"{url}/chat/completions", json={**body, "max_tokens": 6}).json()["id"]
            for _ in range(2)
        ]
        assert app.state.audit.flush()
        recs = [app.state.audit.get(i) for i in ids]
        ctx = ReplayContext.from_detector_set(rt.dset)
        same = replay(rt.policy, recs, ctx)
        block2 = rule("block-2", "always", "block", 2, aggregation="{kind: count_over, threshold: 0.5}")
        stricter = replay(parse_policy(policy_text(block2)), recs, ctx)
        # the truth for the stricter draft: the server itself running it
        policy.write_text(policy_text(block2))
        assert not rt.holder.reload()
        blocked = httpx.post(f"{url}/chat/completions", json={**body, "max_tokens": 6}).json()
    assert [r.would for r in same.rows] == ["flag", "flag"] and not any(r.changed for r in same.rows)
    assert [(r.would, r.blocked_at) for r in stricter.rows] == [("block", 1), ("block", 1)]
    assert blocked["featurewatch"]["verdict"] == "block" and blocked["featurewatch"]["blocked_at"] == 1
