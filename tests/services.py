"""Starting modalign's real service processes in tests."""

from __future__ import annotations

import socket
from pathlib import Path

from modalign.core.kafka import KafkaConfig
from modalign.core.processes import ManagedProcess, free_port, grpc_serving


def kafka_args(config: KafkaConfig) -> list[str]:
    """The command-line flags that point a service at config's broker and topics."""
    return [
        "--kafka.bootstrap-servers", config.bootstrap_servers,
        "--kafka.topic-prefix", config.topic_prefix,
        "--kafka.partitions", str(config.partitions),
    ]


def start_grpc_service(name: str, module: str, kafka: KafkaConfig, log_dir: Path, *args: str,
                       timeout_s: float = 120) -> tuple[ManagedProcess, str, int]:
    """Starts a gRPC service process on free loopback ports; returns it, its address and its metrics port."""
    address, metrics_port = f"127.0.0.1:{free_port()}", free_port()
    process = ManagedProcess.python_module(
        name, module, ["--listen", address, "--metrics-port", str(metrics_port), *kafka_args(kafka), *args],
        ready=lambda: grpc_serving(address), log_dir=log_dir,
    )
    process.start()
    try:
        process.wait_ready(timeout_s)
    except BaseException:
        process.stop()
        raise
    return process, address, metrics_port


def free_run(count: int) -> int:
    """A port such that it and the count - 1 after it are free on loopback."""
    for _ in range(100):
        base = free_port()
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
