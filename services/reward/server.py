"""The reward service: the reward model behind KServe's Open Inference Protocol v2 (REST and gRPC).

Contract (model name configurable, default "reward"):

    inputs   prompt    BYTES [B]     UTF-8 user prompt, without chat formatting
             response  BYTES [B]     UTF-8 assistant response to score
             images    BYTES [B, K]  encoded images (PNG, JPEG, WEBP or GIF) of each prompt, raw or
                                     base64; an empty element is "no image", so a row holds 0..K
                                     images, in order
    output   score     FP32  [B]     scalar reward per row, read at the last response token

Send images base64 over REST: KServe 0.21 turns every REST BYTES element into UTF-8 text while
parsing the request (InferRequest.from_bytes, binary extension included), so raw image bytes fail
there with a 500 before this code runs. gRPC carries raw bytes as they are; base64 works on both.

Bad requests raise kserve.errors.InvalidInput naming the input; KServe 0.21 maps that to HTTP 400
(invalid_input_handler) and gRPC INVALID_ARGUMENT (ExceptionToStatusInterceptor).

Binding: kserve 0.21 hard-codes its listen addresses (uvicorn host "0.0.0.0" in
protocol/rest/server.py, gRPC "[::]:port" in protocol/grpc/server.py) and offers no option for them.
BoundModelServer below replaces ModelServer.start so both listeners bind the host given by --host,
which defaults to loopback; a pod passes --host 0.0.0.0.

New versions: with --follow-versions true (and --kafka.* pointing at the broker) a daemon thread
tails the policy-versions topic (modalign.core.versions.follow_newest_version) and loads the reward model
each PolicyVersionPublished event names (reward_model_version, in the same model store as the
policy folder of its uri): verified file by file against its manifest first, then built beside the
serving model and swapped in as one reference, so in-flight requests finish on the old model and no
request fails. A version that fails verification or loading is refused (counted in
modalign_reward_model_loads_total{outcome="failed"}) and the previous one keeps serving.
modalign_reward_model_info{version} names the version being served.

Command line: kserve.model_server parses sys.argv with parse_known_args when it is imported, for the
defaults of its own flags (--http_port, --model_name, ...). Our flags come from RewardServerConfig via
modalign.core.config and are spelled with hyphens or dots (--http-port, --limits.max-batch-size),
which are neither kserve flags nor prefixes of one, so that parse ignores them; serve() passes the ports, host,
workers and grace period to ModelServer explicitly. Each flag is also an
environment variable (MODALIGN_HTTP_PORT, ...).

Run: python -m modalign.reward.server --http-port 8080 --grpc-port 8081 [--model-dir PATH]
     [--follow-versions true --kafka.bootstrap-servers HOST:PORT --kafka.topic-prefix PREFIX]
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import re
import sys
import threading
import uuid
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kserve
import numpy as np
import torch
from grpc import aio
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING, MAX_GRPC_MESSAGE_LENGTH
from kserve.errors import InvalidInput
from kserve.logging import KSERVE_LOGGER_DATE_FORMAT, KSERVE_LOGGER_FORMAT, logger
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from kserve.protocol.rest.server import RESTServer
from PIL import Image
from prometheus_client import Counter, Gauge

from modalign.core.config import parse_config
from modalign.core.images import ImageLimits, InvalidImage, decode_image
from modalign.core.kafka import KafkaConfig, ensure_topics
from modalign.core.modelstore import MANIFEST, ChecksumMismatch, S3Config, fetch, read_manifest, sibling_uri, verify
from modalign.core.versions import follow_newest_version
from modalign.reward.model import RewardModel, UnscorableText, build_default_reward_model
from modalign.v1 import events_pb2

INPUTS = [
    {"name": "prompt", "datatype": "BYTES", "shape": [-1]},
    {"name": "response", "datatype": "BYTES", "shape": [-1]},
    {"name": "images", "datatype": "BYTES", "shape": [-1, -1]},
]
OUTPUTS = [{"name": "score", "datatype": "FP32", "shape": [-1]}]

# Defined once per process: prometheus_client's default registry is what KServe's /metrics serves.
SCORED = Counter("modalign_reward_scored_total", "Responses scored by the reward model.")
MODEL_INFO = Gauge("modalign_reward_model_info", "1 for the reward model version being served.", ["version"])
MODEL_LOADS = Counter(
    "modalign_reward_model_loads",
    "Reward model loads, by outcome: loaded, or failed (the previous model keeps serving).",
    ["outcome"],
)
# A version name becomes a folder name: nothing that could step out of the model store.
_VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# Magic numbers of the formats modalign.core.images accepts: the protocol carries no MIME type.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on one request, so a single client cannot make a forward pass arbitrarily expensive."""

    max_batch_size: int = 64
    """Most rows in one request."""
    max_images_per_row: int = 8
    """Most non-empty images in one row."""
    max_text_bytes: int = 32 * 1024
    """Largest prompt or response, in UTF-8 bytes."""
    image: ImageLimits = ImageLimits()


