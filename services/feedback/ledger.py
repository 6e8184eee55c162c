"""Which feedback ids are already stored, learned from the feedback topic itself.

The topic is the source of truth, so there is no second database to keep consistent: at start-up the
ledger reads the topic from the beginning (its retention bounds the work), then keeps tailing it, which
also teaches each replica the ids that other replicas stored. Records are keyed by feedback_id, so all
copies of one id land in one partition in order.
"""

from __future__ import annotations

import logging
import threading
import time

from kafka import TopicPartition

from modalign.core.kafka import KafkaConfig, assign, decode_record, make_consumer
from modalign.v1 import events_pb2

log = logging.getLogger(__name__)


class FeedbackLedger:
    def __init__(self, config: KafkaConfig) -> None:
        self._topic = config.topic("feedback")
        self._config = config
        self._content_by_id: dict[str, str] = {}
        self._seen = threading.Condition()
        self._positions: dict[int, int] = {}
        self._stopping = threading.Event()
        self._consumer = make_consumer(config, group_id=None, consumer_timeout_ms=500)
        partitions = self._consumer.partitions_for_topic(self._topic)
        if not partitions:
            raise RuntimeError(f"topic {self._topic} does not exist; run `modalign kafka topics` first")
        self._partitions = [TopicPartition(self._topic, p) for p in sorted(partitions)]
        assign(self._consumer, self._partitions)
        self._consumer.seek_to_beginning(*self._partitions)
        self._thread = threading.Thread(target=self._tail, name="feedback-ledger", daemon=True)

    def start(self, timeout_s: float = 60.0) -> None:
        """Starts tailing and returns once everything stored before now has been read."""
        self._thread.start()
        self.catch_up(timeout_s)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._consumer.close()

    def stored_content(self, feedback_id: str) -> str | None:
        """The content digest stored under feedback_id, or None if the id was never stored."""
        with self._seen:
            return self._content_by_id.get(feedback_id)

    def record(self, feedback_id: str, content_sha256: str) -> None:
        """Notes a write this replica just had acknowledged, before the tail reads it back."""
        with self._seen:
            self._content_by_id.setdefault(feedback_id, content_sha256)

    def catch_up(self, timeout_s: float) -> None:
        """Waits until the ledger has read every record written before this call.

        Used after a write whose outcome is unknown (a timeout may still have reached the broker), so a
        retry sees it instead of storing it twice. Raises TimeoutError, e.g. while the broker is down.
        """
        deadline = time.monotonic() + timeout_s
        ends = self._end_offsets(timeout_s)
        with self._seen:
            while any(self._positions.get(tp.partition, 0) < end for tp, end in ends.items()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"the feedback ledger did not catch up with {self._topic} in {timeout_s}s")
                self._seen.wait(remaining)

    def _end_offsets(self, timeout_s: float) -> dict[TopicPartition, int]:
        # A separate short-lived consumer: KafkaConsumer is not thread-safe and the tail thread owns ours.
        probe = make_consumer(self._config, group_id=None)
        try:
            return probe.end_offsets(self._partitions, timeout_ms=int(timeout_s * 1000))
        except Exception as error:
            raise TimeoutError(f"could not read the end offsets of {self._topic}: {error}") from error
        finally:
            probe.close()

    def _tail(self) -> None:
        while not self._stopping.is_set():
            try:
                batches = self._consumer.poll(timeout_ms=200)
                positions = {tp.partition: self._consumer.position(tp) for tp in self._partitions}
            except Exception:
                log.warning("feedback ledger could not poll; retrying", exc_info=True)
                time.sleep(1)
                continue
            with self._seen:
                for records in batches.values():
                    for record in records:
                        if (event := decode_record(events_pb2.FeedbackReceived, record)) is not None:
                            self._content_by_id.setdefault(event.feedback.feedback_id, event.content_sha256)
                self._positions = positions
                self._seen.notify_all()
