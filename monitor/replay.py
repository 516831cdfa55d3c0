"""Replay a draft policy over stored audit records: what would it have done to those requests?

Pure: records in, report out, no I/O. Each record is replayed with the live server's streaming semantics
(`monitor.monitoring.RequestMonitor` driven by `monitor.engine`): a `PolicyState` for the record's tenant
and route gets the prompt scores, stops there on a block, then each completion token's stored scores in
order, stops at the first token whose verdict blocks, and `finish()` judges the whole message (rules that
waited for `min_tokens`). So a draft equal to the live policy reproduces the stored verdict.

What the trail cannot tell, each such row says in its `note`:
- Only audited records exist: `allow` decisions are stored only with AUDIT_ALLOWED, so a stricter draft's
  effect on traffic the live policy allowed is invisible unless that setting was on.
- The prompt is stored as one value per detector (its own aggregation over the prompt tokens), replayed
  as a one-token prompt: exact for a prompt rule that uses the detector's aggregation when that is max,
  mean or topk_mean; approximate otherwise (other aggregations, scope both, prompt min_tokens > 1).
- Tokens after a live block were never generated: a looser draft that does not block by then is judged
  on the tokens up to the block only (and not as a finished message).
- Steering changes the tokens that follow, so where the draft steers differently from the live policy
  the later tokens (and their scores) would differ.
- A detector the draft reads but the live server did not score has no stored scores: its rules are left
  out of that row's replay. A detector that failed live is replayed as failed from the start.
- Scores are stored rounded to 4 decimals: a value within 5e-5 of a threshold may decide differently.
- `scope: conversation` rules are judged on the record's own turn only: earlier turns are not replayed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from detectors.aggregate import Aggregation
from policies.evaluate import PolicyState, Verdict, fired_rules, resolve_aggregation
from policies.schema import Policy, Rule

AUDITED_ONLY = (
    "Only audited requests are replayed: allow decisions are stored only when AUDIT_ALLOWED is on, so "
    "requests the live policy allowed are missing unless it was."
)
_EXACT_PROMPT_KINDS = ("max", "mean", "topk_mean")  # f([f(xs)]) == f(xs): a one-token prompt is exact


@dataclass(frozen=True)
class ReplayContext:
    """What only the detectors know (as in `monitor.monitoring.DetectorSet`): calibrated thresholds
    (`scam`, `scam@0.05`), each detector's own aggregation, and steering clamps (only whether a detector
    has any matters to a verdict)."""

    thresholds: Mapping[str, float] = field(default_factory=dict)
    aggregations: Mapping[str, Aggregation] = field(default_factory=dict)
    clamps: Mapping[str, Mapping[int, float]] = field(default_factory=dict)

    @classmethod
    def from_detector_set(cls, dset: Any) -> ReplayContext:
        return cls(dset.thresholds, dset.aggregations, dset.clamps)

    @classmethod
    def from_specs(cls, specs: Mapping[str, Any]) -> ReplayContext:
        """From detector specs alone (no weights loaded), e.g. for the CLI. Clamps mirror
        `SaeFeaturesDetector.clamp_for_steering` (latents with positive weight); probes have none."""
        thresholds: dict[str, float] = {}
        for name, spec in specs.items():
            thresholds[name] = float(spec.threshold)
            for fpr, value in spec.operating_points.items():
                thresholds[f"{name}@{float(fpr)}"] = float(value)
        clamps = {
            name: {lat.id: 0.0 for lat in getattr(spec, "latents", None) or [] if lat.weight > 0}
            for name, spec in specs.items()
        }
        return cls(thresholds, {n: s.aggregation for n, s in specs.items()}, clamps)


@dataclass(frozen=True)
class ReplayRow:
    id: str
    created: float
    tenant: str | None
    happened: str  # the stored verdict
    would: str  # the draft's verdict
    rules: list[dict[str, Any]]  # the draft's fired rules (id, detector, action, value, threshold[, error])
    changed: bool  # happened != would
    note: str | None  # why this row is approximate, if it is
    blocked_at: int | None = None  # completion token where the draft blocks (None: not, or at the prompt)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ReplayReport:
    rows: list[ReplayRow]
    counts: dict[str, dict[str, int]]  # happened verdict -> would verdict -> records
    note: str = AUDITED_ONLY

    @property
    def changed(self) -> list[ReplayRow]:
        return [r for r in self.rows if r.changed]


def replay(
    policy: Policy, records: Iterable[dict[str, Any]], context: ReplayContext | None = None
) -> ReplayReport:
    """The draft `policy`'s verdict on each stored record (see the module doc for what is approximate)."""
    ctx = context or ReplayContext()
    rows = [replay_record(policy, rec, ctx) for rec in records]
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        by_would = counts.setdefault(row.happened, {})
        by_would[row.would] = by_would.get(row.would, 0) + 1
    return ReplayReport(rows, counts)


