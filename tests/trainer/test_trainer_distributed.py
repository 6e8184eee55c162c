"""The trainer under torchrun: two CPU ranks (gloo) share the feedback partitions and stay in step."""

from __future__ import annotations

import re
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from modalign.core.kafka import KafkaConfig
from modalign.core.launch import service_argv
from modalign.core.processes import ManagedProcess, free_port
from modalign.feedback.server import FeedbackConfig
from modalign.policy.config import PolicyConfig
from modalign.trainer.state import TrainerState

from tests.services import start_grpc_service
from tests.trainer.test_trainer_crash import live_checkpoint, send_feedback, wait_for_log
from tests.trainer.test_trainer_learns import trainer_config

pytestmark = pytest.mark.integration

CHECKPOINTED = re.compile(r"round (\d+) checkpointed: (\d+) pairs learned so far \(rank (\d), parameters (\w+)\)")


@pytest.mark.parametrize("learner", [
    {}, {"learner.lora_rank": 4, "learner.reward_lora": True, "learner.algorithm": "ppo"}, {"learner.sharding": "fsdp"},
], ids=["full", "lora", "fsdp"])
def test_two_ranks_share_the_partitions_and_keep_identical_models(
    own_kafka_config: KafkaConfig, tmp_path: Path, learner: dict
) -> None:
    """With LoRA the ranks train their adapters in step on identical frozen bases (the digest covers both);
    the reward model and PPO's critic are adapters on the same base, each wrapper averaging its own.
    With FSDP each rank holds shards (the digest is of the whole weights, gathered), and the job is
    SIGKILLed once, right after a checkpoint, and started again: it resumes from its sharded checkpoint
    and still learns from every feedback exactly once."""
    sharded = learner.get("learner.sharding") == "fsdp"
    kafka_config = own_kafka_config  # each run's trainer reads its feedback topics from the start
    assert kafka_config.partitions == 2
    policy, policy_address, _ = start_grpc_service(PolicyConfig, kafka_config, tmp_path, blob_dir=tmp_path / "blobs")
    feedback, feedback_address, _ = start_grpc_service(FeedbackConfig, kafka_config, tmp_path)
    trainer = trainer_config(kafka_config, tmp_path, {
        "round_max_feedback": 4, "round_max_seconds": 1.0, "min_pairs_to_learn": 2,
        "rounds_per_version": 2, "learner.policy_updates_per_round": 1, "learner.sample_prompts": 2,
        "learner.samples_per_prompt": 2, "learner.max_new_tokens": 6, "learner.eval_prompts": 4,
        "gate.min_reward_gain": -1000.0, "gate.max_kl": 1000.0, **learner,
    }, metrics_port=0)
    torchrun = ManagedProcess(
        "torchrun",
        [str(Path(sys.executable).with_name("torchrun")), "--nnodes", "1", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *service_argv(trainer)],
        ready=trainer.ready, log_path=tmp_path / "torchrun.log",
    )
    try:
        sent, orphan = send_feedback(kafka_config, policy_address, feedback_address, interactions=16)
        if sharded:
            torchrun.start()
            wait_for_log(torchrun, r"round 2 checkpointed: .* \(rank 0", after=0)
            torchrun.kill()
            assert (tmp_path / "trainer" / "checkpoint.json").exists()
        log_size = torchrun.log_path.stat().st_size if torchrun.log_path.exists() else 0
        torchrun.start()
        deadline = time.monotonic() + 300
        state = None
        while time.monotonic() < deadline:
            checkpoint = live_checkpoint(tmp_path / "trainer")
            if checkpoint is not None:
                ranks = [TrainerState.from_json(rank) for rank in checkpoint["ranks"]]
                consumed = set().union(*(rank.consumed_ids for rank in ranks))
                if set(sent) | {orphan} <= consumed and not ranks[0].pending_pairs:
                    state = ranks
                    break
            assert torchrun.process.poll() is None, torchrun.log_tail()
            time.sleep(1)
        assert state is not None, torchrun.log_tail()
        torchrun.stop(timeout_s=60)  # torchrun itself exits 1 on SIGTERM, by design, after stopping its workers
    finally:
        torchrun.kill()
        feedback.stop()
        policy.stop()

    first, second = state
    assert first.consumed_ids and second.consumed_ids, "each rank consumes its own share of the partitions"
    assert not set(first.consumed_ids) & set(second.consumed_ids)
    assert first.trained_ids == second.trained_ids  # both learned from the same gathered pairs
    assert max(Counter(first.trained_ids).values()) == 1, "a feedback learned from twice"
    log = torchrun.log_path.read_text()
    assert re.search(r"published policy v\d+", log), "rank 0 publishes the versions the gate passes"
    if sharded:
        assert "resumed from round" in log[log_size:]
        assert list((tmp_path / "trainer").glob("sharded-*/.metadata")), "each rank's shards, in a sharded checkpoint"
    assert {p for (topic, p) in first.positions if topic.endswith("feedback")} == {0}
    assert {p for (topic, p) in second.positions if topic.endswith("feedback")} == {1}

    digests: dict[tuple[int, int], str] = {}
    for round_, _, rank, digest in CHECKPOINTED.findall(log):
        digests[(int(round_), int(rank))] = digest
    rounds = sorted({r for r, _ in digests if (r, 0) in digests and (r, 1) in digests})
    assert len(rounds) >= 3
    assert all(digests[(r, 0)] == digests[(r, 1)] for r in rounds), digests
    assert len({digests[(r, 0)] for r in rounds}) > 1, "the models must have learned, not merely stayed equal"
