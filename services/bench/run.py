"""`modalign bench`: modalign measured side by side with what a user would run instead, in one run.

Each measurement runs modalign and its baseline in this one process, on the same model and the same
work, with repeats interleaved, and reports the ratio modalign / baseline (above 1: modalign is faster).
It writes OUT/bench.json (the ratios, medians and ranges, the machine and versions) and OUT/bench.md, a
section for docs/benchmarks.md with the command that produced it.

Measured, each module's docstring saying exactly what its two sides are:
- policy serving against transformers' `generate` (bench/serving.py), under Poisson arrivals at
  concurrency 1, 8 and 32 and as one static batch;
- the services' transports against calling the same model in this process (bench/overhead.py): the
  policy over gRPC and over its OpenAI-compatible HTTP API, the reward model over OIP v2 REST;
- feedback ingestion through the feedback service against kafka-python's producer on the same broker
  (bench/ingestion.py);
- reward-model training and policy updates against TRL's trainers on the same work (bench/training.py);
- freshness (a feedback to a version trained on it serving canary traffic) and each service's resident
  memory, from the demo's loop run for a few minutes with its settings (bench/loop.py).

The command starts a broker for the measurements that need one (Java and the Kafka distribution
`modalign kafka` uses), and TRL and the `openai` client come with the bench extra
(`uv run --extra bench modalign bench`). Every measurement runs with one torch thread per process, as
modalign's services do on a small machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from modalign.bench import ingestion, loop, serving

try:
    from modalign.bench import overhead, training
except ModuleNotFoundError as missing:  # TRL and openai come with the bench extra, not with modalign itself
    raise SystemExit(f"modalign bench needs {missing.name!r}, which the bench extra installs: "
                     "uv run --extra bench modalign bench") from missing
from modalign.bench.common import Measured
from modalign.bench.serving import make_requests
from modalign.core import broker
from modalign.core.config import add_arguments, build_config
from modalign.core.processes import free_port
from modalign.policy.config import PolicyConfig
from modalign.policy.engine import PolicyEngine
from modalign.policy.model import build_default_policy


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
    """Continuous batching against transformers' generate (serving.py): Poisson arrivals with at most 1, 8
    and 32 outstanding, and one static batch of 32 requests arriving at once; the policy service's own bounds
    (32 rows, up to 5 ms of waiting for company)."""
    model, processor = build_default_policy(0)
    engine = PolicyEngine(model, processor)
    new_tokens = (2, 8) if quick else (4, 64)
    # Poisson arrivals faster than either side serves (each waits for one of the places to free up):
    # throughput is then what each side can do, not the arrival rate. Fewer requests where fewer run at once.
    loads = {  # name: (requests, arrivals per second, most outstanding)
        "serving_vs_hf_generate_poisson_c1": (3 if quick else 24, 1000.0, 1),
        "serving_vs_hf_generate_poisson_c8": (6 if quick else 64, 1000.0, 8),
        "serving_vs_hf_generate_poisson_c32": (12 if quick else 192, 1000.0, 32),
        "serving_vs_hf_generate_static": (8 if quick else 32, 0.0, 32),
    }
    measured = {}
    for name, (count, rate, concurrency) in loads.items():
        requests = make_requests(processor, count, *new_tokens, seed=0)
        arrivals = f"Poisson {rate:g}/s" if rate else "all at once"
        measured[name] = Measured(
            f"{count} requests, {arrivals}, at most {concurrency} outstanding, {new_tokens[0]}-{new_tokens[1]} new tokens",
            "tokens/s", serving.compare(engine, requests, rate=rate, concurrency=concurrency, policy=PolicyConfig(),
                                        repeats=repeats))
    return measured


def measure_on_a_broker(quick: bool, repeats: int, work: Path) -> dict[str, Measured]:
    """Feedback ingestion (ingestion.py) and the policy's transports (overhead.py), on a broker started for them."""
    node = broker.BrokerConfig(data_dir=work / "kafka", port=free_port(), controller_port=free_port())
    broker.start(node)
    try:
        requests, concurrency = (60, 4) if quick else (600, 16)
        measured = {"ingestion_vs_raw_producer": Measured(
            f"{requests} records, {concurrency} writers each waiting for its acknowledgement, one broker", "records/s",
            ingestion.compare(node.bootstrap_servers, work / "logs", requests=requests, concurrency=concurrency,
                              repeats=repeats))}
        return measured | overhead.measure_policy(node.bootstrap_servers, work, requests=16 if quick else 128,
                                                  concurrency=8, repeats=repeats)
    finally:
        broker.stop(node)


