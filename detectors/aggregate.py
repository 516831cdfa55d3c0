"""Aggregations: per-token detector scores (T,) -> one message-level value.

Every aggregation exists twice: as a pure batch function over a score tensor and as `RunningAggregate`,
which takes one token at a time (for mid-stream blocking). After each token the running value equals the
batch function over the prefix seen so far, bit for bit: both work in float64 on the same values and use
order-independent arithmetic (max/min, comparisons, `math.fsum`) or the same left-to-right order (mean, ema).

Definitions (T tokens s_1..s_T; every aggregation of an empty sequence is 0.0):
- max:               max_t s_t
- mean:              (s_1 + … + s_T) / T, summed left to right
- topk_mean(k):      mean of the min(k, T) largest scores
- last_mean(k):      mean of the last min(k, T) scores (math.fsum): the end of a statement, where a
                     truth probe reads best (Marks & Tegmark's end-of-statement tokens); mid-stream it is
                     the mean of the k most recent tokens, so it can fall as well as rise
- mix(k, alpha):      σ(alpha · mean_t z_t + (1 − alpha) · mean of the last min(k, T) z_t), z_t = logit(s_t):
                     a probe fitted on the convex pool alpha·mean + (1 − alpha)·last-k-mean of the residuals
                     (pool "mix:K:A", detectors.variants) is served exactly, since its logit is affine in its
                     input. A truth probe needs both: TruthfulQA's answers read best over their mean,
                     cities' statements at their last tokens (docs/benchmarks.md, [3/7], session 15).
                     Mid-stream its last-k part is the newest tokens', as for last_mean
- ema(window):       e_0 = 0, e_t = α·s_t + (1−α)·e_{t−1} with α = 2/(window+1); returns max_t e_t.
                     Starting from 0 (not s_1) makes a one-token spike count the same anywhere in the text.
- count_over(thr):   the NUMBER of tokens with s_t ≥ thr (a count, not a fraction, so it never shrinks as
                     a message grows; it is not a [0, 1] score, so specs may not use it as their default)
- sustained(thr, n): m = max over windows of n consecutive tokens of the window's min score (0.0 while
                     T < n). Returns 1.0 when m ≥ thr (some n consecutive tokens all score ≥ thr), else m.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

AggKind = Literal["max", "mean", "topk_mean", "last_mean", "mix", "ema", "count_over", "sustained"]
# Parameters each kind needs; every other parameter must be left out.
PARAMS: dict[str, tuple[str, ...]] = {
    "max": (),
    "mean": (),
    "topk_mean": ("k",),
    "last_mean": ("k",),
    "mix": ("k", "alpha"),
    "ema": ("window",),
    "count_over": ("threshold",),
    "sustained": ("threshold", "n"),
}
_ALL_PARAMS = ("k", "alpha", "window", "threshold", "n")
# mix works on logits: scores are clipped to [_EPS, 1 − _EPS] first, so a saturated 0 or 1 stays finite.
_EPS = 1e-12

Scores = torch.Tensor | Sequence[float]


class Aggregation(BaseModel):
    """`{"kind": "ema", "window": 8}`; a bare string (`"max"`) is accepted for parameter-free kinds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: AggKind = "max"
    k: int | None = Field(default=None, ge=1)
    alpha: float | None = Field(default=None, gt=0.0, lt=1.0)
    window: int | None = Field(default=None, ge=1)
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, raw: Any) -> Any:
        return {"kind": raw} if isinstance(raw, str) else raw

    @model_validator(mode="after")
    def _params_match_kind(self) -> Aggregation:
        need = PARAMS[self.kind]
        missing = [p for p in need if getattr(self, p) is None]
        extra = [p for p in _ALL_PARAMS if p not in need and getattr(self, p) is not None]
        if missing:
            raise ValueError(f"aggregation {self.kind!r} needs {', '.join(missing)}")
        if extra:
            raise ValueError(f"aggregation {self.kind!r} takes no {', '.join(extra)}")
        return self

    @property
    def bounded(self) -> bool:
        """True when the value lies in [0, 1] for scores in [0, 1] (everything but count_over)."""
        return self.kind != "count_over"


