"""PolicyService over gRPC: validate, decode and store images, route, sample in batches, log every candidate.

Transport only: the model in model.py, its batched sampling in engine.py and batcher.py, the choice of
version per request in routing.py. A candidate is logged to Kafka (acks=all) before the client sees
it, so feedback on any response_id a client holds can always be joined to its generation.
"""

from __future__ import annotations

import logging
import queue
import re
import time
import uuid
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Iterator

import grpc
import torch
from google.protobuf import timestamp_pb2
from kafka.consumer.fetcher import ConsumerRecord
from prometheus_client import Counter, Gauge, Histogram
from transformers import ProcessorMixin

from modalign.core.blobs import BlobStore
from modalign.core.images import ImageLimits, InvalidImage, decode_image
from modalign.core.kafka import BrokerUnavailable, decode_record, ensure_topics, make_producer, produce_durably
from modalign.core.modelstore import fetch
from modalign.core.service import run_service, serve_grpc
from modalign.core.versions import TopicFollower
from modalign.policy.batcher import BatcherOverloaded, DynamicBatcher
from modalign.policy.config import FOLLOW_MODES, PolicyConfig
from modalign.policy.conversation import ROLES, last_user_text, of_messages
from modalign.policy.engine import GenerationRequest, PolicyEngine, PromptTooLong, Sample, SamplingParams
from modalign.policy.model import build_default_policy, format_conversation, load_policy
from modalign.policy.routing import Routes, VersionRouter
from modalign.v1 import common_pb2, events_pb2, policy_pb2, policy_pb2_grpc

log = logging.getLogger(__name__)

GENERATED_TOKENS = Counter(
    "modalign_policy_generated_tokens_total", "Tokens generated, end-of-sequence included.", ["policy_version"]
)
BATCH_ROWS = Histogram(
    "modalign_policy_batch_rows",
    "Sequences (candidates of all requests) decoded together in one batch.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
VERSION_INFO = Gauge(
    "modalign_policy_version_info", "1 for each policy version this replica serves.", ["policy_version"]
)
TRAFFIC_WEIGHT = Gauge(
    "modalign_policy_traffic_weight_percent",
    "Share of sessions this replica routes to each version it serves (the rollout's weights).",
    ["policy_version"],
)
REQUESTS = Counter(
    "modalign_policy_requests_total",
    "Generate and GenerateStream calls by the version they were routed to and their gRPC status code.",
    ["policy_version", "grpc_code"],
)
REQUEST_SECONDS = Histogram(
    "modalign_policy_request_seconds",
    "Time from routing a request to its last response, by version; the rollout's latency guard reads it.",
    ["policy_version"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)

# Trailing metadata naming the version a request was routed to, on failures as on successes.
VERSION_METADATA = "policy-version"
OPAQUE_ID = re.compile(r"^[A-Za-z0-9._:@-]{0,128}$")
FINISH_REASONS = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}


class InvalidRequest(ValueError):
    """A message starting with the offending field's path."""


def sampling_params(request: policy_pb2.GenerateRequest, config: PolicyConfig) -> SamplingParams:
    sampling = request.sampling
    temperature = sampling.temperature if sampling.HasField("temperature") else 1.0
    if not 0.0 <= temperature <= 2.0:
        raise InvalidRequest(f"sampling.temperature: must be in [0, 2], got {temperature}")
    top_p = sampling.top_p if sampling.HasField("top_p") else 1.0
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequest(f"sampling.top_p: must be in (0, 1], got {top_p}")
    max_new_tokens = sampling.max_new_tokens if sampling.HasField("max_new_tokens") else config.default_max_new_tokens
    if not 1 <= max_new_tokens <= config.max_new_tokens_limit:
        raise InvalidRequest(
            f"sampling.max_new_tokens: must be in [1, {config.max_new_tokens_limit}], got {max_new_tokens}"
        )
    seed = sampling.seed if sampling.HasField("seed") else None
    return SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)


def validate_request(request: policy_pb2.GenerateRequest, config: PolicyConfig) -> None:
    if request.conversation:
        validate_conversation(request, config)
    else:
        text_bytes = len(request.text.encode())
        if not request.text.strip():
            raise InvalidRequest("text: required and not only whitespace")
        if text_bytes > config.max_text_bytes:
            raise InvalidRequest(f"text: {text_bytes} UTF-8 bytes, above the limit of {config.max_text_bytes}")
        if not 1 <= len(request.images) <= config.max_images:
            raise InvalidRequest(f"images: between 1 and {config.max_images} images required, got {len(request.images)}")
    if request.n > config.max_candidates:
        raise InvalidRequest(f"n: at most {config.max_candidates} candidates, got {request.n}")
    for name in ("user_id", "session_id"):
        if not OPAQUE_ID.match(getattr(request, name)):
            raise InvalidRequest(f"{name}: at most 128 characters of [A-Za-z0-9._:@-]")


