"""The trainer publishes into an S3 model store, and the policy and reward services load from it.

Real parts: a Kafka broker, an S3 server (s3proxy), the policy service as a process, the trainer's
and the reward service's own code in this process. Learning is not the point here (see
test_trainer_learns.py), so the trainer publishes the version its gate would have passed.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import grpc
import pytest

from modalign.core.blobs import BlobStore
from modalign.core.kafka import KafkaConfig, read_topic
from modalign.core.modelstore import S3Config, open_store
from modalign.policy.config import PolicyConfig
from modalign.reward.server import RewardKServeModel
from modalign.trainer.learner import Learner
from modalign.trainer.service import Trainer, TrainerConfig
from modalign.trainer.state import PendingVersion
from modalign.v1 import events_pb2, policy_pb2_grpc

from tests.services import start_grpc_service
from tests.trainer.scripted_users import prompt

pytestmark = pytest.mark.integration


def test_versions_published_to_s3_are_served_by_the_policy_and_reward_services(
    kafka_config: KafkaConfig, s3_bucket: str, s3_config: S3Config, tmp_path: Path
) -> None:
    root = f"s3://{s3_bucket}/models"
    policy, address, _ = start_grpc_service(
        PolicyConfig, kafka_config, tmp_path, follow="latest", blob_dir=tmp_path / "blobs", model_store=root,
        s3=S3Config(endpoint_url=s3_config.endpoint_url, cache_dir=tmp_path / "policy-cache"),
    )
    try:
        config = TrainerConfig(kafka=kafka_config, work_dir=tmp_path / "trainer", model_store=root, s3=s3_config,
                               blob_dir=tmp_path / "blobs", metrics_port=0)
        trainer = Trainer(config, Learner(config.learner, BlobStore(config.blob_dir)))
        try:
            # The last step of a round whose candidate passed the gate.
            trainer._publish(PendingVersion("v1", "v0", eval_metrics={"kl": 0.0}, trained_through=[]))
        finally:
            trainer.close()
        assert open_store(root, s3_config).versions("policy") == ["v1"]
        (event,) = read_topic(kafka_config, "policy-versions", events_pb2.PolicyVersionPublished)
        assert (event.uri, event.reward_model_version) == (f"{root}/policy/v1", "r1")

        with grpc.insecure_channel(address) as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            request, _ = prompt(random.Random(3), n=1, max_new_tokens=4)
            deadline = time.monotonic() + 60
            while (served := stub.Generate(request, timeout=60).policy_version) != "v1":
                assert time.monotonic() < deadline, f"the policy still serves {served}:\n{policy.log_tail()}"
                time.sleep(0.5)
        assert list((tmp_path / "policy-cache").rglob("manifest.json")), "the policy loaded a verified local copy"

        reward = RewardKServeModel("reward", None, s3=s3_config, store=root)
        reward.load()
        reward.load_published(event)
        assert reward.version == "r1"
    finally:
        policy.stop()
