"""Unit tests of the feedback join: pure logic on protobuf events, no broker."""

from __future__ import annotations

import uuid

from modalign.trainer.join import FeedbackJoiner, JoinLimits, prompt_key
from modalign.v1 import common_pb2, events_pb2, feedback_pb2


def generation(prompt: str = "What colour?", text: str = "red", image: str = "a" * 64) -> events_pb2.GenerationLogged:
    return events_pb2.GenerationLogged(
        response_id=str(uuid.uuid4()), prompt_id=str(uuid.uuid4()), policy_version="v0", prompt_text=prompt,
        images=[common_pb2.ImageRef(sha256=image, mime_type="image/png")], response_text=text,
        prompt_token_ids=[1, 2, 3], response_token_ids=[4, 5], response_logprobs=[-0.1, -0.2],
    )


def received(**kind) -> events_pb2.FeedbackReceived:
    return events_pb2.FeedbackReceived(
        feedback=feedback_pb2.Feedback(feedback_id=f"fb-{uuid.uuid4().hex[:8]}", user_id="u", **kind)
    )


def preference(chosen, rejected) -> events_pb2.FeedbackReceived:
    return received(preference=feedback_pb2.Preference(
        chosen_response_id=chosen.response_id, rejected_response_id=rejected.response_id))


def rating(generation_, score: int) -> events_pb2.FeedbackReceived:
    return received(rating=feedback_pb2.Rating(response_id=generation_.response_id, score=score))


def test_a_preference_joins_once_both_generations_are_known() -> None:
    joiner = FeedbackJoiner()
    a, b = generation(text="red"), generation(text="blue")
    joiner.add_generation(a)
    pairs, dead = joiner.add_feedback(preference(a, b), (0, 0), now=0)
    assert (pairs, dead) == ([], [])
    assert len(joiner.waiting) == 1
    joiner.add_generation(b)
    pairs, dead = joiner.retry_waiting(now=1)
    assert dead == [] and joiner.waiting == []
    [pair] = pairs
    assert (pair.chosen.text, pair.rejected.text, pair.source) == ("red", "blue", "preference")
    assert pair.chosen.token_ids == (4, 5)


def test_a_preference_across_different_prompts_is_dead_lettered() -> None:
    joiner = FeedbackJoiner()
    a, b = generation(prompt="one"), generation(prompt="two")
    joiner.add_generation(a)
    joiner.add_generation(b)
    pairs, [dead] = joiner.add_feedback(preference(a, b), (0, 1))
    assert pairs == [] and dead.reason.startswith("mismatched")


def test_a_tie_makes_no_pair_and_is_not_dead_lettered() -> None:
    joiner = FeedbackJoiner()
    a, b = generation(text="red"), generation(text="red")
    joiner.add_generation(a)
    joiner.add_generation(b)
    tie = received(tie=feedback_pb2.Tie(first_response_id=a.response_id, second_response_id=b.response_id))
    assert joiner.add_feedback(tie, (0, 2)) == ([], [])
    assert joiner.waiting == []


def test_an_edit_prefers_the_edited_text_over_the_original() -> None:
    joiner = FeedbackJoiner()
    original = generation(text="a blue square")
    joiner.add_generation(original)
    [pair], _ = joiner.add_feedback(received(edit=feedback_pb2.Edit(response_id=original.response_id,
                                                                     edited_text="a red square")), (0, 0))
    assert (pair.chosen.text, pair.chosen.token_ids, pair.rejected.text) == ("a red square", None, "a blue square")


def test_ratings_of_one_prompt_become_pairs_higher_over_lower() -> None:
    joiner = FeedbackJoiner()
    low, high, tie = generation(text="low"), generation(text="high"), generation(text="tie")
    other_prompt = generation(prompt="unrelated", text="other")
    for g in (low, high, tie, other_prompt):
        joiner.add_generation(g)
    assert joiner.add_feedback(rating(low, 2), (0, 0)) == ([], [])
    assert joiner.add_feedback(rating(other_prompt, 5), (0, 1)) == ([], [])
    [pair], _ = joiner.add_feedback(rating(high, 5), (0, 2))
    assert (pair.chosen.text, pair.rejected.text, pair.margin) == ("high", "low", 3)
    pairs, _ = joiner.add_feedback(rating(tie, 2), (0, 3))
    assert [(p.chosen.text, p.rejected.text) for p in pairs] == [("high", "tie")]


def test_feedback_that_waits_too_long_or_overflows_is_dead_lettered() -> None:
    joiner = FeedbackJoiner(limits=JoinLimits(max_wait_s=10, max_waiting=2))
    ghosts = [generation() for _ in range(4)]
    _, dead = joiner.add_feedback(rating(ghosts[0], 3), (0, 0), now=0)
    _, dead = joiner.add_feedback(rating(ghosts[1], 3), (0, 1), now=5)
    assert dead == []
    _, [overflowed] = joiner.add_feedback(rating(ghosts[2], 3), (0, 2), now=6)
    assert overflowed.position == (0, 0) and "overflowed" in overflowed.reason
    _, [expired] = joiner.retry_waiting(now=15.5)
    assert expired.position == (0, 1) and "not logged within 10s" in expired.reason
    assert [w.position for w in joiner.waiting] == [(0, 2)]


def test_the_oldest_generations_are_forgotten_first() -> None:
    joiner = FeedbackJoiner(limits=JoinLimits(max_generations=2))
    first, second, third = generation(), generation(), generation()
    for g in (first, second, third):
        joiner.add_generation(g)
    assert list(joiner.generations) == [second.response_id, third.response_id]


def test_the_prompts_rated_longest_ago_are_forgotten_first() -> None:
    joiner = FeedbackJoiner(limits=JoinLimits(max_rated_prompts=2))
    first, second, third = (generation(prompt=f"question {i}") for i in range(3))
    for rated in (first, second, third):
        joiner.add_generation(rated)
    joiner.add_feedback(rating(first, 5), (0, 0))
    joiner.add_feedback(rating(second, 4), (0, 1))
    joiner.add_feedback(rating(first, 3), (0, 2))  # first is the most recently rated again
    joiner.add_feedback(rating(third, 2), (0, 3))
    assert sorted(joiner.ratings) == sorted(prompt_key(g) for g in (first, third))
