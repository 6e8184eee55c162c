"""Overload is refused at once, and work its caller gave up on is dropped: a real policy process on a
real broker, its gRPC server bounded (modalign.core.grpc_server.GrpcLimits) and batching one request at
a time, so that calls queue behind one another."""

from __future__ import annotations

import base64
import http.client
import json
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from modalign.core.grpc_server import GrpcLimits
from modalign.core.kafka import KafkaConfig, read_topic
from modalign.core.processes import free_port
from modalign.feedback.server import FeedbackConfig
from modalign.policy.config import PolicyConfig
from modalign.v1 import common_pb2, events_pb2, feedback_pb2, feedback_pb2_grpc, policy_pb2, policy_pb2_grpc

from tests.policy.test_policy_service import png
from tests.services import counter_total, start_grpc_service

pytestmark = pytest.mark.integration

BOUND = GrpcLimits(max_workers=2, max_concurrent_rpcs=4, max_message_mib=88)  # the policy's default: room for its images and clips


def long_request(text: str, max_new_tokens: int = 512, n: int = 4) -> policy_pb2.GenerateRequest:
    return policy_pb2.GenerateRequest(
        text=text, images=[common_pb2.Image(data=png(), mime_type="image/png")], n=n,
        sampling=common_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=1))


@pytest.fixture
def policy(own_kafka_config: KafkaConfig, tmp_path: Path):
    kafka = own_kafka_config
    http_listen = f"127.0.0.1:{free_port()}"
    process, address, metrics_port = start_grpc_service(
        PolicyConfig, kafka, tmp_path, follow="none", blob_dir=tmp_path / "blobs", max_batch_rows=1, grpc=BOUND,
        http_listen=http_listen)
    channel = grpc.insecure_channel(address)
    try:
        yield (kafka, policy_pb2_grpc.PolicyServiceStub(channel), f"http://127.0.0.1:{metrics_port}/metrics",
               f"http://{http_listen}/v1/chat/completions")
    finally:
        channel.close()
        process.stop()


def test_calls_past_the_bound_are_refused_while_the_accepted_ones_still_run(policy) -> None:
    kafka, stub, _, _ = policy
    calls = 4 * BOUND.max_concurrent_rpcs
    with ThreadPoolExecutor(calls) as pool:
        def call(index: int) -> tuple[grpc.StatusCode, float]:
            try:
                stub.Generate(long_request(f"call {index}"), timeout=300)
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()
            return code, time.monotonic()

        outcomes = list(pool.map(call, range(calls)))
    refused = [ended for code, ended in outcomes if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    served = [ended for code, ended in outcomes if code == grpc.StatusCode.OK]
    assert len(refused) + len(served) == calls, [code for code, _ in outcomes]
    assert len(refused) >= calls - 2 * BOUND.max_concurrent_rpcs and served
    # Refused at once, not after a wait in a queue: every refusal came before the last accepted call ended.
    assert max(refused) < max(served)
    logged = read_topic(kafka, "generations", events_pb2.GenerationLogged)
    assert len(logged) == 4 * len(served)


def running_ahead(stub: policy_pb2_grpc.PolicyServiceStub, metrics: str) -> grpc.Future:
    """A long request whose batch is running: what comes next waits in the queue behind it."""
    ahead = stub.Generate.future(long_request("ahead"), timeout=300)
    deadline = time.monotonic() + 60
    while counter_total(metrics, "modalign_policy_batch_rows_count") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return ahead


def test_a_request_whose_deadline_passes_in_the_queue_is_never_generated_or_logged(policy) -> None:
    kafka, stub, metrics, _ = policy
    ahead = running_ahead(stub, metrics)
    with pytest.raises(grpc.RpcError) as late:
        stub.Generate(long_request("too late", max_new_tokens=8, n=1), timeout=0.5)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    ahead.result()
    deadline = time.monotonic() + 60
    while counter_total(metrics, "modalign_policy_requests_total", grpc_code="CANCELLED") < 1:
        assert time.monotonic() < deadline, "the late request was not taken out of its queue"
        time.sleep(0.1)
    assert counter_total(metrics, "modalign_policy_batch_rows_count") == 1  # it never had a batch of its own
    logged = read_topic(kafka, "generations", events_pb2.GenerationLogged)
    assert {event.prompt_text for event in logged} == {"ahead"}


def test_a_message_larger_than_a_service_takes_is_refused_before_it_is_read(
        kafka_config: KafkaConfig, tmp_path: Path) -> None:
    process, address, _ = start_grpc_service(FeedbackConfig, kafka_config, tmp_path)
    try:
        with grpc.insecure_channel(address) as channel:
            edit = feedback_pb2.Feedback(feedback_id=uuid.uuid4().hex, user_id="u", edit=feedback_pb2.Edit(
                response_id="r", edited_text="x" * (2 * 1024 * 1024)))
            with pytest.raises(grpc.RpcError) as refused:
                feedback_pb2_grpc.FeedbackServiceStub(channel).Submit(edit, timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in (refused.value.details() or "")
    finally:
        process.stop()


def test_an_http_client_that_disconnects_while_queued_is_never_generated_or_logged(policy) -> None:
    kafka, stub, metrics, chat_url = policy
    ahead = running_ahead(stub, metrics)
    image = "data:image/png;base64," + base64.b64encode(png()).decode()
    host, port = urllib.parse.urlsplit(chat_url).netloc.split(":")

    def chat(text: str, stream: bool) -> http.client.HTTPConnection:
        body = {"model": "modalign", "stream": stream, "max_tokens": 8, "messages": [{"role": "user", "content": [
            {"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": image}}]}]}
        connection = http.client.HTTPConnection(host, int(port), timeout=1)
        connection.request("POST", urllib.parse.urlsplit(chat_url).path, json.dumps(body),
                           {"Content-Type": "application/json"})
        return connection

    # A client that gives up waiting and closes its connection, and one that closes its stream after the
    # first event.
    gave_up = chat("gave up", stream=False)
    with pytest.raises(TimeoutError):
        gave_up.getresponse()
    gave_up.close()
    closed = chat("closed the stream", stream=True)
    assert closed.getresponse().readline().startswith(b"data: ")
    closed.close()
    ahead.result()
    deadline = time.monotonic() + 60
    while counter_total(metrics, "modalign_policy_requests_total", grpc_code="CANCELLED") < 2:
        assert time.monotonic() < deadline, "a disconnected HTTP request was not taken out of its queue"
        time.sleep(0.1)
    assert counter_total(metrics, "modalign_policy_batch_rows_count") == 1  # neither had a batch of its own
    logged = read_topic(kafka, "generations", events_pb2.GenerationLogged)
    assert {event.prompt_text for event in logged} == {"ahead"}
