"""The simulated users' hidden preference, and the report's statistics and KL estimate."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from modalign.demo.report import held_out_examples, kl_to, sample_answers
from modalign.demo.scenes import examples, hallucinated_answer, reference_answer
from modalign.demo.users import preference, rating
from modalign.evaluation.metrics import mean_interval, wilson_interval
from modalign.policy.engine import PolicyEngine
from modalign.policy.model import build_default_policy


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
        if example.question.kind == "exists" and example.question.target is not None:
            assert rating(wrong_concise, example) == 4  # "No." where it is there: a miss, nothing false
        else:
            assert rating(wrong_concise, example) <= 2


def test_intervals_cover_their_estimates() -> None:
    low, high = wilson_interval(30, 100)
    assert low < 0.3 < high and high - low == pytest.approx(0.18, abs=0.01)
    assert wilson_interval(0, 50)[0] == pytest.approx(0.0)
    mean, (low, high) = mean_interval([1.0, 0.0, 0.5, 1.0])
    assert mean == pytest.approx(0.625) and low < mean < high


def test_kl_scores_each_answer_as_its_sampler_did() -> None:
    """Scored by the policy that sampled them, answers give KL 0 to float precision: the teacher-forced
    log-probs match the sampler's own, masking included. A perturbed policy is measurably away."""
    torch.set_num_threads(1)
    model, processor = build_default_policy(seed=0)
    held_out = held_out_examples(12)
    reference = PolicyEngine(model, processor, "v0")
    assert kl_to(reference, sample_answers(reference, held_out, max_new_tokens=6), held_out) == pytest.approx(0, abs=1e-4)
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in perturbed.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    moved = sample_answers(PolicyEngine(perturbed, processor, "v1"), held_out, max_new_tokens=6)
    assert kl_to(reference, moved, held_out) > 0.1
