"""Validation of incoming feedback. Pure functions: each problem becomes one message naming its field."""

from __future__ import annotations

import re
import time
import uuid

from modalign.v1 import feedback_pb2

ID_PATTERN = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
MAX_REASON_BYTES = 2000
MAX_EDIT_BYTES = 8192
MAX_CLOCK_SKEW_S = 24 * 3600
EARLIEST_CLIENT_TIME_S = 946_684_800  # 2000-01-01T00:00:00Z: anything older is a client bug


class InvalidFeedback(ValueError):
    """Raised with a message that starts with the offending field's path, e.g. "rating.score: ..."."""


def check_opaque_id(field: str, value: str) -> None:
    if not value:
        raise InvalidFeedback(f"{field}: required")
    if not ID_PATTERN.match(value):
        raise InvalidFeedback(f"{field}: must be 1 to 128 characters of [A-Za-z0-9._:@-], got {value[:40]!r}")


def check_response_id(field: str, value: str) -> None:
    if not value:
        raise InvalidFeedback(f"{field}: required")
    try:
        canonical = str(uuid.UUID(value))
    except ValueError:
        canonical = None
    if canonical != value.lower() or len(value) != 36:
        raise InvalidFeedback(f"{field}: must be a response_id (a 36-character UUID), got {value[:40]!r}")


def referenced_responses(feedback: feedback_pb2.Feedback) -> list[str]:
    """The response_ids a feedback is about: a preference's or a tie's two, a rating's or an edit's one."""
    kind = feedback.WhichOneof("kind")
    if kind == "preference":
        return [feedback.preference.chosen_response_id, feedback.preference.rejected_response_id]
    if kind == "tie":
        return [feedback.tie.first_response_id, feedback.tie.second_response_id]
    if kind == "rating":
        return [feedback.rating.response_id]
    if kind == "edit":
        return [feedback.edit.response_id]
    return []


def validate_feedback(feedback: feedback_pb2.Feedback, now_s: float | None = None) -> str:
    """Checks every field; returns the kind ("preference", "tie", "rating" or "edit") or raises InvalidFeedback."""
    check_opaque_id("feedback_id", feedback.feedback_id)
    check_opaque_id("user_id", feedback.user_id)

    if not feedback.HasField("client_time"):
        raise InvalidFeedback("client_time: required")
    client_time = feedback.client_time
    if not 0 <= client_time.nanos < 1_000_000_000:
        raise InvalidFeedback(f"client_time.nanos: must be in [0, 1e9), got {client_time.nanos}")
    if client_time.seconds < EARLIEST_CLIENT_TIME_S:
        raise InvalidFeedback("client_time: before 2000-01-01, check the client clock")
    now_s = time.time() if now_s is None else now_s
    if client_time.seconds > now_s + MAX_CLOCK_SKEW_S:
        raise InvalidFeedback("client_time: more than 24 hours in the future, check the client clock")

    if len(feedback.reason.encode()) > MAX_REASON_BYTES:
        raise InvalidFeedback(f"reason: at most {MAX_REASON_BYTES} UTF-8 bytes")

    kind = feedback.WhichOneof("kind")
    if kind == "preference":
        preference = feedback.preference
        check_response_id("preference.chosen_response_id", preference.chosen_response_id)
        check_response_id("preference.rejected_response_id", preference.rejected_response_id)
        if preference.chosen_response_id.lower() == preference.rejected_response_id.lower():
            raise InvalidFeedback("preference.rejected_response_id: must differ from chosen_response_id")
    elif kind == "tie":
        check_response_id("tie.first_response_id", feedback.tie.first_response_id)
        check_response_id("tie.second_response_id", feedback.tie.second_response_id)
        if feedback.tie.first_response_id.lower() == feedback.tie.second_response_id.lower():
            raise InvalidFeedback("tie.second_response_id: must differ from first_response_id")
    elif kind == "rating":
        check_response_id("rating.response_id", feedback.rating.response_id)
        if not 1 <= feedback.rating.score <= 5:
            raise InvalidFeedback(f"rating.score: must be between 1 and 5, got {feedback.rating.score}")
    elif kind == "edit":
        check_response_id("edit.response_id", feedback.edit.response_id)
        text = feedback.edit.edited_text
        if not text.strip():
            raise InvalidFeedback("edit.edited_text: required and not only whitespace")
        if len(text.encode()) > MAX_EDIT_BYTES:
            raise InvalidFeedback(f"edit.edited_text: at most {MAX_EDIT_BYTES} UTF-8 bytes")
    else:
        raise InvalidFeedback("kind: one of preference, tie, rating or edit is required")
    return kind