def _values(scores: Scores) -> list[float]:
    t = torch.as_tensor(scores, dtype=torch.float64)
    if t.dim() != 1:
        raise ValueError(f"scores must be 1-D (T,), got shape {tuple(t.shape)}")
    return [float(v) for v in t.tolist()]


def _seq_sum(values: Iterable[float]) -> float:
    total = 0.0
    for v in values:  # explicit left-to-right order, the same one RunningAggregate uses
        total += v
    return total


# ---- batch functions -----------------------------------------------------------------------------------
def agg_max(scores: Scores) -> float:
    v = _values(scores)
    return max(v) if v else 0.0


def agg_mean(scores: Scores) -> float:
    v = _values(scores)
    return _seq_sum(v) / len(v) if v else 0.0


def topk_mean(scores: Scores, k: int) -> float:
    v = sorted(_values(scores), reverse=True)[:k]
    return math.fsum(v) / len(v) if v else 0.0


def last_mean(scores: Scores, k: int) -> float:
    v = _values(scores)[-k:]
    return math.fsum(v) / len(v) if v else 0.0


def _logit(s: float) -> float:
    s = min(max(s, _EPS), 1.0 - _EPS)
    return math.log(s / (1.0 - s))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def _mix_value(z_sum: float, n: int, z_last: Iterable[float], alpha: float) -> float:
    last = list(z_last)
    return _sigmoid(alpha * (z_sum / n) + (1.0 - alpha) * (math.fsum(last) / len(last)))


def mix(scores: Scores, k: int, alpha: float) -> float:
    z = [_logit(s) for s in _values(scores)]
    return _mix_value(_seq_sum(z), len(z), z[-k:], alpha) if z else 0.0


def ema(scores: Scores, window: int) -> float:
    alpha = 2.0 / (window + 1)
    e, best = 0.0, 0.0
    for i, s in enumerate(_values(scores)):
        e = alpha * s + (1.0 - alpha) * e
        best = e if i == 0 else max(best, e)
    return best


def count_over(scores: Scores, threshold: float) -> float:
    return float(sum(1 for s in _values(scores) if s >= threshold))


def sustained(scores: Scores, threshold: float, n: int) -> float:
    v = _values(scores)
    if len(v) < n:
        return 0.0
    best = max(min(v[i : i + n]) for i in range(len(v) - n + 1))
    return 1.0 if best >= threshold else best


def aggregate(scores: Scores, agg: Aggregation) -> float:
    """The message-level value of `scores` (T,) under `agg`."""
    if agg.kind == "max":
        return agg_max(scores)
    if agg.kind == "mean":
        return agg_mean(scores)
    if agg.kind == "topk_mean":
        assert agg.k is not None
        return topk_mean(scores, agg.k)
    if agg.kind == "last_mean":
        assert agg.k is not None
        return last_mean(scores, agg.k)
    if agg.kind == "mix":
        assert agg.k is not None and agg.alpha is not None
        return mix(scores, agg.k, agg.alpha)
    if agg.kind == "ema":
        assert agg.window is not None
        return ema(scores, agg.window)
    if agg.kind == "count_over":
        assert agg.threshold is not None
        return count_over(scores, agg.threshold)
    assert agg.threshold is not None and agg.n is not None
    return sustained(scores, agg.threshold, agg.n)


def stream_peak(scores: Scores, agg: Aggregation, from_token: int = 1) -> float:
    """The highest running value of `agg` over a message's prefixes of ≥ `from_token` tokens: what a
    mid-stream rule with `min_tokens: from_token` compares with its threshold (a message shorter than
    that is judged on its final value). Equals the final value for max and for topk_mean once k tokens
    are in; a running mean can peak early and fall."""
    if from_token < 1:
        raise ValueError(f"from_token must be ≥ 1, got {from_token}")
    run = RunningAggregate(agg)
    vals = [run.update(s) for s in _values(scores)]
    return max(vals[min(from_token, len(vals)) - 1 :]) if vals else 0.0


