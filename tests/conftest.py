"""Fixtures shared by the integration tests: a real Kafka broker, a real S3 server, real service processes.

Every process a test starts is stopped by its PID when the test (or the session) ends.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator

import boto3
import pytest

from modalign.core import broker
from modalign.core.kafka import KafkaConfig, ensure_topics
from modalign.core.modelstore import S3Config
from modalign.core.processes import free_port

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


@pytest.fixture(scope="module")
def kafka_config(kafka_broker: broker.BrokerConfig) -> KafkaConfig:
    """A KafkaConfig whose topics, created here, belong to this test module alone."""
    config = KafkaConfig(
        bootstrap_servers=kafka_broker.bootstrap_servers,
        topic_prefix=f"test-{uuid.uuid4().hex[:10]}.",
        partitions=2,
    )
    ensure_topics(config)
    return config


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
