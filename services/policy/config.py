"""The policy service's settings, in a module of their own: whoever starts the service (modalign up,
the tests) builds this config without importing torch and transformers, which the server needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from modalign.core.config import DTYPES, ConfigError, require_one_of
from modalign.core.grpc_server import GrpcLimits
from modalign.core.images import ImageLimits
from modalign.core.modelstore import DEFAULT_MODEL_STORE, S3Config
from modalign.core.ratelimit import RateLimit
from modalign.core.service import GrpcServiceConfig, loopback
from modalign.core.tls import ClientTls
from modalign.core.version_names import STARTING_VERSION

# The topics each --follow mode reads.
FOLLOW_MODES = {"rollout": ["policy-versions", "rollout"], "latest": ["policy-versions"], "none": []}


@dataclass(frozen=True)
class PolicyConfig(GrpcServiceConfig):
    """The policy service."""

    command: ClassVar[str] = "policy"
    listen: str = "127.0.0.1:50051"
    metrics_port: int = 9101
    grpc: GrpcLimits = field(default_factory=lambda: GrpcLimits(
        max_workers=64, max_concurrent_rpcs=128, max_message_mib=88.0))
    """What the gRPC server takes on at once. Each Generate holds a thread while it waits on its batch,
    so max_workers bounds the requests being generated; a request may carry max_images images of
    image_max_bytes each and max_audio clips of audio_max_bytes, which max_message_mib must hold."""
    http_listen: str = ""
    """Address of the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models), host:port; empty
    (the default) serves none. modalign up and the chart turn it on. HTTPS with the gRPC listener's
    --tls.cert and --tls.key when given."""
    model_name: str = "modalign"
    """The model's name on the HTTP API (the `model` of /v1/models and of every completion)."""
    http_image_url_prefixes: tuple[str, ...] = ()
    """URL prefixes (e.g. https://images.example.com/) under which the HTTP API fetches a message's
    remote image_url; none by default: every remote URL is refused, and clients send data: URLs."""
    feedback_address: str = ""
    """The FeedbackService (host:port) that the HTTP API's POST /v1/feedback forwards to, so a web front
    end needs no gRPC; empty: /v1/feedback answers 404."""
    feedback_tls: ClientTls = field(default_factory=ClientTls)
    """How the HTTP API reaches the FeedbackService, when that serves TLS."""
    model_dir: str = ""
    """Folder of a Hugging Face image-text-to-text checkpoint, or the URI of a published version
    (file://... or s3://..., loaded verified; the rollout controller names one on a KServe revision);
    empty builds the small default policy."""
    policy_version: str = STARTING_VERSION
    """The version name of the model loaded at start-up (model_dir, or the default policy)."""
    follow: str = "rollout"
    """Which versions to serve. "rollout": stable and canary as the rollout controller sets them (the
    rollout topic), loading each published version, verified by checksum, when it is routed to.
    "latest": every version the trainer publishes, at once, for development without a controller.
    "none": only the model loaded at start-up (e.g. under a KServe InferenceService, which splits
    traffic itself)."""
    seed: int = 0
    """Seed of the default policy's random initialisation (when model_dir is empty)."""
    device: str = "cpu"
    """Torch device for the model, e.g. "cuda" or "cuda:1"."""
    dtype: str = "float32"
    """Precision of the served weights: float32, bfloat16 or float16 (every version is loaded in it)."""
    blob_dir: Path = Path.home() / ".local" / "share" / "modalign" / "blobs"
    """Content-addressed image store shared with the trainer and reward service."""
    model_store: str = DEFAULT_MODEL_STORE
    """The model store the trainer publishes to (its --model-store: a folder or s3://bucket/prefix):
    a published version is loaded only from there, and one whose URI points anywhere else is refused."""
    s3: S3Config = field(default_factory=S3Config)
    """How to reach the model store when the trainer publishes to S3."""
    max_batch_rows: int = 32
    """Most sequences decoded together; requests join a running batch between its steps up to this."""
    max_batch_tokens: int = 65536
    """Cache positions a running batch may reserve, each candidate its prompt plus its max_new_tokens
    (a bound on the KV cache's memory); a request that would pass it waits, one larger than it runs alone."""
    max_batch_wait_ms: float = 5.0
    """How long the first queued request waits for company before a batch starts (later ones join it)."""
    default_max_new_tokens: int = 64
    """Tokens sampled per candidate when a request sets no sampling.max_new_tokens."""
    max_new_tokens_limit: int = 512
    """Largest sampling.max_new_tokens a request may ask for."""
    max_candidates: int = 8
    """Most candidates (n) one request may ask for."""
    max_images: int = 8
    """Most images in one request (over all turns of a conversation)."""
    max_text_bytes: int = 8192
    """Longest request text (each text part of a conversation), in UTF-8 bytes."""
    max_turns: int = 32
    """Most turns in one conversation, a system turn included."""
    image_max_bytes: int = ImageLimits.max_bytes
    """Largest encoded image accepted."""
    image_max_pixels: int = ImageLimits.max_pixels
    """Most pixels (width x height) of a decoded image."""
    max_audio: int = 2
    """Most audio clips (spoken parts) in one request, over all turns; only a model that takes audio
    accepts any."""
    audio_max_bytes: int = 8 * 1024 * 1024
    """Largest encoded audio clip accepted."""
    audio_max_seconds: float = 30.0
    """Longest audio clip accepted, read from its header before it is decoded."""
    max_pending_rows: int = 512
    """Candidates allowed to queue for a batch; past this, requests get RESOURCE_EXHAUSTED."""
    head_to_head_percent: int = 50
    """Share, in percent, of the canary's requests with n >= 2 that are head-to-head while a canary rolls
    out: half their candidates (rounded up) from one of canary and stable, the rest from the other, in
    random order, each logged with its version. A user's preference between them is direct evidence of
    which version users prefer (docs/rollout.md); only sessions routed to the canary see them, so no
    more users see the canary than its weight says. 0 turns it off."""
    user_rate_limit: RateLimit = field(default_factory=RateLimit)
    """Generate calls (gRPC and HTTP together) one end user may make; past it, RESOURCE_EXHAUSTED (HTTP
    429) saying when to retry. Calls that name no user are not limited per user."""

    def validate(self) -> None:
        if not 0 <= self.head_to_head_percent <= 100:
            raise ConfigError("head_to_head_percent", f"a percentage in [0, 100], got {self.head_to_head_percent}")
        super().validate()
        require_one_of("follow", self.follow, FOLLOW_MODES)
        require_one_of("dtype", self.dtype, DTYPES)
        for name in ("max_batch_rows", "max_batch_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"at least 1, got {getattr(self, name)}")
        if self.http_listen:
            host, _, port = self.http_listen.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError("http_listen", f"host:port, got {self.http_listen!r}")
        largest_request = (self.max_images * self.image_max_bytes + self.max_audio * self.audio_max_bytes
                           + self.max_turns * self.max_text_bytes)
        if self.grpc.max_message_bytes < largest_request:
            raise ConfigError("grpc.max_message_mib", f"{self.grpc.max_message_mib} MiB cannot hold a request of "
                              f"max_images images of image_max_bytes, max_audio clips of audio_max_bytes and "
                              f"max_turns texts ({largest_request} bytes)")

    @property
    def http_url(self) -> str:
        """Where a client on this machine reaches the HTTP API's /v1 (empty when it is off)."""
        if not self.http_listen:
            return ""
        host, _, port = self.http_listen.rpartition(":")
        scheme = "https" if self.tls.enabled else "http"
        return f"{scheme}://{loopback(host)}:{port}/v1"
