"""Canary rollouts end to end: a real broker, two policy replicas, the feedback service, the rollout
controller, and scripted users who only speak gRPC.

The tests run in file order on one system: v1 (concise, which users prefer) is promoted over the
initial v0; v2 (rambling, rated worse) and v3 (broken: it cannot generate) are rolled back; v4 (as
good as v1) survives a SIGKILL of the controller mid-rollout; v5 is rolled out by a second controller,
which fenced the first. Users send traffic throughout, and the last test checks that no request failed
except on the broken v3.
"""

from __future__ import annotations

import math
import random
import re
import time
import urllib.request
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest

from modalign.core.config import with_overrides
from modalign.core.kafka import KafkaConfig, read_topic
from modalign.core.launch import service_process
from modalign.core.modelstore import DirectoryStore
from modalign.core.processes import ManagedProcess
from modalign.feedback.server import FeedbackConfig
from modalign.policy.config import PolicyConfig
from modalign.rollout.server import RolloutConfig
from modalign.v1 import common_pb2, events_pb2, policy_pb2, policy_pb2_grpc, rollout_pb2, rollout_pb2_grpc

from tests.rollout.users import Users, announce, image_png, publish, save_model
from tests.services import grpc_service_config, start_grpc_service

pytestmark = pytest.mark.integration

STEPS = (20, 50, 100)
MIN_STEP_SECONDS = 3
TICK_SECONDS = 0.3


