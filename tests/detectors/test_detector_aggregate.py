"""Aggregations: hand-computed values, parameter validation, and batch == streaming for every kind."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from detectors.aggregate import (
    Aggregation,
    RunningAggregate,
    agg_max,
    agg_mean,
    aggregate,
    count_over,
    ema,
    last_mean,
    mix,
    stream_peak,
    sustained,
    topk_mean,
)

SCORES = torch.tensor([0.1, 0.9, 0.4, 0.8, 0.2], dtype=torch.float64)
ALL_KINDS = [
    Aggregation(kind="max"),
    Aggregation(kind="mean"),
    Aggregation(kind="topk_mean", k=1),
    Aggregation(kind="topk_mean", k=3),
    Aggregation(kind="last_mean", k=1),
    Aggregation(kind="last_mean", k=2),
    Aggregation(kind="mix", k=1, alpha=0.5),
    Aggregation(kind="mix", k=3, alpha=0.25),
    Aggregation(kind="ema", window=1),
    Aggregation(kind="ema", window=4),
    Aggregation(kind="count_over", threshold=0.5),
    Aggregation(kind="sustained", threshold=0.5, n=1),
    Aggregation(kind="sustained", threshold=0.6, n=3),
]


def test_hand_computed_values() -> None:
    assert agg_max(SCORES) == pytest.approx(0.9)
    assert agg_mean(SCORES) == pytest.approx(0.48)
    assert topk_mean(SCORES, 2) == pytest.approx(0.85)
    assert topk_mean(SCORES, 10) == pytest.approx(0.48)  # k > T: all tokens
    assert last_mean(SCORES, 1) == pytest.approx(0.2)
    assert last_mean(SCORES, 2) == pytest.approx(0.5)  # the last two: 0.8, 0.2
    assert last_mean(SCORES, 10) == pytest.approx(0.48)  # k > T: all tokens
    # window 3 -> alpha 0.5; trace from e0 = 0: 0.05, 0.475, 0.4375, 0.61875, 0.409375
    assert ema(SCORES, 3) == pytest.approx(0.61875)
    assert count_over(SCORES, 0.5) == 2.0
    assert count_over(SCORES, 0.8) == 2.0  # >= threshold counts
    # windows of 2: mins 0.1, 0.4, 0.4, 0.2 -> best 0.4
    assert sustained(SCORES, 0.35, 2) == 1.0
    assert sustained(SCORES, 0.5, 2) == pytest.approx(0.4)
    assert sustained(SCORES, 0.5, 6) == 0.0  # fewer tokens than n: no window yet


@pytest.mark.parametrize("agg", ALL_KINDS, ids=lambda a: f"{a.kind}")
def test_empty_is_zero(agg: Aggregation) -> None:
    assert aggregate(torch.zeros(0), agg) == 0.0
    assert RunningAggregate(agg).value == 0.0


@pytest.mark.parametrize("agg", ALL_KINDS, ids=lambda a: f"{a.kind}")
def test_streaming_equals_batch_after_every_token(agg: Aggregation) -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(200, generator=gen, dtype=torch.float32)
    scores[50:60] = 0.95  # a sustained run
    scores[100:110] = scores[99]  # ties
    running = RunningAggregate(agg)
    for t in range(len(scores)):
        got = running.update(scores[t])
        assert got == aggregate(scores[: t + 1], agg), f"{agg} differs after token {t}"
    running.reset()
    assert running.extend(scores) == aggregate(scores, agg)


def test_aggregation_params_are_validated() -> None:
    assert Aggregation.model_validate("mean").kind == "mean"
    assert Aggregation().kind == "max"
    with pytest.raises(ValidationError, match="needs k"):
        Aggregation(kind="topk_mean")
    with pytest.raises(ValidationError, match="needs k"):
        Aggregation(kind="last_mean")
    with pytest.raises(ValidationError, match="takes no window"):
        Aggregation(kind="max", window=3)
    with pytest.raises(ValidationError, match="threshold"):
        Aggregation(kind="count_over", threshold=1.5)
    with pytest.raises(ValidationError, match="extra"):
        Aggregation.model_validate({"kind": "max", "beta": 0.1})
    with pytest.raises(ValidationError, match="takes no alpha"):
        Aggregation(kind="max", alpha=0.1)
    with pytest.raises(ValidationError, match="needs alpha"):
        Aggregation(kind="mix", k=2)
    for alpha in (0.0, 1.0):  # the end points are mean / last_mean: use those
        with pytest.raises(ValidationError, match="alpha"):
            Aggregation(kind="mix", k=2, alpha=alpha)
    assert not Aggregation(kind="count_over", threshold=0.5).bounded


def test_mix_by_hand_and_saturated_scores_stay_finite() -> None:
    z = [math.log(s / (1 - s)) for s in SCORES.tolist()]
    want = 1 / (1 + math.exp(-(0.25 * sum(z) / 5 + 0.75 * (z[-1] + z[-2]) / 2)))
    assert mix(SCORES, 2, 0.25) == pytest.approx(want, abs=1e-12)
    assert 0.0 < mix([1.0, 1.0], 1, 0.5) <= 1.0 and 0.0 <= mix([0.0, 0.0], 1, 0.5) < 1e-6


def test_mix_of_token_scores_is_the_probe_on_the_mixed_pool() -> None:
    """A probe fitted on alpha·mean + (1 − alpha)·last-k-mean of a record's rows (build pool "mix:K:A")
    gives, on that record, exactly the mix aggregation of its per-token scores: the logit is affine."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 4, generator=gen, dtype=torch.float64)  # (T, D) one record's residual rows
    w, b = torch.randn(4, generator=gen, dtype=torch.float64), 0.3
    mu, sd = torch.randn(4, generator=gen, dtype=torch.float64), torch.rand(4, generator=gen) + 0.5

    def logit(rows: torch.Tensor) -> torch.Tensor:
        return ((rows - mu) / sd) @ w + b

    for k, alpha in ((1, 0.5), (2, 0.5), (3, 0.8), (20, 0.1)):
        pooled = alpha * x.mean(0) + (1 - alpha) * x[-k:].mean(0)
        want = float(torch.sigmoid(logit(pooled[None]))[0])
        assert mix(torch.sigmoid(logit(x)), k, alpha) == pytest.approx(want, abs=1e-9)


