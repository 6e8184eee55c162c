"""Feedback ingestion: the feedback service against kafka-python's own producer, on the same broker.

  A  baseline: kafka-python's KafkaProducer (acks=all), the records the service writes (a
     FeedbackReceived per feedback, keyed by its id) written straight to a topic of their own; each
     writer waits for its record's acknowledgement before writing the next.
  B  modalign: Submit over gRPC to a feedback service process (validation, de-duplication against
     the topic, an acks=all write before the answer), with as many client threads.

Both are closed loops of `concurrency` writers until `requests` records are acknowledged; each side has
topics of its own. Reported per side: records per second and latency p50/p99; the ratio B/A of
throughput per repeat. Repeats alternate the order of the sides after an untimed warm-up of each.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
from kafka import KafkaProducer

from modalign.bench.common import Comparison, closed_loop, compared, interleaved, running
from modalign.core.auth import AuthConfig
from modalign.core.kafka import KafkaConfig, ensure_topics
from modalign.core.processes import free_port
from modalign.feedback.server import FeedbackConfig
from modalign.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc


def new_feedback() -> feedback_pb2.Feedback:
    """A rating no one gave before: a new feedback_id and user."""
    feedback = feedback_pb2.Feedback(feedback_id=f"fb-{uuid.uuid4().hex}", user_id=f"user-{uuid.uuid4().hex[:12]}")
    feedback.client_time.FromSeconds(int(time.time()))
    feedback.rating.response_id = str(uuid.uuid4())
    feedback.rating.score = 4
    return feedback


def submit_over_grpc(address: str) -> Callable[[], Callable[[], None]]:
    """connect() for closed_loop: each client thread its own channel, submitting new ratings."""
    def connect() -> Callable[[], None]:
        stub = feedback_pb2_grpc.FeedbackServiceStub(grpc.insecure_channel(address))

        def submit() -> None:
            feedback = new_feedback()
            if stub.Submit(feedback, timeout=30).duplicate:
                raise AssertionError(f"{feedback.feedback_id} answered as a duplicate")
        return submit
    return connect


def produce_directly(producer: KafkaProducer, topic: str) -> Callable[[], None]:
    def produce() -> None:
        feedback = new_feedback()
        record = events_pb2.FeedbackReceived(feedback=feedback)
        record.received_at.GetCurrentTime()
        producer.send(topic, key=feedback.feedback_id.encode(), value=record.SerializeToString()).get(timeout=30)
    return produce


def compare(bootstrap_servers: str, log_dir: Path, *, requests: int, concurrency: int,
            repeats: int) -> Comparison:
    """Both sides (module docstring) on the broker at bootstrap_servers; the feedback service runs as a
    process of its own, logging to log_dir, and is stopped before this returns."""
    def topics(side: str) -> KafkaConfig:
        kafka = KafkaConfig(bootstrap_servers=bootstrap_servers, topic_prefix=f"bench-{side}-{uuid.uuid4().hex[:6]}.")
        ensure_topics(kafka)
        return kafka

    raw = topics("raw")
    producer = KafkaProducer(**raw.client_kwargs(), acks="all")
    service = FeedbackConfig(listen=f"127.0.0.1:{free_port()}", metrics_port=0, auth=AuthConfig(insecure=True),
                             verify_authors=False, kafka=topics("service"))
    try:
        with running(service, log_dir, "feedback"):
            passes = interleaved({
                "A": lambda: closed_loop(produce_directly(producer, raw.topic("feedback")), requests, concurrency),
                "B": lambda: closed_loop(lambda: None, requests, concurrency, connect=submit_over_grpc(service.address)),
            }, repeats)
    finally:
        producer.close()
    return compared(passes, rate=lambda one: one.per_s, times=lambda one: one.latencies_s)
