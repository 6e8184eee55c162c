"""What both of the policy service's front doors do with a request, free of any transport: validate it,
store its images, route it to a version, sample it in a batch, and log every candidate durably before
anyone sees it. The gRPC servicer (server.py) and the OpenAI-compatible HTTP API (openai_api.py) only
translate to and from their wire formats, and map a Refused to their own status codes.
"""

from __future__ import annotations

import logging
import queue
import re
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from google.protobuf import timestamp_pb2
from prometheus_client import Counter, Histogram
from transformers import ProcessorMixin

from modalign.core.audio import Audio, AudioLimits, InvalidAudio, decode_audio
from modalign.core.blobs import BlobStore
from modalign.core.images import ImageLimits, InvalidImage, decode_image
from modalign.core.kafka import BrokerUnavailable, DurableProducer
from modalign.core.ratelimit import LIMITED, PerUserLimiter, limited_message
from modalign.policy.batcher import BatcherOverloaded
from modalign.policy.config import PolicyConfig
from modalign.policy.conversation import ROLES, last_user_text, of_messages
from modalign.policy.engine import GenerationRequest, PromptTooLong, Sample, SamplingParams
from modalign.policy.families import audio_sampling_rate
from modalign.policy.model import format_conversation
from modalign.policy.routing import VersionRouter
from modalign.v1 import common_pb2, events_pb2, policy_pb2

log = logging.getLogger(__name__)

GENERATED_TOKENS = Counter(
    "modalign_policy_generated_tokens_total", "Tokens generated, end-of-sequence included.", ["policy_version"]
)
REQUESTS = Counter(
    "modalign_policy_requests_total",
    "Requests (gRPC Generate and GenerateStream, HTTP chat completions) by the version they were routed to and "
    "the status they ended with, by gRPC's name of it (HTTP 400 is INVALID_ARGUMENT, 429 RESOURCE_EXHAUSTED, ...).",
    ["policy_version", "grpc_code"],
)
AUDIO_SECONDS = Counter(
    "modalign_policy_audio_seconds_total", "Seconds of users' audio (spoken questions) answered, by version.",
    ["policy_version"],
)
REQUEST_SECONDS = Histogram(
    "modalign_policy_request_seconds",
    "Time from routing a request to its last response, by version; the rollout's latency guard reads it.",
    ["policy_version"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)

OPAQUE_ID = re.compile(r"^[A-Za-z0-9._:@-]{0,128}$")
MAX_STOP_TEXTS, MAX_STOP_BYTES = 4, 64
FINISH_REASONS = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}


