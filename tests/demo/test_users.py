"""The simulated users' hidden preference and the report's statistics (pure logic)."""

from __future__ import annotations

import random

import pytest

from modalign.demo.report import mean_interval, wilson_interval
from modalign.demo.scenes import examples, hallucinated_answer, reference_answer
from modalign.demo.users import preference, rating


@pytest.fixture
def stream():
    return examples(7)


def test_faithfulness_comes_first_and_style_breaks_ties_only_between_equals(stream) -> None:
    rng = random.Random(0)
    for _ in range(200):
        example = next(stream)
        concise = reference_answer(example.scene, example.question, "concise")
        verbose = reference_answer(example.scene, example.question, "verbose")
        wrong_concise = hallucinated_answer(example.scene, example.question, "concise", rng)
        assert preference(verbose, wrong_concise, example) == 1.0  # faithful beats concise
        assert preference(concise, verbose, example) == 1.0  # equally faithful: concise wins
        assert preference(concise, concise, example) == 0.5
        assert rating(concise, example) == 5 and rating(verbose, example) == 4
        assert rating(wrong_concise, example) <= 2


def test_intervals_cover_their_estimates() -> None:
    low, high = wilson_interval(30, 100)
    assert low < 0.3 < high and high - low == pytest.approx(0.18, abs=0.01)
    assert wilson_interval(0, 50)[0] == pytest.approx(0.0)
    mean, (low, high) = mean_interval([1.0, 0.0, 0.5, 1.0])
    assert mean == pytest.approx(0.625) and low < mean < high