@dataclass(frozen=True)
class ScoreBatch:
    prompts: list[str]
    images: list[list[Image.Image]]
    responses: list[str]


@dataclass(frozen=True)
class _LoadedRewardModel:
    """The model and its version, swapped as one reference so a request never mixes two versions."""

    reward: RewardModel
    version: str


def _sniff_mime(data: bytes) -> str | None:
    for signature, mime in _SIGNATURES:
        if data.startswith(signature):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _as_bytes(element: Any, name: str) -> bytes:
    """One BYTES element as bytes: bytes over gRPC, text over REST (KServe decodes it as UTF-8)."""
    if isinstance(element, bytes):
        return element
    if isinstance(element, str):
        return element.encode("utf-8")
    raise InvalidInput(f"input '{name}': element of type {type(element).__name__} is not BYTES")


def _image_bytes(data: bytes) -> tuple[bytes, str] | None:
    """The encoded image and its MIME type, sent raw or base64. Raw is tried first, unambiguously:
    base64 of these formats begins "iVBOR", "/9j/", "R0lGOD" or "UklGR", never a raw signature."""
    mime = _sniff_mime(data)
    if mime is not None:
        return data, mime
    try:
        decoded = base64.b64decode(data, validate=True)
    except binascii.Error:
        return None
    mime = _sniff_mime(decoded)
    return (decoded, mime) if mime is not None else None


def _tensor(request: InferRequest, name: str, rank: int) -> np.ndarray:
    tensor = next(infer_input for infer_input in request.inputs if infer_input.name == name)
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"input '{name}' must have datatype BYTES, got {tensor.datatype}")
    if len(tensor.shape) != rank:
        raise InvalidInput(f"input '{name}' must have rank {rank}, got shape {list(tensor.shape)}")
    try:
        return tensor.as_numpy()
    except ValueError as error:  # numpy cannot reshape the data to the declared shape
        raise InvalidInput(f"input '{name}': data does not match shape {list(tensor.shape)} ({error})") from error


def _texts(array: np.ndarray, name: str, limits: RequestLimits) -> list[str]:
    texts = []
    for row, element in enumerate(array):
        data = _as_bytes(element, name)
        if len(data) > limits.max_text_bytes:
            raise InvalidInput(
                f"input '{name}'[{row}] is {len(data)} bytes, above the limit of {limits.max_text_bytes}"
            )
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise InvalidInput(f"input '{name}'[{row}] is not valid UTF-8 ({error.reason})") from error
    return texts


def _images(array: np.ndarray, limits: RequestLimits) -> list[list[Image.Image]]:
    rows = []
    for row, elements in enumerate(array):
        present = [(column, data) for column, data in enumerate(_as_bytes(e, "images") for e in elements) if data]
        # Counted before any decoding, so an oversized row costs nothing.
        if len(present) > limits.max_images_per_row:
            raise InvalidInput(
                f"input 'images'[{row}] holds {len(present)} images, above the limit of {limits.max_images_per_row}"
            )
        images = []
        for column, data in present:
            image = _image_bytes(data)
            if image is None:
                raise InvalidInput(
                    f"input 'images'[{row}][{column}] is not a PNG, JPEG, WEBP or GIF image, raw or base64"
                )
            try:
                images.append(decode_image(*image, limits.image))
            except InvalidImage as error:
                raise InvalidInput(f"input 'images'[{row}][{column}] {error}") from error
        rows.append(images)
    return rows


