"""`modalign up`: the broker and every service on loopback, with embedded defaults, until Ctrl-C."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import os
import secrets
import signal
import threading
import time
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from modalign.core.auth import CLIENT, READER, ROLES, AuthConfig, ClientAuth
from modalign.core.broker import BrokerConfig
from modalign.core.config import FLATTEN, ConfigError, parse_config, with_overrides
from modalign.core.grpc_server import dial
from modalign.core.kafka import KafkaConfig
from modalign.core.launch import LocalSystem, on_broker
from modalign.core.service import ServiceConfig
from modalign.feedback.server import FeedbackConfig
from modalign.policy.config import PolicyConfig
from modalign.reward.config import RewardServerConfig
from modalign.rollout.server import RolloutConfig
from modalign.trainer.service import TrainerConfig
from modalign.v1 import common_pb2, feedback_pb2, feedback_pb2_grpc, policy_pb2, policy_pb2_grpc


@dataclass(frozen=True)
class LocalPorts:
    """Where the local services listen on 127.0.0.1: consecutive ports from two bases."""

    grpc_base: int = 50051
    """policy gRPC, feedback gRPC, reward REST, reward gRPC, rollout gRPC, policy HTTP (the OpenAI-compatible
    API), in that order."""
    metrics_base: int = 9101
    """Prometheus /metrics of policy, feedback, (reward serves its own on REST), trainer, rollout."""

    @property
    def policy(self) -> str:
        return f"127.0.0.1:{self.grpc_base}"

    @property
    def feedback(self) -> str:
        return f"127.0.0.1:{self.grpc_base + 1}"

    @property
    def reward_http(self) -> int:
        return self.grpc_base + 2

    @property
    def reward_grpc(self) -> int:
        return self.grpc_base + 3

    @property
    def rollout(self) -> str:
        return f"127.0.0.1:{self.grpc_base + 4}"

    @property
    def policy_http(self) -> str:
        return f"127.0.0.1:{self.grpc_base + 5}"

    def metrics(self, index: int) -> int:
        return self.metrics_base + index


@dataclass(frozen=True)
class UpConfig:
    """Start the broker and every service on loopback, with embedded defaults, until Ctrl-C."""

    broker: BrokerConfig = field(default_factory=BrokerConfig, metadata=FLATTEN)
    """The local broker: used if running, else started, and stopped again at the end."""
    example: bool = False
    """Once up, make example client calls: a chat completion over HTTP, then gRPC Generate and feedback."""
    insecure: bool = False
    """Serve without authentication: anyone who reaches a port may generate, give feedback and steer the
    rollout. By default every call needs a bearer token from the tokens file up prints."""
    grpc_base_port: int = 50051
    """policy, feedback, reward REST, reward gRPC, rollout and the policy's HTTP API listen on this port and
    the next five."""
    metrics_base_port: int = 9101
    """policy, feedback, trainer and rollout serve /metrics on this port, +1, +3 and +4."""

    @property
    def ports(self) -> LocalPorts:
        return LocalPorts(grpc_base=self.grpc_base_port, metrics_base=self.metrics_base_port)


Overrides = Mapping[str, Mapping[str, Any]]
"""More settings by service name, as dotted field -> value (modalign.core.config.with_overrides)."""


def local_tokens(home: Path) -> Path:
    """home/tokens.json: a bearer token per role ({"client": ..., "operator": ..., "reader": ...}),
    readable only by this user; written on first use and kept (delete it to rotate every token)."""
    path = home / "tokens.json"
    with contextlib.suppress(OSError, ValueError):  # missing or unreadable: written afresh below
        if sorted(json.loads(path.read_text())) == sorted(ROLES) and path.stat().st_mode & 0o077 == 0:
            return path
    home.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump({role: secrets.token_urlsafe(32) for role in ROLES}, file, indent=2)
    os.chmod(path.with_suffix(".tmp"), 0o600)
    os.replace(path.with_suffix(".tmp"), path)
    return path


def local_services(kafka: KafkaConfig, home: Path, ports: LocalPorts, auth: AuthConfig,
                   overrides: Overrides | None = None) -> dict[str, ServiceConfig]:
    """The configs of one local system's services, in start order, sharing the blob store, the model
    store, the broker and auth (how the gRPC services and the HTTP API authenticate their callers). A
    misspelt or removed field in overrides raises ConfigError here."""
    overrides = overrides or {}
    unknown = set(overrides) - {"feedback", "policy", "reward", "trainer", "rollout"}
    if unknown:
        raise ConfigError(",".join(sorted(unknown)), "not a service of the local system")
    blobs, models = home / "blobs", str(home / "models")
    services: dict[str, ServiceConfig] = {
        "feedback": on_broker(FeedbackConfig, kafka, listen=ports.feedback, metrics_port=ports.metrics(1)),
        "policy": on_broker(PolicyConfig, kafka, listen=ports.policy, metrics_port=ports.metrics(0), blob_dir=blobs,
                            http_listen=ports.policy_http, feedback_address=ports.feedback, model_store=models),
        "reward": on_broker(RewardServerConfig, kafka, http_port=ports.reward_http, grpc_port=ports.reward_grpc,
                            follow="latest", model_store=models),
        "trainer": on_broker(TrainerConfig, kafka, metrics_port=ports.metrics(3), blob_dir=blobs,
                             work_dir=home / "trainer", model_store=models),
        "rollout": on_broker(RolloutConfig, kafka, listen=ports.rollout, metrics_port=ports.metrics(4), blob_dir=blobs,
                             policy_metrics=(f"127.0.0.1:{ports.metrics(0)}",),
                             reward_url=f"127.0.0.1:{ports.reward_http}"),
    }
    # Every service that takes callers authenticates them alike; the controller scores with the reader token.
    services = {name: dataclasses.replace(config, auth=auth) if hasattr(config, "auth") else config
                for name, config in services.items()}
    services["rollout"] = dataclasses.replace(services["rollout"], reward_auth=ClientAuth(auth.tokens_file, READER))
    return {name: with_overrides(config, overrides.get(name, {})) for name, config in services.items()}


def run_local_system(config: UpConfig) -> int:
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())

    broker_config, ports = config.broker, config.ports
    print(f"kafka: starting on {broker_config.bootstrap_servers} (data in {broker_config.data_dir})", flush=True)
    home = broker_config.data_dir.parent
    tokens = None if config.insecure else local_tokens(home)
    auth = AuthConfig(insecure=True) if tokens is None else AuthConfig(tokens_file=tokens)
    services = local_services(KafkaConfig(bootstrap_servers=broker_config.bootstrap_servers), home, ports, auth)
    system = LocalSystem(services, home / "logs", broker_config)
    system.start()
    try:
        print(
            "modalign is up:\n"
            f"  policy    gRPC {ports.policy}  (modalign.v1.PolicyService)    metrics http://127.0.0.1:{ports.metrics(0)}/metrics\n"
            f"            OpenAI-compatible API http://{ports.policy_http}/v1  (POST /chat/completions, POST /feedback, GET /models)\n"
            f"  feedback  gRPC {ports.feedback}  (modalign.v1.FeedbackService)  metrics http://127.0.0.1:{ports.metrics(1)}/metrics\n"
            f"  reward    OIP v2 http://127.0.0.1:{ports.reward_http}, gRPC 127.0.0.1:{ports.reward_grpc}"
            f"      metrics http://127.0.0.1:{ports.reward_http}/metrics\n"
            f"  trainer   learns from the feedback stream                metrics http://127.0.0.1:{ports.metrics(3)}/metrics\n"
            f"  rollout   gRPC {ports.rollout}  (modalign.v1.RolloutService)   metrics http://127.0.0.1:{ports.metrics(4)}/metrics\n"
            "            every version the trainer publishes goes through a canary before serving everyone\n"
            f"  kafka     {broker_config.bootstrap_servers}\n"
            f"  models    {home / 'models'}  (each published version)\n"
            f"  logs      {home / 'logs'}\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        if tokens is None:
            print("WARNING: authentication is off (--insecure): anyone who reaches these ports may generate, "
                  "give feedback and pin or promote versions", flush=True)
        else:
            print(f"tokens {tokens}\n  bearer tokens by role (client, operator, reader), sent as 'authorization: Bearer TOKEN'",
                  flush=True)
        if config.example:
            example_chat(f"http://{ports.policy_http}/v1", ClientAuth(tokens, CLIENT).token())
            example_call(ports.policy, ports.feedback, ClientAuth(tokens, CLIENT).token())
        while not stopping.wait(1.0):
            if (exited := system.exited()) is not None:
                print(f"{exited.name} exited with {exited.process.returncode}; see {exited.log_path}")
                return 1
        return 0
    finally:
        say("stopping...")
        system.stop()
        say("stopped.")


def say(line: str) -> None:
    """Prints line; a reader that went away (`modalign up | head`, a closed pipe) must not keep the
    services from being stopped."""
    with contextlib.suppress(BrokenPipeError):
        print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_local_system(parse_config(UpConfig, argv, prog="modalign up"))


def example_image() -> bytes:
    image = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(image).ellipse((4, 8, 20, 24), fill="red")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def example_call(policy_address: str, feedback_address: str, token: str) -> None:
    """What a client does: ask for two candidates about an image, then say which one is better."""
    with dial(policy_address, token) as policy_channel, dial(feedback_address, token) as fb_channel:
        reply = policy_pb2_grpc.PolicyServiceStub(policy_channel).Generate(
            policy_pb2.GenerateRequest(
                text="What colour is the shape?",
                images=[common_pb2.Image(data=example_image(), mime_type="image/png")],
                n=2, user_id="example-user", session_id="example-session",
            ),
            timeout=60,
        )
        print(f"example: Generate answered with policy {reply.policy_version}:")
        for candidate in reply.candidates:
            print(f"  {candidate.response_id}  {candidate.text!r}")
        feedback = feedback_pb2.Feedback(
            feedback_id=f"example-{uuid.uuid4().hex}", user_id="example-user",
            preference=feedback_pb2.Preference(
                chosen_response_id=reply.candidates[0].response_id,
                rejected_response_id=reply.candidates[1].response_id,
            ),
        )
        feedback.client_time.FromSeconds(int(time.time()))
        ack = feedback_pb2_grpc.FeedbackServiceStub(fb_channel).Submit(feedback, timeout=30)
        print(f"example: preference {ack.feedback_id} acknowledged (stored durably in Kafka)", flush=True)


def example_chat(base_url: str, token: str) -> None:
    """The same question through the OpenAI-compatible API, as curl or the openai package would send it."""
    image = "data:image/png;base64," + base64.b64encode(example_image()).decode()
    body = {"model": "modalign", "max_tokens": 16, "user": "example-user", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What colour is the shape?"}]}]}
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(f"{base_url}/chat/completions", data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        reply = json.load(response)
    [choice] = reply["choices"]
    print(f"example: chat completion by policy {reply['system_fingerprint']}: {choice['response_id']}  "
          f"{choice['message']['content']!r}", flush=True)

