"""Durability on a real three-node Kafka cluster (KRaft, every node a broker and a controller voter), with
topics at replication factor 3 and min.insync.replicas 2, as the Helm chart's Strimzi mode runs them.

Real feedback service processes, real gRPC clients, brokers killed and paused by PID. What is checked is
what docs/operations.md ("Durability on a three-broker cluster") promises: an acknowledged feedback is
never lost when a broker dies, and a client's retries never store it twice.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from kafka import KafkaAdminClient, TopicPartition

from modalign.core import broker
from modalign.core.config import with_overrides
from modalign.core.kafka import KafkaConfig, ensure_topics, make_consumer, make_producer, read_topic, type_headers
from modalign.core.processes import ManagedProcess
from modalign.feedback.server import FeedbackConfig, content_digest
from modalign.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc

from tests.feedback.cases import valid_feedback
from tests.services import grpc_service_config, start_service

pytestmark = pytest.mark.integration

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
"""What a client may see while a broker is lost, and retries with the same feedback_id."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[broker.Cluster]:
    """Three local Kafka nodes for this module's tests, stopped by PID at the end."""
    nodes = broker.Cluster.on_free_ports(tmp_path_factory.mktemp("cluster"))
    nodes.start()
    yield nodes
    nodes.stop()


def replicated_topics(cluster: broker.Cluster, partitions: int) -> KafkaConfig:
    """Topics of the test's own on the cluster, each partition on all three nodes, two needed for a write."""
    kafka = KafkaConfig(bootstrap_servers=cluster.bootstrap_servers, topic_prefix=f"durable-{uuid.uuid4().hex[:8]}.",
                        partitions=partitions, replication_factor=3, min_insync_replicas=2)
    ensure_topics(kafka)
    return kafka


def start_feedback_service(kafka: KafkaConfig, log_dir: Path, name: str) -> tuple[ManagedProcess, str]:
    # Feedback on made-up responses, as in tests/feedback: what is tested lies behind the author check.
    config = grpc_service_config(FeedbackConfig, kafka, verify_authors=False)
    config = with_overrides(config, {"kafka.replication_factor": kafka.replication_factor,
                                     "kafka.min_insync_replicas": kafka.min_insync_replicas,
                                     "kafka.produce_timeout_s": 3.0})
    return start_service(config, log_dir, name), config.address


def partition_leaders(kafka: KafkaConfig, topic: str) -> dict[int, int]:
    """The node leading each partition of topic (-1 while none does), as the cluster's metadata says."""
    admin = KafkaAdminClient(**kafka.client_kwargs(), request_timeout_ms=5000)
    try:
        (description,) = admin.describe_topics([kafka.topic(topic)])
        return {p["partition_index"]: p["leader_id"] for p in description["partitions"]}
    finally:
        admin.close()


def stored_ids(kafka: KafkaConfig) -> collections.Counter[str]:
    return collections.Counter(r.feedback.feedback_id for r in read_topic(kafka, "feedback", events_pb2.FeedbackReceived))


def submit_until_ok(stub: feedback_pb2_grpc.FeedbackServiceStub, feedback: feedback_pb2.Feedback,
                    seen: collections.Counter[str], deadline_s: float = 10.0, give_up_s: float = 120.0) -> None:
    """A client's retry loop: the same feedback (so the same feedback_id) until it is acknowledged,
    counting every answer in seen; anything but OK, UNAVAILABLE and DEADLINE_EXCEEDED is raised."""
    give_up = time.monotonic() + give_up_s
    while True:
        try:
            stub.Submit(feedback, timeout=deadline_s)
            seen["OK"] += 1
            return
        except grpc.RpcError as error:
            if error.code() not in RETRYABLE or time.monotonic() > give_up:
                raise
            seen[error.code().name] += 1
            time.sleep(0.1)


class LoadedClients:
    """Client threads, each submitting new feedback one after another over its own channel, retrying each
    until it is acknowledged; stop() lets each finish the feedback it is on."""

    def __init__(self, address: str, threads: int) -> None:
        self.acknowledged: list[str] = []
        self.seen: collections.Counter[str] = collections.Counter()
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(address,), daemon=True) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, address: str) -> None:
        seen: collections.Counter[str] = collections.Counter()
        try:
            with grpc.insecure_channel(address) as channel:
                stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
                while not self._stopping.is_set():
                    feedback = valid_feedback("rating")
                    feedback.user_id = f"user-{uuid.uuid4().hex[:12]}"  # many users, none over its rate limit
                    submit_until_ok(stub, feedback, seen)
                    with self._lock:
                        self.acknowledged.append(feedback.feedback_id)
        except BaseException as error:
            self.errors.append(error)
        finally:
            with self._lock:
                self.seen.update(seen)

    def count(self) -> int:
        with self._lock:
            return len(self.acknowledged)

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=180)


