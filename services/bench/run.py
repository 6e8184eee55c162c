"""`modalign bench`: modalign measured side by side with what a user would run instead, in one run.

Each measurement runs modalign and its baseline in this one process, on the same model and the same
work, with repeats interleaved, and reports the ratio modalign / baseline (above 1: modalign is faster).
It writes OUT/bench.json (the ratios, medians and ranges, the machine and versions) and OUT/bench.md, a
section for docs/benchmarks.md with the command that produced it.

Measured: policy serving against transformers' `generate` (bench/serving.py), under Poisson arrivals at
concurrency 32 and as one static batch; feedback ingestion through the feedback service against
kafka-python's producer on the same broker (bench/ingestion.py; the command starts the broker, which
needs Java and the Kafka distribution `modalign kafka` uses). bench.json's `not_measured` lists what
issue 19 asks for that this command does not measure yet.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch

from modalign.bench import ingestion, serving
from modalign.bench.serving import Measured, make_requests
from modalign.core import broker
from modalign.core.config import add_arguments, build_config
from modalign.core.processes import free_port
from modalign.policy.engine import PolicyEngine
from modalign.policy.model import build_default_policy

NOT_MEASURED = {
    "rm_training_vs_trl": "reward-model training against TRL's RewardTrainer: not yet",
    "policy_update_vs_trl": "policy updates against TRL's trainers: not yet",
    "freshness_seconds": "feedback to a version serving canary traffic: not yet",
}


@dataclass(frozen=True)
class BenchConfig:
    """Benchmarks, each side by side with its baseline."""

    out: Path = Path("modalign-bench")
    """Where bench.json and bench.md are written."""
    quick: bool = False
    """A small run: less traffic, one repeat. It shows that everything runs; its ratios are noise."""
    repeats: int = 3
    """Timed passes per side and measurement, after an untimed warm-up (--quick: 1)."""


def measure_serving(quick: bool, repeats: int) -> dict[str, Measured]:
    """Continuous batching against transformers' generate (serving.py): Poisson arrivals at most 32
    outstanding, and one static batch of 32 requests arriving at once; the policy service's own bounds
    (32 rows, up to 5 ms of waiting for company)."""
    model, processor = build_default_policy(0)
    engine = PolicyEngine(model, processor)
    new_tokens = (2, 8) if quick else (4, 64)
    loads = {"serving_vs_hf_generate_poisson_c32": (12 if quick else 96, 40.0),
             "serving_vs_hf_generate_static": (8 if quick else 32, 0.0)}
    measured = {}
    for name, (count, rate) in loads.items():
        requests = make_requests(processor, count, *new_tokens, seed=0)
        arrivals = f"Poisson {rate:g}/s" if rate else "all at once"
        measured[name] = Measured(
            f"{count} requests, {arrivals}, at most 32 outstanding, {new_tokens[0]}-{new_tokens[1]} new tokens",
            "tokens/s", serving.compare(engine, requests, rate=rate, concurrency=32, max_batch_rows=32,
                                        max_wait_ms=5.0, repeats=repeats))
    return measured


def measure_ingestion(quick: bool, repeats: int, work: Path) -> dict[str, Measured]:
    """The feedback service against kafka-python's producer (ingestion.py), on a broker started for it."""
    node = broker.BrokerConfig(data_dir=work / "kafka", port=free_port(), controller_port=free_port())
    broker.start(node)
    try:
        requests, concurrency = (60, 4) if quick else (600, 16)
        comparison = ingestion.compare(node.bootstrap_servers, work / "logs", requests=requests,
                                       concurrency=concurrency, repeats=repeats)
    finally:
        broker.stop(node)
    return {"ingestion_vs_raw_producer": Measured(
        f"{requests} records, {concurrency} writers each waiting for its acknowledgement, one broker", "records/s",
        comparison)}


def report(config: BenchConfig, command: str, results: dict[str, Measured], seconds: float) -> dict:
    machine = {"host": platform.node(), "cpus": torch.get_num_threads(), "python": platform.python_version(),
               "torch": torch.__version__, "transformers": version("transformers"), "modalign": version("modalign")}
    return {
        "command": command, "quick": config.quick, "repeats": config.repeats, "machine": machine,
        "seconds": round(seconds, 1),
        "ratios": {name: round(m.comparison.ratio, 3) for name, m in results.items()},
        "details": {
            name: {"traffic": m.traffic, "unit": m.unit,
                   "ratio_range": [round(min(m.comparison.ratios), 3), round(max(m.comparison.ratios), 3)],
                   "baseline": m.comparison.baseline.__dict__, "modalign": m.comparison.modalign.__dict__}
            for name, m in results.items()
        },
        "not_measured": NOT_MEASURED,
    }


def markdown(result: dict) -> str:
    machine = result["machine"]
    lines = [
        f"### `modalign bench`, {time.strftime('%Y-%m-%d')}{' (--quick)' if result['quick'] else ''}", "",
        f"{machine['host']}, {machine['cpus']} torch threads; Python {machine['python']}, torch {machine['torch']}, "
        f"transformers {machine['transformers']}, modalign {machine['modalign']}; {result['repeats']} repeats, "
        f"{result['seconds']} s.", "", "```", result["command"], "```", "",
        "| measurement | traffic | baseline (median throughput, latency) | modalign | throughput ratio (median, range) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, detail in result["details"].items():
        sides = [f"{statistics.median(side['per_second']):.0f} {detail['unit']}, p50 {side['p50_ms']:.0f} ms, "
                 f"p99 {side['p99_ms']:.0f} ms" for side in (detail["baseline"], detail["modalign"])]
        low, high = detail["ratio_range"]
        lines.append(f"| {name} | {detail['traffic']} | {sides[0]} | {sides[1]} | "
                     f"{result['ratios'][name]:.2f}x ({low:.2f}-{high:.2f}) |")
    lines += ["", "Not measured yet: " + "; ".join(f"{name} ({why})" for name, why in result["not_measured"].items()) + "."]
    return "\n".join(lines) + "\n"


def bench(config: BenchConfig, command: str) -> dict:
    started = time.monotonic()
    repeats = 1 if config.quick else config.repeats
    with tempfile.TemporaryDirectory(prefix="modalign-bench-") as work:
        results = measure_serving(config.quick, repeats) | measure_ingestion(config.quick, repeats, Path(work))
    result = report(config, command, results, time.monotonic() - started)
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (config.out / "bench.md").write_text(markdown(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modalign bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, BenchConfig)
    argv = sys.argv[1:] if argv is None else argv
    config = build_config(parser, BenchConfig, parser.parse_args(argv))
    if config.repeats < 1:
        parser.error("--repeats must be at least 1")
    result = bench(config, shlex.join(["modalign", "bench", *argv]))
    for name, ratio in result["ratios"].items():
        print(f"{name}: {ratio:.2f}x")
    print(f"wrote {config.out / 'bench.json'} and {config.out / 'bench.md'}")
    return 0
