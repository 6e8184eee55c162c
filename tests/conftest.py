"""Fixtures shared by the integration tests: a real Kafka broker and real service processes.

Every process a test starts is stopped by its PID when the test (or the session) ends.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator

import pytest

from modalign.core import broker
from modalign.core.kafka import KafkaConfig, ensure_topics
from modalign.core.processes import free_port


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
