"""PolicyService over gRPC: validate, decode and store images, sample in batches, log every candidate.

Transport only: the model and its batched sampling live in model.py and engine.py. A candidate is
logged to Kafka (acks=all) before the client sees it, so feedback on any response_id a client holds
can always be joined to its generation.
"""

from __future__ import annotations

import logging
import queue
import re
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import grpc
from google.protobuf import timestamp_pb2
from prometheus_client import Counter, Gauge, Histogram

from modalign.core.blobs import BlobStore
from modalign.core.config import parse_config
from modalign.core.grpc_server import run_grpc_service
from modalign.core.images import ImageLimits, InvalidImage, decode_image
from modalign.core.kafka import BrokerUnavailable, KafkaConfig, ensure_topics, make_producer, produce_durably
from modalign.core.modelstore import ModelStore
from modalign.core.versions import VersionFollower, local_path
from modalign.policy.engine import (
    BatcherOverloaded,
    DynamicBatcher,
    GenerationRequest,
    PolicyEngine,
    Sample,
    SamplingParams,
)
from modalign.policy.model import build_default_policy, format_prompt, load_policy
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

OPAQUE_ID = re.compile(r"^[A-Za-z0-9._:@-]{0,128}$")
FINISH_REASONS = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}


@dataclass(frozen=True)
class PolicyConfig:
    """The policy service."""

    listen: str = "127.0.0.1:50051"
    """gRPC address, host:port; 0.0.0.0 or [::] in a container."""
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9101
    """Port of the Prometheus /metrics endpoint; 0 disables it."""
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    model_dir: str = ""
    """Folder of a Hugging Face image-text-to-text checkpoint; empty builds the small default policy."""
    policy_version: str = "v0"
    """The version name this replica reports for the model it loaded at start-up."""
    follow_versions: bool = True
    """Load each version the trainer publishes (policy-versions topic), verified by checksum, without
    dropping in-flight requests; at start-up, the newest one published so far."""
    seed: int = 0
    """Seed of the default policy's random initialisation (when model_dir is empty)."""
    device: str = "cpu"
    """Torch device for the model, e.g. "cuda" or "cuda:1"."""
    blob_dir: Path = Path.home() / ".local" / "share" / "modalign" / "blobs"
    """Content-addressed image store shared with the trainer and reward service."""
    max_batch_rows: int = 32
    """Most sequences decoded together; concurrent requests are merged up to this."""
    max_batch_wait_ms: float = 5.0
    """How long the first queued request waits for company before its batch starts."""
    default_max_new_tokens: int = 64
    max_new_tokens_limit: int = 512
    max_candidates: int = 8
    max_images: int = 8
    max_text_bytes: int = 8192
    image_max_bytes: int = ImageLimits.max_bytes
    image_max_pixels: int = ImageLimits.max_pixels
    max_pending_rows: int = 512
    """Candidates allowed to queue for a batch; past this, requests get RESOURCE_EXHAUSTED."""
    max_workers: int = 64
    """Threads serving RPCs; each waits on its batch, so this bounds requests in flight."""


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


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, config: PolicyConfig, batcher: DynamicBatcher, blobs: BlobStore) -> None:
        self._config = config
        self._batcher = batcher
        self._blobs = blobs
        self._limits = ImageLimits(max_bytes=config.image_max_bytes, max_pixels=config.image_max_pixels)
        self._producer = make_producer(config.kafka)
        self._topic = config.kafka.topic("generations")

    def close(self) -> None:
        self._producer.close(timeout=5)

    def Generate(self, request: policy_pb2.GenerateRequest, context: grpc.ServicerContext) -> policy_pb2.GenerateResponse:
        generation, image_refs = self._prepare(request, context)
        samples = self._submit(generation, context).result()
        prompt_id, candidates = self._log(request, image_refs, samples, context)
        return policy_pb2.GenerateResponse(
            prompt_id=prompt_id, policy_version=samples[0].policy_version, candidates=candidates
        )

    def GenerateStream(
        self, request: policy_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[policy_pb2.GenerateStreamChunk]:
        deltas: queue.Queue = queue.Queue()
        generation, image_refs = self._prepare(request, context)
        generation.on_token = lambda index, _token, text: deltas.put((index, text))
        pending = self._submit(generation, context)
        pending.add_done_callback(lambda _: deltas.put(None))
        response_ids = [str(uuid.uuid4()) for _ in range(generation.n)]
        token_counts = [0] * generation.n
        while (item := deltas.get()) is not None:
            index, text = item
            token_counts[index] += 1
            yield policy_pb2.GenerateStreamChunk(
                candidate_index=index, response_id=response_ids[index], text_delta=text,
                token_count=token_counts[index],
            )
        samples = pending.result()
        prompt_id, candidates = self._log(request, image_refs, samples, context, response_ids)
        for index, candidate in enumerate(candidates):
            yield policy_pb2.GenerateStreamChunk(
                prompt_id=prompt_id, policy_version=samples[index].policy_version, candidate_index=index,
                response_id=candidate.response_id, token_count=candidate.token_count,
                finish_reason=candidate.finish_reason,
            )

    def _submit(self, generation: GenerationRequest, context: grpc.ServicerContext) -> Future[list[Sample]]:
        try:
            return self._batcher.submit(generation)
        except BatcherOverloaded as error:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the policy is at capacity, retry later: {error}")

    def _prepare(
        self, request: policy_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> tuple[GenerationRequest, list[common_pb2.ImageRef]]:
        try:
            validate_request(request, self._config)
            params = sampling_params(request, self._config)
            try:
                prompt = format_prompt(self._batcher.engine.processor, request.text, len(request.images))
            except ValueError as error:
                raise InvalidRequest(f"text: {error}") from error
            images, refs = [], []
            for index, image in enumerate(request.images):
                try:
                    decoded = decode_image(image.data, image.mime_type, self._limits)
                except InvalidImage as error:
                    raise InvalidRequest(f"images[{index}]: {error}") from error
                images.append(decoded)
                refs.append(common_pb2.ImageRef(
                    sha256=self._blobs.put(image.data), mime_type=image.mime_type,
                    width=decoded.width, height=decoded.height,
                ))
        except InvalidRequest as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return GenerationRequest(prompt_text=prompt, images=images, params=params, n=request.n or 1), refs

    def _log(
        self,
        request: policy_pb2.GenerateRequest,
        image_refs: list[common_pb2.ImageRef],
        samples: list[Sample],
        context: grpc.ServicerContext,
        response_ids: list[str] | None = None,
    ) -> tuple[str, list[policy_pb2.Candidate]]:
        """Writes one GenerationLogged per candidate and waits for every acknowledgement."""
        prompt_id = str(uuid.uuid4())
        response_ids = response_ids or [str(uuid.uuid4()) for _ in samples]
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        candidates, records = [], []
        for index, (sample, response_id) in enumerate(zip(samples, response_ids)):
            finish_reason = FINISH_REASONS[sample.finish_reason]
            version = sample.policy_version
            event = events_pb2.GenerationLogged(
                response_id=response_id, prompt_id=prompt_id, policy_version=version,
                user_id=request.user_id, session_id=request.session_id, prompt_text=request.text,
                images=image_refs, sampling=request.sampling, candidate_index=index, num_candidates=len(samples),
                prompt_token_ids=sample.prompt_token_ids, response_token_ids=sample.token_ids,
                response_logprobs=sample.logprobs, response_text=sample.text, finish_reason=finish_reason,
                created_at=now,
            )
            records.append((response_id, event.SerializeToString()))
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


def load_version(event: events_pb2.PolicyVersionPublished, batcher: DynamicBatcher, device: str) -> None:
    """Verifies a published version's files, loads it, and serves later batches from it.

    The batch running during the swap finishes on the old model, so no request fails because of it.
    """
    if event.version == batcher.policy_version:
        return
    folder = local_path(event.uri)
    ModelStore.verify(folder, event.manifest_sha256)
    model, processor = load_policy(folder, device=device)
    old = batcher.swap(PolicyEngine(model, processor, policy_version=event.version))
    VERSION_INFO.labels(event.version).set(1)
    VERSION_INFO.remove(old.policy_version)
    log.info("now serving policy %s (was %s)", event.version, old.policy_version)


SERVICE_NAMES = [policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name]


def serve(config: PolicyConfig) -> None:
    ensure_topics(config.kafka)
    if config.model_dir:
        model, processor = load_policy(config.model_dir, device=config.device)
    else:
        model, processor = build_default_policy(config.seed)
        model.to(config.device)
    engine = PolicyEngine(model, processor, policy_version=config.policy_version)
    batcher = DynamicBatcher(
        engine, max_batch_rows=config.max_batch_rows, max_wait_ms=config.max_batch_wait_ms,
        max_pending_rows=config.max_pending_rows, on_batch=BATCH_ROWS.observe,
    )
    VERSION_INFO.labels(config.policy_version).set(1)
    follower = None
    if config.follow_versions:
        follower = VersionFollower(config.kafka, lambda event: load_version(event, batcher, config.device))
        follower.start()
    servicer = PolicyServicer(config, batcher, BlobStore(config.blob_dir))
    log.info("policy service serving %s", batcher.policy_version)
    try:
        run_grpc_service(
            config.listen, lambda server: policy_pb2_grpc.add_PolicyServiceServicer_to_server(servicer, server),
            SERVICE_NAMES, config.max_workers, config.metrics_host, config.metrics_port,
        )
    finally:
        if follower is not None:
            follower.stop()
        batcher.close()
        servicer.close()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(parse_config(PolicyConfig, argv))


if __name__ == "__main__":
    main()
