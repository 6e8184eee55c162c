"""Feedback messages for tests: one valid message per kind and a table of bad mutations of them."""

from __future__ import annotations

import time
import uuid
from typing import Callable

from modalign.core.kafka import KafkaConfig, make_producer, produce_durably
from modalign.feedback.server import content_digest
from modalign.v1 import events_pb2, feedback_pb2


def valid_feedback(kind: str, feedback_id: str | None = None, response_id: str | None = None) -> feedback_pb2.Feedback:
    feedback = feedback_pb2.Feedback(feedback_id=feedback_id or f"fb-{uuid.uuid4().hex}", user_id="user-1")
    feedback.client_time.FromSeconds(int(time.time()))
    response_id = response_id or str(uuid.uuid4())
    if kind == "preference":
        feedback.preference.chosen_response_id = response_id
        feedback.preference.rejected_response_id = str(uuid.uuid4())
    elif kind == "tie":
        feedback.tie.first_response_id = response_id
        feedback.tie.second_response_id = str(uuid.uuid4())
    elif kind == "rating":
        feedback.rating.response_id = response_id
        feedback.rating.score = 4
    else:
        feedback.edit.response_id = response_id
        feedback.edit.edited_text = "There are two red circles."
    return feedback


def store_directly(kafka: KafkaConfig, feedback: feedback_pb2.Feedback) -> None:
    """Writes feedback to the feedback topic as the feedback service would, past its checks: how a
    record the service would refuse today (one on a response never logged) reaches the readers."""
    producer = make_producer(kafka)
    try:
        produce_durably(producer, kafka.topic("feedback"), [(feedback.feedback_id, events_pb2.FeedbackReceived(
            feedback=feedback, content_sha256=content_digest(feedback)))], timeout_s=30)
    finally:
        producer.close()


def _set(path: str, value) -> Callable[[feedback_pb2.Feedback], None]:
    def mutate(feedback: feedback_pb2.Feedback) -> None:
        *parents, leaf = path.split(".")
        target = feedback
        for name in parents:
            target = getattr(target, name)
        setattr(target, leaf, value)
    return mutate


def _as_kind(kind: str, path: str, value) -> Callable[[feedback_pb2.Feedback], None]:
    def mutate(feedback: feedback_pb2.Feedback) -> None:
        feedback.CopyFrom(valid_feedback(kind, feedback.feedback_id))
        _set(path, value)(feedback)
    return mutate


def _same_pair(feedback: feedback_pb2.Feedback) -> None:
    feedback.CopyFrom(valid_feedback("preference", feedback.feedback_id))
    feedback.preference.rejected_response_id = feedback.preference.chosen_response_id


def _same_tie(feedback: feedback_pb2.Feedback) -> None:
    feedback.CopyFrom(valid_feedback("tie", feedback.feedback_id))
    feedback.tie.second_response_id = feedback.tie.first_response_id.upper()


def _no_kind(feedback: feedback_pb2.Feedback) -> None:
    feedback.ClearField("rating")


# (mutation of a valid rating, the field its error must name)
BAD_FEEDBACK: list[tuple[Callable[[feedback_pb2.Feedback], None], str]] = [
    (_set("feedback_id", ""), "feedback_id"),
    (_set("feedback_id", "x" * 129), "feedback_id"),
    (_set("feedback_id", "has space"), "feedback_id"),
    (_set("user_id", ""), "user_id"),
    (_set("user_id", "ünïcode"), "user_id"),
    (lambda f: f.ClearField("client_time"), "client_time"),
    (_set("client_time.seconds", int(time.time()) + 3 * 86400), "client_time"),
    (_set("client_time.seconds", 1000), "client_time"),
    (_set("reason", "r" * 2001), "reason"),
    (_no_kind, "kind"),
    (_set("rating.score", 0), "rating.score"),
    (_set("rating.score", 6), "rating.score"),
    (_set("rating.response_id", ""), "rating.response_id"),
    (_set("rating.response_id", "not-a-uuid"), "rating.response_id"),
    (_as_kind("preference", "preference.chosen_response_id", "123"), "preference.chosen_response_id"),
    (_as_kind("preference", "preference.rejected_response_id", ""), "preference.rejected_response_id"),
    (_same_pair, "preference.rejected_response_id"),
    (_as_kind("tie", "tie.first_response_id", ""), "tie.first_response_id"),
    (_as_kind("tie", "tie.second_response_id", "not-a-uuid"), "tie.second_response_id"),
    (_same_tie, "tie.second_response_id"),
    (_as_kind("edit", "edit.response_id", "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz"), "edit.response_id"),
    (_as_kind("edit", "edit.edited_text", ""), "edit.edited_text"),
    (_as_kind("edit", "edit.edited_text", " \n\t "), "edit.edited_text"),
    (_as_kind("edit", "edit.edited_text", "é" * 5000), "edit.edited_text"),
]