def validate_conversation(request: policy_pb2.GenerateRequest, config: PolicyConfig) -> None:
    """The limits of GenerateRequest.conversation (see policy.proto), but its token count, which the engine checks."""
    turns = request.conversation
    if request.text or request.images:
        raise InvalidRequest("conversation: give either a conversation or text and images, not both")
    if len(turns) > config.max_turns:
        raise InvalidRequest(f"conversation: at most {config.max_turns} turns, got {len(turns)}")
    images = 0
    for index, turn in enumerate(turns):
        where = f"conversation[{index}]"
        if turn.role not in ROLES:
            raise InvalidRequest(f"{where}.role: must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT, got {turn.role}")
        if turn.role == common_pb2.ROLE_SYSTEM and index != 0:
            raise InvalidRequest(f"{where}.role: a system turn may only come first")
        if not turn.content:
            raise InvalidRequest(f"{where}.content: at least one part required")
        for part_index, part in enumerate(turn.content):
            kind = part.WhichOneof("part")
            if kind is None:
                raise InvalidRequest(f"{where}.content[{part_index}]: a text or an image required")
            if kind == "image" and turn.role != common_pb2.ROLE_USER:
                raise InvalidRequest(f"{where}.content[{part_index}].image: images only in user turns")
            if kind == "text" and len(part.text.encode()) > config.max_text_bytes:
                raise InvalidRequest(f"{where}.content[{part_index}].text: {len(part.text.encode())} UTF-8 bytes, "
                                     f"above the limit of {config.max_text_bytes}")
            images += kind == "image"
    if turns[-1].role != common_pb2.ROLE_USER:
        raise InvalidRequest(f"conversation[{len(turns) - 1}].role: the last turn must be the user's, to be answered")
    if not 1 <= images <= config.max_images:
        raise InvalidRequest(f"conversation: between 1 and {config.max_images} images required over all turns, got {images}")


