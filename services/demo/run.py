"""`modalign demo`: the whole online RLHF loop with simulated users, ending with a report.

1. v0: the warm start (built by modalign.demo.warmstart on first use and cached), or --policy-model.
2. The broker (started if it is not running; the demo's topics get their own prefix) and every
   service: feedback, policy, reward, trainer (DPO on the users' preferences) and the rollout
   controller, with settings that let versions move in minutes rather than hours.
3. Simulated users talk to policy and feedback over gRPC until --minutes pass or --versions versions
   have been promoted; progress is printed as it goes.
4. Every version is evaluated on held-out scenes and the report is written to --out.
"""

from __future__ import annotations

import argparse
import signal
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import grpc

from modalign.core import broker
from modalign.core.kafka import KafkaConfig, ensure_topics, read_topic
from modalign.core.version_names import STARTING_VERSION
from modalign.core.modelstore import fetch
from modalign.core.versions import ACTIVE_PHASES
from modalign.demo.report import evaluate_versions, held_out_examples, write_report
from modalign.demo.users import SimulatedUsers, UsersConfig
from modalign.demo.warmstart import build_warm_start
from modalign.up import LocalPorts, local_services
from modalign.v1 import events_pb2, rollout_pb2, rollout_pb2_grpc

DEFAULT_CACHE = Path.home() / ".cache" / "modalign" / "warm-start"

