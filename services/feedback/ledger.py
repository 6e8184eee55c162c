"""What the feedback service must know of two topics, learned from the topics themselves: which
feedback ids are already stored (the feedback topic: content digest by feedback_id), and to whom each
response was served (the generations topic: user_id by response_id).

A topic is the source of truth, so there is no second database to keep consistent: at start-up a
ledger reads its topic from the beginning (its retention bounds the work), then keeps tailing it, which
also teaches each replica what other replicas (and the policy) wrote. Feedback records are keyed by
feedback_id, so all copies of one id land in one partition in order.

Catching up (Ledger.catch_up: reading everything written before a call) asks the brokers for the
topic's end offsets through one long-lived consumer that every caller shares (EndOffsets): a caller
that arrives while a lookup is under way waits for it and takes the next one, so under any load there is
at most one lookup in flight and one waiting, and each costs one ListOffsets round trip, not a new
connection and its metadata.

A ledger keeps the most recent max_entries keys it read, the oldest forgotten first, so its memory is
bounded whatever the topic's retention (modalign_feedback_ledger_entries shows its size): a feedback id
resubmitted after that many newer ones is stored again (the trainer skips it as seen, see TrainerState),
and feedback on a response older than that many newer ones is refused as not served.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from google.protobuf.message import Message
from kafka import KafkaConsumer, TopicPartition
from prometheus_client import Gauge, Histogram

from modalign.core.kafka import KafkaConfig, assign, decode_record, make_consumer
from modalign.v1 import events_pb2

log = logging.getLogger(__name__)

ENTRIES = Gauge("modalign_feedback_ledger_entries", "Keys a feedback service's ledger of a topic holds (at most "
                "its --max-feedback-ids or --max-served-responses).", ["topic"])
CATCH_UP_SECONDS = Histogram(
    "modalign_feedback_ledger_catch_up_seconds",
    "Time a ledger took to read its topic up to the end offsets as of the call (Ledger.catch_up): the "
    "end-offset lookup plus the tail's lag; the feedback service catches up before storing a new feedback_id.",
    ["topic"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


class EndOffsets:
    """The end offsets of some partitions, as of a moment after the call began, looked up by one
    long-lived consumer shared by every caller.

    KafkaConsumer is not thread-safe, so one caller at a time looks up (the one whose turn it is) and
    callers that arrive meanwhile wait: a lookup that began before a caller did may miss records written
    just before its call, so such a caller waits for the next lookup, which it shares with everyone else
    waiting. However many callers there are, at most one lookup runs and one is queued.
    """

    def __init__(self, make_consumer: Callable[[], KafkaConsumer], partitions: list[TopicPartition]) -> None:
        self._make_consumer = make_consumer
        self._partitions = partitions
        self._consumer: KafkaConsumer | None = None  # made on first use; only the caller whose turn it is uses it
        self._changed = threading.Condition()
        self._started = 0  # lookups begun
        self._finished = 0  # lookups ended; the latest's result is in _result
        self._running = False
        self._result: dict[TopicPartition, int] | Exception = {}

    def get(self, timeout_s: float) -> dict[TopicPartition, int]:
        """The end offsets, looked up after this call began. Raises TimeoutError when the lookup fails
        or does not end within timeout_s."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            wanted = self._started + 1  # the first lookup to begin after this call
        while True:
            with self._changed:
                while self._finished < wanted and self._running:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"no end offsets of {self._partitions[0].topic} in {timeout_s}s")
                    self._changed.wait(remaining)
                if self._finished >= wanted:
                    result = self._result
                    break
                self._running = True  # this caller's turn: it looks up for everyone waiting
                self._started += 1
                number = self._started
            try:
                outcome: dict[TopicPartition, int] | Exception = self._lookup(deadline - time.monotonic())
            except Exception as error:
                outcome = error
            with self._changed:
                self._running = False
                self._finished = number
                self._result = outcome
                self._changed.notify_all()
        if isinstance(result, Exception):
            raise TimeoutError(f"could not read the end offsets of {self._partitions[0].topic}: {result}") from result
        return result

    def _lookup(self, timeout_s: float) -> dict[TopicPartition, int]:
        if self._consumer is None:
            self._consumer = self._make_consumer()
        return self._consumer.end_offsets(self._partitions, timeout_ms=max(int(timeout_s * 1000), 1))

    def close(self) -> None:
        with self._changed:
            consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.close()