# ---- streaming -----------------------------------------------------------------------------------------
class RunningAggregate:
    """One token at a time; `update` returns the value over all tokens so far (== `aggregate` on them)."""

    def __init__(self, agg: Aggregation) -> None:
        self.agg = agg
        self.reset()

    def reset(self) -> None:
        self.n_tokens = 0
        self._best = 0.0  # max / ema / sustained: best value so far
        self._sum = 0.0  # mean (mix: of the logits)
        self._ema = 0.0
        self._count = 0
        self._heap: list[float] = []  # topk_mean: min-heap of the k largest scores
        self._window: deque[tuple[int, float]] = deque()  # sustained: candidates for the window min
        self._last: deque[float] = deque(maxlen=self.agg.k or 1)  # last_mean / mix: the k most recent

    @property
    def value(self) -> float:
        kind = self.agg.kind
        if self.n_tokens == 0:
            return 0.0
        if kind == "mean":
            return self._sum / self.n_tokens
        if kind == "topk_mean":
            return math.fsum(self._heap) / len(self._heap)
        if kind == "last_mean":
            return math.fsum(self._last) / len(self._last)
        if kind == "mix":
            assert self.agg.alpha is not None
            return _mix_value(self._sum, self.n_tokens, self._last, self.agg.alpha)
        if kind == "count_over":
            return float(self._count)
        if kind == "sustained":
            assert self.agg.threshold is not None
            return 1.0 if self._best >= self.agg.threshold and self._full() else self._best
        return self._best

    def update(self, score: float | torch.Tensor) -> float:
        s = float(score)
        first = self.n_tokens == 0
        self.n_tokens += 1
        getattr(self, f"_update_{self.agg.kind}")(s, first)
        return self.value

    def extend(self, scores: Scores) -> float:
        for s in _values(scores):
            self.update(s)
        return self.value

    def _full(self) -> bool:
        assert self.agg.n is not None
        return self.n_tokens >= self.agg.n

    def _update_max(self, s: float, first: bool) -> None:
        self._best = s if first else max(self._best, s)

    def _update_mean(self, s: float, first: bool) -> None:
        self._sum += s

    def _update_topk_mean(self, s: float, first: bool) -> None:
        assert self.agg.k is not None
        if len(self._heap) < self.agg.k:
            heapq.heappush(self._heap, s)
        elif s > self._heap[0]:
            heapq.heapreplace(self._heap, s)

    def _update_last_mean(self, s: float, first: bool) -> None:
        self._last.append(s)

    def _update_mix(self, s: float, first: bool) -> None:
        z = _logit(s)
        self._sum += z
        self._last.append(z)

    def _update_ema(self, s: float, first: bool) -> None:
        assert self.agg.window is not None
        alpha = 2.0 / (self.agg.window + 1)
        self._ema = alpha * s + (1.0 - alpha) * self._ema
        self._best = self._ema if first else max(self._best, self._ema)

    def _update_count_over(self, s: float, first: bool) -> None:
        assert self.agg.threshold is not None
        self._count += s >= self.agg.threshold

    def _update_sustained(self, s: float, first: bool) -> None:
        # Sliding-window minimum with a monotonic deque: O(1) amortised per token.
        assert self.agg.n is not None
        i = self.n_tokens - 1
        while self._window and self._window[-1][1] >= s:
            self._window.pop()
        self._window.append((i, s))
        if self._window[0][0] <= i - self.agg.n:
            self._window.popleft()
        if self._full():
            w_min = self._window[0][1]
            self._best = w_min if self.n_tokens == self.agg.n else max(self._best, w_min)
