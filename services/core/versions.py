"""Following the state topics (policy-versions, rollout): services act on what the trainer published and
on what the rollout controller decided."""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection
from typing import Callable

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from prometheus_client import Counter

from modalign.core.kafka import KafkaConfig, assign, decode_record, make_consumer
from modalign.v1 import events_pb2

log = logging.getLogger(__name__)

NOT_TRANSACTIONAL = Counter(
    "modalign_state_records_ignored_total",
    "Records of a state topic written only in transactions (rollout) that no transaction committed: "
    "ignored, whoever wrote them.",
    ["topic"],
)

# Rollout phases in which a canary holds its share of traffic.
ACTIVE_PHASES = (events_pb2.ROLLOUT_PHASE_PROGRESSING, events_pb2.ROLLOUT_PHASE_PAUSED)


class CommittedByTransactions:
    """Passes on only the records of a transactionally written topic that a transaction committed.

    Read with isolation_level read_committed, aborted transactions never arrive; but a record written
    outside any transaction (by anyone who can write the topic but is not the controller) does. A
    transaction's commit marker takes the offset after its last record, so such a record is followed by
    a gap in the offsets the consumer sees (markers are never delivered). A record followed directly by
    the next one, or by the end of the partition, was written outside any transaction: it is held while
    that is not yet known (a poll cut short may not have reached its marker), then ignored and counted.
    """

    def __init__(self, consumer: KafkaConsumer) -> None:
        self._consumer = consumer
        self._held: dict[TopicPartition, ConsumerRecord] = {}

    def records(self, partition: TopicPartition, polled: list[ConsumerRecord]) -> list[ConsumerRecord]:
        """Of what one poll returned for partition (call it for every poll, even one that returned
        nothing), the records known to be committed, a held one first."""
        passed: list[ConsumerRecord] = []
        held = self._held.pop(partition, None)
        pending = ([held] if held is not None else []) + polled
        position = self._consumer.position(partition)
        for record, following in zip(pending, [r.offset for r in pending[1:]] + [position]):
            if following > record.offset + 1:
                passed.append(record)
            elif record is pending[-1] and record is not held:
                self._held[partition] = record  # the next poll reads on from the same fetch: one more look decides
            else:
                NOT_TRANSACTIONAL.labels(partition.topic).inc()
                log.warning("ignoring %s offset %d: written outside a transaction", partition.topic, record.offset)
        return passed

    def resume_offset(self, partition: TopicPartition) -> int:
        """Where a reader restarted later must read on from not to skip the record still held."""
        held = self._held.get(partition)
        return held.offset if held is not None else self._consumer.position(partition)


class TopicFollower:
    """Replays single-partition state topics from the beginning, then follows them on a daemon thread.

    on_records first gets everything published so far as one list, so a replica that starts late can
    act on the newest state only, not replay the history; then the records of each poll, in order per
    topic. The replay runs in start(), the rest on the follower's thread. An exception in on_records
    is logged and its records skipped: one version that fails to load must not stop later ones.

    Reads only committed records: the rollout controller writes in transactions, and the writes a
    fenced (superseded) controller had in flight are aborted, never routed by. On the topics named
    transactional, a record is passed on only once a transaction is known to have committed it
    (CommittedByTransactions).
    """

    def __init__(
        self, config: KafkaConfig, topic_names: list[str], on_records: Callable[[list[ConsumerRecord]], None],
        transactional: Collection[str] = (),
    ) -> None:
        self._on_records = on_records
        self._transactional = {config.topic(name) for name in transactional}
        self._consumer = make_consumer(config, group_id=None, isolation_level="read_committed")
        self._committed_only = CommittedByTransactions(self._consumer)
        self._partitions = [TopicPartition(config.topic(name), 0) for name in topic_names]
        assign(self._consumer, self._partitions)
        self._consumer.seek_to_beginning(*self._partitions)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="topic-follower", daemon=True)

    def start(self) -> None:
        """Replays what was published so far, then follows new records in the background."""
        ends = self._consumer.end_offsets(self._partitions)
        replayed: list[ConsumerRecord] = []
        while any(self._consumer.position(p) < ends[p] for p in self._partitions):
            replayed.extend(self._committed(self._consumer.poll(timeout_ms=500)))
        if replayed:
            self._deliver(replayed)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._consumer.close()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                batch = self._committed(self._consumer.poll(timeout_ms=500))
            except Exception:
                log.warning("could not poll %s; retrying", [p.topic for p in self._partitions], exc_info=True)
                self._stopping.wait(1.0)
                continue
            if batch:
                self._deliver(batch)

    def _committed(self, polled: dict[TopicPartition, list[ConsumerRecord]]) -> list[ConsumerRecord]:
        """The records of one poll to pass on, in order per partition."""
        passed: list[ConsumerRecord] = []
        for partition in self._partitions:
            records = polled.get(partition, [])
            passed.extend(self._committed_only.records(partition, records)
                          if partition.topic in self._transactional else records)
        return passed

    def _deliver(self, records: list[ConsumerRecord]) -> None:
        try:
            self._on_records(records)
        except Exception:
            log.exception("could not act on %d records of %s", len(records), sorted({r.topic for r in records}))


def follow_newest_version(
    config: KafkaConfig, on_version: Callable[[events_pb2.PolicyVersionPublished], None]
) -> TopicFollower:
    """A follower of policy-versions that passes on only the newest (valid) version of each batch it reads."""
    def on_records(records: list[ConsumerRecord]) -> None:
        events = [event for record in records
                  if (event := decode_record(events_pb2.PolicyVersionPublished, record)) is not None]
        if events:
            on_version(events[-1])

    return TopicFollower(config, ["policy-versions"], on_records)