def parse_request(request: InferRequest, limits: RequestLimits) -> ScoreBatch:
    """Validates an OIP v2 request against the contract; every refusal names the input at fault."""
    names = [infer_input.name for infer_input in request.inputs]
    expected = [spec["name"] for spec in INPUTS]
    for name in expected:
        if names.count(name) != 1:
            problem = "missing" if name not in names else "given more than once"
            raise InvalidInput(f"input '{name}' is {problem}; the reward model expects inputs {expected}")
    unexpected = sorted(set(names) - set(expected))
    if unexpected:
        raise InvalidInput(f"unexpected inputs {unexpected}; the reward model expects inputs {expected}")

    prompt = _tensor(request, "prompt", rank=1)
    response = _tensor(request, "response", rank=1)
    images = _tensor(request, "images", rank=2)
    batch_size = prompt.shape[0]
    if batch_size == 0:
        raise InvalidInput("input 'prompt' is empty; send at least one row")
    if batch_size > limits.max_batch_size:
        raise InvalidInput(f"input 'prompt' has {batch_size} rows, above the limit of {limits.max_batch_size}")
    for name, array in (("response", response), ("images", images)):
        if array.shape[0] != batch_size:
            raise InvalidInput(f"input '{name}' has {array.shape[0]} rows but input 'prompt' has {batch_size}")
    return ScoreBatch(
        prompts=_texts(prompt, "prompt", limits),
        images=_images(images, limits),
        responses=_texts(response, "response", limits),
    )


def verified_version(model_dir: Path | None, seed: int, expected: str | None = None, fetched: bool = False) -> str:
    """The version label of a folder about to be loaded.

    A model-store version (it has a manifest) is verified file by file first, unless `fetched` says
    modelstore.fetch just did, and must be a reward model; a bare folder from RewardModel.save is
    named by its folder. With `expected` (a published version), the manifest is required and must
    name that version.
    """
    if model_dir is None:
        return f"default-seed{seed}"
    if not (model_dir / MANIFEST).is_file():
        if expected is not None:
            raise ChecksumMismatch(f"{model_dir} has no {MANIFEST}: reward version {expected} cannot be verified")
        return model_dir.name
    manifest = read_manifest(model_dir) if fetched else verify(model_dir)
    if manifest.kind != "reward":
        raise ValueError(f"{model_dir} holds a {manifest.kind!r} model, not a reward model")
    if expected is not None and manifest.version != expected:
        raise ValueError(f"{model_dir} holds reward version {manifest.version!r}, not {expected!r}")
    return manifest.version


def published_reward_uri(event: events_pb2.PolicyVersionPublished) -> str:
    """The URI of the reward version an event names: <store>/reward/<rN>, beside <store>/policy/<vN> (its uri)."""
    version = event.reward_model_version
    if not _VERSION_NAME.match(version):
        raise ValueError(f"policy {event.version}: reward_model_version {version!r} is not a version name")
    return sibling_uri(event.uri, "reward", version)


