"""Kafka topics and durable producing, shared by every service.

A write counts as done only when the broker acknowledged it with acks=all; callers turn
`BrokerUnavailable` into gRPC UNAVAILABLE so that nothing unwritten is ever acknowledged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import Message
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, OffsetOutOfRangeError, TopicAlreadyExistsError
from prometheus_client import Counter, Histogram

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

PRODUCE_SECONDS = Histogram(
    "modalign_kafka_produce_seconds",
    "Time from send to broker acknowledgement (acks=all) of one record.",
    ["topic"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PRODUCE_ERRORS = Counter(
    "modalign_kafka_produce_errors_total",
    "Records the broker did not acknowledge, by topic and error type.",
    ["topic", "error"],
)

POISON_RECORDS = Counter(
    "modalign_kafka_poison_records_total",
    "Consumed records skipped because they are not a valid message of their topic's type, by topic.",
    ["topic"],
)

OFFSET_GAPS = Counter(
    "modalign_kafka_offset_gap_records_total",
    "Records a consumer was to read next that were gone when it got there (deleted by retention: the consumer "
    "was stopped, or fell behind, longer than the topic keeps records), by topic.",
    ["topic"],
)

DAY_MS = 24 * 60 * 60 * 1000

# What every message of a topic's type carries. Protobuf parses many byte strings, another message type's
# included, into a message of any type (unknown fields are kept aside, missing ones read as empty), so a
# record that parses but lacks these is not one of ours.
IDENTITY_FIELDS: dict[str, tuple[str, ...]] = {
    "modalign.v1.GenerationLogged": ("response_id", "policy_version"),
    "modalign.v1.FeedbackReceived": ("feedback.feedback_id",),
    "modalign.v1.RolloutState": ("stable_version",),
    "modalign.v1.PolicyVersionPublished": ("version",),
    "modalign.v1.DeadLetter": ("source_topic",),
}

CONTENT_TYPE_HEADER = "content-type"


def content_type(message_type_name: str) -> str:
    """The content-type header value of a record holding a message of that (full) type name."""
    return f"application/x-protobuf; messageType={message_type_name}"


class PoisonRecord(ValueError):
    """A record's value is not a valid message of the expected type; str() says why."""


def parse_record(message_type: type[M], value: bytes | None, headers: Sequence[tuple[str, bytes]] = ()) -> M:
    """value as a message_type, or PoisonRecord naming what is wrong with it: a content-type header
    (type_headers) naming another type, bytes that do not parse, or a message without its identity fields
    (what a record from a writer that sets no header is checked by)."""
    name = message_type.DESCRIPTOR.full_name
    declared = dict(headers).get(CONTENT_TYPE_HEADER)
    if declared is not None and (declared_type := declared.decode(errors="replace")) != content_type(name):
        raise PoisonRecord(f"not a {name}: its content-type is {declared_type!r}")
    if value is None:
        raise PoisonRecord(f"not a {name}: the record has no value")
    try:
        message = message_type.FromString(value)
    except Exception as error:  # DecodeError, and RuntimeError or others for some malformed inputs
        raise PoisonRecord(f"not a {name}: {error}") from None
    missing = [path for path in IDENTITY_FIELDS.get(name, ()) if not _field_value(message, path)]
    if missing:
        raise PoisonRecord(f"not a {name}: it has no {', '.join(missing)}")
    return message


def _field_value(message: Message, path: str) -> object:
    for name in path.split("."):
        message = getattr(message, name)
    return message


def decode_record(message_type: type[M], record) -> M | None:
    """A consumed record's value as a message_type, or None for a poison record, which is counted
    (modalign_kafka_poison_records_total) and logged, and which the caller skips: one bad record must
    never stop a consumer or cost it the valid records around it."""
    try:
        return parse_record(message_type, record.value, record.headers or ())
    except PoisonRecord as error:
        count_poison(record, error)
        return None


def assign(consumer: KafkaConsumer, partitions: list[TopicPartition]) -> None:
    """consumer.assign(partitions), exporting poison and gap counts of 0 for each of their topics:
    Prometheus's increase() sees no rise in a series whose first sample is already above zero, so the
    alert on the first poison record (or gap) of a topic needs the zero before it."""
    consumer.assign(partitions)
    for topic in {partition.topic for partition in partitions}:
        POISON_RECORDS.labels(topic)
        OFFSET_GAPS.labels(topic)


