"""`modalign dead-letters`: what the trainer set aside is listed, and replayed once its cause is fixed.

Real broker; the trainer's own code in this process; the tool through the `modalign` command line.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from modalign import cli
from modalign.core.blobs import BlobStore
from modalign.core.broker import BrokerConfig
from modalign.core.kafka import KafkaConfig, ensure_topics, make_producer, produce_durably, read_topic
from modalign.trainer.join import JoinLimits
from modalign.trainer.learner import Learner
from modalign.trainer.service import Trainer, TrainerConfig
from modalign.v1 import events_pb2

from tests.trainer.test_join import generation, preference

pytestmark = pytest.mark.integration


def run(kafka: KafkaConfig, *args: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main(["dead-letters", *args, f"--kafka.bootstrap-servers={kafka.bootstrap_servers}",
                  f"--kafka.topic-prefix={kafka.topic_prefix}"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_unjoinable_feedback_is_replayed_once_its_generations_arrive_and_learned_once(
    kafka_broker: BrokerConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kafka = KafkaConfig(bootstrap_servers=kafka_broker.bootstrap_servers, topic_prefix=f"test-{uuid.uuid4().hex[:10]}.",
                        partitions=1)
    ensure_topics(kafka)
    # No wait for generations: feedback whose generations are not there yet is dead-lettered at once.
    config = TrainerConfig(kafka=kafka, work_dir=tmp_path / "trainer", model_store=str(tmp_path / "models"),
                           blob_dir=tmp_path / "blobs", metrics_port=0, round_max_seconds=0.5,
                           join=JoinLimits(max_wait_s=0.0), heldout_percent=0)
    chosen, rejected = generation(text="red"), generation(text="blue")
    early = preference(chosen, rejected)
    producer = make_producer(kafka)
    try:
        produce_durably(producer, kafka.topic("feedback"), [(early.feedback.feedback_id, early)], timeout_s=30)
        producer.send(kafka.topic("feedback"), key=b"junk", value=b"\xff not feedback").get(timeout=30)

        trainer = Trainer(config, Learner(config.learner, BlobStore(config.blob_dir)))
        try:
            trainer.run_round()
            assert early.feedback.feedback_id not in trainer.state.consumed_ids  # dead-lettered: forgotten
            listed = run(kafka, "list", capsys=capsys)
            assert "2 dead letters" in listed and "unjoinable: 1" in listed and "malformed: 1" in listed
            assert f"feedback {early.feedback.feedback_id}: unjoinable: response {chosen.response_id}" in listed
            assert f"{kafka.topic('feedback')}-0@1  not feedback: malformed" in listed

            # The generations arrive late (restored, say); the unjoinable letter is replayed, the malformed
            # one cannot be.
            produce_durably(producer, kafka.topic("generations"),
                            [(g.response_id, g) for g in (chosen, rejected)], timeout_s=30)
            out = run(kafka, "replay", "--reason=unjoinable", capsys=capsys)
            assert out.strip() == f"replayed 1 dead letters to {kafka.topic('feedback')}"
            trainer.run_round()
            learned = [p.feedback_id for p in trainer.state.pending_pairs]
            assert learned == [early.feedback.feedback_id]

            # Replaying everything again writes the same feedback once more: it is skipped as a duplicate.
            out = run(kafka, "replay", capsys=capsys)
            assert out.strip() == (f"replayed 1 dead letters to {kafka.topic('feedback')}; "
                                   "1 are not feedback and stay where they are")
            trainer.run_round()
            assert [p.feedback_id for p in trainer.state.pending_pairs] == learned
            assert trainer.state.positions[(kafka.topic("feedback"), 0)] == 4
        finally:
            trainer.close()
    finally:
        producer.close()
    # Nothing new was dead-lettered by the replays.
    assert len(read_topic(kafka, "feedback.dlq", events_pb2.DeadLetter)) == 2


def test_a_time_that_is_not_iso_8601_is_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["dead-letters", "list", "--since=yesterday"])
    assert exited.value.code == 2
    assert "--since" in capsys.readouterr().err
