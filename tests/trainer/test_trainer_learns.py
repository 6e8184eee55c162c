"""End to end through the public APIs: users' feedback makes the trainer publish a policy they prefer.

Real parts throughout: a Kafka broker, the policy and feedback services as processes spoken to over
gRPC, and the trainer as a process that publishes into a model store the policy service loads from.
"""

from __future__ import annotations

import math
import random
import threading
import time
from pathlib import Path

import grpc
import pytest

from modalign.core.kafka import KafkaConfig, read_topic
from modalign.core.modelstore import verify
from modalign.core.processes import ManagedProcess, free_port, http_ok
from modalign.v1 import events_pb2, feedback_pb2_grpc, policy_pb2_grpc

from tests.services import kafka_args, start_grpc_service
from tests.trainer.scripted_users import colour_rate, interact

pytestmark = pytest.mark.integration

HELD_OUT_PROMPTS = 64


def trainer_process(kafka: KafkaConfig, work: Path, *args: str) -> ManagedProcess:
    metrics_port = free_port()
    return ManagedProcess.python_module(
        "trainer", "modalign.trainer",
        ["--metrics-port", str(metrics_port), *kafka_args(kafka), "--work-dir", str(work / "trainer"),
         "--model-store", str(work / "models"), "--blob-dir", str(work / "blobs"), *args],
        ready=lambda: http_ok(f"http://127.0.0.1:{metrics_port}/metrics"), log_dir=work,
    )


def two_proportion_z(after: float, before: float, n: int) -> float:
    pooled = (after + before) / 2
    return (after - before) / math.sqrt(max(pooled * (1 - pooled) * 2 / n, 1e-12))


def test_trainer_publishes_a_version_that_users_prefer(kafka_config: KafkaConfig, tmp_path: Path) -> None:
    policy, policy_address, _ = start_grpc_service(
        "policy", "modalign.policy.server", kafka_config, tmp_path, "--blob-dir", str(tmp_path / "blobs"),
        "--max-batch-wait-ms", "20", "--follow", "latest",
    )
    feedback, feedback_address, _ = start_grpc_service("feedback", "modalign.feedback.server", kafka_config, tmp_path)
    trainer = trainer_process(
        kafka_config, tmp_path,
        "--round-max-seconds", "2", "--min-pairs-to-learn", "8", "--rounds-per-version", "4",
        "--learner.policy-updates-per-round", "2", "--learner.sample-prompts", "8",
        "--learner.samples-per-prompt", "4", "--learner.max-new-tokens", "12",
    )
    stop_users = threading.Event()
    try:
        with grpc.insecure_channel(policy_address) as policy_channel, grpc.insecure_channel(feedback_address) as fb_channel:
            policy_stub = policy_pb2_grpc.PolicyServiceStub(policy_channel)
            feedback_stub = feedback_pb2_grpc.FeedbackServiceStub(fb_channel)
            v0_rate, v0_versions = colour_rate(policy_stub, HELD_OUT_PROMPTS, seed=2024)
            assert v0_versions == {"v0"}

            trainer.start()
            trainer.wait_ready(180)
            interactions, failures = [], []

            def users() -> None:
                rng = random.Random(7)
                while not stop_users.is_set():
                    try:
                        interactions.append(interact(policy_stub, feedback_stub, rng))
                    except grpc.RpcError as error:  # none may fail, new versions loading included
                        failures.append(error)
                        return

            users_thread = threading.Thread(target=users, daemon=True)
            users_thread.start()

            deadline = time.monotonic() + 420
            best_rate, best_version = v0_rate, "v0"
            while time.monotonic() < deadline:
                time.sleep(10)
                published = read_topic(kafka_config, "policy-versions", events_pb2.PolicyVersionPublished)
                if not published:
                    continue
                rate, versions = colour_rate(policy_stub, HELD_OUT_PROMPTS, seed=2024)
                if versions == {published[-1].version} and rate > best_rate:
                    best_rate, best_version = rate, published[-1].version
                if two_proportion_z(best_rate, v0_rate, HELD_OUT_PROMPTS) > 3:
                    break
            stop_users.set()
            users_thread.join(timeout=120)
            print(f"v0 names the colour in {v0_rate:.1%} of held-out answers, {best_version} in {best_rate:.1%}; "
                  f"{len(interactions)} user interactions")
            assert failures == [], failures
            assert best_version != "v0", trainer.log_tail()
            assert two_proportion_z(best_rate, v0_rate, HELD_OUT_PROMPTS) > 3, (v0_rate, best_rate)

            folder = tmp_path / "models" / "policy" / best_version
            manifest = verify(folder)
            assert manifest.parent and manifest.trained_through and "rm_heldout_accuracy" in manifest.eval_metrics
    finally:
        stop_users.set()
        trainer.stop()
        feedback.stop()
        policy.stop()