def report(config: BenchConfig, command: str, repeats: int, results: dict[str, Measured], loop_result: dict,
           seconds: float) -> dict:
    machine = {"host": platform.node(), "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
               "python": platform.python_version(), "torch": torch.__version__,
               "transformers": version("transformers"), "trl": version("trl"), "modalign": version("modalign")}
    ratios: dict[str, Any] = {}
    for name, measured in results.items():
        group, _, key = name.partition(".")  # "policy_update_vs_trl.dpo": a ratio per algorithm
        if key:
            ratios.setdefault(group, {})[key] = round(measured.comparison.ratio, 3)
        else:
            ratios[name] = round(measured.comparison.ratio, 3)
    return {
        "command": command, "quick": config.quick, "repeats": repeats, "machine": machine,
        "seconds": round(seconds, 1), "ratios": ratios,
        "freshness_seconds": loop_result["freshness_seconds"]["median"],
        "freshness": loop_result["freshness_seconds"], "memory_mib": loop_result["memory_mib"],
        "loop": loop_result["traffic"],
        "details": {
            name: {"traffic": m.traffic, "unit": m.unit, "ratio": round(m.comparison.ratio, 3),
                   "ratio_range": [round(min(m.comparison.ratios), 3), round(max(m.comparison.ratios), 3)],
                   "baseline": m.comparison.baseline.__dict__, "modalign": m.comparison.modalign.__dict__}
            for name, m in results.items()
        },
    }


def markdown(result: dict) -> str:
    machine = result["machine"]
    lines = [
        f"### `modalign bench`, {time.strftime('%Y-%m-%d')}{' (--quick)' if result['quick'] else ''}", "",
        f"{machine['host']}, {machine['cpus']} CPUs, {machine['torch_threads']} torch thread(s) per process; Python "
        f"{machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}, TRL {machine['trl']}, "
        f"modalign {machine['modalign']}; {result['repeats']} repeats, "
        f"{result['seconds']} s.", "", "```", result["command"], "```", "",
        "| measurement | traffic | baseline (median throughput, latency) | modalign | throughput ratio (median, range) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, detail in result["details"].items():
        sides = [f"{statistics.median(side['per_second']):.0f} {detail['unit']}, p50 {side['p50_ms']:.0f} ms, "
                 f"p99 {side['p99_ms']:.0f} ms" for side in (detail["baseline"], detail["modalign"])]
        low, high = detail["ratio_range"]
        lines.append(f"| {name} | {detail['traffic']} | {sides[0]} | {sides[1]} | "
                     f"{detail['ratio']:.2f}x ({low:.2f}-{high:.2f}) |")
    freshness = result["freshness"]
    lines += ["", f"Freshness ({result['loop']}): median {freshness['median']:.1f} s, p90 {freshness['p90']:.1f} s, "
              f"over {freshness['measured']} feedback ({freshness['left_out']} not yet in a version that served; "
              f"{freshness['passed_over']} passed over by the trainer as older than its --max-feedback-age-s).", "",
              "| service | resident memory at idle | under load (median) | under load (max) |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {memory['idle']:.0f} MiB | {memory['load_median']:.0f} MiB | {memory['load_max']:.0f} MiB |"
              for name, memory in result["memory_mib"].items()]
    return "\n".join(lines) + "\n"


def bench(config: BenchConfig, command: str) -> dict:
    started = time.monotonic()
    repeats = 1 if config.quick else config.repeats
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="modalign-bench-") as work:
        results = (measure_serving(config.quick, repeats) | measure_on_a_broker(config.quick, repeats, Path(work))
                   | overhead.measure_reward(Path(work), requests=16 if config.quick else 256, concurrency=8,
                                             repeats=repeats)
                   | training.measure_training(config.quick, repeats))
    loop_result = loop.measure_loop(config.quick)  # last: the whole loop, with the machine to itself
    result = report(config, command, repeats, results, loop_result, time.monotonic() - started)
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
    for name, detail in result["details"].items():
        print(f"{name}: {detail['ratio']:.2f}x")
    print(f"freshness: median {result['freshness_seconds']:.1f} s")
    print(f"wrote {config.out / 'bench.json'} and {config.out / 'bench.md'}")
    return 0