def count_poison(record, error: PoisonRecord) -> None:
    """Counts and logs a poison record that its consumer skips."""
    POISON_RECORDS.labels(record.topic).inc()
    log.warning("skipping record %s-%d@%d: %s", record.topic, record.partition, record.offset, error)


@dataclass(frozen=True)
class KafkaConfig:
    """How a service reaches Kafka and names its topics."""

    bootstrap_servers: str = "127.0.0.1:9092"
    """Comma-separated host:port list of brokers."""
    topic_prefix: str = "modalign."
    """Prepended to every topic name, so several deployments can share one cluster."""
    partitions: int = 3
    """Partitions of the generations and feedback topics (and their dead-letter topic): the unit of
    trainer parallelism."""
    replication_factor: int = 1
    """Replicas per partition; 3 in a production cluster."""
    min_insync_replicas: int = 1
    """Replicas that must have a write before acks=all returns; 2 in a production cluster."""
    retention_days: float = 7.0
    """How long generations, feedback and dead letters are kept."""
    produce_timeout_s: float = 10.0
    """Upper bound on waiting for an acknowledgement; past it the write counts as failed."""
    security_protocol: str = "PLAINTEXT"
    """PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."""
    ssl_cafile: str = ""
    """PEM file of the CA that signed the brokers' certificates (SSL, SASL_SSL)."""
    ssl_certfile: str = ""
    """PEM client certificate, for brokers that authenticate clients by TLS."""
    ssl_keyfile: str = ""
    """PEM private key of ssl_certfile."""
    sasl_mechanism: str = ""
    """PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (SASL_PLAINTEXT, SASL_SSL)."""
    sasl_plain_username: str = ""
    """User name for SASL PLAIN or SCRAM."""
    sasl_plain_password: str = ""
    """Read it from a Secret through MODALIGN_KAFKA_SASL_PLAIN_PASSWORD rather than a flag."""

    def topic(self, name: str) -> str:
        return self.topic_prefix + name

    def client_kwargs(self) -> dict:
        optional = {
            name: getattr(self, name)
            for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "sasl_mechanism",
                         "sasl_plain_username", "sasl_plain_password")
            if getattr(self, name)
        }
        return {"bootstrap_servers": self.bootstrap_servers.split(","), "security_protocol": self.security_protocol,
                **optional}


@dataclass(frozen=True)
class TopicSpec:
    name: str
    compacted: bool
    """Compacted topics keep the newest record per key (the current state); the others expire by age."""
    partitioned: bool
    """Whether the topic gets KafkaConfig.partitions partitions; state topics have one, so readers see
    one total order."""


TOPICS = (
    TopicSpec("generations", compacted=False, partitioned=True),
    TopicSpec("feedback", compacted=False, partitioned=True),
    TopicSpec("feedback.dlq", compacted=False, partitioned=True),
    TopicSpec("policy-versions", compacted=True, partitioned=False),
    TopicSpec("rollout", compacted=True, partitioned=False),
)


def topic_configs(spec: TopicSpec, config: KafkaConfig) -> dict[str, str]:
    settings = {"min.insync.replicas": str(config.min_insync_replicas)}
    if spec.compacted:
        settings |= {"cleanup.policy": "compact", "min.compaction.lag.ms": "0", "segment.ms": str(DAY_MS)}
    else:
        settings |= {"cleanup.policy": "delete", "retention.ms": str(int(config.retention_days * DAY_MS))}
    return settings


def ensure_topics(config: KafkaConfig, timeout_s: float = 30.0) -> list[str]:
    """Creates any missing modalign topic with its settings; returns the names it created.

    Idempotent: topics that exist are left as they are (their settings are not rewritten).
    """
    admin = KafkaAdminClient(**config.client_kwargs(), request_timeout_ms=int(timeout_s * 1000))
    try:
        existing = set(admin.list_topics())
        wanted = [
            NewTopic(
                name=config.topic(spec.name),
                num_partitions=config.partitions if spec.partitioned else 1,
                replication_factor=config.replication_factor,
                topic_configs=topic_configs(spec, config),
            )
            for spec in TOPICS
            if config.topic(spec.name) not in existing
        ]
        created = []
        for topic in wanted:
            try:
                admin.create_topics([topic], timeout_ms=int(timeout_s * 1000))
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass  # another process created it between our listing and our request
        return created
    finally:
        admin.close()


class BrokerUnavailable(RuntimeError):
    """The broker did not acknowledge a write in time; the record must be treated as not written."""


