"""`modalign up`: the broker and every service on loopback, with embedded defaults, until Ctrl-C."""

from __future__ import annotations

import io
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
from PIL import Image, ImageDraw

from modalign.core import broker
from modalign.core.kafka import KafkaConfig, ensure_topics
from modalign.core.processes import ManagedProcess, grpc_serving, http_ok
from modalign.v1 import common_pb2, feedback_pb2, feedback_pb2_grpc, policy_pb2, policy_pb2_grpc


@dataclass(frozen=True)
class LocalPorts:
    """Where the local services listen on 127.0.0.1: consecutive ports from two bases."""

    grpc_base: int = 50051
    """policy gRPC, feedback gRPC, reward REST, reward gRPC, rollout gRPC, in that order."""
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

    def metrics(self, index: int) -> int:
        return self.metrics_base + index


def local_services(
    kafka: list[str], home: Path, ports: LocalPorts, extra_args: dict[str, list[str]] | None = None
) -> list[ManagedProcess]:
    """The services of one local system, sharing the blob store, the model store and the broker.

    kafka: the --kafka.* flags every service gets; extra_args: more flags by service name.
    """
    extra = extra_args or {}
    blobs = ["--blob-dir", str(home / "blobs")]
    log_dir = home / "logs"
    trainer_metrics = f"http://127.0.0.1:{ports.metrics(3)}/metrics"
    return [
        ManagedProcess.python_module(
            "feedback", "modalign.feedback.server",
            ["--listen", ports.feedback, "--metrics-port", str(ports.metrics(1)), *kafka, *extra.get("feedback", [])],
            ready=lambda: grpc_serving(ports.feedback), log_dir=log_dir,
        ),
        ManagedProcess.python_module(
            "policy", "modalign.policy.server",
            ["--listen", ports.policy, "--metrics-port", str(ports.metrics(0)), *kafka, *blobs, *extra.get("policy", [])],
            ready=lambda: grpc_serving(ports.policy), log_dir=log_dir,
        ),
        ManagedProcess.python_module(
            "reward", "modalign.reward.server",
            ["--http-port", str(ports.reward_http), "--grpc-port", str(ports.reward_grpc),
             "--follow-versions", "true", *kafka, *extra.get("reward", [])],
            ready=lambda: http_ok(f"http://127.0.0.1:{ports.reward_http}/v2/health/ready"), log_dir=log_dir,
        ),
        ManagedProcess.python_module(
            "trainer", "modalign.trainer",
            ["--metrics-port", str(ports.metrics(3)), *kafka, *blobs, "--work-dir", str(home / "trainer"),
             "--model-store", str(home / "models"), *extra.get("trainer", [])],
            ready=lambda: http_ok(trainer_metrics), log_dir=log_dir,
        ),
        ManagedProcess.python_module(
            "rollout", "modalign.rollout.server",
            ["--listen", ports.rollout, "--metrics-port", str(ports.metrics(4)), *kafka, *blobs,
             "--policy-metrics", f"127.0.0.1:{ports.metrics(0)}", "--reward-url", f"127.0.0.1:{ports.reward_http}",
             *extra.get("rollout", [])],
            ready=lambda: grpc_serving(ports.rollout), log_dir=log_dir,
        ),
    ]


def run_local_system(broker_config: broker.BrokerConfig, ports: LocalPorts = LocalPorts(), example: bool = False) -> int:
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())

    started_broker = broker.running_pid(broker_config) is None
    print(f"kafka: starting on {broker_config.bootstrap_servers} (data in {broker_config.data_dir})", flush=True)
    broker.start(broker_config)
    ensure_topics(KafkaConfig(bootstrap_servers=broker_config.bootstrap_servers))
    home = broker_config.data_dir.parent
    services = local_services(["--kafka.bootstrap-servers", broker_config.bootstrap_servers], home, ports)
    try:
        for service in services:
            service.start()
        for service in services:
            service.wait_ready(timeout_s=180)
        print(
            "modalign is up:\n"
            f"  policy    gRPC {ports.policy}  (modalign.v1.PolicyService)    metrics http://127.0.0.1:{ports.metrics(0)}/metrics\n"
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
        if example:
            example_call(ports.policy, ports.feedback)
        while not stopping.wait(1.0):
            for service in services:
                if service.process is not None and service.process.poll() is not None:
                    print(f"{service.name} exited with {service.process.returncode}; see {service.log_path}")
                    return 1
        return 0
    finally:
        print("stopping...", flush=True)
        for service in reversed(services):
            service.stop()
        if started_broker:
            broker.stop(broker_config)
        print("stopped.", flush=True)


def example_image() -> bytes:
    image = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(image).ellipse((4, 8, 20, 24), fill="red")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def example_call(policy_address: str, feedback_address: str) -> None:
    """What a client does: ask for two candidates about an image, then say which one is better."""
    with grpc.insecure_channel(policy_address) as policy_channel, grpc.insecure_channel(feedback_address) as fb_channel:
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

