"""DurableProducer: a failed write retires its producer and the next write goes through a new one (the
kafka-python producer can stop sending for good after a write expires). Stand-in producers: pure logic."""

from __future__ import annotations

import threading

import pytest
from kafka.errors import KafkaTimeoutError

from modalign.core.kafka import BrokerUnavailable, DurableProducer, KafkaConfig
from modalign.v1 import events_pb2


class Acknowledgement:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def get(self, timeout: float) -> None:
        if self.error is not None:
            raise self.error


class StandInProducer:
    """Acknowledges every send, or fails them all as an expired kafka-python producer would."""

    def __init__(self, failing: bool) -> None:
        self.failing = failing
        self.sent: list[bytes] = []
        self.closed = threading.Event()

    def send(self, topic: str, key: bytes, value: bytes, headers: list) -> Acknowledgement:
        self.sent.append(key)
        return Acknowledgement(KafkaTimeoutError("expired") if self.failing else None)

    def close(self, timeout: float | None = None) -> None:
        self.closed.set()


def test_a_failed_write_retires_the_producer_and_the_next_write_gets_a_new_one() -> None:
    made: list[StandInProducer] = []

    def make(config: KafkaConfig) -> StandInProducer:
        made.append(StandInProducer(failing=not made))  # the first one is broken for good
        return made[-1]

    producer = DurableProducer(KafkaConfig(), make)  # type: ignore[arg-type]
    record = [("v1", events_pb2.PolicyVersionPublished(version="v1"))]
    with pytest.raises(BrokerUnavailable):
        producer.produce("t.policy-versions", record, timeout_s=1)
    producer.produce("t.policy-versions", record, timeout_s=1)  # through a new producer
    producer.produce("t.policy-versions", record, timeout_s=1)  # and it stays
    assert [len(p.sent) for p in made] == [1, 2]
    assert made[0].closed.wait(5) and not made[1].closed.is_set()
    # A failure reported for a producer already replaced does not retire its successor.
    producer.failed(made[0])  # type: ignore[arg-type]
    assert producer.current() is made[1]
    producer.close()
    assert made[1].closed.is_set()