def make_producer(config: KafkaConfig) -> KafkaProducer:
    """A producer whose acknowledged writes are durable and never duplicated by its own retries."""
    timeout_ms = int(config.produce_timeout_s * 1000)
    return KafkaProducer(
        **config.client_kwargs(),
        acks="all",
        enable_idempotence=True,
        retries=2**31 - 1,
        max_in_flight_requests_per_connection=5,
        linger_ms=2,
        compression_type=None,
        max_block_ms=timeout_ms,
        request_timeout_ms=max(timeout_ms - 1000, 1000),
        delivery_timeout_ms=timeout_ms,
        reconnect_backoff_max_ms=1000,
    )


def type_headers(message: Message) -> list[tuple[str, bytes]]:
    """The headers every record modalign writes carries: its message type, as CloudEvents' Kafka
    binding and schema registries do, so a reader can tell one type's bytes from another's."""
    return [(CONTENT_TYPE_HEADER, content_type(message.DESCRIPTOR.full_name).encode())]


def produce_durably(
    producer: KafkaProducer, topic: str, records: list[tuple[str, Message]], timeout_s: float
) -> None:
    """Sends (key, message) records and returns only once the broker acknowledged all of them (acks=all).

    Raises BrokerUnavailable when it did not within timeout_s; the caller must not acknowledge anything.
    """
    started = time.perf_counter()
    try:
        pending = [producer.send(topic, key=key.encode(), value=message.SerializeToString(),
                                 headers=type_headers(message)) for key, message in records]
        for acknowledgement in pending:
            acknowledgement.get(timeout=max(timeout_s - (time.perf_counter() - started), 0.001))
    except KafkaError as error:
        PRODUCE_ERRORS.labels(topic, type(error).__name__).inc()
        raise BrokerUnavailable(f"Kafka did not acknowledge the write to {topic}: {error}") from error
    PRODUCE_SECONDS.labels(topic).observe(time.perf_counter() - started)


ON_GAP = ("resume", "stop")
"""What a consumer that resumes from a position does when the records there are gone (see GapAwareConsumer)."""


class OffsetGap(RuntimeError):
    """Records a consumer was to read next are gone, and its policy is to stop rather than skip them."""


class GapAwareConsumer(KafkaConsumer):
    """A consumer that resumes from positions of its own (a checkpoint's, a group's committed offsets) and
    never skips records silently. Where its next record was deleted by retention (it was stopped, or fell
    behind, longer than the topic keeps records), Kafka's usual auto_offset_reset jumps to the log start
    with an info line. This consumer logs an error naming the topic, partition and the records lost, counts
    them in modalign_kafka_offset_gap_records_total (alert ModalignKafkaOffsetGap), and then follows
    on_gap: "resume" goes on from the oldest record kept; "stop" raises OffsetGap from poll(), so the
    service exits and an operator decides (restart with the policy "resume" to go on).

    Every partition must be given a position (seek, seek_to_beginning) before the first poll."""

    def __init__(self, *topics: str, on_gap: str, **configs) -> None:
        if on_gap not in ON_GAP:
            raise ValueError(f"on_gap must be one of {', '.join(ON_GAP)}, got {on_gap!r}")
        super().__init__(*topics, auto_offset_reset="none", **configs)
        self.on_gap = on_gap

    def poll(self, timeout_ms: int = 0, max_records: int | None = None, update_offsets: bool = True) -> dict:
        try:
            return super().poll(timeout_ms=timeout_ms, max_records=max_records, update_offsets=update_offsets)
        except OffsetOutOfRangeError as error:
            self._mind_the_gap(error.args[0])
            return {}

    def _mind_the_gap(self, out_of_range: dict[TopicPartition, int]) -> None:
        starts = self.beginning_offsets(list(out_of_range))
        ends = self.end_offsets(list(out_of_range))
        for partition, position in out_of_range.items():
            start, end = starts[partition], ends[partition]
            where = f"{partition.topic}-{partition.partition}"
            if position < start:
                OFFSET_GAPS.labels(partition.topic).inc(start - position)
                what = (f"{where}: records {position} to {start - 1} were deleted by retention before this consumer "
                        f"read them ({start - position} lost to it)")
            else:  # beyond the end: the topic was deleted and recreated, or truncated
                what = f"{where}: its position {position} is beyond the log's end {end} (the topic was recreated?)"
            if self.on_gap == "stop":
                raise OffsetGap(f"{what}; stopping, as the offset-gap policy says (restart with it set to resume "
                                f"to go on from offset {start})")
            log.error("%s; resuming from the oldest record kept, offset %d", what, start)
            self.seek(partition, start)


