"""Scope `conversation`: a rule whose value aggregates a detector's per-turn scores over a conversation.

A turn's score is the detector's own aggregation (its spec's: the message-level score the response
reports under `scores`) over that turn's completion. The caller loads the earlier turns' scores before
generating (the sidecar: `monitor.conversation`, from Redis) and passes them in, so evaluation stays pure.
While the prompt is evaluated the value covers the earlier turns only, so a conversation that already
crossed a threshold is stopped before anything is generated; once the completion has at least one scored
token, the current turn's running score joins as the newest turn. The rule's `aggregation` then runs
over the turn scores, oldest first, exactly as it would over token scores (`detectors.aggregate`): max,
mean, topk_mean(k), ema(window) (recent turns weigh more), count_over(threshold) (a number of TURNS),
sustained(threshold, n) (n consecutive turns). No earlier turns (no conversation id): the current turn
alone.

Pure: no I/O, clock or randomness; `evaluate` and `PolicyState` both compute values here, so they agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

from detectors.aggregate import Aggregation, RunningAggregate, aggregate
from policies.schema import CONVERSATION, Rule

if TYPE_CHECKING:  # evaluate imports this module
    from policies.evaluate import Finding

__all__ = ["CONVERSATION", "NON_FINITE", "conversation_value", "running_outcome", "turns_value"]
NON_FINITE = "detector returned a non-finite score"


@lru_cache(maxsize=1024)  # PolicyState asks again after every token, mostly with the same current score
def turns_value(prior: tuple[float, ...], current: float | None, agg: Aggregation) -> float | None:
    """`agg` over the earlier turns' scores followed by the current turn's (when it has one); None when a
    score is not finite."""
    turns = [*prior] if current is None else [*prior, current]
    if not all(math.isfinite(s) for s in turns):
        return None
    return aggregate(turns, agg)


def no_turn_aggregation(detector: str) -> str:
    """The error of a conversation rule whose detector's own (per-turn) aggregation is unknown."""
    return f"no aggregation known for detector {detector!r} (it scores each turn of a conversation)"


def as_history(conversation: Mapping[str, Sequence[float]] | None) -> dict[str, tuple[float, ...]]:
    """Earlier turns' scores per detector, as plain float tuples."""
    return {d: tuple(float(s) for s in v) for d, v in (conversation or {}).items()}


def conversation_value(
    rule: Rule,
    turn_agg: Aggregation,
    index: Mapping[tuple[str, str], Finding],
    phase: Literal["prompt", "completion"],
    aggregations: Mapping[str, Aggregation] | None,
) -> tuple[float | None, str | None, int | None]:
    """`evaluate`'s (value, error, current turn's token count) for a conversation rule. The count is None
    in the prompt phase: the earlier turns are complete, so `min_tokens` does not wait there."""
    det = rule.detector
    own = (aggregations or {}).get(det)
    if own is None:
        return None, no_turn_aggregation(det), None
    hist = index.get((det, CONVERSATION))
    if hist is not None and hist.error is not None:
        return None, hist.error, None
    prior = (hist.scores if hist is not None else None) or ()
    current, n = None, None
    if phase == "completion":
        f = index.get((det, "completion"))
        if f is None or f.error is not None or f.scores is None:
            missing = f"no completion {'finding' if f is None else 'token scores'} for detector {det!r}"
            return None, (f.error if f is not None else None) or missing, None
        if not all(math.isfinite(s) for s in f.scores):
            return None, NON_FINITE, None
        n = len(f.scores)
        current = aggregate(f.scores, own) if n else None
    value = turns_value(prior, current, turn_agg)
    return (None, NON_FINITE, None) if value is None else (value, None, n)


def running_outcome(
    rule: Rule,
    running: RunningAggregate,
    prior: tuple[float, ...],
    error: str | None,
    *,
    completion: bool,
    final: bool,
) -> tuple[float | None, str | None] | None:
    """`PolicyState`'s (value, error) for a conversation rule whose current turn so far is `running` (the
    detector's own aggregation); None while it waits for `min_tokens`. `error` is what the state already
    knows (unknown aggregation, history not loaded, a failed or non-finite stream), in `evaluate`'s order."""
    n, value = running.n_tokens, None
    if error is None:
        assert isinstance(rule.aggregation, Aggregation)  # the schema refuses `detector` here
        value = turns_value(prior, running.value if completion and n else None, rule.aggregation)
        error = NON_FINITE if value is None else None
    if error is None and completion and not final and n < rule.min_tokens:
        return None  # not enough tokens of this turn yet to judge
    return value, error
