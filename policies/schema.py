"""Policy files: which detector values trigger which action, for which tenants and routes.

Pydantic v2 models with `extra="forbid"`, so a typo in a field name is an error, never a silently ignored
rule. Cross-field checks (threshold range vs aggregation, `steer` iff action is steer) are field validators
on the later field, so each error carries the loc of the field at fault and `policies.loader` can point at
its line. The semantics are documented in policies/README.md.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from detectors.aggregate import Aggregation
from detectors.spec import NAME_PATTERN, Scope

Action = Literal["allow", "log", "flag", "steer", "block"]
# A detector spec's scopes, plus `conversation`: the detector's per-turn scores over the conversation so far
# (policies.conversation).
RuleScope = Literal[Scope, "conversation"]  # flat: one "unknown scope" error per typo
# Strength order: several firing rules combine to the strongest action.
ACTIONS: tuple[Action, ...] = ("allow", "log", "flag", "steer", "block")
ACTION_RANK: dict[str, int] = {a: i for i, a in enumerate(ACTIONS)}
CONVERSATION = "conversation"
CALIBRATED = "calibrated"  # threshold: the detector spec's own calibrated threshold, resolved at evaluation
# "calibrated@0.05": the detector's threshold calibrated for that false-positive rate (an operating point
# stored in its spec by `featurewatch detectors calibrate --operating-point`).
CALIBRATED_AT = re.compile(r"^calibrated@(0?\.\d+)$")


def threshold_key(detector: str, threshold: str) -> str:
    """Key of a calibrated threshold in the evaluator's `thresholds` map: `scam` or `scam@0.05`."""
    m = CALIBRATED_AT.match(threshold)
    return f"{detector}@{float(m.group(1))}" if m else detector


DEFAULT_BLOCK_MESSAGE = "This response was stopped by the safety policy."
DUPLICATE_ID_ERROR = "duplicate_rule_id"


class Steer(BaseModel):
    """`latents: {id: value}` clamps, or `latents: detector` for a detector's own `clamp_for_steering()`:
    the rule's detector, or `detector: NAME` (e.g. a residual probe decides, and its SAE-feature twin,
    which knows which latents carry the concept, supplies the clamps)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latents: dict[int, float] | Literal["detector"]
    detector: str | None = Field(default=None, pattern=NAME_PATTERN)

    @model_validator(mode="after")
    def _detector_needs_latents_detector(self) -> Steer:
        if self.detector is not None and self.latents != "detector":
            raise ValueError("`detector` names where clamps come from: use it with `latents: detector`")
        return self

    @field_validator("latents", mode="before")
    @classmethod
    def _check_latents(cls, raw: Any) -> Any:
        # Checked by hand: pydantic's union errors would list one failure per union member.
        if raw == "detector":
            return raw
        if not isinstance(raw, dict) or not raw:
            raise ValueError("must be 'detector' or a non-empty mapping {latent_id: value}")
        out: dict[int, float] = {}
        for key, value in raw.items():
            # Digit strings too: JSON (e.g. a policy pushed over the wire) has only string keys.
            lid = int(key) if isinstance(key, str) and key.isdigit() else key
            if isinstance(lid, bool) or not isinstance(lid, int) or lid < 0:
                raise ValueError(f"latent id {key!r} must be a non-negative integer")
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"clamp value for latent {key} must be a finite number, got {value!r}")
            out[lid] = float(value)
        return out


class Rule(BaseModel):
    """One rule: `aggregation(detector scores over scope) >= threshold` → `action`.

    Field order matters: validators of later fields read earlier ones (threshold reads aggregation, steer
    reads action) from `info.data`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=NAME_PATTERN)
    enabled: bool = True
    detector: str = Field(pattern=NAME_PATTERN)
    scope: RuleScope = "completion"
    # An aggregation, or "detector": the detector spec's own (the one its calibrated threshold is for).
    # Scope conversation: the aggregation over the turns' scores; it must be named.
    aggregation: Aggregation | Literal["detector"] = Field(default_factory=Aggregation)
    # A number, "calibrated" or "calibrated@FPR". For count_over a whole number of tokens (of turns for
    # scope conversation), else in [0, 1]. Scope conversation takes numbers only.
    threshold: float | str
    action: Action
    steer: Steer | None = Field(default=None, validate_default=True)
    tenants: list[str] | None = None  # None: every tenant
    routes: list[str] | None = None  # None: every route
    message: str | None = None  # shown to the client when this rule blocks
    # The rule waits until its scope has this many scored tokens (or the message has ended): a mean over
    # the first token or two is noise. The server holds back min_tokens-1 tokens for block rules.
    min_tokens: int = Field(default=0, ge=0)
    # Judged only once the message has ended, on the whole message: for aggregations that read the end
    # of a statement (last_mean, mix), whose mid-stream value is the newest tokens'. log / flag only: a block
    # or steer decided after the message has ended would come too late to act.
    final_only: bool = False

    @field_validator("final_only")
    @classmethod
    def _final_only_records(cls, final_only: bool, info: ValidationInfo) -> bool:
        action, scope = info.data.get("action"), info.data.get("scope")
        if final_only and action in ("block", "steer"):
            raise ValueError(
                f"only for action log or flag: a {action} judged after the message ended cannot act"
            )
        if final_only and scope in ("prompt", CONVERSATION):
            raise ValueError(f"only for scope completion or both (this rule's scope is {scope})")
        return final_only

    @field_validator("threshold", mode="before")
    @classmethod
    def _check_threshold(cls, raw: Any, info: ValidationInfo) -> Any:
        agg = info.data.get("aggregation")  # absent when the aggregation itself was invalid
        counts = isinstance(agg, Aggregation) and not agg.bounded
        if raw == CALIBRATED or (isinstance(raw, str) and CALIBRATED_AT.match(raw)):
            if info.data.get("scope") == CONVERSATION:
                raise ValueError("scope conversation needs a number: thresholds are calibrated per message")
            if counts:
                raise ValueError("'calibrated' is a [0, 1] score threshold; count_over needs a token count")
            return raw
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
            raise ValueError(
                f"must be a number, 'calibrated' or 'calibrated@FPR' (e.g. calibrated@0.05), got {raw!r}"
            )
        if counts:
            if raw < 0 or raw != int(raw):
                what = "turns" if info.data.get("scope") == CONVERSATION else "tokens"
                raise ValueError(f"count_over counts {what}: need a whole number >= 0, got {raw!r}")
        elif not 0.0 <= raw <= 1.0:
            raise ValueError(f"must lie in [0, 1] (a score threshold), got {raw!r}")
        return float(raw)

    @field_validator("aggregation", mode="before")
    @classmethod
    def _detector_or_aggregation(cls, raw: Any, info: ValidationInfo) -> Any:
        # Checked by hand so a typo reads "unknown aggregation", not one error per union member.
        if raw == "detector" and info.data.get("scope") == CONVERSATION:
            raise ValueError(
                "scope conversation aggregates per-turn scores: name an aggregation (max, mean, "
                "{kind: ema, window: N}, {kind: count_over, threshold: T}, …)"
            )
        if raw == "detector" or isinstance(raw, Aggregation):
            return raw
        return Aggregation.model_validate(raw)

    @field_validator("steer")
    @classmethod
    def _steer_iff_action(cls, steer: Steer | None, info: ValidationInfo) -> Steer | None:
        action = info.data.get("action")
        if action == "steer" and steer is None:
            raise ValueError("required when action is steer: {latents: {id: value}} or {latents: detector}")
        if action is not None and action != "steer" and steer is not None:
            raise ValueError(f"only allowed with action: steer (this rule's action is {action})")
        return steer

    @field_validator("tenants", "routes")
    @classmethod
    def _not_empty(cls, names: list[str] | None) -> list[str] | None:
        # An empty list would make a rule that never applies: almost surely a mistake.
        if names is not None and not names:
            raise ValueError("must list at least one name; leave the field out to apply to all")
        return names

    @field_validator("routes")
    @classmethod
    def _routes_are_paths(cls, routes: list[str] | None) -> list[str] | None:
        for route in routes or ():
            if not route.startswith("/"):
                raise ValueError(
                    f"route {route!r} must be a path starting with '/', e.g. /v1/chat/completions"
                )
        return routes

    def applies_to(self, tenant: str | None, route: str | None) -> bool:
        """Enabled, and scoped to this tenant and route (None on the rule = all; None on the request only
        matches rules that are not scoped)."""
        return (
            self.enabled
            and (self.tenants is None or tenant in self.tenants)
            and (self.routes is None or route in self.routes)
        )


