"""Canary analysis: is the canary worse than stable? Pure statistics, no I/O.

The decision rule (docs/rollout.md states it for operators):

- A rollout of K steps takes exactly K analyses, one at the end of each step: once the step has lasted
  rollout.min_step_seconds and any of the required metrics has min_samples per version. Data accumulate from
  the start of the rollout. Nothing is decided between analyses, so looking often cannot inflate the
  error rate (the "peeking" problem of repeated significance tests).
- Each analysis tests, for each of the M statistical metrics with at least min_samples per version,
  H0 "the canary is not worse than stable" against H1 "it is worse", one-sided, at level alpha / (K * M).
  By Bonferroni's inequality, which holds however the K looks and M metrics depend on each other, a
  canary that is truly not worse is rolled back by chance with probability at most alpha over the whole
  rollout.
- Any rejection rolls the canary back; otherwise it advances, and past the last step it is promoted.
  The chance of promoting a worse canary is bounded by the power at min_samples: a mean difference
  of (z(1 - alpha/(K*M)) + z(1 - beta)) * sigma * sqrt(2 / min_samples) is caught with probability at least
  1 - beta at each look (for alpha 0.05, K 4, M 3, 30 samples and beta 0.2: about 0.93 sigma).
- Hard guards are not tests: a canary whose server error rate or p99 latency passes its limit, over at
  least guard_min_requests requests, is rolled back at once, at any time.

Metrics, canary against stable:
- rating: users' 1-5 ratings of each version's responses; Welch's z on the means.
- preference: preferences in which one user compared a canary response with a stable one; an exact
  binomial test of the canary's wins against one half.
- reward: the reward model's score of the responses each version served; Welch's z on the means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from modalign.v1 import events_pb2

STATISTICAL_METRICS = ("rating", "preference", "reward")


@dataclass
class Moments:
    """Count, mean and sum of squared deviations of a stream of numbers (Welford's update)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, value: float) -> None:
        self.n += 1
        delta = value - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (value - self.mean)

    @property
    def variance(self) -> float:
        """Unbiased sample variance; 0 with fewer than two values."""
        return self.m2 / (self.n - 1) if self.n > 1 else 0.0


@dataclass
class Evidence:
    """What users and the reward model said about the canary and stable versions since the rollout began."""

    ratings: dict[str, Moments] = field(default_factory=dict)
    rewards: dict[str, Moments] = field(default_factory=dict)
    canary_wins: int = 0
    """Head-to-head preferences (one canary response against one stable response) the canary won."""
    stable_wins: int = 0
    ties: int = 0
    """Head-to-head comparisons users called a tie: reported, but not in the test, which is over decided ones."""

    def moments(self, metric: str, version: str) -> Moments:
        table = self.ratings if metric == "rating" else self.rewards
        return table.setdefault(version, Moments())

    def samples(self, metric: str, canary: str, stable: str) -> tuple[int, int]:
        """Samples per version; a head-to-head comparison counts as one sample of each."""
        if metric == "preference":
            compared = self.canary_wins + self.stable_wins
            return compared, compared
        return self.moments(metric, canary).n, self.moments(metric, stable).n


@dataclass(frozen=True)
class Traffic:
    """A version's requests as the policy replicas counted them since the rollout began."""

    requests: int = 0
    server_errors: int = 0
    p99_latency_s: float = 0.0

    @property
    def error_rate(self) -> float:
        return self.server_errors / self.requests if self.requests else 0.0


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def welch_z(canary: Moments, stable: Moments) -> tuple[float, float]:
    """z of (canary mean - stable mean) with Welch's standard error, and its one-sided p-value for
    "canary lower". With no spread at all the difference is certain: z is +-inf or 0."""
    difference = canary.mean - stable.mean
    standard_error = math.sqrt(canary.variance / canary.n + stable.variance / stable.n)
    if standard_error == 0:
        z = 0.0 if difference == 0 else math.copysign(math.inf, difference)
    else:
        z = difference / standard_error
    return z, 1.0 - normal_sf(z)


def binomial_lower_tail(wins: int, trials: int) -> float:
    """P(X <= wins) for X ~ Binomial(trials, 1/2): the exact one-sided p-value for "wins too few"."""
    return math.fsum(math.comb(trials, k) for k in range(wins + 1)) / 2.0**trials


def verdict_for(
    metric: str, evidence: Evidence, canary: str, stable: str, min_samples: int, level: float
) -> events_pb2.AnalysisVerdict:
    """One metric's verdict: "worse" when H0 (canary not worse) is rejected at `level`."""
    canary_samples, stable_samples = evidence.samples(metric, canary, stable)
    verdict = events_pb2.AnalysisVerdict(
        metric=metric, canary_samples=canary_samples, stable_samples=stable_samples, threshold=level
    )
    if metric == "preference":
        trials = evidence.canary_wins + evidence.stable_wins
        verdict.canary_value = evidence.canary_wins / trials if trials else 0.0
        verdict.stable_value = evidence.stable_wins / trials if trials else 0.0
        statistic, p_value = float(evidence.canary_wins), binomial_lower_tail(evidence.canary_wins, trials)
        verdict.ties = evidence.ties
    else:
        canary_moments, stable_moments = evidence.moments(metric, canary), evidence.moments(metric, stable)
        verdict.canary_value, verdict.stable_value = canary_moments.mean, stable_moments.mean
        statistic, p_value = welch_z(canary_moments, stable_moments) if min(canary_samples, stable_samples) else (0.0, 1.0)
    verdict.statistic, verdict.p_value = statistic, p_value
    if min(canary_samples, stable_samples) < min_samples:
        verdict.outcome = "insufficient"
    else:
        verdict.outcome = "worse" if p_value < level else "not_worse"
    return verdict


def analyse(
    evidence: Evidence, canary: str, stable: str, *, alpha: float, looks: int, min_samples: int
) -> list[events_pb2.AnalysisVerdict]:
    """The verdict of every statistical metric at one of `looks` analyses (see the module docstring)."""
    level = alpha / (looks * len(STATISTICAL_METRICS))
    return [verdict_for(m, evidence, canary, stable, min_samples, level) for m in STATISTICAL_METRICS]


def has_required_samples(
    evidence: Evidence, canary: str, stable: str, required: tuple[str, ...], min_samples: int
) -> bool:
    """Whether any of the required metrics has min_samples per version: users who only compare answers,
    or only rate them, must each be able to move a canary."""
    return any(min(evidence.samples(metric, canary, stable)) >= min_samples for metric in required)


def guard_verdicts(
    canary: Traffic, stable: Traffic, *, max_error_rate: float, max_p99_latency_s: float, min_requests: int
) -> list[events_pb2.AnalysisVerdict]:
    """The hard guards; outcome "guard" means roll back now."""
    verdicts = []
    for metric, canary_value, stable_value, limit in (
        ("error_rate", canary.error_rate, stable.error_rate, max_error_rate),
        ("p99_latency_seconds", canary.p99_latency_s, stable.p99_latency_s, max_p99_latency_s),
    ):
        if canary.requests < min_requests:
            outcome = "insufficient"
        else:
            outcome = "guard" if canary_value > limit else "not_worse"
        verdicts.append(events_pb2.AnalysisVerdict(
            metric=metric, outcome=outcome, canary_samples=canary.requests, stable_samples=stable.requests,
            canary_value=canary_value, stable_value=stable_value, statistic=canary_value, threshold=limit,
        ))
    return verdicts


def describe(verdict: events_pb2.AnalysisVerdict) -> str:
    """One verdict in a line, for RolloutState.reason and logs."""
    if verdict.metric in STATISTICAL_METRICS:
        return (f"{verdict.metric} {verdict.outcome}: canary {verdict.canary_value:.3g} (n={verdict.canary_samples})"
                f" vs stable {verdict.stable_value:.3g} (n={verdict.stable_samples}),"
                f" p={verdict.p_value:.3g} vs {verdict.threshold:.3g}")
    return (f"{verdict.metric} {verdict.outcome}: canary {verdict.canary_value:.3g} over {verdict.canary_samples}"
            f" requests, limit {verdict.threshold:.3g}")
