"""Benchmark: the policy service's continuous batching against the serving loop a user would script with
transformers, under Poisson arrivals, at any traffic (modalign/bench/serving.py has the two sides;
`modalign bench` runs its standard loads).

Run from the repository root:

    .venv/bin/python benchmarks/continuous_batching.py --requests 96 --rate 40 --concurrency 32 --repeats 3
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch

from modalign.bench.serving import compare, make_requests
from modalign.policy.config import PolicyConfig
from modalign.policy.engine import PolicyEngine
from modalign.policy.model import build_default_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=96, help="requests per pass")
    parser.add_argument("--rate", type=float, default=40.0, help="Poisson arrival rate, requests per second (0: all at once)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests outstanding at most")
    parser.add_argument("--min-new-tokens", type=int, default=4, help="fewest tokens a request wants")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="most tokens a request wants")
    defaults = PolicyConfig()
    parser.add_argument("--max-batch-rows", type=int, default=defaults.max_batch_rows,
                        help="batch bound of both sides (the server's default)")
    parser.add_argument("--max-wait-ms", type=float, default=defaults.max_batch_wait_ms,
                        help="wait for company of both sides (the server's default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per side, after an untimed warm-up")
    args = parser.parse_args()
    model, processor = build_default_policy(0)
    engine = PolicyEngine(model, processor)
    requests = make_requests(processor, args.requests, args.min_new_tokens, args.max_new_tokens, seed=0)
    policy = PolicyConfig(max_batch_rows=args.max_batch_rows, max_batch_wait_ms=args.max_wait_ms)
    result = compare(engine, requests, rate=args.rate, concurrency=args.concurrency, policy=policy, repeats=args.repeats)
    print(f"# {platform.node()}, {torch.get_num_threads()} threads, torch {torch.__version__}; {args.requests} requests, "
          f"Poisson {args.rate}/s, concurrency {args.concurrency}, {args.min_new_tokens}-{args.max_new_tokens} new tokens "
          f"(greedy), max_batch_rows {args.max_batch_rows}, max_wait_ms {args.max_wait_ms}, repeats {args.repeats}")
    print("| side | useful tokens/s (median, range) | p50 latency | p99 latency |")
    print("| --- | --- | --- | --- |")
    for side, label in ((result.baseline, "A: transformers `generate`, static batches"),
                        (result.modalign, "B: modalign, continuous batching")):
        rates = side.per_second
        print(f"| {label} | {statistics.median(rates):.1f} ({min(rates):.1f}-{max(rates):.1f}) | "
              f"{side.p50_ms:.0f} ms | {side.p99_ms:.0f} ms |")
    print(f"B/A throughput: {result.ratio:.2f}x (range {min(result.ratios):.2f}-{max(result.ratios):.2f}), "
          f"every request's tokens identical on both sides")


if __name__ == "__main__":
    main()