class Refused(Exception):
    """A request the service does not answer: code (gRPC's status, the canonical set) says why in kind,
    the message in words, starting with the offending field's path where there is one; retry_after_s,
    when set, when the caller may try again (a rate limit)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


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
    if len(sampling.stop) > MAX_STOP_TEXTS:
        raise InvalidRequest(f"sampling.stop: at most {MAX_STOP_TEXTS} stop texts, got {len(sampling.stop)}")
    for index, stop in enumerate(sampling.stop):
        if not 1 <= len(stop.encode()) <= MAX_STOP_BYTES:
            raise InvalidRequest(f"sampling.stop[{index}]: 1 to {MAX_STOP_BYTES} UTF-8 bytes, got {len(stop.encode())}")
    return SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                          stop=tuple(sampling.stop))


def validate_request(request: policy_pb2.GenerateRequest, config: PolicyConfig) -> None:
    if request.conversation:
        validate_conversation(request, config)
    else:
        text_bytes = len(request.text.encode())
        if not request.text.strip() and not request.HasField("audio"):
            raise InvalidRequest("text: required and not only whitespace, unless the question is spoken (audio)")
        if text_bytes > config.max_text_bytes:
            raise InvalidRequest(f"text: {text_bytes} UTF-8 bytes, above the limit of {config.max_text_bytes}")
        if not 1 <= len(request.images) <= config.max_images:
            raise InvalidRequest(f"images: between 1 and {config.max_images} images required, got {len(request.images)}")
        if request.HasField("audio") and config.max_audio < 1:
            raise InvalidRequest("audio: this policy accepts no audio clips (max_audio 0)")
    if request.n > config.max_candidates:
        raise InvalidRequest(f"n: at most {config.max_candidates} candidates, got {request.n}")
    for name in ("user_id", "session_id"):
        if not OPAQUE_ID.match(getattr(request, name)):
            raise InvalidRequest(f"{name}: at most 128 characters of [A-Za-z0-9._:@-]")


def validate_conversation(request: policy_pb2.GenerateRequest, config: PolicyConfig) -> None:
    """The limits of GenerateRequest.conversation (see policy.proto), but its token count, which the engine checks."""
    turns = request.conversation
    if request.text or request.images or request.HasField("audio"):
        raise InvalidRequest("conversation: give either a conversation or text, images and audio, not both")
    if len(turns) > config.max_turns:
        raise InvalidRequest(f"conversation: at most {config.max_turns} turns, got {len(turns)}")
    images = clips = 0
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
                raise InvalidRequest(f"{where}.content[{part_index}]: a text, an image or audio required")
            if kind in ("image", "audio") and turn.role != common_pb2.ROLE_USER:
                raise InvalidRequest(f"{where}.content[{part_index}].{kind}: {kind} only in user turns")
            if kind == "text" and len(part.text.encode()) > config.max_text_bytes:
                raise InvalidRequest(f"{where}.content[{part_index}].text: {len(part.text.encode())} UTF-8 bytes, "
                                     f"above the limit of {config.max_text_bytes}")
            images += kind == "image"
            clips += kind == "audio"
    if clips > config.max_audio:
        raise InvalidRequest(f"conversation: at most {config.max_audio} audio clips over all turns, got {clips}")
    if turns[-1].role != common_pb2.ROLE_USER:
        raise InvalidRequest(f"conversation[{len(turns) - 1}].role: the last turn must be the user's, to be answered")
    if not 1 <= images <= config.max_images:
        raise InvalidRequest(f"conversation: between 1 and {config.max_images} images required over all turns, got {images}")


def shorthand_conversation(request: policy_pb2.GenerateRequest) -> list[common_pb2.Message]:
    """The conversation a request stands for: its own, or one user turn of its images, then its spoken
    question (if any), then its text (if any)."""
    if request.conversation:
        return list(request.conversation)
    parts = [common_pb2.ContentPart(image=image) for image in request.images]
    if request.HasField("audio"):
        parts.append(common_pb2.ContentPart(audio=request.audio))
    if request.text:
        parts.append(common_pb2.ContentPart(text=request.text))
    return [common_pb2.Message(role=common_pb2.ROLE_USER, content=parts)]


@dataclass
class Started:
    """A request routed and queued: its version, the samples' future, and what logging it needs."""

    request: policy_pb2.GenerateRequest
    prompt_id: str
    """Shared by the request's candidates; assigned here so that a stream can name it from its first chunk."""
    version: str
    pending: Future[list[Sample]]
    conversation: list[common_pb2.LoggedMessage]
    prompt_text: str
    """The last user turn's text: GenerationLogged.prompt_text."""
    n: int
    deltas: queue.Queue | None = None
    """(candidate_index, text_delta) as tokens are sampled, then None; only for a request started streamed."""

    def cancel_when_gone(self, context: grpc.ServicerContext) -> None:
        """Takes the request out of its queue if the RPC ends before its batch starts (its deadline
        passed, or its caller cancelled): it is then never generated, and its place goes to others;
        if it ends while the request runs, its rows stop at the next decoding step (RequestFuture)."""
        if not context.add_callback(self.pending.cancel):  # the RPC has ended already
            self.pending.cancel()


@dataclass
class Generated:
    prompt_id: str
    version: str
    candidates: list[policy_pb2.Candidate]
    prompt_tokens: int
    """Tokens of the formatted prompt, image placeholders expanded: what usage reports."""


