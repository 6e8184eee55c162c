"""A trainer restarted after retention deleted feedback it had not read says so, and follows its policy.

Real broker; the trainer's own code in this process. Feedback it read is checkpointed; more arrives
while it is down, and some of that is deleted (DeleteRecords moves the log start, as retention does)
before it comes back.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, TopicPartition
from prometheus_client import REGISTRY

from modalign.core.blobs import BlobStore
from modalign.core.broker import BrokerConfig
from modalign.core.config import ConfigError
from modalign.core.kafka import KafkaConfig, OffsetGap, ensure_topics, make_producer, produce_durably
from modalign.trainer.learner import Learner
from modalign.trainer.service import Trainer, TrainerConfig
from modalign.v1 import events_pb2, feedback_pb2

pytestmark = pytest.mark.integration


def write_feedback(kafka: KafkaConfig, ids: range) -> None:
    producer = make_producer(kafka)
    try:
        produce_durably(producer, kafka.topic("feedback"), [
            # Ratings of responses not logged (yet): they wait to be joined, remembered as consumed.
            (f"f{i}", events_pb2.FeedbackReceived(feedback=feedback_pb2.Feedback(
                feedback_id=f"f{i}", user_id="u", rating=feedback_pb2.Rating(response_id=f"r{i}", score=3))))
            for i in ids
        ], timeout_s=30)
    finally:
        producer.close()


def gap_records(kafka: KafkaConfig) -> float:
    return REGISTRY.get_sample_value("modalign_kafka_offset_gap_records_total", {"topic": kafka.topic("feedback")}) or 0.0


def test_feedback_deleted_before_the_trainer_read_it_is_reported_never_skipped_silently(
    kafka_broker: BrokerConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kafka = KafkaConfig(bootstrap_servers=kafka_broker.bootstrap_servers, topic_prefix=f"test-{uuid.uuid4().hex[:10]}.",
                        partitions=1)
    ensure_topics(kafka)
    config = TrainerConfig(kafka=kafka, work_dir=tmp_path / "trainer", model_store=str(tmp_path / "models"),
                           blob_dir=tmp_path / "blobs", metrics_port=0, round_max_seconds=0.5)
    learner = Learner(config.learner, BlobStore(config.blob_dir))
    feedback = (kafka.topic("feedback"), 0)

    write_feedback(kafka, range(0, 5))
    trainer = Trainer(config, learner)
    try:
        trainer.run_round()
        assert trainer.state.positions[feedback] == 5
    finally:
        trainer.close()

    # Down while 10 more arrive, of which retention deletes the first 4 (offsets 5 to 8).
    write_feedback(kafka, range(5, 15))
    admin = KafkaAdminClient(**kafka.client_kwargs())
    try:
        admin.delete_records({TopicPartition(*feedback): 9})
    finally:
        admin.close()

    # The policy "stop": the round fails with the gap named, and nothing is checkpointed past it.
    stopping = Trainer(TrainerConfig(**{**config.__dict__, "on_offset_gap": "stop"}), learner)
    try:
        with pytest.raises(OffsetGap, match=rf"{kafka.topic('feedback')}-0: records 5 to 8 were deleted .* \(4 lost"):
            stopping.run_round()
    finally:
        stopping.close()

    # The policy "resume" (the default): an error in the log, the records lost counted, and every record
    # still kept read.
    before = gap_records(kafka)
    resuming = Trainer(config, learner)
    try:
        assert resuming.state.positions[feedback] == 5
        with caplog.at_level(logging.ERROR, logger="modalign.core.kafka"):
            for _ in range(3):
                resuming.run_round()
        assert resuming.state.positions[feedback] == 15
        assert {f"f{i}" for i in range(15)} - set(resuming.state.consumed_ids) == {f"f{i}" for i in range(5, 9)}
        assert gap_records(kafka) == before + 4
        assert any("4 lost" in record.getMessage() and record.levelno == logging.ERROR for record in caplog.records)
    finally:
        resuming.close()


def test_an_unknown_offset_gap_policy_is_refused() -> None:
    with pytest.raises(ConfigError, match="one of resume, stop, got 'skip'") as refused:
        TrainerConfig(on_offset_gap="skip").validate()
    assert refused.value.field == "on_offset_gap"
