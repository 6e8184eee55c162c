"""Reading records off a topic: a poison record (garbage, another type's bytes, no value) is named and skipped."""

from __future__ import annotations

import os
import random
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY

from modalign.core.kafka import IDENTITY_FIELDS, PoisonRecord, decode_record, parse_record, type_headers
from modalign.v1 import events_pb2

VALID = {
    events_pb2.GenerationLogged: events_pb2.GenerationLogged(response_id="r1", policy_version="v0", prompt_text="hi"),
    events_pb2.FeedbackReceived: events_pb2.FeedbackReceived(feedback={"feedback_id": "f1", "user_id": "u"}),
    events_pb2.RolloutState: events_pb2.RolloutState(revision=3, stable_version="v2"),
    events_pb2.PolicyVersionPublished: events_pb2.PolicyVersionPublished(version="v4", uri="file:///m/v4"),
    events_pb2.DeadLetter: events_pb2.DeadLetter(source_topic="m.feedback", source_offset=7, reason="unjoinable: late"),
}


def test_every_topic_message_type_has_identity_fields() -> None:
    assert set(IDENTITY_FIELDS) == {message_type.DESCRIPTOR.full_name for message_type in VALID}


@pytest.mark.parametrize("message_type", list(VALID), ids=lambda t: t.DESCRIPTOR.name)
def test_a_valid_record_reads_back_as_its_message_with_or_without_its_type_header(message_type) -> None:
    message = VALID[message_type]
    assert parse_record(message_type, message.SerializeToString(), type_headers(message)) == message
    assert parse_record(message_type, message.SerializeToString()) == message


@pytest.mark.parametrize("message_type", list(VALID), ids=lambda t: t.DESCRIPTOR.name)
def test_another_types_record_garbage_and_no_value_are_poison_named_as_such(message_type) -> None:
    name = message_type.DESCRIPTOR.full_name
    for other_type, other in VALID.items():
        if other_type is not message_type:  # as modalign writes it: the header names its type
            with pytest.raises(PoisonRecord, match=f"not a {name}: its content-type is .*{other_type.DESCRIPTOR.name}"):
                parse_record(message_type, other.SerializeToString(), type_headers(other))
    rng = random.Random(0)
    for _ in range(50):  # from a writer without headers: most fail to parse, the rest lack the identity fields
        with pytest.raises(PoisonRecord, match=f"not a {name}"):
            parse_record(message_type, os.urandom(rng.randint(0, 64)))
    with pytest.raises(PoisonRecord, match=f"not a {name}: it has no "):
        parse_record(message_type, events_pb2.DeadLetter(reason="x").SerializeToString())
    with pytest.raises(PoisonRecord, match="no value"):
        parse_record(message_type, None)


def test_decode_record_skips_a_poison_record_and_counts_it_by_topic() -> None:
    def count() -> float:
        return REGISTRY.get_sample_value("modalign_kafka_poison_records_total", {"topic": "t.rollout"}) or 0.0

    before = count()
    record = SimpleNamespace(topic="t.rollout", partition=0, offset=7, value=b"\xff\x00garbage", headers=[])
    assert decode_record(events_pb2.RolloutState, record) is None
    assert count() == before + 1
    state = VALID[events_pb2.RolloutState]
    valid = SimpleNamespace(topic="t.rollout", partition=0, offset=8, value=state.SerializeToString(),
                            headers=type_headers(state))
    assert decode_record(events_pb2.RolloutState, valid) == VALID[events_pb2.RolloutState]
    assert count() == before + 1
