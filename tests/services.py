"""Starting modalign's real service processes in tests, and reading what they wrote to Kafka."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from google.protobuf.message import Message
from kafka import TopicPartition

from modalign.core.kafka import KafkaConfig, make_consumer
from modalign.core.processes import ManagedProcess, free_port, grpc_serving

M = TypeVar("M", bound=Message)


def kafka_args(config: KafkaConfig) -> list[str]:
    """The command-line flags that point a service at config's broker and topics."""
    return [
        "--kafka.bootstrap-servers", config.bootstrap_servers,
        "--kafka.topic-prefix", config.topic_prefix,
        "--kafka.partitions", str(config.partitions),
    ]


def start_grpc_service(name: str, module: str, kafka: KafkaConfig, log_dir: Path, *args: str,
                       timeout_s: float = 120) -> tuple[ManagedProcess, str, int]:
    """Starts a gRPC service process on free loopback ports; returns it, its address and its metrics port."""
    address, metrics_port = f"127.0.0.1:{free_port()}", free_port()
    process = ManagedProcess.python_module(
        name, module, ["--listen", address, "--metrics-port", str(metrics_port), *kafka_args(kafka), *args],
        ready=lambda: grpc_serving(address), log_dir=log_dir,
    )
    process.start()
    try:
        process.wait_ready(timeout_s)
    except BaseException:
        process.stop()
        raise
    return process, address, metrics_port


def read_topic(kafka: KafkaConfig, name: str, message_type: type[M]) -> list[M]:
    """Every record of a topic, from the beginning to the end offsets as of this call."""
    consumer = make_consumer(kafka, group_id=None)
    try:
        topic = kafka.topic(name)
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        records = []
        while any(consumer.position(tp) < end for tp, end in ends.items()):
            for batch in consumer.poll(timeout_ms=1000).values():
                records.extend(message_type.FromString(r.value) for r in batch)
        return records
    finally:
        consumer.close()
