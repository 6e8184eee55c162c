"""The canary decision rule as pure statistics: exact values, and its error rates by simulation."""

from __future__ import annotations

import math
import random

import pytest

from modalign.rollout.analysis import (
    Evidence,
    Moments,
    Traffic,
    analyse,
    binomial_lower_tail,
    guard_verdicts,
    has_required_samples,
    normal_sf,
    welch_z,
)
from modalign.rollout.evidence import quantile_from_buckets


def moments_of(values: list[float]) -> Moments:
    moments = Moments()
    for value in values:
        moments.add(value)
    return moments


def test_moments_match_the_textbook_formulas() -> None:
    values = [1.0, 4.0, 4.0, 5.0, 2.0, 3.0]
    moments = moments_of(values)
    mean = sum(values) / len(values)
    assert moments.mean == pytest.approx(mean)
    assert moments.variance == pytest.approx(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_welch_z_and_its_one_sided_p_value() -> None:
    canary, stable = moments_of([2, 3, 3, 4, 2, 3]), moments_of([4, 5, 4, 4, 5, 3, 4])
    z, p = welch_z(canary, stable)
    expected = (canary.mean - stable.mean) / math.sqrt(canary.variance / 6 + stable.variance / 7)
    assert z == pytest.approx(expected)
    assert p == pytest.approx(1 - normal_sf(expected))
    assert p < 0.01  # clearly lower ratings: "canary worse" is significant
    assert normal_sf(1.6448536269514722) == pytest.approx(0.05, abs=1e-12)


def test_welch_z_without_spread_is_certain() -> None:
    assert welch_z(moments_of([3, 3]), moments_of([4, 4])) == (-math.inf, 1.0 - normal_sf(-math.inf))
    assert welch_z(moments_of([4, 4]), moments_of([4, 4]))[0] == 0.0


def test_binomial_lower_tail_is_exact() -> None:
    assert binomial_lower_tail(2, 10) == pytest.approx((1 + 10 + 45) / 1024)
    assert binomial_lower_tail(10, 10) == pytest.approx(1.0)
    assert binomial_lower_tail(0, 0) == 1.0


def add_samples(evidence: Evidence, rng: random.Random, n: int, canary_shift: float, win_probability: float) -> Evidence:
    """n ratings and reward scores per version (canary's mean shifted), and n head-to-head comparisons."""
    for _ in range(n):
        evidence.moments("rating", "c").add(rng.gauss(3.5 + canary_shift, 1.0))
        evidence.moments("rating", "s").add(rng.gauss(3.5, 1.0))
        evidence.moments("reward", "c").add(rng.gauss(canary_shift, 1.0))
        evidence.moments("reward", "s").add(rng.gauss(0.0, 1.0))
        if rng.random() < win_probability:
            evidence.canary_wins += 1
        else:
            evidence.stable_wins += 1
    return evidence


def evidence_from(rng: random.Random, n: int, canary_shift: float, win_probability: float = 0.5) -> Evidence:
    return add_samples(Evidence(), rng, n, canary_shift, win_probability)


def rollout_rolls_back(rng: random.Random, looks: int, per_look: int, shift: float, win_probability: float) -> bool:
    """One whole rollout: data accumulate, one analysis per step, any "worse" verdict rolls back."""
    evidence = Evidence()
    for _ in range(looks):
        add_samples(evidence, rng, per_look, shift, win_probability)
        verdicts = analyse(evidence, "c", "s", alpha=0.05, looks=looks, min_samples=per_look)
        if any(v.outcome == "worse" for v in verdicts):
            return True
    return False


def test_a_canary_that_is_not_worse_is_rarely_rolled_back_however_often_the_steps_look() -> None:
    rng = random.Random(7)
    trials = 400
    rollbacks = sum(rollout_rolls_back(rng, looks=4, per_look=30, shift=0.0, win_probability=0.5) for _ in range(trials))
    # Bonferroni bounds the rate by alpha = 0.05; allow 3 binomial standard errors of Monte Carlo noise.
    assert rollbacks / trials <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)


def test_a_canary_rated_a_standard_deviation_worse_is_rolled_back() -> None:
    rng = random.Random(8)
    trials = 100
    rollbacks = sum(rollout_rolls_back(rng, looks=4, per_look=30, shift=-1.0, win_probability=0.3) for _ in range(trials))
    assert rollbacks / trials >= 0.95


def test_insufficient_samples_are_never_judged() -> None:
    evidence = evidence_from(random.Random(1), 10, canary_shift=-3.0, win_probability=0.0)
    verdicts = analyse(evidence, "c", "s", alpha=0.05, looks=4, min_samples=30)
    assert {v.outcome for v in verdicts} == {"insufficient"}
    assert not has_required_samples(evidence, "c", "s", ("rating", "preference"), 30)
    assert has_required_samples(evidence, "c", "s", ("rating", "preference"), 10)


def test_a_step_needs_enough_samples_of_any_one_required_metric() -> None:
    only_compared = Evidence(canary_wins=20, stable_wins=15)  # users who compare answers and never rate them
    assert has_required_samples(only_compared, "c", "s", ("rating", "preference"), 30)
    assert not has_required_samples(only_compared, "c", "s", ("rating",), 30)


def test_each_look_is_held_to_alpha_over_looks_and_metrics() -> None:
    verdicts = analyse(evidence_from(random.Random(2), 40, 0.0), "c", "s", alpha=0.05, looks=4, min_samples=30)
    assert [v.metric for v in verdicts] == ["rating", "preference", "reward"]
    assert all(v.threshold == pytest.approx(0.05 / 12) for v in verdicts)


def test_guards_trip_on_errors_or_latency_once_enough_requests_were_seen() -> None:
    healthy = Traffic(requests=100, server_errors=0, p99_latency_s=0.5)
    erroring = Traffic(requests=30, server_errors=30, p99_latency_s=0.1)
    slow = Traffic(requests=30, server_errors=0, p99_latency_s=12.0)
    young = Traffic(requests=5, server_errors=5, p99_latency_s=60.0)

    def outcomes(canary: Traffic) -> list[str]:
        verdicts = guard_verdicts(canary, healthy, max_error_rate=0.05, max_p99_latency_s=10.0, min_requests=20)
        return [v.outcome for v in verdicts]

    assert outcomes(healthy) == ["not_worse", "not_worse"]
    assert outcomes(erroring) == ["guard", "not_worse"]
    assert outcomes(slow) == ["not_worse", "guard"]
    assert outcomes(young) == ["insufficient", "insufficient"]


def test_p99_is_the_upper_edge_of_its_bucket() -> None:
    buckets = {0.1: 50.0, 0.5: 98.0, 1.0: 99.0, 5.0: 100.0, math.inf: 100.0}
    assert quantile_from_buckets(buckets, 0.99) == 1.0
    assert quantile_from_buckets({0.1: 0.0, math.inf: 10.0}, 0.99) == math.inf
    assert quantile_from_buckets({}, 0.99) == 0.0
