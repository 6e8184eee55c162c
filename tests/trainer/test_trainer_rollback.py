"""A rollback of the version the trainer builds on sends it back to the stable version.

Real broker; the trainer's own code in this process, publishing into a folder store. The rollout
states are written to the rollout topic as the controller writes them (in its transactions), and once
as someone else would, outside them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
from kafka import TopicPartition
from prometheus_client import REGISTRY

from modalign.core.blobs import BlobStore
from modalign.core.config import with_overrides
from modalign.core.kafka import KafkaConfig, make_consumer, make_producer, produce_durably
from modalign.rollout.controller import STATE_KEY, StateStore
from modalign.trainer.learner import Learner
from modalign.trainer.service import Trainer, TrainerConfig
from modalign.trainer.state import PendingVersion
from modalign.v1 import events_pb2

pytestmark = pytest.mark.integration


def train_and_publish(trainer: Trainer, version: str) -> str:
    """Stands in for rounds of learning and a passed gate: the policy moves, and is published. Returns
    the learner's digest (its reward model does not move without pairs: the policy tells them apart)."""
    with torch.no_grad():
        for parameter in trainer.learner.models.versions.trainable_parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    trainer.learner.models.accept_candidate()
    trainer._publish(PendingVersion(version, trainer.state.parent_version, eval_metrics={}, trained_through=[]))
    return trainer.learner.models.parameter_digest()


def write_rollout_states(kafka: KafkaConfig, *states: events_pb2.RolloutState) -> None:
    controller = StateStore(kafka)  # the controller's own writer, one transaction per state
    try:
        for state in states:
            controller.write(state)
    finally:
        controller.close()


def forge_rollout_state(kafka: KafkaConfig, state: events_pb2.RolloutState) -> None:
    """Acknowledged by the broker, visible to read_committed readers, but no transaction's."""
    producer = make_producer(kafka)
    try:
        produce_durably(producer, kafka.topic("rollout"), [(STATE_KEY.decode(), state)], kafka.produce_timeout_s)
    finally:
        producer.close()


def rounds_until(trainer: Trainer, done: Callable[[], bool], rounds: int = 10) -> None:
    """Runs rounds until done: the commit marker after a state may reach the trainer a round after the state."""
    for _ in range(rounds):
        trainer.run_round()
        if done():
            return


def ignored_states(kafka: KafkaConfig) -> float:
    return REGISTRY.get_sample_value("modalign_state_records_ignored_total", {"topic": kafka.topic("rollout")}) or 0.0


def rollout_end(kafka: KafkaConfig) -> int:
    consumer = make_consumer(kafka, group_id=None)
    try:
        partition = TopicPartition(kafka.topic("rollout"), 0)
        return consumer.end_offsets([partition])[partition]
    finally:
        consumer.close()


def rolled_back(canary: str, stable: str) -> events_pb2.RolloutState:
    return events_pb2.RolloutState(canary_version=canary, stable_version=stable,
                                   phase=events_pb2.ROLLOUT_PHASE_ROLLED_BACK, reason="rating worse")


@pytest.mark.parametrize("lora_rank", [0, 4], ids=["full", "lora"])
def test_the_trainer_goes_back_to_the_stable_version_when_its_version_is_rolled_back(
    own_kafka_config: KafkaConfig, tmp_path: Path, lora_rank: int
) -> None:
    """With LoRA, the versions it goes back to are reloaded from the adapters published beside them."""
    kafka_config = own_kafka_config  # each run reads its rollout topic from the start
    config = with_overrides(TrainerConfig(
        kafka=kafka_config, work_dir=tmp_path / "trainer", model_store=str(tmp_path / "models"),
        blob_dir=tmp_path / "blobs", metrics_port=0, round_max_seconds=0.5), {"learner.lora_rank": lora_rank})
    trainer = Trainer(config, Learner(config.learner, BlobStore(config.blob_dir)))
    try:
        starting = trainer.learner.models.parameter_digest()
        v1 = train_and_publish(trainer, "v1")
        v2 = train_and_publish(trainer, "v2")
        assert len({starting, v1, v2}) == 3 and trainer.state.parent_version == "v2"

        # A rollback of v2 that the controller did not write is ignored (decided once the record after
        # it shows no commit marker between them; until then it is held, not acted on).
        ignored_before = ignored_states(kafka_config)
        forge_rollout_state(kafka_config, rolled_back("v2", "v0"))
        trainer.run_round()
        assert trainer.state.parent_version == "v2" and trainer.learner.models.parameter_digest() == v2

        # v1 was promoted before; v2, the version the trainer builds on, is rolled back; a rollback of
        # a version it does not build on changes nothing.
        write_rollout_states(kafka_config, rolled_back("v7", "v1"), events_pb2.RolloutState(
            canary_version="v1", stable_version="v1", phase=events_pb2.ROLLOUT_PHASE_PROMOTED), rolled_back("v2", "v1"))
        rounds_until(trainer, lambda: trainer.state.parent_version == "v1")
        assert ignored_states(kafka_config) == ignored_before + 1
        assert trainer.state.parent_version == "v1" and trainer.state.rollout_offset == rollout_end(kafka_config)
        assert trainer.learner.models.parameter_digest() == v1  # the weights published as v1, from the model store
        assert trainer.learner.models.policy_optimizer.state == {}

        # Built on v1 again: v3's parent is v1. Its rollback returns to the starting policy, which is
        # not in the store: the learner's reference.
        train_and_publish(trainer, "v3")
        assert (tmp_path / "models" / "policy" / "v3" / "manifest.json").read_text().count('"parent": "v1"') == 1
        write_rollout_states(kafka_config, rolled_back("v3", "v0"))
        rounds_until(trainer, lambda: trainer.state.parent_version == "v0")
        assert trainer.state.parent_version == "v0" and trainer.learner.models.parameter_digest() == starting
    finally:
        trainer.close()

    # What was followed is checkpointed: a restarted trainer reads on from there and does not go back again.
    restarted = Trainer(config, Learner(config.learner, BlobStore(config.blob_dir)))
    try:
        assert (restarted.state.parent_version, restarted.state.rollout_offset) == ("v0", rollout_end(kafka_config))
        v4 = train_and_publish(restarted, "v4")
        rounds_until(restarted, lambda: restarted.state.parent_version == "v4")
        assert restarted.state.parent_version == "v4" and restarted.learner.models.parameter_digest() == v4
    finally:
        restarted.close()
