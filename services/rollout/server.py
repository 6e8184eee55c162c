"""The rollout controller service: the control loop, and modalign.v1.RolloutService for operators.

Run: modalign rollout [--listen HOST:PORT] [--rollout.steps 5,25,50,100]
     [--policy-metrics HOST:PORT,...] [--reward-url HOST:PORT] [--kafka.bootstrap-servers HOST:PORT]
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import grpc

from modalign.core.auth import OPERATOR, READER, ClientAuth, current_principal
from modalign.core.blobs import BlobStore
from modalign.core.config import ConfigError
from modalign.core.grpc_server import GrpcLimits, access_for
from modalign.core.kafka import ensure_topics
from modalign.core.service import GrpcServiceConfig, run_service, serve_grpc
from modalign.core.tls import ClientTls
from modalign.feedback.caps import UserCap
from modalign.rollout.controller import (
    Fenced,
    RolloutController,
    RolloutPolicy,
    RolloutRefused,
    StateStore,
    VersionCatalog,
)
from modalign.rollout.evidence import EvidenceCollector, RewardScorer, TrafficScraper
from modalign.rollout.kserve import KServeConfig, KServeDriver
from modalign.v1 import events_pb2, rollout_pb2, rollout_pb2_grpc

log = logging.getLogger(__name__)

MAX_REASON_BYTES = 512

SERVICE = rollout_pb2.DESCRIPTOR.services_by_name["RolloutService"]
ACCESS = access_for(SERVICE, {OPERATOR}, GetState={READER, OPERATOR})
"""Operators steer the rollout; readers (dashboards, scripts) only look."""


@dataclass(frozen=True)
class RolloutConfig(GrpcServiceConfig):
    """The rollout controller."""

    command: ClassVar[str] = "rollout"
    listen: str = "127.0.0.1:50055"
    """gRPC address of modalign.v1.RolloutService, host:port; 0.0.0.0 or [::] in a container."""
    metrics_port: int = 9105
    grpc: GrpcLimits = field(default_factory=lambda: GrpcLimits(max_workers=8, max_concurrent_rpcs=16))
    """What the gRPC server takes on at once: a few operators and dashboards."""
    rollout: RolloutPolicy = field(default_factory=RolloutPolicy)
    """How each new version is rolled out."""
    policy_metrics: tuple[str, ...] = ("127.0.0.1:9101",)
    """host:port of every policy replica's /metrics, comma-separated; a name with several addresses (a
    headless Service) stands for all of them. The error and latency guards read these."""
    reward_url: str = ""
    """host:port of the reward service's REST endpoint (OIP v2); empty: no reward metric."""
    reward_model: str = "reward"
    """The reward model's name on the reward service's v2 endpoints."""
    reward_tls: ClientTls = field(default_factory=ClientTls)
    """How the controller reaches the reward service, when that serves TLS."""
    reward_auth: ClientAuth = field(default_factory=ClientAuth)
    """The token the controller scores with (a role the reward service lets score: reader by default)."""
    blob_dir: Path = Path.home() / ".local" / "share" / "modalign" / "blobs"
    """The image store the policy writes to; the reward model scores responses with their images."""
    tick_seconds: float = 1.0
    """How often the controller reads new evidence and decides."""
    user_cap: UserCap = field(default_factory=UserCap)
    """How many of a rollout's ratings and preferences one user may give (docs/security.md)."""
    kserve: KServeConfig = field(default_factory=KServeConfig)
    """The InferenceService the controller drives, if any."""

    def validate(self) -> None:
        super().validate()
        if "reward" in self.rollout.required_metrics and not self.reward_url:
            raise ConfigError("rollout.required_metrics", "names reward, which needs --reward-url")


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    """Operator commands: each answers once the new state is durable in the rollout topic."""

    def __init__(self, controller: RolloutController) -> None:
        self._controller = controller

    def GetState(self, request: rollout_pb2.GetStateRequest, context: grpc.ServicerContext) -> events_pb2.RolloutState:
        return self._controller.state

    def Pause(self, request: rollout_pb2.RolloutCommand, context: grpc.ServicerContext) -> events_pb2.RolloutState:
        return self._run(context, self._controller.pause, request.reason)

    def Resume(self, request: rollout_pb2.RolloutCommand, context: grpc.ServicerContext) -> events_pb2.RolloutState:
        return self._run(context, self._controller.resume, request.reason)

    def Promote(self, request: rollout_pb2.RolloutCommand, context: grpc.ServicerContext) -> events_pb2.RolloutState:
        return self._run(context, self._controller.promote, request.reason)

    def Rollback(self, request: rollout_pb2.RolloutCommand, context: grpc.ServicerContext) -> events_pb2.RolloutState:
        return self._run(context, self._controller.rollback, request.reason)

    def Pin(self, request: rollout_pb2.PinRequest, context: grpc.ServicerContext) -> events_pb2.RolloutState:
        return self._run(context, lambda why, by: self._controller.pin(request.version, why, by), request.reason)

    @staticmethod
    def _run(context: grpc.ServicerContext, command, reason: str) -> events_pb2.RolloutState:
        """Runs command(reason, principal), the caller's principal recorded in the state it writes."""
        if len(reason.encode()) > MAX_REASON_BYTES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"reason: at most {MAX_REASON_BYTES} UTF-8 bytes")
        by = current_principal().name
        log.info("%s by %s: %s", context.peer(), by, reason or "no reason given")
        try:
            return command(reason or "no reason given", by)
        except RolloutRefused as error:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        except LookupError as error:
            context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        except Fenced as error:
            stop_process(f"fenced by another controller: {error}")
            context.abort(grpc.StatusCode.UNAVAILABLE, "this controller was superseded by another; retry")
        except Exception as error:  # a write the broker did not acknowledge: nothing changed
            log.warning("command failed", exc_info=True)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the rollout state could not be stored, retry: {error}")


