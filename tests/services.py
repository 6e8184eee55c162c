"""Starting modalign's real service processes in tests, from their configs (modalign.core.launch)."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from modalign.core.auth import AuthConfig
from modalign.core.kafka import KafkaConfig
from modalign.core.launch import on_broker, service_process
from modalign.core.processes import ManagedProcess, free_port
from modalign.core.service import GrpcServiceConfig, ServiceConfig

G = TypeVar("G", bound=GrpcServiceConfig)


def start_service(config: ServiceConfig, log_dir: Path, name: str | None = None, timeout_s: float = 120) -> ManagedProcess:
    """Starts the service config describes and waits until it is ready; stops it if it never is."""
    process = service_process(config, log_dir, name)
    process.start()
    try:
        process.wait_ready(timeout_s)
    except BaseException:
        process.stop()
        raise
    return process


def grpc_service_config(cls: type[G], kafka: KafkaConfig, **fields: Any) -> G:
    """A gRPC service's config on free loopback ports, pointed at kafka's broker and topics; without
    authentication unless fields give `auth` (tests/test_security.py tests it, the other tests what
    lies behind it)."""
    return on_broker(cls, kafka, **{"listen": f"127.0.0.1:{free_port()}", "metrics_port": free_port(),
                                    "auth": AuthConfig(insecure=True), **fields})


def start_grpc_service(cls: type[GrpcServiceConfig], kafka: KafkaConfig, log_dir: Path, name: str | None = None,
                       timeout_s: float = 120, **fields: Any) -> tuple[ManagedProcess, str, int]:
    """Starts a gRPC service on free loopback ports; returns it, its address and its metrics port."""
    config = grpc_service_config(cls, kafka, **fields)
    return start_service(config, log_dir, name, timeout_s), config.address, config.metrics_port


def counter_total(metrics_url: str, name: str, **labels: str) -> float:
    """The sum of a counter's samples (name ends in _total) that carry labels, as a /metrics endpoint shows them."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())
