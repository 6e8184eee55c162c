"""`modalign up`: the broker and every service on loopback, with embedded defaults, until Ctrl-C."""

from __future__ import annotations

import io
import signal
import threading
import time
import uuid

import grpc
from PIL import Image, ImageDraw

from modalign.core import broker
from modalign.core.kafka import KafkaConfig, ensure_topics
from modalign.core.processes import ManagedProcess, grpc_serving, http_ok
from modalign.v1 import common_pb2, feedback_pb2, feedback_pb2_grpc, policy_pb2, policy_pb2_grpc

POLICY = "127.0.0.1:50051"
FEEDBACK = "127.0.0.1:50052"
REWARD_HTTP_PORT, REWARD_GRPC_PORT = 8080, 8081


def local_services(bootstrap_servers: str, log_dir) -> list[ManagedProcess]:
    kafka = ["--kafka.bootstrap-servers", bootstrap_servers]
    return [
        ManagedProcess.python_module(
            "feedback", "modalign.feedback.server", ["--listen", FEEDBACK, "--metrics-port", "9102", *kafka],
            ready=lambda: grpc_serving(FEEDBACK), log_dir=log_dir,
        ),
        ManagedProcess.python_module(
            "policy", "modalign.policy.server", ["--listen", POLICY, "--metrics-port", "9101", *kafka],
            ready=lambda: grpc_serving(POLICY), log_dir=log_dir,
        ),
        ManagedProcess.python_module(
            "reward", "modalign.reward.server",
            ["--http-port", str(REWARD_HTTP_PORT), "--grpc-port", str(REWARD_GRPC_PORT)],
            ready=lambda: http_ok(f"http://127.0.0.1:{REWARD_HTTP_PORT}/v2/health/ready"), log_dir=log_dir,
        ),
    ]


def run_local_system(broker_config: broker.BrokerConfig, example: bool = False) -> int:
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())

    started_broker = broker.running_pid(broker_config) is None
    print(f"kafka: starting on {broker_config.bootstrap_servers} (data in {broker_config.data_dir})", flush=True)
    broker.start(broker_config)
    ensure_topics(KafkaConfig(bootstrap_servers=broker_config.bootstrap_servers))
    log_dir = broker_config.data_dir.parent / "logs"
    services = local_services(broker_config.bootstrap_servers, log_dir)
    try:
        for service in services:
            service.start()
        for service in services:
            service.wait_ready(timeout_s=180)
        print(
            "modalign is up:\n"
            f"  policy    gRPC {POLICY}  (modalign.v1.PolicyService)   metrics http://127.0.0.1:9101/metrics\n"
            f"  feedback  gRPC {FEEDBACK}  (modalign.v1.FeedbackService) metrics http://127.0.0.1:9102/metrics\n"
            f"  reward    OIP v2 http://127.0.0.1:{REWARD_HTTP_PORT}  gRPC 127.0.0.1:{REWARD_GRPC_PORT}"
            f"  metrics http://127.0.0.1:{REWARD_HTTP_PORT}/metrics\n"
            f"  kafka     {broker_config.bootstrap_servers}\n"
            f"  logs      {log_dir}\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        if example:
            example_call(POLICY, FEEDBACK)
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