class DurableProducer:
    """A service's producer for acks=all writes, replaced after a write fails.

    kafka-python 3.0.12's idempotent producer sends nothing more once a write it had already sent expires
    (its delivery timeout passed while it was retried, as when a broker dies): it drops its producer id to
    get a new one, but never asks for one. A long-lived service would then answer UNAVAILABLE until it is
    restarted. So a failed write retires the producer (failed()), and the next write goes through a new
    one (current()); the retired one closes in the background once its pending writes have ended."""

    def __init__(self, config: KafkaConfig, make: Callable[[KafkaConfig], KafkaProducer] = make_producer) -> None:
        self._config = config
        self._make = make
        self._lock = threading.Lock()
        self._producer = make(config)
        self._broken = False

    def current(self) -> KafkaProducer:
        """The producer to write through: a new one if a write through the last one failed. Raises
        BrokerUnavailable when a new one cannot be made."""
        with self._lock:
            if self._broken:
                try:
                    fresh = self._make(self._config)
                except Exception as error:
                    raise BrokerUnavailable(f"could not make a new Kafka producer: {error}") from error
                retired, self._producer, self._broken = self._producer, fresh, False
                threading.Thread(target=self._retire, args=(retired,), name="retire-producer", daemon=True).start()
            return self._producer

    def failed(self, producer: KafkaProducer) -> None:
        """A write through producer failed: unless it was replaced already, the next write gets a new one."""
        with self._lock:
            if producer is self._producer:
                self._broken = True

    def produce(self, topic: str, records: list[tuple[str, Message]], timeout_s: float) -> None:
        """produce_durably through the current producer; a failure retires it."""
        producer = self.current()
        try:
            produce_durably(producer, topic, records, timeout_s)
        except BrokerUnavailable:
            self.failed(producer)
            raise

    def _retire(self, producer: KafkaProducer) -> None:
        try:
            producer.close(timeout=self._config.produce_timeout_s + 5)
        except Exception:
            log.warning("a retired Kafka producer did not close cleanly", exc_info=True)

    def close(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            producer = self._producer
        try:
            producer.close(timeout=timeout_s)
        except KafkaError:
            log.warning("the Kafka producer closed with writes unresolved", exc_info=True)


def make_consumer(config: KafkaConfig, *topics: str, group_id: str | None, on_gap: str | None = None,
                  **options) -> KafkaConsumer:
    """A consumer with manual commits; session timeouts kept short so group joins take seconds.

    on_gap: for a consumer resuming from positions of its own, what to do where records it was to read
    next are gone (a GapAwareConsumer); None for one that reads from the beginning or a point in time,
    to which Kafka's jump to the oldest record kept loses nothing it meant to read."""
    common = dict(
        **config.client_kwargs(),
        group_id=group_id,
        enable_auto_commit=False,
        session_timeout_ms=options.pop("session_timeout_ms", 10_000),
        heartbeat_interval_ms=options.pop("heartbeat_interval_ms", 1_000),
        **options,
    )
    if on_gap is not None:
        return GapAwareConsumer(*topics, on_gap=on_gap, **common)
    return KafkaConsumer(*topics, auto_offset_reset="earliest", **common)


def read_topic(kafka: KafkaConfig, name: str, message_type: type[M]) -> list[M]:
    """Every committed record of a topic, from the beginning to the end offsets as of this call."""
    return [message for _, _, message in read_records(kafka, name, message_type)]


def read_records(kafka: KafkaConfig, name: str, message_type: type[M]) -> list[tuple[int, int, M]]:
    """read_topic's records as (partition, offset, message): where each record sits, for comparing with
    consumer positions (a published version's trained_through)."""
    consumer = make_consumer(kafka, group_id=None, isolation_level="read_committed")
    try:
        topic = kafka.topic(name)
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        records: list[tuple[int, int, M]] = []
        while any(consumer.position(tp) < end for tp, end in ends.items()):
            for batch in consumer.poll(timeout_ms=1000).values():
                records.extend((r.partition, r.offset, m) for r in batch
                               if (m := decode_record(message_type, r)) is not None)
        return records
    finally:
        consumer.close()
