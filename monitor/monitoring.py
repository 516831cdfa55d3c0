"""Per-request monitoring: detector token scores -> streaming policy verdict, plus the evidence behind it.

`DetectorSet` is what a server loads once (detectors, their calibrated thresholds and steering clamps, the
union of residual points and SAE latents they read). `RequestMonitor` follows one request: it scores the
prompt tokens, then each completion token before that token is emitted, feeds `policies.PolicyState`, and
answers whether generation may go on. Its `summary()` is the `featurewatch` field of the response and the
core of the audit record.

Which prompt positions are scored mirrors `detectors.extract` (the scoring contract): special tokens and
position 0 are skipped, because their residuals are attention-sink outliers the detectors never saw.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from detectors.aggregate import Aggregation, RunningAggregate, aggregate
from detectors.base import Detector, TokenFeatures, wants_all_latents
from monitor.conversation import History
from monitor.evidence import Labels, TokenEvidence, attributed, most_active
from policies.evaluate import Phase, PolicyState, Verdict, fired_rules
from policies.schema import Policy


@dataclass(frozen=True)
class DetectorSet:
    """Loaded detectors and what the generator must capture for them."""

    detectors: dict[str, Detector]
    report: tuple[str, ...]  # scored on every request (besides the policy's own detectors)
    thresholds: dict[str, float]
    clamps: dict[str, dict[int, float]]
    aggregations: dict[str, Aggregation]  # each spec's own (for `aggregation: detector` rules)
    points: list[str]  # residual hook points any detector reads
    latent_ids: list[int]  # SAE latents watched: every detector's (also the evidence shown per token)
    labels: Labels | None = None
    # Detectors whose top latents come from reading them through the SAE decoder (monitor.evidence): when
    # any is scored, generation encodes every latent so the audit trail can name them.
    attributing: tuple[str, ...] = ()

    @classmethod
    def build(
        cls, detectors: Mapping[str, Detector], report: list[str], labels: Labels | None = None
    ) -> DetectorSet:
        dets = dict(detectors)
        spec_labels = {
            lat.id: lat.label
            for d in dets.values()
            for lat in getattr(d.spec, "latents", None) or []
            if lat.label
        }

        def label(i: int) -> str:  # the SAE's dashboard label, else a detector spec's
            return (labels(i) if labels is not None else "") or spec_labels.get(i, "")

        return cls(
            detectors=dets,
            report=tuple(report),
            thresholds={
                **{n: float(d.spec.threshold) for n, d in dets.items()},
                **{
                    f"{n}@{float(fpr)}": float(v)
                    for n, d in dets.items()
                    for fpr, v in d.spec.operating_points.items()
                },
            },
            clamps={n: dict(d.clamp_for_steering()) for n, d in dets.items()},
            aggregations={n: d.spec.aggregation for n, d in dets.items()},
            points=list(dict.fromkeys(p for d in dets.values() for p in d.hook_points())),
            latent_ids=sorted({i for d in dets.values() for i in d.latent_ids()}),
            labels=label,
            attributing=tuple(n for n, d in dets.items() if wants_all_latents(d)),
        )

    def scored_for(self, policy: Policy) -> list[str]:
        """Detectors scored for a request under `policy`: the reported ones and every one its rules read."""
        names = list(dict.fromkeys([*self.report, *policy.detectors]))
        return [n for n in names if n in self.detectors]


@dataclass
class RequestMonitor:
    """Monitoring state of one request. Not thread-safe: the engine thread alone calls it."""

    dset: DetectorSet
    policy: Policy
    tenant: str | None = None
    route: str | None = None
    evidence_k: int = 3  # watched latents kept per token for the audit trail
    # The request's conversation: its earlier turns (loaded before generation), for conversation rules.
    conversation: History | None = None
    state: PolicyState = field(init=False)
    names: list[str] = field(init=False)
    prompt_verdict: Verdict | None = None
    peaks: dict[str, float] = field(default_factory=dict)  # completion max token score per detector
    prompt_peaks: dict[str, float] = field(default_factory=dict)
    # Each detector's own aggregation over the completion (prompt) so far: its message-level score, the
    # value `featurewatch score` and /v1/monitor/score report.
    values: dict[str, RunningAggregate] = field(default_factory=dict)
    prompt_values: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    tokens: list[TokenEvidence] = field(default_factory=list)
    seconds: float = 0.0  # wall time spent in observe_* (detectors + policy), for the overhead metric
    policy_seconds: float = 0.0  # of which in policy evaluation
    steered_at: int | None = None  # first completion token generated under steering clamps
    blocked_at: int | None = None  # index of the completion token that was withheld
    _all_ids: list[int] = field(default_factory=list)  # 0..d_sae−1, built once for attributed evidence
    _attributing: dict[str, Detector] = field(default_factory=dict)  # this request's attributing probes

    def __post_init__(self) -> None:
        self.state = PolicyState(
            self.policy,
            tenant=self.tenant,
            route=self.route,
            thresholds=self.dset.thresholds,
            clamps=self.dset.clamps,
            aggregations=self.dset.aggregations,
            conversation=self.conversation.scores() if self.conversation is not None else None,
            conversation_error=self.conversation.error if self.conversation is not None else None,
        )
        self.names = self.dset.scored_for(self.policy)
        self._attributing = {n: self.dset.detectors[n] for n in self.dset.attributing if n in self.names}

    # ---- observation ------------------------------------------------------------------------------
    def observe_prompt(
        self,
        token_ids: list[int],
        latents: torch.Tensor,
        resid: Mapping[str, torch.Tensor],
        special: set[int],
    ) -> Verdict:
        """Score the prompt (T tokens; latents (T, n_watched), resid {point: (T, d_in)}) and return the
        prompt-phase verdict (prompt and scope-both rules)."""
        with self._clock("seconds"):
            keep = [t for t, tok in enumerate(token_ids) if t > 0 and tok not in special]
            idx = torch.tensor(keep, dtype=torch.long)
            feats = self._features(
                latents.index_select(0, idx), {p: r.index_select(0, idx) for p, r in resid.items()}
            )
            for name in self.names:
                scores = self._score(name, feats, "prompt")
                if scores is None:
                    continue
                for s in scores:
                    self._update(name, "prompt", s)
                self.prompt_peaks[name] = max(scores, default=0.0)
                self.prompt_values[name] = aggregate(scores, self.dset.aggregations[name])
            self.prompt_verdict = self.state.verdict
            return self.prompt_verdict

    def observe_token(
        self,
        index: int,
        text: str,
        latents: torch.Tensor,
        resid: Mapping[str, torch.Tensor],
        full_latents: torch.Tensor | None = None,
    ) -> Verdict:
        """Score one completion token (latents (n_watched,), resid {point: (d_in,)}) before it is emitted.
        `full_latents` (d_sae,), when the generator encoded them all, name the latents behind a probe."""
        with self._clock("seconds"):
            feats = self._features(latents[None], {p: r[None] for p, r in resid.items()})  # T = 1
            if not self.tokens:
                self.state.start_completion()
            scores: dict[str, float] = {}
            for name in self.names:
                got = self._score(name, feats, "completion")
                if got is None:
                    continue
                scores[name] = got[0]
                self._update(name, "completion", got[0])
                self.peaks[name] = max(self.peaks.get(name, 0.0), got[0])
                if name not in self.values:
                    self.values[name] = RunningAggregate(self.dset.aggregations[name])
                self.values[name].update(got[0])
            self.tokens.append(self._evidence(index, text, scores, latents, resid, full_latents))
            verdict = self.state.verdict
            if verdict.blocked and self.blocked_at is None:
                self.blocked_at = index
            return verdict

    def finish(self) -> Verdict:
        """The final verdict, over the whole message (rules waiting for `min_tokens` are judged now;
        completion rules see an empty completion when nothing was generated)."""
        if self.prompt_verdict is not None and not self.tokens and not self.prompt_verdict.blocked:
            self.state.start_completion()
        return self.state.finish()

    # ---- internals ---------------------------------------------------------------------------------
    @contextmanager
    def _clock(self, counter: str) -> Iterator[None]:
        """Adds the block's wall time to `self.<counter>` (seconds), even when it raises."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, counter, getattr(self, counter) + time.perf_counter() - t0)

    def _update(self, name: str, scope: Phase, score: float) -> None:
        with self._clock("policy_seconds"):
            self.state.update(name, scope, score)

    def _features(self, latents: torch.Tensor, resid: dict[str, torch.Tensor]) -> TokenFeatures:
        lat = latents if self.dset.latent_ids else None
        return TokenFeatures(resid=resid, latents=lat, latent_ids=list(self.dset.latent_ids))

    def _score(self, name: str, feats: TokenFeatures, scope: str) -> list[float] | None:
        if name in self.errors:
            return None
        try:
            return [float(s) for s in self.dset.detectors[name].score_tokens(feats).tolist()]
        except Exception as e:  # a broken detector fails closed through the policy, never crashes serving
            self.errors[name] = f"{type(e).__name__}: {e}"
            self.state.fail(name, self.errors[name])
            return None

    def _evidence(
        self,
        index: int,
        text: str,
        scores: dict[str, float],
        latents: torch.Tensor,
        resid: Mapping[str, torch.Tensor],
        full: torch.Tensor | None,
    ) -> TokenEvidence:
        if full is not None and self.evidence_k > 0:
            if len(self._all_ids) != full.numel():
                self._all_ids = list(range(full.numel()))
            limits = self.dset.thresholds
            got = attributed(self._attributing, scores, full, resid, self._all_ids, self.evidence_k, limits)
            if got is not None:
                return TokenEvidence(index, text, scores, got[0], got[1])
        return TokenEvidence(index, text, scores, most_active(latents, self.dset.latent_ids, self.evidence_k))

    # ---- reporting ----------------------------------------------------------------------------------
    def summary(self, verdict: Verdict | None = None) -> dict[str, Any]:
        """The response's `featurewatch` field: verdict, rules fired and why, peak scores."""
        v = verdict or self.state.verdict
        return {
            "verdict": v.action,
            "prompt_verdict": self.prompt_verdict.action if self.prompt_verdict else None,
            "policy": f"{self.policy.name}@{self.policy.version}",
            "rules": fired_rules(v),
            "scores": {k: round(a.value, 4) for k, a in self.values.items()},
            "peak_token_scores": {k: round(x, 4) for k, x in self.peaks.items()},
            "prompt_scores": {k: round(x, 4) for k, x in self.prompt_values.items()},
            "steered": self.steered_at is not None,
            "blocked_at": self.blocked_at,
            "message": v.message,
            **({"detector_errors": dict(self.errors)} if self.errors else {}),
            **({"conversation": self._conversation_summary()} if self.conversation is not None else {}),
        }

    def turn_scores(self) -> dict[str, float] | None:
        """This turn's score per detector (its own aggregation over the completion), as a conversation
        stores it; None when no completion token was scored (such a turn is not stored)."""
        return {k: a.value for k, a in self.values.items()} if self.tokens else None

    def _conversation_summary(self) -> dict[str, Any]:
        """`{id, turns, scores: {detector: [score per turn, oldest first, this one last]}}`."""
        assert self.conversation is not None
        scores = {k: list(v) for k, v in self.conversation.scores().items()}
        for k, v in (self.turn_scores() or {}).items():
            scores.setdefault(k, []).append(v)
        turns = len(self.conversation.turns) + (1 if self.tokens else 0)
        error = {"error": self.conversation.error} if self.conversation.error else {}
        rounded = {k: [round(x, 4) for x in v] for k, v in scores.items()}
        return {"id": self.conversation.id, "turns": turns, "scores": rounded, **error}

    def evidence(self) -> list[dict[str, Any]]:
        """Per completion token: scores and top watched latents (the audit trail's sparse evidence)."""
        return [t.as_dict(self.dset.labels) for t in self.tokens]