class RewardKServeModel(kserve.Model):
    """Scores (prompt, images, response) rows with the current reward model; load() hot-swaps it."""

    def __init__(
        self,
        name: str,
        model_dir: Path | None,
        seed: int = 0,
        device: str = "cpu",
        limits: RequestLimits = RequestLimits(),
        s3: S3Config = S3Config(),
    ) -> None:
        super().__init__(name)
        self.limits = limits
        self._s3 = s3
        self._model_dir = model_dir
        self._seed = seed
        self._device = device
        self._served: _LoadedRewardModel | None = None
        self._load_lock = threading.Lock()

    @property
    def version(self) -> str | None:
        """The version being served; None before the first load."""
        served = self._served
        return served.version if served is not None else None

    def load(self, model_dir: Path | str | None = None, expected_version: str | None = None) -> bool:
        """Loads `model_dir` (or the folder given at construction) and swaps it in atomically; a str
        is the URI of a published version, fetched (a verified local copy) first.

        The new model is fully built before the swap, so requests keep being served by the old one
        meanwhile; a failed load (a checksum that differs from the manifest included) raises and
        leaves the old model serving. `expected_version`: see verified_version.
        """
        try:
            if isinstance(model_dir, str):
                self._load(fetch(model_dir, self._s3), expected_version, fetched=True)
            else:
                self._load(model_dir, expected_version)
        except Exception:
            MODEL_LOADS.labels(outcome="failed").inc()
            raise
        MODEL_LOADS.labels(outcome="loaded").inc()
        return self.ready

    def load_published(self, event: events_pb2.PolicyVersionPublished) -> None:
        """Serves the reward model a PolicyVersionPublished event names; the version follower's callback.

        Runs on the follower's thread. An event without a reward model, or naming the version already
        served, changes nothing; one that fails to verify or load raises (the follower logs it and
        goes on) and the current model keeps serving.
        """
        if not event.reward_model_version:
            logger.info("policy %s names no reward model; still serving %s", event.version, self.version)
            return
        if event.reward_model_version == self.version:
            return
        self.load(published_reward_uri(event), expected_version=event.reward_model_version)

    def _load(self, model_dir: Path | None, expected_version: str | None, fetched: bool = False) -> None:
        with self._load_lock:
            folder = model_dir if model_dir is not None else self._model_dir
            version = verified_version(folder, self._seed, expected_version, fetched)
            reward = RewardModel.load(folder) if folder is not None else build_default_reward_model(self._seed)
            served = _LoadedRewardModel(reward=reward.to(self._device), version=version)
            previous, self._served = self._served, served
            self._model_dir = folder
            if previous is not None:
                MODEL_INFO.remove(previous.version)
            MODEL_INFO.labels(version=served.version).set(1)
            self.ready = True
            # KServe's logger: KServe configures it when the ModelServer is built; one of ours would stay silent.
            logger.info(
                "serving reward model version %s%s",
                served.version, f" (was {previous.version})" if previous is not None else "",
            )

    def get_input_types(self) -> list[dict]:
        return INPUTS

    def get_output_types(self) -> list[dict]:
        return OUTPUTS

    async def predict(
        self,
        payload: InferRequest | dict,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> InferResponse:
        if not isinstance(payload, InferRequest):
            raise InvalidInput("the reward model speaks the Open Inference Protocol v2 only (/v2/models/.../infer)")
        # Decoding images and the forward pass are CPU-bound: off the event loop, so health checks
        # and /metrics stay responsive while a batch is scored.
        return await asyncio.get_running_loop().run_in_executor(None, self._infer, payload)

    def _infer(self, request: InferRequest) -> InferResponse:
        batch = parse_request(request, self.limits)
        served = self._served
        try:
            scores = served.reward.score(batch.prompts, batch.images, batch.responses)
        except UnscorableText as error:
            raise InvalidInput(f"inputs 'prompt'/'response': {error}") from error
        SCORED.inc(len(batch.responses))
        output = InferOutput(name="score", shape=[len(batch.responses)], datatype="FP32")
        # As a list, not an ndarray: InferResponse.to_grpc tests `output.data` for truth, which an
        # ndarray refuses; to_rest and to_grpc re-encode the list as binary when the client asked.
        output.set_data_from_numpy(scores.float().cpu().numpy(), binary_data=False)
        return InferResponse(
            # tritonclient.http answers 500 to a response without an id.
            response_id=request.id or str(uuid.uuid4()),
            model_name=self.name,
            model_version=served.version,
            infer_outputs=[output],
            use_binary_outputs=request.use_binary_outputs,
            requested_outputs=request.request_outputs,
        )


class _BoundGRPCServer(GRPCServer):
    """kserve's GRPCServer.start with the listen host as a parameter instead of "[::]"."""

    def __init__(self, host: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._host = host

    async def start(self, max_workers: int) -> None:
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()),
            options=[
                ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_LENGTH),
                ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_LENGTH),
            ],
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self._data_plane, self._model_repository_extension), self._server
        )
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._server.add_insecure_port(f"{host}:{self._port}")
        logger.info("gRPC server listening on %s:%d", host, self._port)
        await self._server.start()
        await self._server.wait_for_termination()


class BoundModelServer(kserve.ModelServer):
    """A single-worker kserve.ModelServer whose REST and gRPC listeners bind `host`."""

    def __init__(self, host: str, **kwargs: Any) -> None:
        super().__init__(workers=1, **kwargs)
        self.host = host

    def start(self, models: list[kserve.Model]) -> None:
        # Mirrors ModelServer.start for workers=1 (kserve==0.21.0 is pinned), changing only the hosts.
        self._register_and_check_atleast_one_model_is_ready(models)
        self._rest_server = RESTServer(
            FASTAPI_APP_IMPORT_STRING,
            self.dataplane,
            self.model_repository_extension,
            self.http_port,
            access_log_format=self.access_log_format,
            workers=1,
            grace_period=self.grace_period,
            event_loop=self.event_loop,
            timeout_keep_alive=self.timeout_keep_alive,
            ssl_certfile=self.ssl_certfile,
            ssl_keyfile=self.ssl_keyfile,
        )
        # uvicorn reads Config.host only when it binds, inside serve(), so setting it here suffices.
        self._rest_server.config.host = self.host
        self.servers.append(self._rest_server.start())
        if self.enable_grpc:
            self._grpc_server = _BoundGRPCServer(
                self.host,
                self.grpc_port,
                self.dataplane,
                self.model_repository_extension,
                kwargs={},
                grace_period=self.grace_period,
            )
            self.servers.append(self._grpc_server.start(self.max_threads))
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())


