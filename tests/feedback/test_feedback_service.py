"""The feedback service as users meet it: a real process, a real Kafka broker, real gRPC calls."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from modalign.core import broker
from modalign.core.config import with_overrides
from modalign.core.kafka import KafkaConfig, ensure_topics, make_producer, produce_durably, read_topic
from modalign.core.processes import ManagedProcess
from modalign.feedback.ledger import served_responses
from modalign.feedback.server import FeedbackConfig
from modalign.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc

from tests.conftest import start_broker
from tests.feedback.cases import BAD_FEEDBACK, valid_feedback
from tests.services import grpc_service_config, start_service

pytestmark = pytest.mark.integration


def start_feedback_service(kafka: KafkaConfig, log_dir: Path, produce_timeout_s: float = 3.0) -> tuple[ManagedProcess, str, int]:
    # Feedback here names made-up responses: what these tests check lies behind the author check, which
    # tests/test_security.py tests against a real policy.
    config = grpc_service_config(FeedbackConfig, kafka, verify_authors=False)
    config = with_overrides(config, {"kafka.produce_timeout_s": produce_timeout_s})
    return start_service(config, log_dir), config.address, config.metrics_port


@pytest.fixture(scope="module")
def feedback_service(
    kafka_config: KafkaConfig, tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[feedback_pb2_grpc.FeedbackServiceStub, str, int]]:
    process, address, metrics_port = start_feedback_service(kafka_config, tmp_path_factory.mktemp("feedback"))
    with grpc.insecure_channel(address) as channel:
        yield feedback_pb2_grpc.FeedbackServiceStub(channel), address, metrics_port
    process.stop()


def stored_feedback(kafka: KafkaConfig) -> list[events_pb2.FeedbackReceived]:
    return read_topic(kafka, "feedback", events_pb2.FeedbackReceived)


def test_feedback_sent_twice_is_acknowledged_twice_and_stored_once(feedback_service, kafka_config) -> None:
    stub, _, _ = feedback_service
    feedback = valid_feedback("preference")
    first = stub.Submit(feedback, timeout=30)
    second = stub.Submit(feedback, timeout=30)
    assert (first.feedback_id, first.duplicate) == (feedback.feedback_id, False)
    assert (second.feedback_id, second.duplicate) == (feedback.feedback_id, True)

    records = [r for r in stored_feedback(kafka_config) if r.feedback.feedback_id == feedback.feedback_id]
    assert len(records) == 1
    assert records[0].feedback == feedback
    assert records[0].received_at.seconds > 0


def test_reused_feedback_id_with_other_content_is_refused(feedback_service) -> None:
    stub, _, _ = feedback_service
    feedback = valid_feedback("rating")
    stub.Submit(feedback, timeout=30)
    feedback.rating.score = 1
    with pytest.raises(grpc.RpcError) as raised:
        stub.Submit(feedback, timeout=30)
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "feedback_id" in raised.value.details()


@pytest.mark.parametrize(("mutate", "field"), BAD_FEEDBACK, ids=[field for _, field in BAD_FEEDBACK])
def test_invalid_feedback_is_refused_naming_the_field(feedback_service, mutate, field: str) -> None:
    stub, _, _ = feedback_service
    feedback = valid_feedback("rating")
    mutate(feedback)
    with pytest.raises(grpc.RpcError) as raised:
        stub.Submit(feedback, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(field + ":"), raised.value.details()


def test_stream_upload_counts_new_and_duplicate_and_names_a_bad_index(feedback_service, kafka_config) -> None:
    stub, _, _ = feedback_service
    batch = [valid_feedback(kind) for kind in ("preference", "rating", "edit")]
    reply = stub.SubmitStream(iter(batch + [batch[0]]), timeout=30)
    assert (reply.accepted, reply.duplicates) == (3, 1)

    bad = valid_feedback("rating")
    bad.rating.score = 9
    with pytest.raises(grpc.RpcError) as raised:
        stub.SubmitStream(iter([valid_feedback("edit"), bad]), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith("feedback[1].rating.score:")

    stored_ids = [r.feedback.feedback_id for r in stored_feedback(kafka_config)]
    assert sorted(stored_ids) == sorted(set(stored_ids))
    assert {f.feedback_id for f in batch} <= set(stored_ids)


def test_health_reflection_and_metrics_answer(feedback_service) -> None:
    stub, address, metrics_port = feedback_service
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    accepted_edits = r'modalign_feedback_received_total\{kind="edit",outcome="accepted"\} (\d+)\.0'
    before = int(m.group(1)) if (m := re.search(accepted_edits, urllib.request.urlopen(metrics_url).read().decode())) else 0
    stub.Submit(valid_feedback("edit"), timeout=30)
    with pytest.raises(grpc.RpcError):
        stub.Submit(feedback_pb2.Feedback(), timeout=30)
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="modalign.v1.FeedbackService"), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        listing = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        ))
        names = {s.name for s in listing.list_services_response.service}
        assert {"modalign.v1.FeedbackService", "grpc.health.v1.Health"} <= names

    metrics = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    assert int(re.search(accepted_edits, metrics).group(1)) == before + 1
    assert re.search(
        r'modalign_grpc_server_handled_total\{grpc_code="OK",grpc_method="Submit",grpc_service="modalign.v1.FeedbackService"\} [1-9]',
        metrics,
    )
    assert re.search(
        r'modalign_grpc_server_handled_total\{grpc_code="INVALID_ARGUMENT",grpc_method="Submit",'
        r'grpc_service="modalign.v1.FeedbackService"\} [1-9]',
        metrics,
    )
    assert "modalign_kafka_produce_seconds_bucket" in metrics


def test_feedback_is_refused_while_the_broker_is_down_and_accepted_once_it_is_back(tmp_path: Path) -> None:
    own_broker = start_broker(tmp_path / "kafka")  # its own broker: stopping the shared one would hurt other tests
    kafka = KafkaConfig(bootstrap_servers=own_broker.bootstrap_servers, topic_prefix="down.", partitions=1)
    ensure_topics(kafka)
    process, address, _ = start_feedback_service(kafka, tmp_path, produce_timeout_s=3.0)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
            stub.Submit(valid_feedback("rating"), timeout=30)

            broker.stop(own_broker)
            refused = valid_feedback("rating")
            with pytest.raises(grpc.RpcError) as raised:
                stub.Submit(refused, timeout=30)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

            broker.start(own_broker)
            reply = retry_until_available(lambda: stub.Submit(refused, timeout=30))
            assert reply.feedback_id == refused.feedback_id

        ids = [r.feedback.feedback_id for r in stored_feedback(kafka)]
        assert ids.count(refused.feedback_id) == 1
    finally:
        process.stop()
        broker.stop(own_broker)


def retry_until_available(call, attempts: int = 10):
    """A client's retry loop: UNAVAILABLE is the one answer worth retrying."""
    for attempt in range(attempts):
        try:
            return call()
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == attempts - 1:
                raise


def test_a_ledger_keeps_the_most_recent_keys_only(own_kafka_config: KafkaConfig) -> None:
    kafka = own_kafka_config
    producer = make_producer(kafka)
    try:
        responses = [events_pb2.GenerationLogged(response_id=f"r{i}", user_id=f"u{i}", policy_version="v0") for i in range(5)]
        produce_durably(producer, kafka.topic("generations"), [(g.response_id, g) for g in responses], timeout_s=30)
    finally:
        producer.close()
    served = served_responses(kafka, max_entries=3)
    served.start()
    try:
        served.record("r5", "u5")  # a write of its own counts as the newest
        kept = {key for key in (f"r{i}" for i in range(6)) if served.get(key) is not None}
        assert len(kept) == 3 and "r5" in kept
        assert REGISTRY.get_sample_value("modalign_feedback_ledger_entries", {"topic": kafka.topic("generations")}) == 3
    finally:
        served.stop()
