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

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from kafka import KafkaProducer

from modalign.bench.serving import Comparison, Side, interleaved, percentile
from modalign.core.auth import AuthConfig
from modalign.core.kafka import KafkaConfig, ensure_topics
from modalign.core.launch import service_process
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


@dataclass(frozen=True)
class Pass:
    wall_s: float
    latencies_s: list[float]

    @property
    def per_s(self) -> float:
        return len(self.latencies_s) / self.wall_s


def closed_loop(write: Callable[[], None], requests: int, concurrency: int,
                connect: Callable[[], Callable[[], None]] | None = None) -> Pass:
    """concurrency threads calling write() (or, with connect, each the writer connect() returns) until
    requests calls have returned; an exception in any ends the pass with it."""
    remaining = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[BaseException] = []
    go = threading.Barrier(concurrency + 1)

    def client() -> None:
        writer = connect() if connect is not None else write
        go.wait()
        try:
            while True:
                with lock:
                    if next(remaining, None) is None:
                        return
                started = time.perf_counter()
                writer()
                took = time.perf_counter() - started
                with lock:
                    latencies.append(took)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    go.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    return Pass(wall, latencies)


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
    process = service_process(service, log_dir, "feedback")
    process.start()
    try:
        process.wait_ready(120)
        comparison = compare_passes({
            "A": lambda: closed_loop(produce_directly(producer, raw.topic("feedback")), requests, concurrency),
            "B": lambda: closed_loop(lambda: None, requests, concurrency, connect=submit_over_grpc(service.address)),
        }, repeats)
    finally:
        process.stop()
        producer.close()
    return comparison


def compare_passes(sides: dict[str, Callable[[], Pass]], repeats: int) -> Comparison:
    """The closed-loop passes of sides A and B (serving.interleaved); B/A of throughput per repeat."""
    passes = interleaved(sides, repeats)

    def side(runs: list[Pass]) -> Side:
        latencies = [latency for one in runs for latency in one.latencies_s]
        return Side([one.per_s for one in runs], percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000)

    return Comparison(side(passes["A"]), side(passes["B"]), [b.per_s / a.per_s for a, b in zip(passes["A"], passes["B"])])
