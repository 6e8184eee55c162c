"""Benchmark: what catching up with the feedback topic before storing each new feedback_id costs Submit.

Before it stores a feedback_id its ledger has not seen, the feedback service reads the topic up to its
end as of the call (FeedbackServicer._read_to_end, Ledger.catch_up), so that a copy another replica
stored is found rather than stored again. Three sides, each a real feedback service process on the same
broker (its own topics), called over real gRPC by the same clients:

  A  baseline: no catch-up before a write (the service before this change, for new ids).
  B  catch-up, the end offsets looked up by one long-lived consumer that concurrent callers share
     (ledger.EndOffsets): what the service does.
  C  catch-up, a new KafkaConsumer per lookup (what Ledger.catch_up did before, once per call).

C client threads, closed loop: each submits a new rating (its own feedback_id and user), waits for the
answer, then submits the next, until the pass's N requests are answered. Every answer must be OK and
new (not a duplicate); the script stops otherwise. Reported per side: requests per second, p50/p95
latency (pooled over repeats); then B/A and C/A throughput, the median and range of the per-repeat
ratios. Repeats rotate the order of the sides (A B C, B C A, C A B, ...) after an untimed warm-up, so
drift in the machine's load falls on all alike.

Run from the repository root (it starts its own broker, or --nodes 3 a three-node cluster with topics
at replication factor 3 and min.insync.replicas 2, on free loopback ports, and stops it):

    .venv/bin/python benchmarks/feedback_catch_up.py --requests 1000 --concurrency 16 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from modalign.bench.common import Pass, closed_loop, percentile
from modalign.bench.ingestion import submit_over_grpc
from modalign.core import broker
from modalign.core.auth import AuthConfig
from modalign.core.kafka import KafkaConfig, ensure_topics, make_consumer
from modalign.core.processes import free_port, grpc_serving
from modalign.core.service import serve_grpc
from modalign.feedback.ledger import stored_feedback
from modalign.feedback.server import ACCESS, SERVICE, FeedbackConfig, FeedbackServicer
from modalign.v1 import feedback_pb2_grpc

SIDES = {
    "A": "no catch-up (baseline)",
    "B": "catch-up, shared lookups",
    "C": "catch-up, a consumer per lookup",
}


class WithoutCatchUp(FeedbackServicer):
    """Side A: stores a new feedback_id on what its ledger has read so far."""

    def _read_to_end(self, timeout_s: float) -> None:
        pass


class ConsumerPerLookup:
    """Side C's end-offset lookup: a new consumer each time (connections, metadata, then ListOffsets)."""

    def __init__(self, kafka: KafkaConfig, partitions) -> None:
        self._kafka = kafka
        self._partitions = partitions

    def get(self, timeout_s: float):
        probe = make_consumer(self._kafka, group_id=None)
        try:
            return probe.end_offsets(self._partitions, timeout_ms=int(timeout_s * 1000))
        except Exception as error:
            raise TimeoutError(f"could not read the end offsets: {error}") from error
        finally:
            probe.close()

    def close(self) -> None:
        pass


def service_config(kafka: KafkaConfig, port: int) -> FeedbackConfig:
    return FeedbackConfig(listen=f"127.0.0.1:{port}", metrics_port=0, auth=AuthConfig(insecure=True), verify_authors=False,
                          kafka=kafka)


def serve(side: str, kafka: KafkaConfig, port: int) -> None:
    """One side's feedback service, in this (child) process, until SIGTERM."""
    config = service_config(kafka, port)
    ledger = stored_feedback(config.kafka, config.max_feedback_ids)
    ledger.start()
    if side == "C":
        ledger._end_offsets = ConsumerPerLookup(config.kafka, ledger._partitions)  # type: ignore[assignment]
    servicer = (WithoutCatchUp if side == "A" else FeedbackServicer)(config, ledger, None)
    try:
        serve_grpc(config, lambda server: feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(servicer, server),
                   [SERVICE.full_name], ACCESS)
    finally:
        servicer.close()
        ledger.stop()


