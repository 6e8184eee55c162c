"""BLEU, ROUGE-L and POPE as the evaluation reports them: pure functions, checked on answers whose scores are known."""

from __future__ import annotations

import random

import pytest
from sacrebleu.metrics import BLEU

from modalign.evaluation.metrics import bleu, bootstrap, exact_match, pope, rouge_l, yes_or_no


def test_perfect_answers_score_full_marks_and_worse_ones_less() -> None:
    references = [["A red circle."], ["Two blue squares.", "There are two blue squares."]]
    assert bleu(["A red circle.", "There are two blue squares."], references)[0] == pytest.approx(100)
    assert rouge_l(["A red circle.", "Two blue squares."], references)[0] == pytest.approx(1.0)
    worse, (low, high) = bleu(["A green circle.", "One red square."], references)
    assert 0 < worse < 100 and low <= worse <= high
    assert rouge_l(["A green circle.", "One red square."], references)[0] < 1.0


def test_bleu_is_sacrebleus_corpus_bleu_and_a_repeated_reference_changes_nothing() -> None:
    answers = ["the small red circle is at the top left", "two large squares and a triangle"]
    single = [["a small red circle at the top left"], ["two squares and one triangle"]]
    # The second item's own second reference: each item may have its own number of references.
    uneven = [single[0], [single[1][0], "there are two large squares and a triangle"]]
    expected = BLEU(effective_order=True).corpus_score(
        answers, [[single[0][0], single[1][0]], [single[0][0], uneven[1][1]]]).score
    assert bleu(answers, uneven)[0] == pytest.approx(expected)
    assert bleu(answers, single)[0] == pytest.approx(BLEU(effective_order=True).corpus_score(
        answers, [[refs[0] for refs in single]]).score)


def test_rouge_l_takes_the_best_reference_of_each_answer() -> None:
    best = rouge_l(["two blue squares"], [["a red circle", "two blue squares"]])[0]
    assert best == pytest.approx(1.0)


def test_pope_reads_yes_and_no_and_counts_an_evasive_answer_as_wrong() -> None:
    answers = ("Yes.", " no, there is not", "Sure! Yes, there is one.", "Maybe", "yesterday", "nothing", "")
    assert [yes_or_no(a) for a in answers] == [True, False, True, None, None, None, None]
    figures = pope(["Yes.", "Yes.", "No.", "No.", "I see a circle."], [True, False, True, False, True])
    assert figures["accuracy"] == pytest.approx(2 / 5)
    assert figures["precision"] == pytest.approx(1 / 2) and figures["recall"] == pytest.approx(1 / 3)
    assert figures["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert figures["yes_ratio"] == pytest.approx(2 / 5) and figures["unanswered"] == 1


def test_an_item_without_a_reference_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one reference"):
        bleu(["an answer"], [[]])


def test_exact_match_ignores_case_punctuation_and_spacing_but_not_words() -> None:
    references = [["The circle is red."], ["Two.", "There are two shapes."]]
    assert exact_match(["the circle is  RED", "two"], references)[0] == 1.0
    share, (low, high) = exact_match(["The circle is blue.", "There are two shapes!"], references)
    assert share == 0.5 and low < 0.5 < high


def test_a_paired_bootstrap_sees_a_small_steady_gain_that_unpaired_intervals_hide() -> None:
    """Items of very different difficulty, and a version that does a little better on every one: the
    difference's paired interval excludes zero, where the two versions' own intervals overlap."""
    rng = random.Random(0)
    difficulty = [rng.random() for _ in range(100)]
    theirs = [d for d in difficulty]
    mine = [d + 0.05 for d in difficulty]

    def mean(values: list[float]):
        return lambda picks: sum(values[i] for i in picks) / len(picks)

    _, (their_low, their_high) = bootstrap(mean(theirs), 100)
    _, (my_low, my_high) = bootstrap(mean(mine), 100)
    assert my_low < their_high  # overlapping
    difference, (low, high) = bootstrap(lambda picks: mean(mine)(picks) - mean(theirs)(picks), 100)
    assert difference == pytest.approx(0.05) and low == pytest.approx(0.05) and high == pytest.approx(0.05)
    same, interval = bootstrap(lambda picks: mean(theirs)(picks) - mean(theirs)(picks), 100)
    assert same == 0 and interval == [0, 0]
