"""Fixtures shared by the integration tests: a real Kafka broker, a real S3 server, real service processes.

Every process a test starts is stopped by its PID when the test (or the session) ends.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator

import boto3
import grpc
import pytest

from modalign.core import broker
from modalign.core.kafka import KafkaConfig, ensure_topics
from modalign.core.modelstore import S3Config
from modalign.core.processes import ManagedProcess, free_port

from tests import s3proxy


def start_broker(data_dir: Path) -> broker.BrokerConfig:
    config = broker.BrokerConfig(data_dir=data_dir, port=free_port(), controller_port=free_port())
    broker.start(config)
    return config


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[broker.BrokerConfig]:
    """One real Apache Kafka broker for the whole test session."""
    config = start_broker(tmp_path_factory.mktemp("kafka"))
    yield config
    broker.stop(config)


def topics_of_their_own(kafka_broker: broker.BrokerConfig) -> KafkaConfig:
    """A KafkaConfig on the broker whose topics, created here, no one else uses."""
    config = KafkaConfig(
        bootstrap_servers=kafka_broker.bootstrap_servers,
        topic_prefix=f"test-{uuid.uuid4().hex[:10]}.",
        partitions=2,
    )
    ensure_topics(config)
    return config


@pytest.fixture(scope="module")
def kafka_config(kafka_broker: broker.BrokerConfig) -> KafkaConfig:
    """A KafkaConfig whose topics belong to this test module alone."""
    return topics_of_their_own(kafka_broker)


@pytest.fixture
def own_kafka_config(kafka_broker: broker.BrokerConfig) -> KafkaConfig:
    """A KafkaConfig whose topics belong to this test alone: for a test that counts every record."""
    return topics_of_their_own(kafka_broker)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3proxy.S3Server]:
    """One real S3-compatible server (s3proxy) for the whole test session."""
    server = s3proxy.start(tmp_path_factory.mktemp("s3proxy"))
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: s3proxy.S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new, empty bucket on the S3 server. The test's clients (and the processes it starts) get the
    key pair as deployments do, from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_access_key)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def s3_config(s3_server: s3proxy.S3Server, tmp_path: Path) -> S3Config:
    """How this test's clients reach the S3 server, each test with its own cache."""
    return S3Config(endpoint_url=s3_server.endpoint_url, cache_dir=tmp_path / "s3-cache")


# The `integration` marker: `pytest -m "not integration"` is the contributors' fast loop, so every test that
# starts a broker, an S3 server, a gRPC server or a service process must carry it. Tests that use the
# fixtures below get it here; an unmarked test that starts one anyway fails (guard_unmarked_tests).
INTEGRATION_FIXTURES = {"kafka_broker", "kafka_config", "s3_server", "s3_bucket", "s3_config"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def _refuse_to_start(what: str):
    def refuse(*args, **kwargs):
        pytest.fail(f"a test without the integration marker started {what}: mark it "
                    f"(pytestmark = pytest.mark.integration) or use the kafka/s3 fixtures", pytrace=False)
    return refuse


@pytest.fixture(autouse=True)
def guard_unmarked_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a test without the integration marker, starting a broker, an S3 server, a gRPC server or a
    ManagedProcess fails the test, so that the fast loop stays free of them."""
    if request.node.get_closest_marker("integration") is not None:
        return
    monkeypatch.setattr(broker, "start", _refuse_to_start("a Kafka broker"))
    monkeypatch.setattr(broker, "launch", _refuse_to_start("a Kafka broker"))  # how a Cluster starts its nodes
    monkeypatch.setattr(s3proxy, "start", _refuse_to_start("an S3 server"))
    monkeypatch.setattr(grpc, "server", _refuse_to_start("a gRPC server"))
    monkeypatch.setattr(ManagedProcess, "start", _refuse_to_start("a service process"))
