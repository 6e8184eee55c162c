"""The reward service: the reward model behind KServe's Open Inference Protocol v2 (REST and gRPC).

The request contract is in contract.py, the listeners' start-up in kserve_server.py, the settings in
config.py; this module holds the model being served and the service around it.

New versions: with --follow latest (and --kafka.* pointing at the broker) a daemon thread tails the
policy-versions topic (modalign.core.versions.follow_newest_version) and loads the reward model each
PolicyVersionPublished event names (reward_model_version, in the same model store as the policy
folder of its uri): verified file by file against its manifest first, then built beside the serving
model and swapped in as one reference, so in-flight requests finish on the old model and no request
fails. A version that fails verification or loading is refused (counted in
modalign_reward_model_loads_total{outcome="failed"}) and the previous one keeps serving.
modalign_reward_model_info{version} names the version being served.

Command line: kserve.model_server parses sys.argv with parse_known_args when it is imported, for the
defaults of its own flags (--http_port, --model_name, ...). Our flags come from RewardServerConfig via
modalign.core.config and are spelled with hyphens or dots (--http-port, --limits.max-batch-size),
which are neither kserve flags nor prefixes of one, so that parse ignores them; serve() passes the
ports, host, workers and grace period to ModelServer explicitly. Each flag is also an environment
variable (MODALIGN_HTTP_PORT, ...).

Run: modalign reward --http-port 8080 --grpc-port 8081 [--model-dir PATH]
     [--follow latest --kafka.bootstrap-servers HOST:PORT --kafka.topic-prefix PREFIX]
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import kserve
import torch
from kserve.errors import InvalidInput
from kserve.logging import logger
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from prometheus_client import Counter, Gauge, Histogram

from modalign.core.auth import Authenticator
from modalign.core.kafka import ensure_topics
from modalign.core.modelstore import (
    DEFAULT_MODEL_STORE,
    MANIFEST,
    VERSION_NAME,
    ChecksumMismatch,
    S3Config,
    fetch,
    fetch_published,
    read_manifest,
    sibling_uri,
    verify,
)
from modalign.core.service import run_service
from modalign.core.versions import follow_newest_version
from modalign.policy.families import audio_sampling_rate
from modalign.reward.backbones import AnyRewardModel, build_default_reward_model, load_reward_model
from modalign.reward.batching import ScoringBatcher
from modalign.reward.config import RequestLimits, RewardServerConfig
from modalign.reward.contract import INPUTS, OUTPUTS, ScoreBatch, parse_request
from modalign.reward.kserve_server import BoundModelServer
from modalign.reward.model import UnscorableText
from modalign.v1 import events_pb2

# Defined once per process: prometheus_client's default registry is what KServe's /metrics serves.
SCORED = Counter("modalign_reward_scored_total", "Responses scored by the reward model.")
BATCH_ROWS = Histogram(
    "modalign_reward_batch_rows", "Rows of concurrent requests scored together in one forward pass.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
MODEL_INFO = Gauge("modalign_reward_model_info", "1 for the reward model version being served.", ["version"])
MODEL_LOADS = Counter(
    "modalign_reward_model_loads",
    "Reward model loads, by outcome: loaded, or failed (the previous model keeps serving).",
    ["outcome"],
)


@dataclass(frozen=True)
class _LoadedRewardModel:
    """The model and its version, swapped as one reference so a request never mixes two versions."""

    reward: AnyRewardModel
    version: str


def verified_version(model_dir: Path | None, fresh_name: str, expected: str | None = None, fetched: bool = False) -> str:
    """The version label of a folder about to be loaded.

    A model-store version (it has a manifest) is verified file by file first, unless `fetched` says
    modelstore.fetch just did, and must be a reward model; a bare folder (a reward model's save())
    is named by its folder; no folder (a fresh model) is named fresh_name. With `expected` (a
    published version), the manifest is required and must name that version.
    """
    if model_dir is None:
        return fresh_name
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
    if not VERSION_NAME.match(version):
        raise ValueError(f"policy {event.version}: reward_model_version {version!r} is not a version name")
    return sibling_uri(event.uri, "reward", version)


class RewardKServeModel(kserve.Model):
    """Scores (prompt, images, response) rows with the current reward model; load() hot-swaps it."""

    def __init__(
        self,
        name: str,
        model_dir: Path | None,
        seed: int = 0,
        backbone: str = "generative",
        device: str = "cpu",
        dtype: str = "float32",
        limits: RequestLimits | None = None,
        s3: S3Config = S3Config(),
        store: str = DEFAULT_MODEL_STORE,
        max_batch_rows: int = 64,
        max_batch_wait_ms: float = 2.0,
    ) -> None:
        super().__init__(name)
        self.limits = limits if limits is not None else RequestLimits()
        self._s3 = s3
        self._store = store
        self._model_dir = model_dir
        self._seed = seed
        self._backbone = backbone
        self._device = device
        self._dtype = getattr(torch, dtype)
        self._served: _LoadedRewardModel | None = None
        self._load_lock = threading.Lock()
        self._batcher = ScoringBatcher(self._score, max_batch_rows, max_batch_wait_ms, on_batch=BATCH_ROWS.observe)

    def close(self) -> None:
        """Scores the requests waiting, then stops the batcher's worker."""
        self._batcher.close()

    @property
    def version(self) -> str | None:
        """The version being served; None before the first load."""
        served = self._served
        return served.version if served is not None else None

    def load(self, model_dir: Path | str | None = None, expected_version: str | None = None,
             published: bool = False) -> bool:
        """Loads `model_dir` (or the folder given at construction) and swaps it in atomically; a str
        is the URI of a version, fetched (a verified local copy) first: when published (read from the
        policy-versions topic), only from the configured model store (OutsideStore otherwise).

        The new model is fully built before the swap, so requests keep being served by the old one
        meanwhile; a failed load (a checksum that differs from the manifest included) raises and
        leaves the old model serving. `expected_version`: see verified_version.
        """
        try:
            if isinstance(model_dir, str):
                folder = fetch_published(model_dir, self._store, self._s3) if published else fetch(model_dir, self._s3)
                self._load(folder, expected_version, fetched=True)
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
        self.load(published_reward_uri(event), expected_version=event.reward_model_version, published=True)

    def _load(self, model_dir: Path | None, expected_version: str | None, fetched: bool = False) -> None:
        with self._load_lock:
            folder = model_dir if model_dir is not None else self._model_dir
            fresh_name = f"default-seed{self._seed}" + ("" if self._backbone == "generative" else f"-{self._backbone}")
            version = verified_version(folder, fresh_name, expected_version, fetched)
            reward = load_reward_model(folder) if folder is not None else build_default_reward_model(self._seed, self._backbone)
            served = _LoadedRewardModel(reward=reward.to(self._device, self._dtype), version=version)
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

    @property
    def _sampling_rate(self) -> int | None:
        """The audio sampling rate of the model served: None when it takes no audio (or none is loaded yet)."""
        served = self._served
        processor = getattr(served.reward, "processor", None) if served is not None else None
        return audio_sampling_rate(processor) if processor is not None else None

    def _score(self, batch: ScoreBatch) -> tuple[torch.Tensor, str]:
        """The batcher's forward pass: one snapshot of the model served, so a reload never splits it."""
        served = self._served
        assert served is not None, "load() runs before the server starts"
        return served.reward.score(batch.prompts, batch.images, batch.responses, batch.audio), served.version

    def _infer(self, request: InferRequest) -> InferResponse:
        batch = parse_request(request, self.limits, self._sampling_rate)
        try:
            scores, version = self._batcher.submit(batch).result()
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
            model_version=version,
            infer_outputs=[output],
            use_binary_outputs=request.use_binary_outputs,
            requested_outputs=request.request_outputs,
        )


