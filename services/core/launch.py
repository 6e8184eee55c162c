"""Starting services from their configs, and one local system's lifecycle.

A launcher builds each service's config as a dataclass (modalign.core.config.with_overrides for
dotted changes), so a misspelt or removed field fails when the config is built; the command line is
derived from the config (config.to_arguments) and the service's readiness from config.ready().
`modalign up`, the demo and the tests start services this way.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, TypeVar

from modalign.core import broker
from modalign.core.config import to_arguments
from modalign.core.kafka import KafkaConfig, ensure_topics
from modalign.core.processes import ManagedProcess
from modalign.core.service import ServiceConfig

C = TypeVar("C", bound=ServiceConfig)


def on_broker(cls: type[C], kafka: KafkaConfig, **fields: Any) -> C:
    """cls's config with fields set and its own Kafka settings (a service may have other defaults, the
    feedback service's shorter produce timeout) pointed at kafka's brokers and topics."""
    own = cls().kafka
    pointed = dataclasses.replace(own, bootstrap_servers=kafka.bootstrap_servers, topic_prefix=kafka.topic_prefix,
                                  partitions=kafka.partitions)
    return cls(kafka=pointed, **fields)


def service_argv(config: ServiceConfig) -> list[str]:
    """The arguments after `python` that run the service config describes: `-m modalign COMMAND FLAGS`."""
    return ["-m", "modalign", config.command, *to_arguments(config)]


def service_process(config: ServiceConfig, log_dir: Path, name: str | None = None,
                    env: dict[str, str] | None = None) -> ManagedProcess:
    """A process (not yet started) running the service config describes, logging to log_dir/NAME.log."""
    name = name or config.command
    return ManagedProcess(name, [sys.executable, *service_argv(config)], config.ready, Path(log_dir) / f"{name}.log",
                          env or {})


class LocalSystem:
    """Services on one machine sharing a broker: the broker (started unless one runs there), the topics
    of every service's Kafka config, the services started in order and each waited for until ready;
    stopped in reverse order, and the broker too if this started it.

    Every process is built before any starts, so a config its service would refuse fails first.
    """

    def __init__(self, services: dict[str, ServiceConfig], log_dir: Path,
                 broker_config: broker.BrokerConfig | None = None, ready_timeout_s: float = 180) -> None:
        self.configs = services
        self.processes = [service_process(config, log_dir, name) for name, config in services.items()]
        self.broker_config = broker_config
        self.ready_timeout_s = ready_timeout_s
        self._started_broker = False

    def start(self) -> None:
        try:
            if self.broker_config is not None:
                self._started_broker = broker.running_pid(self.broker_config) is None
                broker.start(self.broker_config)
            for kafka in {config.kafka for config in self.configs.values()}:
                ensure_topics(kafka)
            for process in self.processes:
                process.start()
            for process in self.processes:
                process.wait_ready(self.ready_timeout_s)
        except BaseException:
            self.stop()
            raise

    def exited(self) -> ManagedProcess | None:
        """A service whose process has ended, if any."""
        return next((p for p in self.processes if p.process is not None and p.process.poll() is not None), None)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        if self._started_broker and self.broker_config is not None:
            broker.stop(self.broker_config)
            self._started_broker = False

    def __enter__(self) -> LocalSystem:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
