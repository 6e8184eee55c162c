"""The `modalign` command: run the local broker, each service, or the whole system at once."""

from __future__ import annotations

import argparse
import sys

from modalign.core import broker
from modalign.core.kafka import KafkaConfig, ensure_topics

# Subcommands that parse their own flags (modalign NAME --help lists them): module, help.
COMMANDS = {
    "demo": ("modalign.demo.run", "the whole loop with simulated users, ending with a report"),
    "policy": ("modalign.policy.server", "run the policy service"),
    "reward": ("modalign.reward.server", "run the reward service"),
    "feedback": ("modalign.feedback.server", "run the feedback service"),
    "trainer": ("modalign.trainer.service", "run the online trainer"),
    "rollout": ("modalign.rollout.server", "run the rollout controller"),
}


def kafka_command(args: argparse.Namespace) -> int:
    config = broker.config_from_arguments(args)
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
    return run_local_system(broker.config_from_arguments(args), ports, example=args.example)


def module_command(args: argparse.Namespace, rest: list[str]) -> int:
    import importlib

    return importlib.import_module(COMMANDS[args.command][0]).main(rest) or 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="modalign", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    kafka = commands.add_parser("kafka", help="the local Apache Kafka broker (KRaft, one node)")
    kafka.add_argument("action", choices=["start", "stop", "status"])
    broker.add_arguments(kafka)

    up = commands.add_parser("up", help="start the broker and every service on loopback; Ctrl-C stops all")
    broker.add_arguments(up)
    up.add_argument("--example", action="store_true", help="once up, make one example client call")
    up.add_argument("--grpc-base-port", type=int, default=50051,
                    help="policy, feedback, reward REST, reward gRPC and rollout listen on this port and the next four")
    up.add_argument("--metrics-base-port", type=int, default=9101,
                    help="policy, feedback, trainer and rollout /metrics listen on this port, +1, +3 and +4")

    for name, (_, help_text) in COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)

    args, rest = parser.parse_known_args(argv)
    if args.command == "kafka":
        sys.exit(kafka_command(args))
    if args.command == "up":
        sys.exit(up_command(args))
    sys.exit(module_command(args, rest))
