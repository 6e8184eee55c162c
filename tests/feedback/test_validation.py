"""Unit tests of feedback validation: pure logic, no servers."""

import pytest

from modalign.feedback.validation import InvalidFeedback, validate_feedback
from modalign.v1 import feedback_pb2

from tests.feedback.cases import BAD_FEEDBACK, valid_feedback


@pytest.mark.parametrize("kind", ["preference", "tie", "rating", "edit"])
def test_valid_feedback_of_each_kind_passes(kind: str) -> None:
    assert validate_feedback(valid_feedback(kind)) == kind


@pytest.mark.parametrize(("mutate", "field"), BAD_FEEDBACK, ids=[field for _, field in BAD_FEEDBACK])
def test_invalid_feedback_names_its_field(mutate, field: str) -> None:
    feedback = valid_feedback("rating")
    mutate(feedback)
    with pytest.raises(InvalidFeedback) as raised:
        validate_feedback(feedback)
    assert str(raised.value).startswith(field + ":")


def test_response_ids_compare_case_insensitively() -> None:
    feedback = valid_feedback("preference")
    feedback.preference.rejected_response_id = feedback.preference.chosen_response_id.upper()
    with pytest.raises(InvalidFeedback, match="^preference.rejected_response_id"):
        validate_feedback(feedback)


def test_missing_kind_is_refused() -> None:
    feedback = valid_feedback("rating")
    feedback.ClearField("rating")
    assert feedback.WhichOneof("kind") is None
    with pytest.raises(InvalidFeedback, match="^kind:"):
        validate_feedback(feedback)
    assert isinstance(feedback, feedback_pb2.Feedback)