class KServeSync:
    """Keeps an InferenceService in step with the rollout state, retrying a failed patch every tick."""

    def __init__(self, driver: KServeDriver, catalog: VersionCatalog) -> None:
        self._driver = driver
        self._catalog = catalog
        self._unapplied: events_pb2.RolloutState | None = None

    def apply(self, state: events_pb2.RolloutState) -> None:
        self._unapplied = state
        self.retry()

    def retry(self) -> None:
        if self._unapplied is None:
            return
        published = {version: event for version, (_, event) in self._catalog.published.items()}
        try:
            self._driver.apply(self._unapplied, published)
            self._unapplied = None
        except Exception as error:
            log.warning("could not patch the InferenceService (%s); retrying", error)


def stop_process(why: str) -> None:
    log.error("stopping: %s", why)
    os.kill(os.getpid(), signal.SIGTERM)


def control_loop(controller: RolloutController, sync: KServeSync | None, tick_s: float, stopping: threading.Event) -> None:
    while not stopping.wait(tick_s):
        try:
            controller.tick()
            if sync is not None:
                sync.retry()
        except Fenced as error:
            stop_process(f"fenced by another controller: {error}")
            return
        except Exception:
            log.exception("rollout tick failed; retrying")


def serve(config: RolloutConfig) -> None:
    ensure_topics(config.kafka)
    scorer = None
    if config.reward_url:
        scorer = RewardScorer(config.reward_url, config.reward_model, BlobStore(config.blob_dir), config.reward_tls,
                              config.reward_auth)
    catalog = VersionCatalog(config.kafka)
    store = StateStore(config.kafka)
    controller = RolloutController(
        config.rollout, store, catalog, EvidenceCollector(config.kafka, scorer, config.user_cap),
        TrafficScraper(config.policy_metrics),
    )
    sync = None
    if config.kserve.inference_service:
        sync = KServeSync(KServeDriver(config.kserve), catalog)
        controller.on_state = sync.apply
        sync.apply(controller.state)
    stopping = threading.Event()
    loop = threading.Thread(
        target=control_loop, args=(controller, sync, config.tick_seconds, stopping), name="rollout-loop", daemon=True
    )
    loop.start()
    servicer = RolloutServicer(controller)
    try:
        serve_grpc(
            config, lambda server: rollout_pb2_grpc.add_RolloutServiceServicer_to_server(servicer, server),
            [SERVICE.full_name], ACCESS,
        )
    finally:
        stopping.set()
        loop.join(timeout=10)
        store.close()
        catalog.close()
        controller.evidence.close()


def main(argv: list[str] | None = None) -> None:
    run_service(RolloutConfig, serve, argv)


if __name__ == "__main__":
    main()
