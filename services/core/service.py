"""The skeleton every modalign service is built on: its config base, its metrics, its `main`.

A service module defines a config (a frozen dataclass deriving from one of the bases below, every
field documented by the docstring under it), a `serve(config)` that runs until SIGTERM or SIGINT, and

    def main(argv=None):
        run_service(PolicyConfig, serve, argv)

run_service parses flags and MODALIGN_* environment variables, runs the config's validate() hooks (a
refused value exits with status 2 naming the flag), sets up logging and calls serve. Each config
names the `modalign` subcommand that runs it and says how to tell that the service is ready, which is
all modalign.core.launch needs to start it from the config.
"""

from __future__ import annotations

import abc
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, ClassVar, TypeVar

import grpc
from prometheus_client import start_http_server

from modalign.core.auth import AuthConfig, Authenticator
from modalign.core.broker import port_open
from modalign.core.config import ConfigError, parse_config, require_one_of
from modalign.core.grpc_server import Access, GrpcLimits, build_server, serve_until_signalled
from modalign.core.kafka import KafkaConfig
from modalign.core.processes import grpc_serving, http_ok
from modalign.core.tls import TlsConfig

log = logging.getLogger(__name__)

C = TypeVar("C", bound="ServiceConfig")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def loopback(host: str) -> str:
    """Where a process on this machine reaches a listener bound to host."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "[::]", "::") else host


@dataclass(frozen=True)
class ServiceConfig(abc.ABC):
    """What every modalign service has: a broker and logging."""

    command: ClassVar[str]
    """The `modalign` subcommand that runs the service (modalign.cli.COMMANDS maps it to its module)."""

    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    """The Kafka cluster, and the prefix of the topics, the service reads and writes."""
    log_level: str = "INFO"
    """Level of the service's log: DEBUG, INFO, WARNING or ERROR."""

    def validate(self) -> None:
        """Refuses a value by raising ConfigError(field, why); run when the config is parsed or launched.
        Subclasses extend it (calling super) for their own fields; nested configs have their own."""
        require_one_of("log_level", self.log_level.upper(), LOG_LEVELS)

    @abc.abstractmethod
    def ready(self) -> bool:
        """Whether the service this config describes, started on this machine, serves yet."""

    def check_start(self) -> None:
        """Raises CannotStart when the service must not start as configured, though each value is valid
        (a listener that would let anyone in); run_service runs it before serving."""
        return None


@dataclass(frozen=True)
class MeteredConfig(ServiceConfig):
    """A service with its own Prometheus /metrics endpoint."""

    metrics_host: str = "127.0.0.1"
    """Address the Prometheus /metrics endpoint binds; 0.0.0.0 in a container."""
    metrics_port: int = 0
    """Port of the Prometheus /metrics endpoint; 0 disables it."""

    def metrics_url(self, offset: int = 0) -> str:
        return f"http://{loopback(self.metrics_host)}:{self.metrics_port + offset}/metrics"

    def ready(self) -> bool:
        # Serving /metrics is the last thing such a service does before its main loop; without the
        # endpoint there is nothing to probe, and a started process counts as ready.
        return not self.metrics_port or http_ok(self.metrics_url())


@dataclass(frozen=True)
class GrpcServiceConfig(MeteredConfig):
    """A gRPC service: its address, TLS, who may call it, and the threads serving its RPCs."""

    listen: str = "127.0.0.1:50051"
    """gRPC address, host:port; 0.0.0.0 or [::] in a container."""
    grpc: GrpcLimits = field(default_factory=GrpcLimits)
    """What the gRPC server takes on at once; past it callers are refused at once (RESOURCE_EXHAUSTED)."""
    tls: TlsConfig = field(default_factory=TlsConfig)
    """TLS (and mutual TLS) on the service's listeners; plaintext when no certificate is given."""
    auth: AuthConfig = field(default_factory=AuthConfig)
    """How callers authenticate; required unless --auth.insecure."""

    @property
    def address(self) -> str:
        """Where a client on this machine reaches the service."""
        host, _, port = self.listen.rpartition(":")
        return f"{loopback(host)}:{port}"

    def validate(self) -> None:
        super().validate()
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError("listen", f"host:port, got {self.listen!r}")

    def check_start(self) -> None:
        if why := self.auth.missing():
            raise CannotStart(why)

    def ready(self) -> bool:
        # Over TLS this machine may hold no certificate the server accepts (mutual TLS): a listening port
        # is the signal, taken as the server starts, a moment before it reports SERVING.
        host, _, port = self.address.rpartition(":")
        return port_open(host, int(port)) if self.tls.enabled else grpc_serving(self.address)


def serve_metrics(config: MeteredConfig, offset: int = 0) -> None:
    """Serves Prometheus /metrics (the default registry) on config's endpoint, port + offset (a
    torchrun rank's own port), unless its port is 0. The one way a service exposes its metrics,
    except the reward service, whose KServe server serves the same registry on its REST port."""
    if config.metrics_port:
        start_http_server(config.metrics_port + offset, addr=config.metrics_host)


def serve_grpc(config: GrpcServiceConfig, register: Callable[[grpc.Server], None], service_names: list[str],
               access: Access) -> None:
    """What every modalign gRPC service does once its servicer is built: serve /metrics, then gRPC with
    health (NOT_SERVING until now, and again while draining) and reflection, each method open to the
    roles access gives it, until SIGTERM or SIGINT."""
    serve_metrics(config)
    server, health_servicer, port = build_server(
        config.listen, register, service_names, Authenticator(config.auth), access, config.tls, config.grpc,
    )
    log.info("%s listening on %s (port %d, %s, %s)", ", ".join(service_names), config.listen, port,
             "mutual TLS" if config.tls.client_ca else "TLS" if config.tls.enabled else "PLAINTEXT",
             "NO AUTHENTICATION (--auth.insecure)" if config.auth.insecure else "authentication required")
    serve_until_signalled(server, health_servicer, service_names)


class CannotStart(Exception):
    """A start-up check refused what the service was given (e.g. a checkpoint of an unsupported model
    family): run_service prints the one-line reason and exits with status 2, before serving anything."""


def run_service(cls: type[C], serve: Callable[[C], None], argv: list[str] | None = None) -> None:
    """The `main` of every service: parse and validate its config, set up logging, serve until
    stopped, exit."""
    config = parse_config(cls, argv, prog=f"modalign {cls.command}")
    # force: a library that logged before this point (absl does) has configured the root logger already.
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)
    try:
        config.check_start()
        serve(config)
    except CannotStart as error:
        print(f"modalign {cls.command}: {error}", file=sys.stderr)
        sys.exit(2)
    # Served, drained and stopped. What remains is the interpreter tearing down torch's, transformers'
    # and kserve's module graphs, measured at 4-5 s for nothing; a stop (a pod rollout, a test) need
    # not wait for it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
