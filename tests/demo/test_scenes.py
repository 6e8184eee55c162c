"""The scenes task's pure logic: determinism, reference answers, and the hallucination judge."""

import itertools
import random

import pytest

from modalign.demo.scenes import (
    POSITIONS,
    QUESTION_KINDS,
    STYLES,
    Question,
    Scene,
    SceneObject,
    examples,
    faithfulness,
    hallucinated_answer,
    make_question,
    reference_answer,
)

RED_CIRCLE = SceneObject("red", "circle", "small", "top left", (2, 2, 9, 9))
BLUE_SQUARE = SceneObject("blue", "square", "large", "bottom right", (17, 17, 30, 30))
SCENE = Scene("mixed", (RED_CIRCLE, BLUE_SQUARE))
COUNT = Question("count", "How many shapes are there?")
DESCRIBE = Question("describe", "Describe the image.")
COLOUR_OF_CIRCLE = Question("colour", "What colour is the circle?", RED_CIRCLE)
WHERE_IS_RED = Question("position", "Where is the red shape?", RED_CIRCLE)
IS_THERE_A_RED_CIRCLE = Question("exists", "Is there a red circle in the image?", RED_CIRCLE, ("red", "circle"))
IS_THERE_A_GREEN_CIRCLE = Question("exists", "Is there a green circle in the image?", None, ("green", "circle"))


def test_the_same_seed_gives_the_same_examples_and_pixels():
    first = list(itertools.islice(examples(7), 20))
    second = list(itertools.islice(examples(7), 20))
    assert first == second
    assert [e.scene.image().tobytes() for e in first] == [e.scene.image().tobytes() for e in second]
    assert first != list(itertools.islice(examples(8), 20))


def test_scenes_follow_the_layout_rules():
    for example in itertools.islice(examples(0), 500):
        objects = example.scene.objects
        assert 1 <= len(objects) <= 3
        assert len({o.colour for o in objects}) == len(objects)  # "the red shape" names one object
        assert len({o.position for o in objects}) == len(objects)  # one object per quadrant
        assert [o.position for o in objects] == sorted((o.position for o in objects), key=POSITIONS.index)
        assert example.scene.image().size == (32, 32)


def test_every_question_kind_and_scene_kind_occurs():
    sample = list(itertools.islice(examples(0), 300))
    assert {e.question.kind for e in sample} == set(QUESTION_KINDS)
    assert {e.scene.kind for e in sample} == {"single", "mixed", "same_shape"}


def test_a_colour_question_names_its_object_unambiguously():
    same = Scene("same_shape", (RED_CIRCLE, SceneObject("blue", "circle", "large", "bottom right", BLUE_SQUARE.box)))
    question = make_question(same, random.Random(0), "colour")
    assert question.text == f"What colour is the shape at the {question.target.position}?"


@pytest.mark.parametrize(("question", "concise"), [
    (COUNT, "Two."),
    (COLOUR_OF_CIRCLE, "Red."),
    (WHERE_IS_RED, "Top left."),
    (DESCRIBE, "A red circle and a blue square."),
    (IS_THERE_A_RED_CIRCLE, "Yes."),
    (IS_THERE_A_GREEN_CIRCLE, "No."),
])
def test_reference_answers_in_both_styles_are_judged_correct(question, concise):
    assert reference_answer(SCENE, question, "concise") == concise
    verbose = reference_answer(SCENE, question, "verbose")
    assert verbose.startswith("Sure!")
    for answer in (concise, verbose):
        verdict = faithfulness(answer, SCENE, question)
        assert not verdict.hallucinated and verdict.correct, (answer, verdict)


def test_every_reference_answer_is_faithful_and_every_corruption_is_caught():
    rng = random.Random(0)
    for example, style in itertools.product(itertools.islice(examples(3), 300), STYLES):
        scene, question = example.scene, example.question
        assert faithfulness(reference_answer(scene, question, style), scene, question).correct
        bad = faithfulness(hallucinated_answer(scene, question, style, rng), scene, question)
        if question.kind == "exists" and question.target is not None:  # denying what is there: a miss
            assert not bad.hallucinated and bad.correct is False
        else:
            assert bad.hallucinated and not bad.correct


@pytest.mark.parametrize("answer", [
    "A green circle and a blue square.",  # a colour that is not in the image
    "A red circle and a purple square.",  # a colour no scene has
    "A red star and a blue square.",  # a shape that is not in the image
    "A red square and a blue circle.",  # real colours and shapes, bound to the wrong objects
    "A large red circle.",  # wrong size
    "There is a red circle at the bottom left.",  # wrong place
    "There are three shapes.",  # miscount
    "I see two blue squares.",  # miscount of one kind
    "The red circle is in the center.",  # objects are never centred
])
def test_the_judge_catches_hallucinations(answer):
    verdict = faithfulness(answer, SCENE)
    assert verdict.hallucinated and verdict.problems and verdict.correct is None


@pytest.mark.parametrize("answer", [
    "There is a small red circle on the left and a blue square on the right.",
    "I see one red circle, one blue square and two shapes in total.",
    "Two shapes on a white background.",
])
def test_true_statements_are_not_hallucinations(answer):
    assert not faithfulness(answer, SCENE).hallucinated


def test_a_bare_attribute_is_about_the_asked_object():
    # "Blue." names a colour that is in the image, but not the circle's: that is a hallucination.
    assert faithfulness("Blue.", SCENE, COLOUR_OF_CIRCLE).hallucinated
    assert faithfulness("Bottom right.", SCENE, WHERE_IS_RED).hallucinated


def test_a_faithful_answer_that_does_not_answer_is_not_correct():
    verdict = faithfulness("A red circle.", SCENE, DESCRIBE)  # true, but the blue square is missing
    assert not verdict.hallucinated and verdict.correct is False
    assert faithfulness("I don't know.", SCENE, COUNT).correct is False


def test_exists_questions_are_half_about_objects_that_are_there():
    rng = random.Random(0)
    questions = [make_question(SCENE, rng, "exists") for _ in range(400)]
    present = [q for q in questions if q.target is not None]
    assert 150 < len(present) < 250
    assert all((q.target.colour, q.target.shape) == q.subject for q in present)
    assert all(q.subject not in {("red", "circle"), ("blue", "square")} for q in questions if q.target is None)
    assert questions[0].text == f"Is there a {questions[0].subject[0]} {questions[0].subject[1]} in the image?"


def test_yes_to_an_object_that_is_not_there_is_a_hallucination_and_no_to_one_that_is_a_miss():
    for answer in ("Yes.", "Sure! Yes, there is a green circle in this picture."):
        verdict = faithfulness(answer, SCENE, IS_THERE_A_GREEN_CIRCLE)
        assert verdict.hallucinated and not verdict.correct
        assert "says there is a green circle where there is none" in verdict.problems
    for answer in ("No.", "Sure! No, I cannot see that in this picture."):
        verdict = faithfulness(answer, SCENE, IS_THERE_A_RED_CIRCLE)
        assert not verdict.hallucinated and verdict.correct is False
    assert faithfulness("Maybe.", SCENE, IS_THERE_A_RED_CIRCLE).correct is False
