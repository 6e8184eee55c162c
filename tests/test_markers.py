"""The fast loop (`pytest -m "not integration"`) must start no broker, server or service process: in a
test without the integration marker, tests/conftest.py makes starting one fail."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from modalign.core import broker
from modalign.core.processes import ManagedProcess, free_port

from tests import s3proxy


def test_an_unmarked_test_cannot_start_a_service_process(tmp_path: Path) -> None:
    process = ManagedProcess("sleeper", ["sleep", "60"], lambda: True, tmp_path / "sleeper.log")
    with pytest.raises(pytest.fail.Exception, match="without the integration marker started a service process"):
        process.start()
    assert process.process is None


@pytest.mark.parametrize(
    ("start", "what"),
    [
        (lambda tmp: broker.start(broker.BrokerConfig(data_dir=tmp, port=free_port(), controller_port=free_port())), "a Kafka broker"),
        (lambda tmp: broker.Cluster.on_free_ports(tmp).start(), "a Kafka broker"),
        (lambda tmp: s3proxy.start(tmp), "an S3 server"),
        (lambda tmp: grpc.server(None), "a gRPC server"),
    ],
    ids=["kafka", "kafka-cluster", "s3", "grpc"],
)
def test_an_unmarked_test_cannot_start_a_server(start, what: str, tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match=f"started {what}"):
        start(tmp_path)


@pytest.mark.integration
def test_a_marked_test_may_start_a_process(tmp_path: Path) -> None:
    process = ManagedProcess("sleeper", ["sleep", "60"], lambda: True, tmp_path / "sleeper.log")
    process.start()
    try:
        assert process.pid is not None and process.process.poll() is None
    finally:
        process.stop()
