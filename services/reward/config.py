"""The reward service's settings, in a module of their own: whoever starts the service (modalign up,
the tests) builds this config without importing kserve and torch, which the server needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from modalign.core.audio import AudioLimits
from modalign.core.auth import AuthConfig
from modalign.core.broker import port_open
from modalign.core.config import DTYPES, ConfigError, require_one_of
from modalign.core.images import ImageLimits
from modalign.core.kafka import KafkaConfig
from modalign.core.modelstore import DEFAULT_MODEL_STORE, S3Config
from modalign.core.processes import http_ok
from modalign.core.service import CannotStart, ServiceConfig, loopback
from modalign.core.tls import TlsConfig

FOLLOW_MODES = ("latest", "none")
BACKBONES = ("generative", "clip")
"""The reward model's backbones (reward/backbones.py), here so that configs name them without importing torch."""


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on one request, so a single client cannot make a forward pass arbitrarily expensive."""

    max_batch_size: int = 64
    """Most rows in one request."""
    max_images_per_row: int = 8
    """Most non-empty images in one row."""
    max_text_bytes: int = 32 * 1024
    """Largest prompt or response, in UTF-8 bytes."""
    max_conversation_bytes: int = 256 * 1024
    """Largest conversation (its JSON), in UTF-8 bytes."""
    image: ImageLimits = ImageLimits()
    """Bounds on each image."""
    max_audio_per_row: int = 2
    """Most non-empty audio clips in one row."""
    audio: AudioLimits = AudioLimits()
    """Bounds on each audio clip."""


@dataclass(frozen=True)
class RewardServerConfig(ServiceConfig):
    """Serve the reward model over the Open Inference Protocol v2 (REST and gRPC); its Prometheus
    /metrics are on the REST port, where KServe serves them."""

    command: ClassVar[str] = "reward"
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    """The broker and topic prefix of policy-versions; used only with --follow latest."""
    model_dir: Path | None = None
    """Reward model folder written by RewardModel.save; unset: a fresh model seeded with --seed."""
    model_name: str = "reward"
    """Model name on the v2 endpoints (/v2/models/NAME/infer, gRPC model_name)."""
    host: str = "127.0.0.1"
    """Listen address of both REST and gRPC; 0.0.0.0 in a pod."""
    http_port: int = 8080
    """Port of the REST endpoints (/v2/..., /metrics)."""
    grpc_port: int = 8081
    """Port of the gRPC endpoint (inference.GRPCInferenceService)."""
    seed: int = 0
    """Seed of the fresh model when no model_dir is given."""
    backbone: str = "generative"
    """Backbone of the fresh model when no model_dir is given: "generative" or "clip" (on the default
    policy); a saved reward model (--model-dir, or a published version) records its own."""
    device: str = "cpu"
    """Torch device of the model: cpu, cuda, cuda:1, ..."""
    dtype: str = "float32"
    """Precision of the served weights: float32, bfloat16 or float16 (every version is loaded in it)."""
    torch_threads: int = 1
    """Intra-op threads; more threads than cores made small-CPU forwards several times slower."""
    grace_period: int = 10
    """Seconds in-flight gRPC requests get to finish on SIGTERM."""
    limits: RequestLimits = RequestLimits()
    """Bounds on one request."""
    max_batch_rows: int = 64
    """Rows of concurrent requests scored together in one forward pass at most (a larger request runs alone)."""
    max_batch_wait_ms: float = 2.0
    """How long the oldest waiting request waits for others to share its forward pass."""
    follow: str = "none"
    """Which versions to serve. "latest": each reward model the trainer publishes (the
    reward_model_version of every event on the policy-versions topic), verified by checksum, loaded
    without failing in-flight requests; at start-up the newest published one replaces --model-dir.
    "none": only --model-dir. None by default, unlike the policy service: scoring needs no broker, so a
    standalone `modalign reward` (or one pinned to --model-dir) runs without Kafka. Use latest wherever
    a trainer publishes (`modalign up`, a cluster: MODALIGN_FOLLOW=latest); then the service needs
    Kafka (--kafka.*) to start."""
    model_store: str = DEFAULT_MODEL_STORE
    """The model store the trainer publishes to (its --model-store): with --follow latest, a published
    reward model is loaded only from there, and one whose URI points anywhere else is refused."""
    s3: S3Config = field(default_factory=S3Config)
    """How to reach the model store when the trainer publishes to S3; used only with --follow latest."""
    tls: TlsConfig = field(default_factory=TlsConfig)
    """TLS (and mutual TLS) on the REST and gRPC listeners; plaintext when no certificate is given."""
    auth: AuthConfig = field(default_factory=AuthConfig)
    """How callers authenticate: scoring needs the client or reader role, loading models the operator
    role; health, readiness, metadata and /metrics are open. Required unless --auth.insecure."""

    def validate(self) -> None:
        super().validate()
        require_one_of("follow", self.follow, FOLLOW_MODES)
        require_one_of("dtype", self.dtype, DTYPES)
        require_one_of("backbone", self.backbone, BACKBONES)
        if self.max_batch_rows < 1:
            raise ConfigError("max_batch_rows", f"at least 1, got {self.max_batch_rows}")

    @property
    def url(self) -> str:
        """Where a client on this machine reaches the REST endpoints."""
        return f"{'https' if self.tls.enabled else 'http'}://{loopback(self.host)}:{self.http_port}"

    def check_start(self) -> None:
        if why := self.auth.missing():
            raise CannotStart(why)

    def ready(self) -> bool:
        if self.tls.enabled:  # this machine may hold no certificate the server accepts (mutual TLS)
            return port_open(loopback(self.host), self.http_port)
        return http_ok(f"{self.url}/v2/health/ready")