def replay_record(policy: Policy, rec: dict[str, Any], ctx: ReplayContext) -> ReplayRow:
    fw: dict[str, Any] = rec.get("featurewatch") or {}
    tenant, route = rec.get("tenant"), rec.get("route")
    prompt_scores: dict[str, float] = rec.get("prompt_scores") or {}
    evidence: list[dict[str, Any]] = rec.get("evidence") or []
    errors: dict[str, str] = fw.get("detector_errors") or {}
    notes: list[str] = []
    recorded = set(prompt_scores) | set(errors) | {d for tok in evidence for d in tok.get("scores", {})}
    policy = _without_unrecorded(policy, tenant, route, recorded, notes)
    notes += _prompt_notes(policy, tenant, route, ctx)
    conv = [r.id for r in policy.rules if r.scope == "conversation" and r.applies_to(tenant, route)]
    if conv:
        notes.append(
            f"conversation rule(s) {', '.join(conv)} judged on this turn only (earlier turns not replayed)"
        )
    if errors:
        notes.append(
            f"detector(s) {', '.join(sorted(errors))} failed live: replayed as failed from the start"
        )

    state = PolicyState(
        policy,
        tenant=tenant,
        route=route,
        thresholds=ctx.thresholds,
        clamps=ctx.clamps,
        aggregations=ctx.aggregations,
    )
    for name, err in errors.items():
        state.fail(name, err)
    for name, value in prompt_scores.items():
        if name not in errors:
            state.update(name, "prompt", value)
    verdict, blocked_at = _completion(state, rec, fw, evidence, errors, notes)
    return ReplayRow(
        id=str(rec.get("id")),
        created=float(rec.get("created") or 0),
        tenant=tenant,
        happened=str(rec.get("verdict")),
        would=verdict.action,
        rules=fired_rules(verdict),
        changed=verdict.action != rec.get("verdict"),
        note="; ".join(notes) or None,
        blocked_at=blocked_at,
    )


def _completion(
    state: PolicyState,
    rec: dict[str, Any],
    fw: dict[str, Any],
    evidence: list[dict[str, Any]],
    errors: Mapping[str, str],
    notes: list[str],
) -> tuple[Verdict, int | None]:
    """Feed the completion like the engine: (final verdict, token index where the draft blocked)."""
    if state.verdict.blocked:  # the prompt blocks: no completion is generated
        return state.finish(), None
    if fw.get("prompt_verdict") == "block" and not evidence:
        notes.append("the live policy blocked at the prompt: no completion exists to judge")
    state.start_completion()
    steer_from: int | None = None
    for tok in evidence:
        for name, score in (tok.get("scores") or {}).items():
            if name not in errors:
                state.update(name, "completion", float(score))
        if state.verdict.blocked:
            final = state.finish()  # the engine finishes a blocked message too
            _steer_notes(fw, steer_from, notes)
            return final, int(tok["index"])
        if steer_from is None and state.verdict.action == "steer":
            steer_from = int(tok["index"]) + 1  # clamps act from the next token on
    _steer_notes(fw, steer_from, notes)
    live_block = fw.get("blocked_at")
    if live_block is not None and evidence and live_block <= int(evidence[-1]["index"]):
        notes.append(
            f"the live policy blocked at token {live_block}; later tokens were never generated, so the "
            f"draft is judged on tokens 0-{live_block} only, as an unfinished message"
        )
        return state.verdict, None
    final = state.finish()
    # Judged on the whole message (a rule that waited for min_tokens): the engine withholds what is held
    # back and counts the block at the message's end.
    return final, (len(evidence) if final.blocked else None)


def _steer_notes(fw: dict[str, Any], steer_from: int | None, notes: list[str]) -> None:
    if fw.get("steered") and steer_from is None:
        notes.append("the live policy steered this completion: unsteered tokens would differ")
    elif steer_from is not None and not fw.get("steered"):
        notes.append(f"the draft steers from token {steer_from}: later tokens would differ")


def _without_unrecorded(
    policy: Policy, tenant: str | None, route: str | None, recorded: set[str], notes: list[str]
) -> Policy:
    """The policy minus the rules that read detectors this record has no scores for."""
    missing = sorted({r.detector for r in policy.rules if r.applies_to(tenant, route)} - recorded)
    if not missing:
        return policy
    skipped = [r.id for r in policy.rules if r.detector in missing and r.applies_to(tenant, route)]
    notes.append(
        f"no stored scores for detector(s) {', '.join(missing)} (not scored live): rule(s) "
        f"{', '.join(skipped)} not replayed"
    )
    rules = [r.model_copy(update={"enabled": False}) if r.detector in missing else r for r in policy.rules]
    return policy.model_copy(update={"rules": rules})


def _prompt_notes(policy: Policy, tenant: str | None, route: str | None, ctx: ReplayContext) -> list[str]:
    approx = [r.id for r in policy.rules if r.applies_to(tenant, route) and not _prompt_exact(r, ctx)]
    if not approx:
        return []
    return [
        f"rule(s) {', '.join(approx)} read the prompt, stored as one aggregated score per detector: "
        "approximate"
    ]


def _prompt_exact(rule: Rule, ctx: ReplayContext) -> bool:
    if rule.scope in ("completion", "conversation"):  # they read no prompt scores
        return True
    if rule.scope == "both" or rule.min_tokens > 1:
        return False
    agg, _ = resolve_aggregation(rule, ctx.aggregations)
    own = ctx.aggregations.get(rule.detector)
    return agg is not None and agg == own and agg.kind in _EXACT_PROMPT_KINDS