class System:
    def __init__(self, kafka: KafkaConfig, work: Path) -> None:
        self.kafka = kafka
        self.work = work
        self.store = DirectoryStore(work / "models")
        self.processes: list[ManagedProcess] = []
        self.policy_addresses: list[str] = []
        self.policy_metrics: list[int] = []
        self.controller: ManagedProcess | None = None
        self.controller_address = ""

    def start_controller(self, name: str = "rollout") -> ManagedProcess:
        config = with_overrides(
            grpc_service_config(RolloutConfig, self.kafka, tick_seconds=TICK_SECONDS,
                                policy_metrics=tuple(f"127.0.0.1:{port}" for port in self.policy_metrics)),
            {"rollout.steps": STEPS, "rollout.min_step_seconds": float(MIN_STEP_SECONDS),
             "rollout.max_step_seconds": 120.0, "rollout.min_samples": 20, "rollout.required_metrics": ("rating",),
             "rollout.guard_min_requests": 8},
        )
        self.controller_address = config.address
        controller = service_process(config, self.work, name)
        controller.start()
        controller.wait_ready(120)
        self.processes.append(controller)
        self.controller = controller
        self._rollout = rollout_pb2_grpc.RolloutServiceStub(grpc.insecure_channel(self.controller_address))
        return controller

    def rollout(self) -> rollout_pb2_grpc.RolloutServiceStub:
        return self._rollout

    def states(self) -> list[events_pb2.RolloutState]:
        return read_topic(self.kafka, "rollout", events_pb2.RolloutState)

    def wait_for_state(self, done: Callable[[events_pb2.RolloutState], bool], timeout_s: float = 240) -> events_pb2.RolloutState:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.rollout().GetState(rollout_pb2.GetStateRequest(), timeout=10)
            if done(state):
                return state
            time.sleep(0.2)
        raise AssertionError(f"rollout state never matched; last: {state}\n{self.controller.log_tail()}")

    def replicas_route(self, weights: dict[str, int], timeout_s: float = 30) -> None:
        """Waits until every replica's /metrics reports exactly these traffic weights."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(replica_weights(port) == weights for port in self.policy_metrics):
                return
            time.sleep(0.2)
        raise AssertionError(f"replicas route {[replica_weights(p) for p in self.policy_metrics]}, not {weights}")


def replica_weights(metrics_port: int) -> dict[str, int]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return {
        version: int(float(value))
        for version, value in re.findall(r'^modalign_policy_traffic_weight_percent\{policy_version="([^"]+)"\} (\S+)', text, re.M)
    }


@pytest.fixture(scope="module")
def system(kafka_config: KafkaConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    work = tmp_path_factory.mktemp("canary")
    system = System(kafka_config, work)
    base = save_model(work / "v0", eos_logit=3.0)
    try:
        for name in ("policy-a", "policy-b"):
            process, address, metrics_port = start_grpc_service(
                PolicyConfig, kafka_config, work, name, model_dir=str(base), blob_dir=work / "blobs",
                max_batch_wait_ms=5.0, model_store=str(system.store.root),
            )
            system.processes.append(process)
            system.policy_addresses.append(address)
            system.policy_metrics.append(metrics_port)
        feedback, feedback_address, _ = start_grpc_service(FeedbackConfig, kafka_config, work)
        system.processes.append(feedback)
        system.start_controller()
        system.users = Users(system.policy_addresses, feedback_address)
        system.users.start()
        yield system
    finally:
        if hasattr(system, "users"):
            system.users.stop()
        for process in reversed(system.processes):
            process.stop()


def rollout_of(states: list[events_pb2.RolloutState], version: str) -> list[tuple[int, int, str]]:
    """(step_index, weight, phase) of each state written while `version` was the canary."""
    return [
        (s.step_index, s.canary_weight_percent, events_pb2.RolloutPhase.Name(s.phase))
        for s in states if s.canary_version == version
    ]


def assert_consistent_history(states: list[events_pb2.RolloutState]) -> None:
    assert [s.revision for s in states] == list(range(1, len(states) + 1)), "a revision was repeated or skipped"


PROMOTED_THROUGH_EVERY_STEP = [
    (0, 20, "ROLLOUT_PHASE_PROGRESSING"), (1, 50, "ROLLOUT_PHASE_PROGRESSING"),
    (2, 100, "ROLLOUT_PHASE_PROGRESSING"), (2, 0, "ROLLOUT_PHASE_PROMOTED"),
]


def test_operator_commands_check_the_state_and_their_input(system: System) -> None:
    rollout = system.rollout()
    state = rollout.GetState(rollout_pb2.GetStateRequest(), timeout=10)
    assert state.stable_version == "v0" and not state.canary_version
    for call, message, code in (
        (rollout.Pause, rollout_pb2.RolloutCommand(reason="why not"), grpc.StatusCode.FAILED_PRECONDITION),
        (rollout.Promote, rollout_pb2.RolloutCommand(), grpc.StatusCode.FAILED_PRECONDITION),
        (rollout.Rollback, rollout_pb2.RolloutCommand(), grpc.StatusCode.FAILED_PRECONDITION),
        (rollout.Pin, rollout_pb2.PinRequest(version="v99"), grpc.StatusCode.NOT_FOUND),
        (rollout.Pause, rollout_pb2.RolloutCommand(reason="x" * 513), grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            call(message, timeout=10)
        assert raised.value.code() == code, raised.value.details()
    assert "reason" in raised.value.details()


def test_a_version_users_prefer_is_promoted_through_every_step(system: System) -> None:
    publish(system.kafka, system.store, "v1", eos_logit=5.0)
    system.wait_for_state(lambda s: s.canary_version == "v1")
    paused = system.rollout().Pause(rollout_pb2.RolloutCommand(reason="measure the split"), timeout=30)
    assert paused.step_index == 0 and paused.phase == events_pb2.ROLLOUT_PHASE_PAUSED
    system.replicas_route({"v0": 80, "v1": 20})

    # The split, measured over 250 fresh sessions spread over both replicas: within 4 standard errors
    # of the weight (4 * sqrt(0.2 * 0.8 / 250) = 0.10).
    stubs = [policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(a)) for a in system.policy_addresses]
    image = common_pb2.Image(data=image_png(random.Random(1)), mime_type="image/png")

    def version_for(session_id: str, replica: int) -> str:
        request = policy_pb2.GenerateRequest(
            text="Hello?", images=[image], sampling=common_pb2.SamplingParams(max_new_tokens=1), session_id=session_id)
        return stubs[replica % 2].Generate(request, timeout=60).policy_version

    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(version_for, [uuid.uuid4().hex for _ in range(250)], range(250)))
        share = versions.count("v1") / len(versions)
        assert abs(share - 0.20) <= 4 * math.sqrt(0.2 * 0.8 / 250), f"canary share {share}"
        # Sticky: a session gets the same version from either replica while the weights hold.
        sessions = [uuid.uuid4().hex for _ in range(20)]
        seen = list(pool.map(lambda s: {version_for(s, replica) for replica in range(4)}, sessions))
        assert all(len(versions_of_session) == 1 for versions_of_session in seen), seen

    system.rollout().Resume(rollout_pb2.RolloutCommand(reason="measured"), timeout=30)
    promoted = system.wait_for_state(lambda s: s.phase == events_pb2.ROLLOUT_PHASE_PROMOTED)
    assert promoted.stable_version == "v1"
    assert {v.metric: v.outcome for v in promoted.verdicts}["rating"] == "not_worse"
    # Paused and resumed within step 1: the same step, its clock restarted.
    history = [h for h in rollout_of(system.states(), "v1") if h[2] != "ROLLOUT_PHASE_PAUSED"]
    assert [h for i, h in enumerate(history) if i == 0 or h != history[i - 1]] == PROMOTED_THROUGH_EVERY_STEP
    system.replicas_route({"v1": 100})


def test_a_version_users_rate_worse_is_rolled_back(system: System) -> None:
    publish(system.kafka, system.store, "v2", eos_logit=-20.0)
    state = system.wait_for_state(
        lambda s: s.canary_version == "v2" and s.phase == events_pb2.ROLLOUT_PHASE_ROLLED_BACK)
    assert state.stable_version == "v1"
    rating = {v.metric: v for v in state.verdicts}["rating"]
    assert rating.outcome == "worse" and rating.canary_value < rating.stable_value, state.reason
    assert rating.canary_samples >= 20 and rating.p_value < rating.threshold
    system.replicas_route({"v1": 100})


def test_a_version_announced_again_is_not_rolled_out_again(system: System) -> None:
    """A trainer restarted between announcing v2 and its checkpoint announces v2 again: the controller,
    which rolled v2 back, starts no second rollout of it."""
    before = system.rollout().GetState(rollout_pb2.GetStateRequest(), timeout=10)
    announce(system.kafka, "v2", system.store.lookup("policy", "v2"))
    time.sleep(5 * TICK_SECONDS)  # the controller reads policy-versions every tick
    after = system.rollout().GetState(rollout_pb2.GetStateRequest(), timeout=10)
    assert (after.revision, after.stable_version, after.phase) == (before.revision, "v1", before.phase), after.reason


def test_a_version_that_errors_is_rolled_back_at_once(system: System) -> None:
    publish(system.kafka, system.store, "v3", eos_logit=5.0, broken=True)
    state = system.wait_for_state(
        lambda s: s.canary_version == "v3" and s.phase == events_pb2.ROLLOUT_PHASE_ROLLED_BACK)
    errors = {v.metric: v for v in state.verdicts}["error_rate"]
    assert errors.outcome == "guard" and errors.canary_value == 1.0, state.reason
    assert state.step_index == 0, "a guard acts at once, within the first step"
    system.replicas_route({"v1": 100})


def test_a_controller_killed_mid_rollout_finishes_it(system: System) -> None:
    publish(system.kafka, system.store, "v4", eos_logit=5.0)
    system.wait_for_state(lambda s: s.canary_version == "v4" and s.step_index == 1)
    system.controller.kill()
    system.start_controller("rollout-restarted")
    state = system.wait_for_state(lambda s: s.canary_version == "v4" and s.phase == events_pb2.ROLLOUT_PHASE_PROMOTED)
    assert state.stable_version == "v4"
    assert rollout_of(system.states(), "v4") == PROMOTED_THROUGH_EVERY_STEP
    assert_consistent_history(system.states())


def test_a_second_controller_fences_the_first(system: System) -> None:
    first = system.controller
    second = system.start_controller("rollout-second")
    publish(system.kafka, system.store, "v5", eos_logit=5.0)
    state = system.wait_for_state(lambda s: s.canary_version == "v5" and s.phase == events_pb2.ROLLOUT_PHASE_PROMOTED)
    assert state.stable_version == "v5"
    first.process.wait(timeout=60)  # its first write was refused: it stopped
    assert "fenced by another controller" in first.log_tail(200)
    assert second.process.poll() is None
    assert_consistent_history(system.states())
    assert rollout_of(system.states(), "v5") == PROMOTED_THROUGH_EVERY_STEP


def test_no_request_failed_except_on_the_broken_version(system: System) -> None:
    system.users.stop()
    calls = system.users.calls
    failed = [c for c in calls if c.code != grpc.StatusCode.OK]
    served = Counter(c.version for c in calls if c.code == grpc.StatusCode.OK)
    assert {"v0", "v1", "v2", "v4", "v5"} <= set(served), served
    assert failed, "the broken v3 received traffic and failed it"
    assert all(c.version == "v3" and c.code == grpc.StatusCode.INTERNAL for c in failed), failed[:5]