@dataclass(frozen=True)
class RewardServerConfig:
    """Serve the reward model over the Open Inference Protocol v2 (REST and gRPC)."""

    model_dir: Path | None = None
    """Reward model folder written by RewardModel.save; unset: a fresh model seeded with --seed."""
    model_name: str = "reward"
    """Model name on the v2 endpoints (/v2/models/NAME/infer, gRPC model_name)."""
    host: str = "127.0.0.1"
    """Listen address of both REST and gRPC; 0.0.0.0 in a pod."""
    http_port: int = 8080
    grpc_port: int = 8081
    seed: int = 0
    """Seed of the fresh model when no model_dir is given."""
    device: str = "cpu"
    """Torch device of the model: cpu, cuda, cuda:1, ..."""
    torch_threads: int = 1
    """Intra-op threads; more threads than cores made small-CPU forwards several times slower."""
    grace_period: int = 10
    """Seconds in-flight gRPC requests get to finish on SIGTERM."""
    limits: RequestLimits = RequestLimits()
    follow_versions: bool = False
    """Load each reward model the trainer publishes (the reward_model_version of every event on the
    policy-versions topic), verified by checksum, without failing in-flight requests; at start-up the
    newest published one replaces --model-dir. Off by default, unlike the policy service: scoring needs
    no broker, so a standalone `modalign reward` (or one pinned to --model-dir) runs without Kafka.
    Turn it on wherever a trainer publishes (`modalign up`, a cluster: MODALIGN_FOLLOW_VERSIONS=true);
    on, the service needs Kafka (--kafka.*) to start."""
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    """The broker and topic prefix of policy-versions; used only with --follow-versions."""
    s3: S3Config = field(default_factory=S3Config)
    """How to reach the model store when the trainer publishes to S3; used only with --follow-versions."""


def _log_like_kserve() -> None:
    """Shows modalign's own loggers (the version follower's) in KServe's format; KServe configures only its own."""
    modalign_logger = logging.getLogger("modalign")
    if modalign_logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(KSERVE_LOGGER_FORMAT, KSERVE_LOGGER_DATE_FORMAT))
    modalign_logger.addHandler(handler)
    modalign_logger.setLevel(logging.INFO)
    modalign_logger.propagate = False


def serve(config: RewardServerConfig) -> None:
    """Loads the model and serves it until SIGTERM/SIGINT; must run on the main thread (KServe's signals).

    With follow_versions, the follower starts before the listeners: the service reports ready only
    once the newest published reward model (if any) is the one served.
    """
    torch.set_num_threads(config.torch_threads)
    # The server first: constructing it configures KServe's logging, so the load is logged too.
    server = BoundModelServer(
        host=config.host, http_port=config.http_port, grpc_port=config.grpc_port, grace_period=config.grace_period
    )
    _log_like_kserve()
    model = RewardKServeModel(
        config.model_name, config.model_dir, seed=config.seed, device=config.device, limits=config.limits,
        s3=config.s3,
    )
    # Loaded even when a published version will replace it: if that one fails verification, this serves.
    model.load()
    follower = None
    if config.follow_versions:
        ensure_topics(config.kafka)
        follower = follow_newest_version(config.kafka, model.load_published)
        follower.start()
    try:
        server.start([model])
    finally:
        if follower is not None:
            follower.stop()


def main(argv: list[str] | None = None) -> None:
    serve(parse_config(RewardServerConfig, argv))
    # Served, drained and stopped. What remains is the interpreter tearing down torch's, transformers'
    # and kserve's module graph, measured at 4-5 s here for nothing; a stop (a pod rollout, a test)
    # need not wait for it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