class Defaults(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # A detector that failed (or a value that cannot be computed) fails closed unless told otherwise.
    action_on_detector_error: Literal["block", "allow"] = "block"
    block_message: str = DEFAULT_BLOCK_MESSAGE  # for block rules without a message of their own


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    version: str = "1"  # the policy's own revision, echoed in audit records
    description: str = ""
    defaults: Defaults = Field(default_factory=Defaults)
    rules: list[Rule]

    @field_validator("version", mode="before")
    @classmethod
    def _int_version(cls, raw: Any) -> Any:
        # `version: 3` is the natural YAML; a plain `str | int` union would report two errors per typo.
        return str(raw) if isinstance(raw, int) and not isinstance(raw, bool) else raw

    @model_validator(mode="after")
    def _unique_ids(self) -> Policy:
        # policies.loader reports duplicates itself, at each repeat's line, and skips this error type.
        ids = [r.id for r in self.rules]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise PydanticCustomError(
                DUPLICATE_ID_ERROR, "duplicate rule id(s): {ids}", {"ids": ", ".join(dup)}
            )
        return self

    @property
    def detectors(self) -> list[str]:
        """Detector names the enabled rules read, in first-use order."""
        return list(dict.fromkeys(r.detector for r in self.rules if r.enabled))

    @property
    def steer_sources(self) -> list[str]:
        """Detectors whose `clamp_for_steering()` enabled `steer: {latents: detector}` rules use."""
        return list(
            dict.fromkeys(
                r.steer.detector or r.detector
                for r in self.rules
                if r.enabled and r.steer is not None and r.steer.latents == "detector"
            )
        )


def format_aggregation(agg: Aggregation | str) -> str:
    """`max`, `ema(window=8)`, `sustained(threshold=1.0, n=3)`: compact, for tables and audit lines."""
    if isinstance(agg, str):
        return agg
    params = [
        f"{p}={getattr(agg, p)}" for p in ("k", "window", "threshold", "n") if getattr(agg, p) is not None
    ]
    return f"{agg.kind}({', '.join(params)})" if params else agg.kind
