"""The demo report: its reading of rollout decisions (pure functions on the controller's verdicts) and what it writes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from modalign.demo.report import Judged, VersionResult, head_to_head, judge, write_report
from modalign.demo.scenes import (
    QUESTION_KINDS,
    Example,
    hallucinated_answer,
    make_question,
    make_scene,
    reference_answer,
)
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


@pytest.mark.parametrize("spoken", [False, True], ids=["typed", "spoken"])
def test_the_report_splits_spoken_and_typed_questions_when_some_were_spoken(tmp_path: Path, spoken: bool) -> None:
    def result(version: str, hallucination: float, win: float) -> VersionResult:
        heard = judge_of(hallucination + 0.1, win - 0.05) if spoken else None
        return VersionResult(version, True, 0.0, win, [win - 0.05, win + 0.05], hallucination,
                             [hallucination - 0.05, hallucination + 0.05], 0.0, 200, spoken=heard)

    def judge_of(hallucination: float, win: float) -> Judged:
        return Judged(hallucination, [hallucination - 0.06, hallucination + 0.06], win, [win - 0.06, win + 0.06], 200)

    summary = {"seconds": 540, "warm_start_seconds": 0, "final": "v1", "requests": 100, "conversations": 20,
               "http_requests": 25, "spoken_requests": 30 if spoken else 0, "feedback": 90,
               "synthesiser": "espeak-ng" if spoken else None,
               "freshness_seconds": {"measured": 0, "left_out": 0}, "memory_mib": {}}
    write_report(tmp_path, [result("v0", 0.5, 0.5), result("v1", 0.2, 0.75)], [], summary)

    report = json.loads((tmp_path / "report.json").read_text())
    markdown = (tmp_path / "report.md").read_text()
    assert (tmp_path / "versions.png").stat().st_size > 0
    row = next(line for line in markdown.splitlines() if line.startswith("| v1 |"))
    if spoken:
        assert report["versions"][1]["spoken"]["hallucination_rate"] == pytest.approx(0.3)
        assert "spoken: hallucination rate" in markdown and "30 asked aloud (spoken by espeak-ng)" in markdown
        assert row.endswith("| 30.0% (24.0%-36.0%) | 70.0% (64.0%-76.0%) |"), row
    else:
        assert report["versions"][1]["spoken"] is None and "spoken" not in markdown and "aloud" not in markdown
        assert row.endswith("| 0.0 |"), row


def test_judge_gives_the_hallucination_rate_per_kind_of_question():
    """Faithful answers to every question but the colour ones, which are hallucinated: the colour kind is at 100%,
    every other kind at 0%, and the overall rate is the colour questions' share."""
    rng = random.Random(0)
    held_out = [Example(scene, make_question(scene, rng, kind)) for kind in QUESTION_KINDS
                for scene in (make_scene(rng) for _ in range(4))]
    answers = [hallucinated_answer(e.scene, e.question, "concise", rng) if e.question.kind == "colour"
               else reference_answer(e.scene, e.question) for e in held_out]
    judged = judge(answers, answers, held_out)
    assert judged.hallucination_by_kind == {kind: float(kind == "colour") for kind in QUESTION_KINDS}
    assert judged.hallucination_rate == pytest.approx(1 / len(QUESTION_KINDS))
