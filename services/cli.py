"""The `modalign` command: run the local broker, each service, or the whole system at once.

Each subcommand is a module's main(argv), which parses its own flags (`modalign NAME --help` lists
them, each with its MODALIGN_* environment variable). Launchers start services the same way:
`python -m modalign NAME ...` (modalign.core.launch).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand: (module whose main(argv) runs it, help).
COMMANDS = {
    "kafka": ("modalign.core.broker", "the local Apache Kafka broker (KRaft, one node): start, stop or status"),
    "up": ("modalign.up", "start the broker and every service on loopback; Ctrl-C stops all"),
    "demo": ("modalign.demo.run", "the whole loop with simulated users, ending with a report"),
    "soak": ("modalign.soak", "the whole system under mixed traffic while services are killed and restarted; a verdict"),
    "policy": ("modalign.policy.server", "run the policy service"),
    "reward": ("modalign.reward.server", "run the reward service"),
    "feedback": ("modalign.feedback.server", "run the feedback service"),
    "trainer": ("modalign.trainer.service", "run the online trainer"),
    "rollout": ("modalign.rollout.server", "run the rollout controller"),
    "dead-letters": ("modalign.trainer.dead_letters", "list the feedback the trainer set aside, or replay it once fixed"),
    "eval": ("modalign.evaluation.run", "a policy version's BLEU, ROUGE-L, POPE and reward on an evaluation set"),
    "export-version": ("modalign.policy.export", "a published policy version into a folder: as stored, or --merged into a full checkpoint"),
    "bench": ("modalign.bench.run", "benchmarks side by side with the baselines users would pick, as ratios (bench.json, bench.md)"),
    "data": ("modalign.data", "public preference datasets in as generations and feedback, the joined feedback out for TRL"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="modalign", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    sys.exit(importlib.import_module(COMMANDS[args.command][0]).main(rest) or 0)