def test_scores_must_be_1d() -> None:
    with pytest.raises(ValueError, match="1-D"):
        agg_max(torch.zeros(2, 3))


def test_last_mean_streams_the_most_recent_tokens() -> None:
    """Mid-stream, last_mean follows the newest tokens: it falls when a high score scrolls out."""
    running = RunningAggregate(Aggregation(kind="last_mean", k=2))
    values = [running.update(s) for s in (0.9, 0.9, 0.1, 0.1)]
    assert values == pytest.approx([0.9, 0.9, 0.5, 0.1])


def test_stream_peak_is_what_a_mid_stream_rule_sees() -> None:
    """A running mean can peak early and fall: a rule with min_tokens N reads the peak from token N on;
    a message shorter than N is judged on its final value; max never falls, so its peak is the final."""
    mean = Aggregation(kind="mean")
    scores = torch.tensor([0.9, 0.1, 0.1, 0.1], dtype=torch.float64)  # running: 0.9, 0.5, 0.367, 0.3
    assert stream_peak(scores, mean, 1) == pytest.approx(0.9)
    assert stream_peak(scores, mean, 2) == pytest.approx(0.5)
    assert stream_peak(scores, mean, 4) == pytest.approx(0.3) == aggregate(scores, mean)
    assert stream_peak(scores, mean, 10) == pytest.approx(0.3)  # shorter than min_tokens: final
    for agg in (Aggregation(kind="max"), Aggregation(kind="topk_mean", k=2)):
        assert stream_peak(SCORES, agg, 2) == pytest.approx(aggregate(SCORES, agg))
    assert stream_peak(torch.zeros(0), mean, 3) == 0.0
    with pytest.raises(ValueError, match="from_token"):
        stream_peak(scores, mean, 0)
