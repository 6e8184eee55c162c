"""FeedbackService over gRPC: validate, de-duplicate by feedback_id, write to Kafka, then acknowledge."""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import grpc
from google.protobuf import timestamp_pb2
from prometheus_client import Counter

from modalign.core import auth
from modalign.core.grpc_server import GrpcLimits, access_for
from modalign.core.kafka import BrokerUnavailable, KafkaConfig, ensure_topics, make_producer, produce_durably
from modalign.core.ratelimit import LIMITED, PerUserLimiter, RateLimit, abort_with_retry_info, limited_message
from modalign.core.service import GrpcServiceConfig, run_service, serve_grpc
from modalign.feedback.ledger import Ledger, served_responses, stored_feedback
from modalign.feedback.validation import InvalidFeedback, referenced_responses, validate_feedback
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


def content_digest(feedback: feedback_pb2.Feedback) -> str:
    return hashlib.sha256(feedback.SerializeToString(deterministic=True)).hexdigest()


class FeedbackServicer(feedback_pb2_grpc.FeedbackServiceServicer):
    def __init__(self, config: FeedbackConfig, ledger: Ledger, served: Ledger | None) -> None:
        self._config = config
        self._ledger = ledger
        self._served = served
        self._producer = make_producer(config.kafka)
        self._topic = config.kafka.topic("feedback")
        self._id_locks: dict[str, threading.Lock] = {}
        self._id_locks_guard = threading.Lock()
        self._uncertain_ids: set[str] = set()
        self._per_user = PerUserLimiter(config.user_rate_limit)

    def close(self) -> None:
        self._producer.close(timeout=5)

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
        with self._lock_for(feedback.feedback_id):
            try:
                if feedback.feedback_id in self._uncertain_ids:
                    # An earlier write of this id timed out and may still have landed: learn its fate first.
                    self._ledger.catch_up(self._config.kafka.produce_timeout_s)
                    self._uncertain_ids.discard(feedback.feedback_id)
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
                produce_durably(
                    self._producer, self._topic, [(feedback.feedback_id, event)],
                    timeout_s=self._config.kafka.produce_timeout_s + 2,
                )
            except (BrokerUnavailable, TimeoutError) as error:
                self._uncertain_ids.add(feedback.feedback_id)
                FEEDBACK.labels(kind, "unavailable").inc()
                context.abort(grpc.StatusCode.UNAVAILABLE, f"feedback not stored, retry later: {error}")
            self._ledger.record(feedback.feedback_id, digest)
        FEEDBACK.labels(kind, "accepted").inc()
        return False

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

    def _lock_for(self, feedback_id: str) -> threading.Lock:
        # Serialises concurrent submits of one id so exactly one of them writes. Locks are not reclaimed:
        # one small object per id seen, the same order of memory as the ledger itself.
        with self._id_locks_guard:
            return self._id_locks.setdefault(feedback_id, threading.Lock())


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
