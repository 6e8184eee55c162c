"""`modalign bench`: modalign measured side by side with what a user would run instead, in one run.

Each measurement runs modalign and its baseline in this one process, on the same model and the same
work, with repeats interleaved, and reports the ratio modalign / baseline (above 1: modalign is faster).
It writes OUT/bench.json (the ratios, medians and ranges, the machine and versions) and OUT/bench.md, a
section for docs/benchmarks.md with the command that produced it.

Measured: policy serving against transformers' `generate` (bench/serving.py), under Poisson arrivals at
concurrency 32 and as one static batch. bench.json's `not_measured` lists what issue 19 asks for that
this command does not measure yet.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch

from modalign.bench.serving import Comparison, compare, make_requests
from modalign.core.config import add_arguments, build_config
from modalign.policy.engine import PolicyEngine
from modalign.policy.model import build_default_policy

NOT_MEASURED = {
    "ingestion_vs_raw_producer": "feedback through gRPC to Kafka against kafka-python's producer: benchmarks/feedback_catch_up.py "
                                 "measures the feedback service, not yet against the raw producer",
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
    """A small run: fewer and shorter requests, one repeat. It shows that everything runs; its ratios are noise."""
    repeats: int = 3
    """Timed passes per side and measurement, after an untimed warm-up (--quick: 1)."""


@dataclass(frozen=True)
class ServingLoad:
    """One serving measurement's traffic."""

    name: str
    requests: int
    rate: float
    """Poisson arrivals per second; 0: all at once."""
    concurrency: int
    min_new_tokens: int
    max_new_tokens: int


def serving_loads(quick: bool) -> list[ServingLoad]:
    if quick:
        return [ServingLoad("serving_vs_hf_generate_poisson_c32", 12, 40.0, 32, 2, 8),
                ServingLoad("serving_vs_hf_generate_static", 8, 0.0, 32, 2, 8)]
    return [ServingLoad("serving_vs_hf_generate_poisson_c32", 96, 40.0, 32, 4, 64),
            ServingLoad("serving_vs_hf_generate_static", 32, 0.0, 32, 4, 64)]


def measure_serving(load: ServingLoad, engine: PolicyEngine, repeats: int) -> Comparison:
    requests = make_requests(engine.processor, load.requests, load.min_new_tokens, load.max_new_tokens, seed=0)
    # The policy service's own bounds: 32 rows, up to 5 ms of waiting for company.
    return compare(engine, requests, rate=load.rate, concurrency=load.concurrency, max_batch_rows=32,
                   max_wait_ms=5.0, repeats=repeats)


def report(config: BenchConfig, command: str, results: dict[str, tuple[ServingLoad, Comparison]],
           seconds: float) -> dict:
    machine = {"host": platform.node(), "cpus": torch.get_num_threads(), "python": platform.python_version(),
               "torch": torch.__version__, "transformers": version("transformers"), "modalign": version("modalign")}
    return {
        "command": command, "quick": config.quick, "repeats": config.repeats, "machine": machine,
        "seconds": round(seconds, 1),
        "ratios": {name: round(comparison.ratio, 3) for name, (_, comparison) in results.items()},
        "details": {
            name: {"load": load.__dict__, "ratio_range": [round(min(c.ratios), 3), round(max(c.ratios), 3)],
                   "baseline": c.baseline.__dict__, "modalign": c.modalign.__dict__}
            for name, (load, c) in results.items()
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
        "| measurement | traffic | baseline (median tokens/s, latency) | modalign | throughput ratio (median, range) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, detail in result["details"].items():
        load = detail["load"]
        arrivals = f"Poisson {load['rate']:g}/s" if load["rate"] else "all at once"
        traffic = (f"{load['requests']} requests, {arrivals}, at most {load['concurrency']} outstanding, "
                   f"{load['min_new_tokens']}-{load['max_new_tokens']} new tokens")
        sides = [f"{statistics.median(side['tokens_per_second']):.0f} tokens/s, p50 {side['p50_ms']:.0f} ms, "
                 f"p99 {side['p99_ms']:.0f} ms"
                 for side in (detail["baseline"], detail["modalign"])]
        low, high = detail["ratio_range"]
        lines.append(f"| {name} | {traffic} | {sides[0]} | {sides[1]} | {result['ratios'][name]:.2f}x ({low:.2f}-{high:.2f}) |")
    lines += ["", "Not measured yet: " + "; ".join(f"{name} ({why})" for name, why in result["not_measured"].items()) + "."]
    return "\n".join(lines) + "\n"


def bench(config: BenchConfig, command: str) -> dict:
    started = time.monotonic()
    repeats = 1 if config.quick else config.repeats
    model, processor = build_default_policy(0)
    engine = PolicyEngine(model, processor)
    results = {load.name: (load, measure_serving(load, engine, repeats)) for load in serving_loads(config.quick)}
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