class Generations:
    """The transport-free core of the policy service."""

    def __init__(self, config: PolicyConfig, router: VersionRouter, processor: ProcessorMixin, blobs: BlobStore) -> None:
        # Prompts are formatted with the start-up model's processor: the versions the trainer publishes
        # are fine-tuned weights of that model, with the same tokenizer and chat template.
        self._config = config
        self._router = router
        self._processor = processor
        self._blobs = blobs
        self._limits = ImageLimits(max_bytes=config.image_max_bytes, max_pixels=config.image_max_pixels)
        self._audio_limits = AudioLimits(max_bytes=config.audio_max_bytes, max_seconds=config.audio_max_seconds)
        self._producer = DurableProducer(config.kafka)
        self._topic = config.kafka.topic("generations")
        self._per_user = PerUserLimiter(config.user_rate_limit)

    @property
    def router(self) -> VersionRouter:
        return self._router

    def close(self) -> None:
        self._producer.close()

    def start(self, request: policy_pb2.GenerateRequest, streamed: bool = False) -> Started:
        """Validates the request, stores its images and queues it on its session's version (streamed: its
        text deltas are kept for stream()). Raises Refused: INVALID_ARGUMENT, or RESOURCE_EXHAUSTED when
        the version's queue is full or its user over the per-user rate limit."""
        if wait_s := self._per_user.wait_s(request.user_id):
            LIMITED.labels("Generate").inc()
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, limited_message(request.user_id, wait_s), wait_s)
        try:
            generation, conversation, prompt_text = self._prepare(request)
        except InvalidRequest as error:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from error
        deltas: queue.Queue | None = queue.Queue() if streamed else None
        if deltas is not None:
            generation.on_token = lambda index, _token, text: deltas.put((index, text))
        try:
            version, pending = self._router.submit(request.session_id, generation)
        except BatcherOverloaded as error:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the policy is at capacity, retry later: {error}") from error
        if deltas is not None:
            pending.add_done_callback(lambda _: deltas.put(None))
        return Started(request, str(uuid.uuid4()), version, pending, conversation, prompt_text, generation.n, deltas)

    def finish(self, started: Started, still_wanted: Callable[[], bool] = lambda: True) -> Generated:
        """Waits for the samples and logs them durably, unless the caller went away (still_wanted() is
        False: its deadline passed, or it cancelled): nobody can give feedback on responses never received,
        so they are not logged. Raises Refused: INVALID_ARGUMENT (a prompt too long for the model),
        CANCELLED (the caller went away), INTERNAL (the version failed), UNAVAILABLE (the log could not
        be written)."""
        request = started.request
        try:
            samples = started.pending.result()
        except CancelledError as error:  # cancelled (Started.cancel_when_gone) while queued, or while it ran
            raise Refused(grpc.StatusCode.CANCELLED, str(error) or "the caller went away before its batch started") from error
        except PromptTooLong as error:
            field = "conversation" if request.conversation else "text"
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {error}") from error
        except Exception as error:
            raise Refused(grpc.StatusCode.INTERNAL, f"policy {started.version} failed to generate: {error}") from error
        if not still_wanted():
            raise Refused(grpc.StatusCode.CANCELLED, "the caller went away while its batch ran: nothing was logged")
        candidates = self._log(started, samples)
        return Generated(started.prompt_id, started.version, candidates, len(samples[0].prompt_token_ids))

    def stream(self, started: Started) -> Iterator[tuple[int, str, int]]:
        """(candidate_index, text_delta, tokens so far) as the candidates of a request started streamed
        are sampled, until they all finished; then finish() logs them."""
        assert started.deltas is not None, "start(request, streamed=True) keeps the deltas"
        token_counts = [0] * started.n
        while (item := started.deltas.get()) is not None:
            index, text = item
            token_counts[index] += 1
            yield index, text, token_counts[index]

    def _prepare(
        self, request: policy_pb2.GenerateRequest
    ) -> tuple[GenerationRequest, list[common_pb2.LoggedMessage], str]:
        """The engine's request, the conversation as it is logged (images stored, by reference), and the
        text of its last user turn."""
        validate_request(request, self._config)
        params = sampling_params(request, self._config)
        images, audio, logged = [], [], []
        for turn_index, turn in enumerate(shorthand_conversation(request)):
            parts = []
            for part_index, part in enumerate(turn.content):
                kind = part.WhichOneof("part")
                if kind == "text":
                    parts.append(common_pb2.LoggedContentPart(text=part.text))
                    continue
                where = (f"conversation[{turn_index}].content[{part_index}].{kind}" if request.conversation
                         else "audio" if kind == "audio" else f"images[{part_index}]")
                if kind == "audio":
                    clip = self._audio(part.audio, where)
                    audio.append(clip.samples)
                    parts.append(common_pb2.LoggedContentPart(audio=common_pb2.AudioRef(
                        sha256=self._blobs.put(part.audio.data), mime_type=part.audio.mime_type, seconds=clip.seconds,
                    )))
                    continue
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
        asked = of_messages(logged)
        try:
            prompt = format_conversation(self._processor, asked)
        except ValueError as error:
            raise InvalidRequest(f"{'conversation' if request.conversation else 'text'}: {error}") from error
        generation = GenerationRequest(prompt_text=prompt, images=images, params=params, n=request.n or 1, audio=audio)
        return generation, logged, last_user_text(asked)

    def _audio(self, clip: common_pb2.Audio, where: str) -> Audio:
        """A client's clip decoded at the model's sampling rate, or InvalidRequest naming it (at `where`)."""
        sampling_rate = audio_sampling_rate(self._processor)
        if sampling_rate is None:
            raise InvalidRequest(f"{where}: this policy's model takes no audio; send the question as text")
        try:
            return decode_audio(clip.data, clip.mime_type, sampling_rate, self._audio_limits)
        except InvalidAudio as error:
            raise InvalidRequest(f"{where}: {error}") from error

    def _log(self, started: Started, samples: list[Sample]) -> list[policy_pb2.Candidate]:
        """Writes one GenerationLogged per candidate and waits for every acknowledgement."""
        request, conversation, prompt_id = started.request, started.conversation, started.prompt_id
        response_ids = [str(uuid.uuid4()) for _ in samples]
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        images = [part.image for turn in conversation for part in turn.content if part.WhichOneof("part") == "image"]
        audio_seconds = sum(part.audio.seconds for turn in conversation for part in turn.content
                            if part.WhichOneof("part") == "audio")
        candidates, records = [], []
        for index, (sample, response_id) in enumerate(zip(samples, response_ids)):
            finish_reason = FINISH_REASONS[sample.finish_reason]
            version = sample.policy_version
            event = events_pb2.GenerationLogged(
                response_id=response_id, prompt_id=prompt_id, policy_version=version,
                user_id=request.user_id, session_id=request.session_id, prompt_text=started.prompt_text,
                images=images, conversation=conversation, sampling=request.sampling, candidate_index=index,
                num_candidates=len(samples),
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
            self._producer.produce(self._topic, records, timeout_s=self._config.kafka.produce_timeout_s + 2)
        except BrokerUnavailable as error:
            log.warning("generation %s not logged: %s", prompt_id, error)
            raise Refused(grpc.StatusCode.UNAVAILABLE, f"the generation could not be logged, retry later: {error}") from error
        if audio_seconds:
            AUDIO_SECONDS.labels(started.version).inc(audio_seconds)
        return candidates


@contextmanager
def observed(version: str) -> Iterator[None]:
    """Counts and times a routed request under its version, by the status it ends with."""
    started, code = time.perf_counter(), "OK"
    try:
        yield
    except Refused as error:
        code = error.code.name
        raise
    except BaseException:
        code = "UNKNOWN"
        raise
    finally:
        REQUESTS.labels(version, code).inc()
        REQUEST_SECONDS.labels(version).observe(time.perf_counter() - started)
