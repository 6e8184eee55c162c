"""--max-feedback-age-s: a trainer that falls behind its users passes over old feedback, counted, and
learns from the new; by default it reads everything, however old.

Real broker; the trainer's own code in this process. Records carry their time as Kafka does (the
producer's create time), so old feedback is written with a time in the past.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from modalign.core.blobs import BlobStore
from modalign.core.broker import BrokerConfig
from modalign.core.config import ConfigError
from modalign.core.kafka import KafkaConfig, ensure_topics, make_producer, read_topic
from modalign.trainer.learner import Learner
from modalign.trainer.service import Trainer, TrainerConfig
from modalign.trainer.state import PendingVersion
from modalign.v1 import events_pb2, feedback_pb2

pytestmark = pytest.mark.integration


def write_feedback(kafka: KafkaConfig, ids: range, age_s: float) -> None:
    """Ratings (of responses not logged: they wait to be joined, remembered as consumed) written age_s ago."""
    producer = make_producer(kafka)
    try:
        for i in ids:
            event = events_pb2.FeedbackReceived(feedback=feedback_pb2.Feedback(
                feedback_id=f"f{i}", user_id="u", rating=feedback_pb2.Rating(response_id=f"r{i}", score=3)))
            producer.send(kafka.topic("feedback"), key=f"f{i}".encode(), value=event.SerializeToString(),
                          timestamp_ms=int((time.time() - age_s) * 1000)).get(timeout=30)
    finally:
        producer.close()


def stale_records() -> float:
    return REGISTRY.get_sample_value("modalign_trainer_feedback_consumed_total", {"outcome": "stale"}) or 0.0


@pytest.mark.parametrize("max_age_s", [0.0, 600.0])
def test_feedback_older_than_the_limit_is_passed_over_and_counted(
    kafka_broker: BrokerConfig, tmp_path: Path, max_age_s: float
) -> None:
    kafka = KafkaConfig(bootstrap_servers=kafka_broker.bootstrap_servers, topic_prefix=f"test-{uuid.uuid4().hex[:10]}.",
                        partitions=1)
    ensure_topics(kafka)
    config = TrainerConfig(kafka=kafka, work_dir=tmp_path / "trainer", model_store=str(tmp_path / "models"),
                           blob_dir=tmp_path / "blobs", metrics_port=0, round_max_seconds=0.5,
                           max_feedback_age_s=max_age_s)
    write_feedback(kafka, range(0, 6), age_s=3600)  # an hour old: the trainer was down, or far behind
    write_feedback(kafka, range(6, 10), age_s=0)
    before = stale_records()

    trainer = Trainer(config, Learner(config.learner, BlobStore(config.blob_dir)))
    try:
        for _ in range(2):
            trainer.run_round()
        assert trainer.state.positions[(kafka.topic("feedback"), 0)] == 10  # read to the end either way
        consumed = {f"f{i}" for i in range(10)} & set(trainer.state.consumed_ids)
        passed_over = trainer.state.passed_over
        if max_age_s:  # the next version's event names them
            trainer._publish(PendingVersion("v1", "v0", {}, trainer._trained_through(), passed_over))
            [event] = read_topic(kafka, "policy-versions", events_pb2.PolicyVersionPublished)
            assert [(r.partition, r.start, r.end) for r in event.passed_over] == [(0, 0, 6)]
    finally:
        trainer.close()

    if max_age_s:
        assert consumed == {f"f{i}" for i in range(6, 10)}
        assert stale_records() == before + 6
        assert passed_over == [{"topic": kafka.topic("feedback"), "partition": 0, "start": 0, "end": 6}]
    else:
        assert consumed == {f"f{i}" for i in range(10)}
        assert stale_records() == before and passed_over == []


def test_a_negative_age_limit_is_refused() -> None:
    with pytest.raises(ConfigError, match="must be 0 .off. or more, not -1") as refused:
        TrainerConfig(max_feedback_age_s=-1).validate()
    assert refused.value.field == "max_feedback_age_s"
