"""FeedbackService over gRPC: validate, de-duplicate by feedback_id, write to Kafka, then acknowledge.

What a client can count on when it retries a feedback (the same feedback_id and content), on this
replica or another, until it is answered OK:

- An OK answer means the feedback is in the topic (acks=all: min.insync.replicas brokers hold it), so
  it survives the loss of any broker short of that many.
- Once any replica has answered OK for a feedback_id, every later Submit of it, on any replica, is
  answered as a duplicate (or ALREADY_EXISTS for other content) and stores nothing: before storing an
  id its ledger has not seen, a replica reads the topic up to its end offsets as of the call
  (Ledger.catch_up), which include every acknowledged write; while it cannot (the brokers are out of
  reach), it answers UNAVAILABLE rather than write blind. Within the ledger's bound: an id resubmitted
  after max_feedback_ids newer ones is stored again.
- The same holds for a write that landed although its client was not told so (a deadline passed, the
  replica answered UNAVAILABLE): once the write is in the topic, a retry anywhere finds it.
- On one replica, a retry while the earlier attempt's write is still under way waits for that write
  (writes.PendingWrites) instead of writing again, so a client that retries on the same replica gets
  exactly one copy even across a broker's death, whose writes may take seconds to settle.

What is not guaranteed: a client that gives up on replica A (its deadline, or A's UNAVAILABLE after
kafka.produce_timeout_s) while A's write is still under way, and retries on replica B before that write
lands, can get a second copy from B: B cannot see a write that is not in the topic yet. A's write goes
on for up to delivery_timeout_s (normally it lands in milliseconds, after a broker's death within
about 10 s). Retrying on the same replica avoids it; the trainer skips a second copy of an id it has
seen (TrainerState), so it never trains twice on one feedback. Two first submissions of one new id to
two replicas at the same moment can also both be stored.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import zlib
from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import grpc
from google.protobuf import timestamp_pb2
from prometheus_client import Counter

from modalign.core import auth
from modalign.core.config import ConfigError
from modalign.core.grpc_server import GrpcLimits, access_for
from modalign.core.kafka import BrokerUnavailable, KafkaConfig, ensure_topics
from modalign.core.ratelimit import LIMITED, PerUserLimiter, RateLimit, abort_with_retry_info, limited_message
from modalign.core.service import GrpcServiceConfig, run_service, serve_grpc
from modalign.feedback.ledger import Ledger, served_responses, stored_feedback
from modalign.feedback.validation import InvalidFeedback, referenced_responses, validate_feedback
from modalign.feedback.writes import PendingWrites
from modalign.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc

log = logging.getLogger(__name__)

FEEDBACK = Counter(
    "modalign_feedback_received_total",
    "Feedback messages by kind and outcome: accepted, duplicate, invalid, conflict, refused (a user_id not the "
    "caller's), rate_limited, not_served (a response never served, or served to another user), unavailable.",
    ["kind", "outcome"],
)


@dataclass(frozen=True)
class FeedbackConfig(GrpcServiceConfig):
    """The feedback service."""

    command: ClassVar[str] = "feedback"
    listen: str = "127.0.0.1:50052"
    metrics_port: int = 9102
    kafka: KafkaConfig = field(default_factory=lambda: KafkaConfig(produce_timeout_s=5.0))
    """The Kafka cluster and topic prefix; a client waits at most produce_timeout_s for its feedback to be stored."""
    delivery_timeout_s: float = 30.0
    """How long a write keeps being retried (stored at most once) after its client was answered UNAVAILABLE at
    kafka.produce_timeout_s; a retry of that feedback_id here meanwhile waits for it rather than writing again.
    Longer than the cluster takes to replace a lost broker (Kafka's broker.session.timeout.ms, 9 s by default,
    plus electing leaders), so that losing one never leaves a write in doubt (docs/operations.md)."""
    grpc: GrpcLimits = field(default_factory=lambda: GrpcLimits(max_workers=32, max_concurrent_rpcs=128))
    """What the gRPC server takes on at once: each RPC holds a thread while its feedback's write is
    acknowledged; a feedback message is small (an edit is at most 8 KiB)."""
    user_rate_limit: RateLimit = field(default_factory=RateLimit)
    """Feedback one end user may submit; past it, RESOURCE_EXHAUSTED with a google.rpc.RetryInfo (a
    stream's feedback counts one by one, and a refused stream keeps what it stored before)."""
    verify_authors: bool = True
    """Accept feedback only on responses served to its user, as the generations topic records them;
    anything else is refused (FAILED_PRECONDITION), so no one rates, prefers or edits a response they
    were not given. Off only where generations are not logged to this cluster's topic."""
    max_feedback_ids: int = 1_000_000
    """Stored feedback ids remembered (the most recent) to answer a resubmission as a duplicate; about 290
    bytes each. Older ones are forgotten (docs/operations.md)."""
    max_served_responses: int = 1_000_000
    """Logged responses remembered (the most recent) to check feedback's author against; about 240 bytes
    each. Feedback on an older response is refused as not served (docs/operations.md)."""

    def validate(self) -> None:
        super().validate()
        if self.delivery_timeout_s < self.kafka.produce_timeout_s:
            raise ConfigError("delivery_timeout_s", f"must be at least kafka.produce_timeout_s "
                                                    f"({self.kafka.produce_timeout_s}), not {self.delivery_timeout_s}")

    @property
    def max_pending_writes(self) -> int:
        """Writes that may be under way at once (PendingWrites.capacity): each holds a gRPC thread for up to
        kafka.produce_timeout_s and ends within delivery_timeout_s, so no more can be begun."""
        return self.grpc.max_workers * (math.ceil(self.delivery_timeout_s / self.kafka.produce_timeout_s) + 1)


ID_LOCK_STRIPES = 4096
"""Locks that serialise submits of one feedback_id (StripedLocks): fixed, whatever the ids seen."""


class StripedLocks:
    """A fixed pool of locks, a key's lock chosen by a hash of the key: the same key always gets the same
    lock, so concurrent submits of one feedback_id are serialised and exactly one of them writes, and
    the memory stays fixed however many ids are seen. Two ids may share a lock (one in len(self) for a
    pair), which only makes one wait for the other's write."""

    def __init__(self, stripes: int) -> None:
        self._locks = tuple(threading.Lock() for _ in range(stripes))

    def __len__(self) -> int:
        return len(self._locks)

    def lock_for(self, key: str) -> threading.Lock:
        return self._locks[zlib.crc32(key.encode()) % len(self._locks)]


def content_digest(feedback: feedback_pb2.Feedback) -> str:
    return hashlib.sha256(feedback.SerializeToString(deterministic=True)).hexdigest()


class FeedbackServicer(feedback_pb2_grpc.FeedbackServiceServicer):
    def __init__(self, config: FeedbackConfig, ledger: Ledger, served: Ledger | None) -> None:
        self._config = config
        self._ledger = ledger
        self._served = served
        self._writes = PendingWrites(config.kafka, config.delivery_timeout_s, config.max_pending_writes, ledger.record)
        self._id_locks = StripedLocks(ID_LOCK_STRIPES)
        self._per_user = PerUserLimiter(config.user_rate_limit)

    def close(self) -> None:
        self._writes.close(timeout_s=5)

    def Submit(self, request: feedback_pb2.Feedback, context: grpc.ServicerContext) -> feedback_pb2.SubmitResponse:
        duplicate = self._store(request, context, field_prefix="")
        return feedback_pb2.SubmitResponse(feedback_id=request.feedback_id, duplicate=duplicate)

    def SubmitStream(
        self, request_iterator: Iterator[feedback_pb2.Feedback], context: grpc.ServicerContext
    ) -> feedback_pb2.SubmitStreamResponse:
        accepted = duplicates = 0
        for index, feedback in enumerate(request_iterator):
            if self._store(feedback, context, field_prefix=f"feedback[{index}]."):
                duplicates += 1
            else:
                accepted += 1
        return feedback_pb2.SubmitStreamResponse(accepted=accepted, duplicates=duplicates)

    def _store(self, feedback: feedback_pb2.Feedback, context: grpc.ServicerContext, field_prefix: str) -> bool:
        """Writes one feedback durably; returns True when it had already been stored. Aborts the RPC
        with the right status code otherwise."""
        kind = feedback.WhichOneof("kind") or "none"
        try:
            feedback.user_id = auth.end_user(auth.current_principal(), feedback.user_id)
        except auth.Refused as refusal:
            FEEDBACK.labels(kind, "refused").inc()
            context.abort(grpc.StatusCode.PERMISSION_DENIED, field_prefix + str(refusal))
        if wait_s := self._per_user.wait_s(feedback.user_id):
            FEEDBACK.labels(kind, "rate_limited").inc()
            LIMITED.labels("Submit").inc()
            abort_with_retry_info(context, field_prefix + limited_message(feedback.user_id, wait_s), wait_s)
        try:
            validate_feedback(feedback)
        except InvalidFeedback as error:
            FEEDBACK.labels(kind, "invalid").inc()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, field_prefix + str(error))
        if self._served is not None:
            try:
                why = self._not_served(feedback)
            except TimeoutError as error:
                FEEDBACK.labels(kind, "unavailable").inc()
                context.abort(grpc.StatusCode.UNAVAILABLE, f"{field_prefix}could not check that the response was "
                                                           f"served (the generations log is out of reach), retry later: {error}")
            if why:
                FEEDBACK.labels(kind, "not_served").inc()
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, field_prefix + why)
        digest = content_digest(feedback)
        wait_s = self._config.kafka.produce_timeout_s
        with self._id_locks.lock_for(feedback.feedback_id):
            try:
                if (earlier := self._writes.pending(feedback.feedback_id)) is not None:
                    # An earlier attempt's write is still under way here: wait for it, never write twice.
                    # Acknowledged, it is in the ledger now; failed, it is written anew below.
                    try:
                        earlier.wait(wait_s)
                    except BrokerUnavailable:
                        if not earlier.done.is_set():
                            raise
                stored = self._ledger.get(feedback.feedback_id)
                if stored is None:
                    self._read_to_end(wait_s)
                    stored = self._ledger.get(feedback.feedback_id)
                if stored == digest:
                    FEEDBACK.labels(kind, "duplicate").inc()
                    return True
                if stored is not None:
                    FEEDBACK.labels(kind, "conflict").inc()
                    context.abort(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"{field_prefix}feedback_id: {feedback.feedback_id!r} was already used for different content",
                    )
                event = events_pb2.FeedbackReceived(
                    feedback=feedback, received_at=timestamp_pb2.Timestamp(), content_sha256=digest
                )
                event.received_at.GetCurrentTime()
                self._writes.begin(feedback.feedback_id, event).wait(wait_s)  # recorded in the ledger on success
            except (BrokerUnavailable, TimeoutError) as error:
                FEEDBACK.labels(kind, "unavailable").inc()
                context.abort(grpc.StatusCode.UNAVAILABLE, f"{field_prefix}feedback not stored, retry later: {error}")
        FEEDBACK.labels(kind, "accepted").inc()
        return False

    def _read_to_end(self, timeout_s: float) -> None:
        """Before storing an id the ledger has not seen: another replica (or an earlier attempt here) may
        have stored it since the tail last read, so read the topic up to its end as of now. Raises
        TimeoutError when that cannot be done in timeout_s (benchmarks/feedback_catch_up.py measures
        its cost)."""
        self._ledger.catch_up(timeout_s)

    def _not_served(self, feedback: feedback_pb2.Feedback) -> str:
        """Why feedback names a response its user was not served, or empty. The policy logs a response
        before the client sees its id, so a response not yet read from the generations topic is waited
        for (the tail reads a new record within milliseconds), and, if still unknown, looked for once more
        after the ledger has read everything logged so far. Raises TimeoutError when it could not read
        that far (the broker is away): nothing that might have been served is refused for good."""
        served = self._served
        assert served is not None
        ids = referenced_responses(feedback)
        if any(served.wait_for(response_id, timeout_s=1.0) is None for response_id in ids):
            served.catch_up(self._config.kafka.produce_timeout_s)
        for response_id in ids:
            user = served.get(response_id)
            if user is None:
                return f"response_id {response_id!r} was never served (or not yet logged; retry)"
            if user != feedback.user_id:
                return f"response_id {response_id!r} was served to another user than {feedback.user_id!r}"
        return ""


SERVICE = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"]
ACCESS = access_for(SERVICE, {auth.CLIENT})


def serve(config: FeedbackConfig) -> None:
    ensure_topics(config.kafka)
    ledger = stored_feedback(config.kafka, config.max_feedback_ids)
    served = served_responses(config.kafka, config.max_served_responses) if config.verify_authors else None
    ledger.start()
    if served is not None:
        served.start()
    servicer = FeedbackServicer(config, ledger, served)
    try:
        serve_grpc(
            config, lambda server: feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(servicer, server),
            [SERVICE.full_name], ACCESS,
        )
    finally:
        servicer.close()
        ledger.stop()
        if served is not None:
            served.stop()


def main(argv: list[str] | None = None) -> None:
    run_service(FeedbackConfig, serve, argv)


if __name__ == "__main__":
    main()