# Settings for versions to move in minutes on a small CPU machine; each is a flag of its service.
DEMO_ARGS = {
    "trainer": ["--learner.algorithm", "dpo", "--round-max-seconds", "5", "--min-pairs-to-learn", "16",
                "--rounds-per-version", "2", "--learner.max-new-tokens", "32", "--learner.policy-lr", "1e-4"],
    "rollout": ["--rollout.steps", "50,100", "--rollout.min-step-seconds", "10", "--rollout.min-samples", "15",
                "--rollout.required-metrics", "rating", "--tick-seconds", "1"],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="modalign demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("modalign-demo"), help="where the report goes")
    parser.add_argument("--minutes", type=float, default=9.0, help="longest the loop runs")
    parser.add_argument("--versions", type=int, default=10, help="stop once this many versions were promoted")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--users", type=int, default=4, help="simulated users sending requests at once")
    parser.add_argument("--policy-model", type=Path, default=None,
                        help="a Hugging Face image-text-to-text checkpoint folder to start from instead of the warm start")
    parser.add_argument("--device", default="cpu",
                        help="torch device of the policy, reward model, trainer and evaluation: cpu, cuda, cuda:1, ...")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where warm starts are cached")
    parser.add_argument("--held-out", type=int, default=200, help="held-out scenes each version is judged on")
    parser.add_argument("--grpc-base-port", type=int, default=50151,
                        help="policy, feedback, reward REST, reward gRPC and rollout listen on this port and the next four")
    parser.add_argument("--metrics-base-port", type=int, default=9201)
    broker.add_arguments(parser)  # the local broker: used if running, else started and stopped again
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    if args.policy_model is not None:
        policy_model, warm_start_seconds = args.policy_model, 0.0
    else:
        print("warm start: building or loading v0 ...", flush=True)
        policy_model = build_warm_start(args.cache_dir, seed=args.seed)
        warm_start_seconds = time.monotonic() - started
        print(f"warm start: {policy_model} ({warm_start_seconds:.0f} s)", flush=True)

    broker_config = broker.config_from_arguments(args)
    started_broker = broker.running_pid(broker_config) is None
    broker.start(broker_config)
    kafka = KafkaConfig(bootstrap_servers=broker_config.bootstrap_servers, topic_prefix=f"demo-{uuid.uuid4().hex[:8]}.")
    ensure_topics(kafka)
    home = args.out.resolve() / "work"
    ports = LocalPorts(grpc_base=args.grpc_base_port, metrics_base=args.metrics_base_port)
    extra = {**DEMO_ARGS, "policy": ["--model-dir", str(policy_model), "--device", args.device],
             "reward": ["--device", args.device],
             "trainer": [*DEMO_ARGS["trainer"], "--learner.policy-model-dir", str(policy_model),
                         "--learner.seed", str(args.seed), "--learner.device", args.device]}
    services = local_services(["--kafka.bootstrap-servers", kafka.bootstrap_servers,
                               "--kafka.topic-prefix", kafka.topic_prefix], home, ports, extra)
    stopping = []
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    users = None
    try:
        for service in services:
            service.start()
        for service in services:
            service.wait_ready(timeout_s=300)
        print(f"demo: services up (logs in {home / 'logs'}); users start", flush=True)
        users = SimulatedUsers(UsersConfig(users=args.users, seed=args.seed), ports.policy, ports.feedback)
        loop_started = time.monotonic()
        users.start()
        promoted = watch(ports.rollout, users, loop_started, args, stopping)
        users.stop()
        loop_seconds = time.monotonic() - loop_started
        published = read_topic(kafka, "policy-versions", events_pb2.PolicyVersionPublished)
        states = read_topic(kafka, "rollout", events_pb2.RolloutState)
    finally:
        if users is not None:
            users.stop()
        for service in reversed(services):
            service.stop()
        if started_broker:
            broker.stop(broker_config)
    # After the services stopped: the evaluation has the CPU to itself.
    print(f"demo: loop ran {loop_seconds:.0f} s, {promoted} versions promoted; evaluating ...", flush=True)
    report(args, published, states, policy_model, home, loop_seconds, warm_start_seconds)
    return 0


def watch(rollout_address: str, users: SimulatedUsers, started: float, args: argparse.Namespace, stopping: list) -> int:
    """Prints progress every few seconds; returns the number of versions promoted when it stops."""
    seen_revision, stables = 0, {STARTING_VERSION}
    with grpc.insecure_channel(rollout_address) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        while not stopping and time.monotonic() - started < args.minutes * 60 and len(stables) - 1 < args.versions:
            time.sleep(5)
            state = stub.GetState(rollout_pb2.GetStateRequest(), timeout=30)
            stables.add(state.stable_version)  # stable changes only by promotion, at most once per step
            if state.revision != seen_revision:
                seen_revision = state.revision
                print(f"[{time.monotonic() - started:5.0f} s] rollout: {state.reason}", flush=True)
            canary = f", canary {state.canary_version} at {state.canary_weight_percent}%" if state.phase in ACTIVE_PHASES else ""
            tally = users.tally
            print(f"[{time.monotonic() - started:5.0f} s] stable {state.stable_version}{canary};"
                  f" requests {tally.requests} (failed {tally.failed}), feedback {dict(tally.feedback)}", flush=True)
    return len(stables) - 1


def report(args: argparse.Namespace, published: list[events_pb2.PolicyVersionPublished],
           states: list[events_pb2.RolloutState], policy_model: Path, home: Path, loop_seconds: float,
           warm_start_seconds: float) -> None:
    promoted = {s.canary_version for s in states if s.phase == events_pb2.ROLLOUT_PHASE_PROMOTED}
    final = states[-1].stable_version if states else STARTING_VERSION
    versions = [(STARTING_VERSION, policy_model, True)] + [(e.version, fetch(e.uri), e.version in promoted) for e in published]
    reward_models = sorted((home / "models" / "reward").glob("r*"), key=lambda p: p.stat().st_mtime)
    results = evaluate_versions(versions, reward_models[-1] if reward_models else None, held_out_examples(args.held_out),
                                device=args.device)
    timeline = [
        {"time": datetime.fromtimestamp(s.updated_at.seconds, timezone.utc).strftime("%H:%M:%S"),
         "revision": s.revision, "canary": s.canary_version, "stable": s.stable_version,
         "phase": events_pb2.RolloutPhase.Name(s.phase), "weight": s.canary_weight_percent, "reason": s.reason}
        for s in states
    ]
    write_report(args.out, results, timeline,
                 {"seconds": loop_seconds, "warm_start_seconds": warm_start_seconds, "final": final, "seed": args.seed})
    for r in results:
        print(f"  {r.version}: hallucination {r.hallucination_rate:.1%}, win rate vs v0 {r.win_rate_vs_v0:.1%}"
              f" {'(promoted)' if r.promoted else ''}")
    print(f"demo: report in {args.out / 'report.md'} and {args.out / 'report.json'}; final version {final}")
