"""The per-user token bucket (modalign.core.ratelimit), on a clock the test moves."""

from __future__ import annotations

import pytest

from modalign.core.config import ConfigError, with_overrides
from modalign.core.ratelimit import PerUserLimiter, RateLimit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_user_gets_a_burst_then_the_sustained_rate_and_is_told_how_long_to_wait() -> None:
    clock = Clock()
    limiter = PerUserLimiter(RateLimit(per_second=2.0, burst=3), clock=clock)
    assert [limiter.wait_s("flood") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.wait_s("flood") == pytest.approx(0.5)
    assert limiter.wait_s("flood") == pytest.approx(0.5)  # a refused call takes nothing
    assert limiter.wait_s("quiet") == 0.0  # each user has a bucket of its own
    clock.now += 0.5
    assert limiter.wait_s("flood") == 0.0
    assert limiter.wait_s("flood") == pytest.approx(0.5)
    clock.now += 60
    assert [limiter.wait_s("flood") for _ in range(4)][-1] == pytest.approx(0.5)  # refilled to the burst, no more


def test_calls_naming_no_user_and_a_limit_of_zero_are_not_limited() -> None:
    assert all(PerUserLimiter(RateLimit(per_second=1, burst=1)).wait_s("") == 0 for _ in range(10))
    assert all(PerUserLimiter(RateLimit(per_second=0)).wait_s("u") == 0 for _ in range(100))


def test_memory_holds_the_most_recent_users_only() -> None:
    clock = Clock()
    limiter = PerUserLimiter(RateLimit(per_second=1, burst=1), max_users=2, clock=clock)
    limiter.wait_s("a")
    assert limiter.wait_s("a") > 0
    limiter.wait_s("b")
    limiter.wait_s("c")  # forgets a, the user seen longest ago
    assert limiter.wait_s("a") == 0.0 and limiter.wait_s("c") > 0


def test_a_limit_that_cannot_work_is_refused() -> None:
    for overrides in ({"per_second": -1.0}, {"burst": 0}):
        with pytest.raises(ConfigError) as refused:
            with_overrides(RateLimit(), overrides)
        assert refused.value.field == next(iter(overrides))
