"""Starting modalign's processes and waiting until they serve; used by `modalign up` and by the tests."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_run(count: int) -> int:
    """A port such that it and the count - 1 after it are free on loopback, below the kernel's range of
    ephemeral ports: a run taken from that range can lose a port to some process's outgoing connection
    between this check and the service's bind, seconds later (a CI run lost the demo trainer's metrics
    port that way)."""
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        base = random.randrange(20000, ephemeral_low - count)
        sockets = []
        try:
            for offset in range(count):
                sock = socket.socket()
                sock.bind(("127.0.0.1", base + offset))
                sockets.append(sock)
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no run of free ports")


def grpc_serving(address: str, service: str = "", timeout_s: float = 1.0) -> bool:
    """True when the gRPC health service at address reports SERVING for service."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


def descendants(pid: int) -> list[int]:
    """The PIDs of pid's children, of theirs, and so on, read from /proc (none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state; the name may hold spaces
        children.setdefault(parent, []).append(int(entry.name))
    found, waiting = [], [pid]
    while waiting:
        below = children.get(waiting.pop(), [])
        found += below
        waiting += below
    return found


@dataclass
class ManagedProcess:
    """A child process that counts as started once `ready()` holds, and is stopped by its PID."""

    name: str
    argv: list[str]
    ready: Callable[[], bool]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @classmethod
    def python_module(cls, name: str, module: str, args: list[str], ready: Callable[[], bool], log_dir: Path,
                      env: dict[str, str] | None = None) -> ManagedProcess:
        return cls(name, [sys.executable, "-m", module, *args], ready, Path(log_dir) / f"{name}.log", env or {})

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # One torch thread per process: on small machines oversubscribed threads made forwards 9x slower.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **self.env}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} was not ready in {timeout_s:.0f}s:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM (a graceful drain), then SIGKILL past timeout_s. Returns the exit code.

        Signals go to the process group the child leads, so its own children (torchrun's workers,
        say) stop with it.
        """
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self._signal_group(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            return self.process.wait()

    def kill(self) -> None:
        """SIGKILL to the process group and to every descendant: some children lead sessions of their own
        (torchrun's workers do), and a killed parent cannot pass a signal on."""
        if self.process is not None and self.process.poll() is None:
            for pid in descendants(self.process.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._signal_group(signal.SIGKILL)
            self.process.wait()

    def _signal_group(self, signum: int) -> None:
        assert self.process is not None  # its callers check
        try:
            os.killpg(self.process.pid, signum)  # the child leads its group: start_new_session
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"