def wait_until(condition, timeout_s: float, what: str) -> None:
    """Waits until condition() holds; one that raises (a broker just killed answers nothing) does not yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f}s")
        time.sleep(0.5)


def test_killing_the_leading_broker_under_load_loses_and_duplicates_nothing_acknowledged(
    cluster: broker.Cluster, tmp_path: Path,
) -> None:
    kafka = replicated_topics(cluster, partitions=3)
    process, address = start_feedback_service(kafka, tmp_path, "feedback")
    victim = None
    try:
        clients = LoadedClients(address, threads=4)
        try:
            wait_until(lambda: clients.count() >= 40 or bool(clients.errors), 60, "feedback acknowledged before the kill")
            victim = partition_leaders(kafka, "feedback")[0]
            assert cluster.kill(victim)
            killed_at, acknowledged_before = time.monotonic(), clients.count()
            # Writes go on: every partition the victim led gets a new leader among the two survivors,
            # and the clients' retries get through to every partition.
            wait_until(lambda: not {victim, -1} & set(partition_leaders(kafka, "feedback").values()), 60,
                       "a surviving leader for every partition")
            wait_until(lambda: clients.count() >= acknowledged_before + 60 or bool(clients.errors), 90,
                       "feedback acknowledged after the kill")
            failover_s = time.monotonic() - killed_at
        finally:
            clients.stop()
        assert clients.errors == []
        stored = stored_ids(kafka)
        assert not [i for i in clients.acknowledged if stored[i] == 0], "acknowledged feedback was lost"
        assert {i: n for i, n in stored.items() if n > 1} == {}, f"stored twice; clients saw {clients.seen}"
        print(f"killed node {victim}; {len(clients.acknowledged)} acknowledged; answers {dict(clients.seen)}; "
              f"writes through again within {failover_s:.1f}s")
    finally:
        process.stop()
        if victim is not None:
            cluster.restart(victim)


def end_offset(kafka: KafkaConfig, topic: str) -> int:
    """The sum of topic's end offsets: the records written to it and acknowledged so far."""
    consumer = make_consumer(kafka, group_id=None)
    try:
        partitions = [TopicPartition(kafka.topic(topic), p) for p in consumer.partitions_for_topic(kafka.topic(topic))]
        return sum(consumer.end_offsets(partitions, timeout_ms=10_000).values())
    finally:
        consumer.close()


def write_others_feedback(kafka: KafkaConfig, count: int) -> None:
    """count feedback records, as other replicas would have written them."""
    producer = make_producer(kafka)
    try:
        for _ in range(count):
            feedback = valid_feedback("rating")
            event = events_pb2.FeedbackReceived(feedback=feedback, content_sha256=content_digest(feedback))
            producer.send(kafka.topic("feedback"), key=feedback.feedback_id.encode(), value=event.SerializeToString(),
                          headers=type_headers(event))
        producer.flush(timeout=60)
    finally:
        producer.close()


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    """The process stopped (SIGSTOP) for the block: a broker or a service that answers nothing, reads
    nothing and writes nothing meanwhile, as in a long pause of its machine."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_retry_on_the_other_replica_after_a_timeout_still_stores_one_copy(cluster: broker.Cluster, tmp_path: Path) -> None:
    kafka = replicated_topics(cluster, partitions=1)
    replica_a, address_a = start_feedback_service(kafka, tmp_path, "feedback-a")
    replica_b, address_b = start_feedback_service(kafka, tmp_path, "feedback-b")
    leader = partition_leaders(kafka, "feedback")[0]
    follower = next(node for node in cluster.nodes if node.node_id != leader)
    feedback = valid_feedback("rating")
    try:
        with grpc.insecure_channel(address_a) as channel_a, grpc.insecure_channel(address_b) as channel_b:
            a, b = feedback_pb2_grpc.FeedbackServiceStub(channel_a), feedback_pb2_grpc.FeedbackServiceStub(channel_b)
            for stub in (a, b):
                stub.Submit(valid_feedback("rating"), timeout=30)
            assert replica_b.pid is not None
            with paused(replica_b.pid):
                # B falls behind the topic, as a replica does after a pause or under load: it has much to read
                # before it reaches what A is about to write.
                write_others_feedback(kafka, 20_000)
                written = end_offset(kafka, "feedback")
                # A's write is slow: a follower in the ISR does not answer, so acks=all waits. The client
                # gives up first; A's write goes on and lands once the follower is back.
                with paused(broker.running_pid(follower) or 0):
                    with pytest.raises(grpc.RpcError) as timed_out:
                        a.Submit(feedback, timeout=1.0)
                    assert timed_out.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                wait_until(lambda: end_offset(kafka, "feedback") == written + 1, 30, "A's write landed")
            # The client retries on B at once, B's ledger still far behind A's write.
            seen: collections.Counter[str] = collections.Counter()
            submit_until_ok(b, feedback, seen, give_up_s=60)
        assert stored_ids(kafka)[feedback.feedback_id] == 1, f"B stored a second copy (B answered {dict(seen)})"
    finally:
        replica_a.stop()
        replica_b.stop()