def run_pass(address: str, requests: int, concurrency: int) -> Pass:
    return closed_loop(lambda: None, requests, concurrency, connect=submit_over_grpc(address))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=600, help="Submits per pass and side")
    parser.add_argument("--concurrency", type=int, default=16, help="client threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nodes", type=int, choices=(1, 3), default=1, help="Kafka nodes: 1, or a 3-node cluster (RF 3, min ISR 2)")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="feedback-catch-up-"))
    if args.nodes == 1:
        node = broker.BrokerConfig(data_dir=home / "kafka", port=free_port(), controller_port=free_port())
        broker.start(node)
        bootstrap, stop_kafka = node.bootstrap_servers, lambda: broker.stop(node)
    else:
        cluster = broker.Cluster.on_free_ports(home / "kafka")
        cluster.start()
        bootstrap, stop_kafka = cluster.bootstrap_servers, cluster.stop
    replication, min_isr = (3, 2) if args.nodes == 3 else (1, 1)
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        for side in SIDES:
            kafka = KafkaConfig(bootstrap_servers=bootstrap, topic_prefix=f"bench-{side}-{uuid.uuid4().hex[:6]}.",
                                replication_factor=replication, min_insync_replicas=min_isr, produce_timeout_s=5.0)
            ensure_topics(kafka)
            port = free_port()
            process = subprocess.Popen(
                [sys.executable, __file__, "--serve", side, kafka.bootstrap_servers, kafka.topic_prefix,
                 str(replication), str(min_isr), str(port)],
                stdout=open(home / f"{side}.log", "wb"), stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            servers[side] = (process, f"127.0.0.1:{port}")
        for side, (process, address) in servers.items():
            deadline = time.monotonic() + 120
            while not grpc_serving(address, SERVICE.full_name):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"side {side} did not serve; see {home / f'{side}.log'}")
                time.sleep(0.2)

        print(f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"load average {os.getloadavg()[0]:.2f}; Kafka {args.nodes} node(s), RF {replication}, min ISR {min_isr}; "
              f"{args.requests} Submits per pass, {args.concurrency} clients, {args.repeats} repeats", flush=True)
        for _, address in servers.values():
            run_pass(address, max(args.concurrency * 4, 50), args.concurrency)  # warm-up: connections and metadata
        runs: dict[str, list[Pass]] = {side: [] for side in SIDES}
        order = list(SIDES)
        for repeat in range(args.repeats):
            for side in order:
                run = run_pass(servers[side][1], args.requests, args.concurrency)
                runs[side].append(run)
                print(f"  repeat {repeat + 1} {side}: {run.per_s:7.1f} Submits/s", flush=True)
            order = order[1:] + order[:1]

        print("\n| side | Submits/s, median (min-max) | latency p50 | latency p95 |")
        print("| --- | --- | --- | --- |")
        for side, label in SIDES.items():
            rates = [run.per_s for run in runs[side]]
            latencies = [latency for run in runs[side] for latency in run.latencies_s]
            print(f"| {side}: {label} | {statistics.median(rates):.1f} ({min(rates):.1f}-{max(rates):.1f}) | "
                  f"{percentile(latencies, 50) * 1000:.1f} ms | {percentile(latencies, 95) * 1000:.1f} ms |")
        for side in ("B", "C"):
            ratios = [b.per_s / a.per_s for a, b in zip(runs["A"], runs[side])]
            print(f"\n{side}/A Submits/s: median {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) "
                  f"over {args.repeats} repeats")
        print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    finally:
        for process, _ in servers.values():
            process.terminate()
        for process, _ in servers.values():
            process.wait(30)
        stop_kafka()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        side, bootstrap, prefix, replication, min_isr, port = sys.argv[2:8]
        serve(side, KafkaConfig(bootstrap_servers=bootstrap, topic_prefix=prefix, replication_factor=int(replication),
                                min_insync_replicas=int(min_isr), produce_timeout_s=5.0), int(port))
    else:
        main()
