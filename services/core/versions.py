"""Following the state topics (policy-versions, rollout): services act on what the trainer published and
on what the rollout controller decided."""

from __future__ import annotations

import logging
import threading
from typing import Callable

from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from modalign.core.kafka import KafkaConfig, assign, decode_record, make_consumer
from modalign.v1 import events_pb2

log = logging.getLogger(__name__)

# Rollout phases in which a canary holds its share of traffic.
ACTIVE_PHASES = (events_pb2.ROLLOUT_PHASE_PROGRESSING, events_pb2.ROLLOUT_PHASE_PAUSED)


class TopicFollower:
    """Replays single-partition state topics from the beginning, then follows them on a daemon thread.

    on_records first gets everything published so far as one list, so a replica that starts late can
    act on the newest state only, not replay the history; then the records of each poll, in order per
    topic. The replay runs in start(), the rest on the follower's thread. An exception in on_records
    is logged and its records skipped: one version that fails to load must not stop later ones.

    Reads only committed records: the rollout controller writes in transactions, and the writes a
    fenced (superseded) controller had in flight are aborted, never routed by.
    """

    def __init__(
        self, config: KafkaConfig, topic_names: list[str], on_records: Callable[[list[ConsumerRecord]], None]
    ) -> None:
        self._on_records = on_records
        self._consumer = make_consumer(config, group_id=None, isolation_level="read_committed")
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
            for records in self._consumer.poll(timeout_ms=500).values():
                replayed.extend(records)
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
                batch = [r for records in self._consumer.poll(timeout_ms=500).values() for r in records]
            except Exception:
                log.warning("could not poll %s; retrying", [p.topic for p in self._partitions], exc_info=True)
                self._stopping.wait(1.0)
                continue
            if batch:
                self._deliver(batch)

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