def serve(config: RewardServerConfig) -> None:
    """Loads the model and serves it until SIGTERM/SIGINT; must run on the main thread (KServe's signals).

    With --follow latest, the follower starts before the listeners: the service reports ready only
    once the newest published reward model (if any) is the one served.
    """
    torch.set_num_threads(config.torch_threads)
    # The server first: constructing it configures KServe's logging, so the load is logged too.
    server = BoundModelServer(
        host=config.host, tls=config.tls, authenticator=Authenticator(config.auth), http_port=config.http_port,
        grpc_port=config.grpc_port, grace_period=config.grace_period,
    )
    model = RewardKServeModel(
        config.model_name, config.model_dir, seed=config.seed, backbone=config.backbone, device=config.device, dtype=config.dtype,
        limits=config.limits, s3=config.s3, store=config.model_store,
        max_batch_rows=config.max_batch_rows, max_batch_wait_ms=config.max_batch_wait_ms,
    )
    # Loaded even when a published version will replace it: if that one fails verification, this serves.
    model.load()
    follower = None
    if config.follow == "latest":
        ensure_topics(config.kafka)
        follower = follow_newest_version(config.kafka, model.load_published)
        follower.start()
    try:
        server.start([model])
    finally:
        if follower is not None:
            follower.stop()
        model.close()


def main(argv: list[str] | None = None) -> None:
    run_service(RewardServerConfig, serve, argv)


if __name__ == "__main__":
    main()
