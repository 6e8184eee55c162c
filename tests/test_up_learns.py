"""`modalign up` with its defaults learns what its users want, seen only through the public APIs.

The users here (tests/trainer/scripted_users.py) want an answer to name the colour of the square in the
image, a preference of the test's choosing and not the demo's. They talk to the policy and feedback
services as any client would (comparisons, edits and ratings); the test watches the rollout service's
public state and measures what the policy service serves. Nothing is configured: the trainer's
algorithm (RLOO), its reward model, its gate and the canary are `modalign up`'s own defaults.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import grpc
import pytest

from modalign.core.auth import ClientAuth
from modalign.core.grpc_server import dial
from modalign.core.processes import free_run
from modalign.v1 import feedback_pb2_grpc, policy_pb2_grpc, rollout_pb2, rollout_pb2_grpc

from tests.test_up import start_up, stop_up
from tests.trainer.scripted_users import colour_counts, interact, two_proportion_z

pytestmark = pytest.mark.integration

DEADLINE_S = 20 * 60
HELD_OUT_PROMPTS = 128
USERS = 3


@pytest.mark.timeout(DEADLINE_S + 300)
def test_up_serves_a_version_its_users_prefer_within_twenty_minutes(tmp_path: Path) -> None:
    grpc_base = free_run(6)
    process = start_up(tmp_path, grpc_base_port=grpc_base)
    stop_users = threading.Event()
    failures: list[grpc.RpcError] = []
    interactions = [0]
    try:
        output = []
        while (line := process.stdout.readline()) and "modalign is up" not in line:
            output.append(line)
        assert process.poll() is None, "".join(output)
        threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()  # keep the pipe drained

        policy_address, feedback_address, rollout_address = (f"127.0.0.1:{grpc_base + i}" for i in (0, 1, 4))
        client, reader = (ClientAuth(tmp_path / "tokens.json", role).token() for role in ("client", "reader"))
        with dial(policy_address, client) as policy_channel, dial(feedback_address, client) as feedback_channel, \
                dial(rollout_address, reader) as rollout_channel:
            policy = policy_pb2_grpc.PolicyServiceStub(policy_channel)
            feedback = feedback_pb2_grpc.FeedbackServiceStub(feedback_channel)
            rollout = rollout_pb2_grpc.RolloutServiceStub(rollout_channel)
            # Held-out prompts as a client sends them, each a new session (so a canary answers its share);
            # every answer counts for the version that gave it: v0's first, then a few every 10 seconds.
            answers = colour_counts(policy, HELD_OUT_PROMPTS, seed=2024)
            assert {version for version, _ in answers} == {"v0"}

            def rate(version: str) -> tuple[float, int]:
                n = answers[version, True] + answers[version, False]
                return answers[version, True] / max(n, 1), n

            def user(seed: int) -> None:
                rng = random.Random(seed)
                while not stop_users.is_set():
                    try:
                        interact(policy, feedback, rng, rating_share=0.4)
                        interactions[0] += 1
                    except grpc.RpcError as error:  # none may fail, canaries and new versions included
                        failures.append(error)
                        return

            for seed in range(USERS):
                threading.Thread(target=user, args=(seed,), daemon=True).start()

            started, best, z = time.monotonic(), "v0", 0.0
            while time.monotonic() - started < DEADLINE_S and not failures and z <= 3:
                time.sleep(10)
                answers += colour_counts(policy, 32, seed=int(time.monotonic()))
                for version in {version for version, _ in answers} - {"v0"}:
                    (version_rate, n), (v0_rate, v0_n) = rate(version), rate("v0")
                    version_z = two_proportion_z(version_rate, v0_rate, n, v0_n) if n >= HELD_OUT_PROMPTS else 0.0
                    if version_z > z:
                        best, z = version, version_z
                state = rollout.GetState(rollout_pb2.GetStateRequest(), timeout=30)
                print(f"[{time.monotonic() - started:4.0f} s] stable {state.stable_version}, canary {state.canary_version or '-'}"
                      f" at {state.canary_weight_percent}%; {interactions[0]} user turns; held-out answers that name the"
                      " colour: " + ", ".join(f"{v} {rate(v)[0]:.1%} of {rate(v)[1]}" for v in sorted({v for v, _ in answers})),
                      flush=True)
            stop_users.set()
            assert failures == [], failures
            assert z > 3, f"no version served did measurably better than v0 within 20 minutes (best {best}, z {z:.2f})"
    finally:
        stop_users.set()
        stop_up(process)
