"""The `modalign` command: run the local broker, each service, or the whole system at once."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modalign.core import broker
from modalign.core.kafka import KafkaConfig, ensure_topics

SERVICES = {
    "policy": "modalign.policy.server",
    "reward": "modalign.reward.server",
    "feedback": "modalign.feedback.server",
    "trainer": "modalign.trainer.service",
    "rollout": "modalign.rollout.server",
}


def _broker_config(args: argparse.Namespace) -> broker.BrokerConfig:
    return broker.BrokerConfig(data_dir=Path(args.data_dir), port=args.port, controller_port=args.controller_port)


def _add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = broker.BrokerConfig()
    parser.add_argument("--data-dir", default=str(defaults.data_dir), help="broker data; survives restarts")
    parser.add_argument("--port", type=int, default=defaults.port, help="client port on 127.0.0.1")
    parser.add_argument("--controller-port", type=int, default=defaults.controller_port)


def kafka_command(args: argparse.Namespace) -> int:
    config = _broker_config(args)
    if args.action == "start":
        pid = broker.start(config)
        created = ensure_topics(KafkaConfig(bootstrap_servers=config.bootstrap_servers))
        print(f"kafka running, pid {pid}, bootstrap {config.bootstrap_servers}, data {config.data_dir}")
        for topic in created:
            print(f"created topic {topic}")
    elif args.action == "stop":
        print("kafka stopped" if broker.stop(config) else "kafka was not running")
    else:
        pid = broker.running_pid(config)
        print(f"kafka running, pid {pid}, bootstrap {config.bootstrap_servers}" if pid else "kafka not running")
        return 0 if pid else 3  # 3: "not running", as LSB init scripts report it
    return 0


def up_command(args: argparse.Namespace) -> int:
    from modalign.up import LocalPorts, run_local_system

    ports = LocalPorts(grpc_base=args.grpc_base_port, metrics_base=args.metrics_base_port)
    return run_local_system(_broker_config(args), ports, example=args.example)


def service_command(args: argparse.Namespace, rest: list[str]) -> int:
    import importlib

    importlib.import_module(SERVICES[args.command]).main(rest)
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="modalign", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    kafka = commands.add_parser("kafka", help="the local Apache Kafka broker (KRaft, one node)")
    kafka.add_argument("action", choices=["start", "stop", "status"])
    _add_broker_arguments(kafka)

    up = commands.add_parser("up", help="start the broker and every service on loopback; Ctrl-C stops all")
    _add_broker_arguments(up)
    up.add_argument("--example", action="store_true", help="once up, make one example client call")
    up.add_argument("--grpc-base-port", type=int, default=50051,
                    help="policy, feedback, reward REST, reward gRPC and rollout listen on this port and the next four")
    up.add_argument("--metrics-base-port", type=int, default=9101,
                    help="policy, feedback, trainer and rollout /metrics listen on this port, +1, +3 and +4")

    for name in SERVICES:
        # The service parses its own flags (modalign NAME --help lists them), so this parser takes none.
        commands.add_parser(name, help=f"run the {name} service", add_help=False)

    args, rest = parser.parse_known_args(argv)
    if args.command == "kafka":
        sys.exit(kafka_command(args))
    if args.command == "up":
        sys.exit(up_command(args))
    sys.exit(service_command(args, rest))