def shorthand_conversation(request: policy_pb2.GenerateRequest) -> list[common_pb2.Message]:
    """The conversation a request stands for: its own, or one user turn of its images, then its text."""
    if request.conversation:
        return list(request.conversation)
    parts = [common_pb2.ContentPart(image=image) for image in request.images] + [common_pb2.ContentPart(text=request.text)]
    return [common_pb2.Message(role=common_pb2.ROLE_USER, content=parts)]


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, config: PolicyConfig, router: VersionRouter, processor: ProcessorMixin, blobs: BlobStore) -> None:
        # Prompts are formatted with the start-up model's processor: the versions the trainer publishes
        # are fine-tuned weights of that model, with the same tokenizer and chat template.
        self._config = config
        self._router = router
        self._processor = processor
        self._blobs = blobs
        self._limits = ImageLimits(max_bytes=config.image_max_bytes, max_pixels=config.image_max_pixels)
        self._producer = make_producer(config.kafka)
        self._topic = config.kafka.topic("generations")

    def close(self) -> None:
        self._producer.close(timeout=5)

    def Generate(self, request: policy_pb2.GenerateRequest, context: grpc.ServicerContext) -> policy_pb2.GenerateResponse:
        generation, conversation = self._prepare(request, context)
        version, pending = self._submit(request.session_id, generation, context)
        context.set_trailing_metadata(((VERSION_METADATA, version),))
        with observed(version, context):
            samples = self._result(request, version, pending, context)
            prompt_id, candidates = self._log(request, conversation, samples, context)
            return policy_pb2.GenerateResponse(prompt_id=prompt_id, policy_version=version, candidates=candidates)

    def GenerateStream(
        self, request: policy_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[policy_pb2.GenerateStreamChunk]:
        deltas: queue.Queue = queue.Queue()
        generation, conversation = self._prepare(request, context)
        generation.on_token = lambda index, _token, text: deltas.put((index, text))
        version, pending = self._submit(request.session_id, generation, context)
        context.set_trailing_metadata(((VERSION_METADATA, version),))
        with observed(version, context):
            pending.add_done_callback(lambda _: deltas.put(None))
            response_ids = [str(uuid.uuid4()) for _ in range(generation.n)]
            token_counts = [0] * generation.n
            # Deltas name no response: an id reaches the client only on the final chunks, once the
            # generation is durably logged, so any feedback that names it can be joined.
            while (item := deltas.get()) is not None:
                index, text = item
                token_counts[index] += 1
                yield policy_pb2.GenerateStreamChunk(
                    policy_version=version, candidate_index=index, text_delta=text, token_count=token_counts[index],
                )
            samples = self._result(request, version, pending, context)
            prompt_id, candidates = self._log(request, conversation, samples, context, response_ids)
            for index, candidate in enumerate(candidates):
                yield policy_pb2.GenerateStreamChunk(
                    prompt_id=prompt_id, policy_version=version, candidate_index=index,
                    response_id=candidate.response_id, token_count=candidate.token_count,
                    finish_reason=candidate.finish_reason,
                )

    def _submit(
        self, session_id: str, generation: GenerationRequest, context: grpc.ServicerContext
    ) -> tuple[str, Future[list[Sample]]]:
        try:
            return self._router.submit(session_id, generation)
        except BatcherOverloaded as error:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the policy is at capacity, retry later: {error}")

    @staticmethod
    def _result(
        request: policy_pb2.GenerateRequest, version: str, pending: Future[list[Sample]], context: grpc.ServicerContext
    ) -> list[Sample]:
        try:
            return pending.result()
        except PromptTooLong as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{'conversation' if request.conversation else 'text'}: {error}")
        except Exception as error:
            context.abort(grpc.StatusCode.INTERNAL, f"policy {version} failed to generate: {error}")

    def _prepare(
        self, request: policy_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> tuple[GenerationRequest, list[common_pb2.LoggedMessage]]:
        """The engine's request, and the conversation as it is logged (images stored, by reference)."""
        try:
            validate_request(request, self._config)
            params = sampling_params(request, self._config)
            images, logged = [], []
            for turn_index, turn in enumerate(shorthand_conversation(request)):
                parts = []
                for part_index, part in enumerate(turn.content):
                    if part.WhichOneof("part") == "text":
                        parts.append(common_pb2.LoggedContentPart(text=part.text))
                        continue
                    where = (f"conversation[{turn_index}].content[{part_index}].image" if request.conversation
                             else f"images[{part_index}]")
                    try:
                        decoded = decode_image(part.image.data, part.image.mime_type, self._limits)
                    except InvalidImage as error:
                        raise InvalidRequest(f"{where}: {error}") from error
                    images.append(decoded)
                    parts.append(common_pb2.LoggedContentPart(image=common_pb2.ImageRef(
                        sha256=self._blobs.put(part.image.data), mime_type=part.image.mime_type,
                        width=decoded.width, height=decoded.height,
                    )))
                logged.append(common_pb2.LoggedMessage(role=turn.role, content=parts))
            try:
                prompt = format_conversation(self._processor, of_messages(logged))
            except ValueError as error:
                raise InvalidRequest(f"{'conversation' if request.conversation else 'text'}: {error}") from error
        except InvalidRequest as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return GenerationRequest(prompt_text=prompt, images=images, params=params, n=request.n or 1), logged

    def _log(
        self,
        request: policy_pb2.GenerateRequest,
        conversation: list[common_pb2.LoggedMessage],
        samples: list[Sample],
        context: grpc.ServicerContext,
        response_ids: list[str] | None = None,
    ) -> tuple[str, list[policy_pb2.Candidate]]:
        """Writes one GenerationLogged per candidate and waits for every acknowledgement."""
        prompt_id = str(uuid.uuid4())
        response_ids = response_ids or [str(uuid.uuid4()) for _ in samples]
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        asked = of_messages(conversation)
        prompt_text = last_user_text(asked)
        images = [part.image for turn in conversation for part in turn.content if part.WhichOneof("part") == "image"]
        candidates, records = [], []
        for index, (sample, response_id) in enumerate(zip(samples, response_ids)):
            finish_reason = FINISH_REASONS[sample.finish_reason]
            version = sample.policy_version
            event = events_pb2.GenerationLogged(
                response_id=response_id, prompt_id=prompt_id, policy_version=version,
                user_id=request.user_id, session_id=request.session_id, prompt_text=prompt_text,
                images=images, conversation=conversation, sampling=request.sampling, candidate_index=index, num_candidates=len(samples),
                prompt_token_ids=sample.prompt_token_ids, response_token_ids=sample.token_ids,
                response_logprobs=sample.logprobs, response_text=sample.text, finish_reason=finish_reason,
                created_at=now,
            )
            records.append((response_id, event))
            candidates.append(policy_pb2.Candidate(
                response_id=response_id, text=sample.text, token_count=len(sample.token_ids),
                finish_reason=finish_reason,
            ))
            GENERATED_TOKENS.labels(version).inc(len(sample.token_ids))
        try:
            produce_durably(self._producer, self._topic, records, timeout_s=self._config.kafka.produce_timeout_s + 2)
        except BrokerUnavailable as error:
            log.warning("generation %s not logged: %s", prompt_id, error)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the generation could not be logged, retry later: {error}")
        return prompt_id, candidates


@contextmanager
def observed(version: str, context: grpc.ServicerContext) -> Iterator[None]:
    """Counts and times a routed request under its version, by the status code it ends with."""
    started, code = time.perf_counter(), grpc.StatusCode.OK
    try:
        yield
    except BaseException:
        code = context.code() or grpc.StatusCode.UNKNOWN
        raise
    finally:
        REQUESTS.labels(version, code.name).inc()
        REQUEST_SECONDS.labels(version).observe(time.perf_counter() - started)


class PublishedVersions:
    """The versions the trainer published and the routes the replica should serve, from the records of
    the followed topics; loads any of those versions, verified against its manifest first."""

    def __init__(self, config: PolicyConfig, initial: PolicyEngine) -> None:
        self._config = config
        self._initial = initial
        self._published: dict[str, events_pb2.PolicyVersionPublished] = {}
        self._rollout_revision = -1
        self._awaiting: Routes | None = None

    def load_engine(self, version: str) -> PolicyEngine:
        if version == self._initial.policy_version:
            return self._initial
        event = self._published.get(version)
        if event is None:
            raise LookupError(f"policy {version} was never published")
        folder = fetch(event.uri, self._config.s3, event.manifest_sha256)
        model, processor = load_policy(folder, device=self._config.device, dtype=getattr(torch, self._config.dtype))
        return PolicyEngine(model, processor, policy_version=version)

    def update(self, records: list[ConsumerRecord]) -> Routes | None:
        """Catalogs every published version in records; returns the routes they call for, if changed."""
        newest_state = newest_version = None
        for record in records:
            if record.topic == self._config.kafka.topic("policy-versions"):
                if (event := decode_record(events_pb2.PolicyVersionPublished, record)) is not None:
                    self._published[event.version] = event
                    newest_version = event.version
            elif (state := decode_record(events_pb2.RolloutState, record)) is not None:
                newest_state = state
        routes = None
        if self._config.follow == "latest" and newest_version is not None:
            routes = Routes(stable=newest_version)
        if self._config.follow == "rollout" and newest_state is not None and newest_state.revision > self._rollout_revision:
            self._rollout_revision = newest_state.revision
            routes = Routes.from_state(newest_state, self._initial.policy_version)
        routes = routes or self._awaiting
        # The two topics are fetched separately, so a state can arrive before the announcement of the
        # version it routes to: hold it until the announcement is read.
        if routes is not None and any(v not in self._published and v != self._initial.policy_version
                                      for v in routes.versions()):
            self._awaiting = routes
            return None
        self._awaiting = None
        return routes


def publish_routes(old: Routes, new: Routes) -> None:
    for version in set(old.versions()) - set(new.versions()):
        VERSION_INFO.remove(version)
        TRAFFIC_WEIGHT.remove(version)
    for version, weight in new.weights().items():
        VERSION_INFO.labels(version).set(1)
        TRAFFIC_WEIGHT.labels(version).set(weight)


SERVICE_NAMES = [policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name]


def serve(config: PolicyConfig) -> None:
    # The model first: a checkpoint that cannot be served is refused before anything else starts.
    if config.model_dir:
        folder = fetch(config.model_dir, config.s3) if "://" in config.model_dir else config.model_dir
        model, processor = load_policy(folder, device=config.device, dtype=getattr(torch, config.dtype))
    else:
        model, processor = build_default_policy(config.seed)
        model.to(config.device, getattr(torch, config.dtype))
    initial = PolicyEngine(model, processor, policy_version=config.policy_version)
    ensure_topics(config.kafka)
    versions = PublishedVersions(config, initial)
    router = VersionRouter(
        initial, versions.load_engine,
        lambda engine: DynamicBatcher(
            engine, max_batch_rows=config.max_batch_rows, max_wait_ms=config.max_batch_wait_ms,
            max_pending_rows=config.max_pending_rows, on_batch=BATCH_ROWS.observe,
        ),
        on_routes=publish_routes,
    )
    publish_routes(router.routes, router.routes)

    def on_records(records: list[ConsumerRecord]) -> None:
        if (routes := versions.update(records)) is not None:
            router.apply(routes)

    follower = None
    if FOLLOW_MODES[config.follow]:
        # Before serving: a replica that starts mid-rollout routes as the others do from its first request.
        follower = TopicFollower(config.kafka, FOLLOW_MODES[config.follow], on_records)
        follower.start()
    servicer = PolicyServicer(config, router, processor, BlobStore(config.blob_dir))
    log.info("policy service serving %s", router.routes.weights())
    try:
        serve_grpc(
            config, lambda server: policy_pb2_grpc.add_PolicyServiceServicer_to_server(servicer, server),
            SERVICE_NAMES,
        )
    finally:
        if follower is not None:
            follower.stop()
        router.close()
        servicer.close()


def main(argv: list[str] | None = None) -> None:
    run_service(PolicyConfig, serve, argv)


if __name__ == "__main__":
    main()