class Ledger:
    """A map from a topic's records, each event read adding entries(event) (key, value) pairs; the first
    value of a key stays."""

    def __init__(self, config: KafkaConfig, topic: str, event_type: type[Message],
                 entries: Callable[[Message], Iterable[tuple[str, str]]], max_entries: int) -> None:
        self._topic = config.topic(topic)
        self._config = config
        self._event_type = event_type
        self._entries = entries
        self._max_entries = max_entries
        self._values: OrderedDict[str, str] = OrderedDict()
        self._size = ENTRIES.labels(self._topic)
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
        self._end_offsets = EndOffsets(lambda: make_consumer(config, group_id=None), self._partitions)
        self._catch_up_seconds = CATCH_UP_SECONDS.labels(self._topic)
        self._thread = threading.Thread(target=self._tail, name=f"ledger-{self._topic}", daemon=True)

    def start(self, timeout_s: float = 60.0) -> None:
        """Starts tailing and returns once everything stored before now has been read."""
        self._thread.start()
        self.catch_up(timeout_s)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._consumer.close()
        self._end_offsets.close()

    def get(self, key: str) -> str | None:
        """The value read (or recorded) for key, or None."""
        with self._seen:
            return self._values.get(key)

    def wait_for(self, key: str, timeout_s: float) -> str | None:
        """The value of key once the tail has read it, waiting at most timeout_s; None if it has not."""
        deadline = time.monotonic() + timeout_s
        with self._seen:
            while (value := self._values.get(key)) is None and (remaining := deadline - time.monotonic()) > 0:
                self._seen.wait(remaining)
            return value

    def record(self, key: str, value: str) -> None:
        """Notes a write this replica just had acknowledged, before the tail reads it back."""
        with self._seen:
            self._add(key, value)

    def _add(self, key: str, value: str) -> None:
        """Keeps the first value of key; forgets the oldest keys past max_entries. Holds self._seen."""
        if key in self._values:
            return
        self._values[key] = value
        while len(self._values) > self._max_entries:
            self._values.popitem(last=False)
        self._size.set(len(self._values))

    def catch_up(self, timeout_s: float) -> None:
        """Waits until the ledger has read every record written before this call (every record the
        brokers had acknowledged when it began, whoever wrote it).

        Used before storing a key the ledger has not seen, so that a write another replica (or an
        earlier attempt here that timed out) had landed is found instead of stored twice, and before
        deciding that a key was never written. Raises TimeoutError, e.g. while the broker is down.
        """
        started = time.monotonic()
        deadline = started + timeout_s
        ends = self._end_offsets.get(timeout_s)
        with self._seen:
            while any(self._positions.get(tp.partition, 0) < end for tp, end in ends.items()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"the ledger did not catch up with {self._topic} in {timeout_s}s")
                self._seen.wait(remaining)
        self._catch_up_seconds.observe(time.monotonic() - started)

    def _tail(self) -> None:
        while not self._stopping.is_set():
            try:
                batches = self._consumer.poll(timeout_ms=200)
                positions = {tp.partition: self._consumer.position(tp) for tp in self._partitions}
            except Exception:
                log.warning("ledger of %s could not poll; retrying", self._topic, exc_info=True)
                time.sleep(1)
                continue
            with self._seen:
                for records in batches.values():
                    for record in records:
                        if (event := decode_record(self._event_type, record)) is not None:
                            for key, value in self._entries(event):
                                self._add(key, value)
                self._positions = positions
                self._seen.notify_all()


def stored_feedback(config: KafkaConfig, max_entries: int) -> Ledger:
    """The content digest of every stored feedback, by feedback_id (the most recent max_entries)."""
    return Ledger(config, "feedback", events_pb2.FeedbackReceived,
                  lambda event: [(event.feedback.feedback_id, event.content_sha256)], max_entries)


def served_responses(config: KafkaConfig, max_entries: int) -> Ledger:
    """The user every logged response was served to, by response_id (the most recent max_entries)."""
    return Ledger(config, "generations", events_pb2.GenerationLogged,
                  lambda event: [(event.response_id, event.user_id)], max_entries)
