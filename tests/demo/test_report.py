"""The demo report's reading of rollout decisions: pure functions on the controller's verdicts."""

from __future__ import annotations

from modalign.demo.report import head_to_head
from modalign.rollout.analysis import Evidence, analyse


def test_head_to_head_counts_come_from_the_preference_verdict() -> None:
    verdicts = analyse(Evidence(canary_wins=12, stable_wins=8), "v2", "v1", alpha=0.05, looks=2, min_samples=10)
    compared = head_to_head(verdicts)
    assert compared is not None
    assert (compared["canary_wins"], compared["stable_wins"], compared["ties"], compared["canary_win_rate"]) == (12, 8, 0, 0.6)
    low, high = compared["canary_win_rate_ci"]
    assert 0.38 < low < 0.6 < high < 0.8


def test_ties_count_half_in_the_win_rate_and_stay_out_of_the_test() -> None:
    without = analyse(Evidence(canary_wins=12, stable_wins=8), "v2", "v1", alpha=0.05, looks=2, min_samples=10)
    verdicts = analyse(Evidence(canary_wins=12, stable_wins=8, ties=10), "v2", "v1", alpha=0.05, looks=2, min_samples=10)
    preference = next(v for v in verdicts if v.metric == "preference")
    assert preference.ties == 10 and preference.canary_samples == 20
    assert preference.p_value == next(v for v in without if v.metric == "preference").p_value
    compared = head_to_head(verdicts)
    assert compared is not None
    assert (compared["canary_wins"], compared["stable_wins"], compared["ties"]) == (12, 8, 10)
    assert compared["canary_win_rate"] == (12 + 5) / 30


def test_only_ties_still_make_a_head_to_head() -> None:
    compared = head_to_head(analyse(Evidence(ties=4), "v2", "v1", alpha=0.05, looks=2, min_samples=10))
    assert compared is not None and compared["ties"] == 4 and compared["canary_win_rate"] == 0.5


def test_a_decision_without_comparisons_has_no_head_to_head() -> None:
    assert head_to_head(analyse(Evidence(), "v2", "v1", alpha=0.05, looks=2, min_samples=10)) is None
