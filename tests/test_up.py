"""`modalign up --example` as a user runs it (README: the system without simulated users), then Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest

from modalign.core.grpc_server import dial
from modalign.core.processes import free_port, free_run
from modalign.up import example_image
from modalign.v1 import (
    common_pb2,
    feedback_pb2,
    feedback_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    rollout_pb2,
    rollout_pb2_grpc,
)

pytestmark = pytest.mark.integration


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def start_up(tmp_path: Path, *arguments: str, grpc_base_port: int | None = None) -> subprocess.Popen:
    """`modalign up` as a user runs it, on free loopback ports (its services on grpc_base_port and the five after)."""
    modalign = shutil.which("modalign", path=str(Path(sys.executable).parent))
    command = [
        modalign, "up", *arguments, "--data-dir", str(tmp_path / "kafka"),
        "--port", str(free_port()), "--controller-port", str(free_port()),
        "--grpc-base-port", str(grpc_base_port or free_run(6)), "--metrics-base-port", str(free_run(5)),
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def stop_up(process: subprocess.Popen, children: list[int] | None = None) -> None:
    """Stops up as Ctrl-C does if it still runs (killing its process group if that takes over 2 minutes),
    then kills whichever of its children (recorded while it ran) a failed stop left behind."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    for pid in children or []:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def children_of(pid: int) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]


def test_up_brings_the_system_up_answers_a_client_and_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    grpc_base = free_run(6)
    process = start_up(tmp_path, "--example", grpc_base_port=grpc_base)
    output = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            output.append(line)
            if "acknowledged" in line:
                break
        text = "".join(output)
        assert "modalign is up" in text, text
        assert re.search(r"OpenAI-compatible API http://127\.0\.0\.1:\d+/v1", text), text
        assert re.search(r"example: chat completion by policy v0: [0-9a-f-]{36} ", text), text
        assert re.search(r"example: Generate answered with policy v0", text), text
        assert re.search(r"example: preference example-\w+ acknowledged", text), text
        assert_only_the_right_token_opens_each_door(text, grpc_base)

        children = children_of(process.pid)
        assert len(children) >= 6  # broker, feedback, policy, reward, trainer, rollout

        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=120)
        assert process.returncode == 0, text + rest
        assert "stopped." in rest
        time.sleep(1)
        assert [pid for pid in children if pid_alive(pid)] == []
    finally:
        stop_up(process)


def assert_only_the_right_token_opens_each_door(output: str, grpc_base: int) -> None:
    """up's defaults: every call needs a token from the file it printed; each role opens only its doors."""
    [tokens_file] = re.findall(r"^tokens (\S+)$", output, re.MULTILINE)
    assert Path(tokens_file).stat().st_mode & 0o777 == 0o600
    tokens = json.loads(Path(tokens_file).read_text())
    assert sorted(tokens) == ["client", "operator", "reader"] and len(set(tokens.values())) == 3
    policy, feedback, rollout = (f"127.0.0.1:{grpc_base + i}" for i in (0, 1, 4))
    request = policy_pb2.GenerateRequest(text="What colour is the shape?", n=2, user_id="u1",
                                         images=[common_pb2.Image(data=example_image(), mime_type="image/png")])

    def generate(token: str) -> policy_pb2.GenerateResponse:
        with dial(policy, token) as channel:
            return policy_pb2_grpc.PolicyServiceStub(channel).Generate(request, timeout=60)

    def submit(token: str, response_id: str) -> feedback_pb2.SubmitResponse:
        rating = feedback_pb2.Feedback(feedback_id=f"t-{uuid.uuid4().hex}", user_id="u1",
                                       rating=feedback_pb2.Rating(response_id=response_id, score=4))
        rating.client_time.GetCurrentTime()
        with dial(feedback, token) as channel:
            return feedback_pb2_grpc.FeedbackServiceStub(channel).Submit(rating, timeout=30)

    def rollout_call(token: str, method: str, message):
        with dial(rollout, token) as channel:
            return getattr(rollout_pb2_grpc.RolloutServiceStub(channel), method)(message, timeout=30)

    def refused(call, *args) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as error:
            call(*args)
        return error.value.code()

    pin = rollout_pb2.PinRequest(version="v0", reason="test")
    before = rollout_call(tokens["reader"], "GetState", rollout_pb2.GetStateRequest())
    assert refused(generate, "") == grpc.StatusCode.UNAUTHENTICATED
    assert refused(generate, "not-a-token-of-this-system") == grpc.StatusCode.UNAUTHENTICATED
    assert refused(generate, tokens["operator"]) == grpc.StatusCode.PERMISSION_DENIED
    assert refused(submit, "", "r") == grpc.StatusCode.UNAUTHENTICATED
    for token, code in (("", grpc.StatusCode.UNAUTHENTICATED), (tokens["client"], grpc.StatusCode.PERMISSION_DENIED),
                        (tokens["reader"], grpc.StatusCode.PERMISSION_DENIED)):
        assert refused(rollout_call, token, "Pin", pin) == code
    assert rollout_call(tokens["reader"], "GetState", rollout_pb2.GetStateRequest()).revision == before.revision

    reply = generate(tokens["client"])
    assert not submit(tokens["client"], reply.candidates[0].response_id).duplicate
    pinned = rollout_call(tokens["operator"], "Pin", pin)
    assert pinned.revision == before.revision + 1 and pinned.pinned_version == "v0" and pinned.changed_by == "operator"


def test_up_stops_everything_on_ctrl_c_when_its_output_is_no_longer_read(tmp_path: Path) -> None:
    """`modalign up | head`: the reader is gone when Ctrl-C comes, and up must still stop every service."""
    process, children = start_up(tmp_path), []
    try:
        while (line := process.stdout.readline()) and "Ctrl-C stops everything" not in line:
            pass
        children = children_of(process.pid)
        assert len(children) >= 6, line
        process.stdout.close()
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
        time.sleep(1)
        assert [pid for pid in children if pid_alive(pid)] == []
    finally:
        stop_up(process, children)
