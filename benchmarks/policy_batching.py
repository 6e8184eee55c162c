"""Benchmark: what the policy service's dynamic batching buys over serving one request at a time.

Both sides run in this one process, on the same engine and the same requests, with their repeats
interleaved (A B, then B A, ...) so that drift in the machine's load falls on both alike:

  A  baseline: every request served alone, one after the other: engine.generate([request]).
  B  DynamicBatcher: C client threads, closed loop (each submits a request, waits for its samples,
     then submits the next), merged into batches by the batcher's worker thread.

Every request has a fixed seed and a fixed max_new_tokens, and the engine's samples do not depend on
their batch companions, so both sides generate exactly the same tokens: the script checks this
request by request and fails otherwise. The figure of merit is generated tokens per wall-clock second
(encoding, prefill and decoding all included), and the ratio B/A is reported per repeat, as a median
and range. Beside it, tokens per CPU-second of this process: on a shared machine another process's
load stretches wall time but hardly the CPU time this process gets, so that ratio is the steadier
estimate of the work batching saves (client threads only wait on futures, so the CPU time is the
engine's).

Latency means different things on the two sides, and both are reported as they are: for A it is
the time of one generate([request]) with nothing queued ahead of it (what a lone caller sees); for B
it is submit-to-result under C concurrent clients, including the batcher's wait for company and the
time spent sharing a batch.

Run from the repository root:

    .venv/bin/python benchmarks/policy_batching.py --requests 64 --concurrency 16 --repeats 3
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw

from modalign.policy.batcher import DynamicBatcher
from modalign.policy.engine import GenerationRequest, PolicyEngine, SamplingParams
from modalign.policy.model import IMAGE_SIZE, build_default_policy, format_prompt

QUESTIONS = (
    "What colour is the shape?",
    "How many shapes are there?",
    "Where is the circle?",
    "Describe the image.",
    "Is there a red square?",
    "Which one is bigger?",
)
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")
BACKGROUNDS = ("white", "black", "gray", "lightblue")


def make_image(rng: random.Random) -> Image.Image:
    """A 32x32 picture of one to three shapes, round-tripped through PNG bytes as a client would send it."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):
        x, y, size = rng.randint(0, 20), rng.randint(0, 20), rng.randint(6, 12)
        box = (x, y, x + size, y + size)
        kind, colour = rng.choice(("circle", "square", "triangle")), rng.choice(COLOURS)
        if kind == "circle":
            draw.ellipse(box, fill=colour)
        elif kind == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x + size // 2, y), (x, y + size), (x + size, y + size)], fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    buffer.seek(0)
    decoded = Image.open(buffer)
    decoded.load()
    return decoded


def make_requests(processor, count: int, max_new_tokens: int, seed: int) -> list[GenerationRequest]:
    """count requests: a short question and one image each, sampled at temperature 1 with seed + i."""
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        text = QUESTIONS[i % len(QUESTIONS)]
        requests.append(
            GenerationRequest(
                prompt_text=format_prompt(processor, text, 1),
                images=[make_image(rng)],
                params=SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed + i),
            )
        )
    return requests


@dataclass
class Run:
    """One timed pass over all the requests by one side."""

    wall_s: float
    cpu_s: float  # CPU time of the whole process (all threads) during the pass
    token_ids: list[list[int]]  # per request, in request order
    latencies_s: list[float]
    batch_rows: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.tokens / self.cpu_s


def run_sequential(engine: PolicyEngine, requests: list[GenerationRequest]) -> Run:
    token_ids, latencies = [], []
    cpu_start, start = time.process_time(), time.perf_counter()
    for request in requests:
        t0 = time.perf_counter()
        (sample,) = engine.generate([request])[0]
        latencies.append(time.perf_counter() - t0)
        token_ids.append(sample.token_ids)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return Run(wall, cpu, token_ids, latencies, batch_rows=[1] * len(requests))


def run_batched(
    engine: PolicyEngine, requests: list[GenerationRequest], concurrency: int, max_batch_rows: int, max_wait_ms: float
) -> Run:
    batch_rows: list[int] = []
    batcher = DynamicBatcher(engine, max_batch_rows=max_batch_rows, max_wait_ms=max_wait_ms, on_batch=batch_rows.append)
    token_ids: list[list[int] | None] = [None] * len(requests)
    latencies: list[float] = [0.0] * len(requests)
    next_index = iter(range(len(requests)))
    index_lock = threading.Lock()
    errors: list[BaseException] = []
    go = threading.Barrier(concurrency + 1)

    def client() -> None:
        go.wait()
        try:
            while True:
                with index_lock:
                    i = next(next_index, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                (sample,) = batcher.submit(requests[i]).result()
                latencies[i] = time.perf_counter() - t0
                token_ids[i] = sample.token_ids
        except BaseException as error:  # surfaced after join: a benchmark must not report a partial run
            errors.append(error)

    threads = [threading.Thread(target=client, name=f"client-{k}") for k in range(concurrency)]
    for thread in threads:
        thread.start()
    go.wait()
    cpu_start, start = time.process_time(), time.perf_counter()
    for thread in threads:
        thread.join()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    batcher.close()
    if errors:
        raise errors[0]
    return Run(wall, cpu, token_ids, latencies, batch_rows)  # type: ignore[arg-type]  # every slot filled


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=32, help="requests per pass (default 32)")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads on the batched side (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="max_new_tokens of every request (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of each side, interleaved (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, images and sampling (default 0)")
    # The policy server's defaults (PolicyConfig.max_batch_rows, max_batch_wait_ms).
    parser.add_argument("--max-batch-rows", type=int, default=32, help="DynamicBatcher max_batch_rows (default 32)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="DynamicBatcher max_wait_ms (default 5)")
    args = parser.parse_args(argv)
    if min(args.requests, args.concurrency, args.max_new_tokens, args.repeats, args.max_batch_rows) < 1:
        parser.error("--requests, --concurrency, --max-new-tokens, --repeats and --max-batch-rows must be >= 1")

    # One intra-op thread: the machines this runs on have 2 cores, and oversubscribed threads made a
    # forward many times slower (tests/policy/conftest.py). Both sides get the same single thread.
    torch.set_num_threads(1)
    print(f"command: {sys.executable} {' '.join(sys.argv)}")
    print(f"machine: {os.cpu_count()} CPUs, {cpu_model()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread")
    print(f"load average at start: {load_average()}")
    print(
        f"workload: {args.requests} requests x {args.max_new_tokens} new tokens, concurrency {args.concurrency}, "
        f"max_batch_rows {args.max_batch_rows}, max_wait_ms {args.max_wait_ms}, repeats {args.repeats}, "
        f"seed {args.seed}"
    )

    model, processor = build_default_policy(seed=args.seed)
    engine = PolicyEngine(model, processor, policy_version="bench")
    requests = make_requests(processor, args.requests, args.max_new_tokens, args.seed)

    # Warm-up (not timed): first-call allocations for a lone request and for a full batch.
    warm = requests[: min(len(requests), args.concurrency)]
    engine.generate(warm[:1])
    run_batched(engine, warm, args.concurrency, args.max_batch_rows, args.max_wait_ms)

    sequential: list[Run] = []
    batched: list[Run] = []
    reference: list[list[int]] | None = None
    print()
    print("repeat  order  A tok/s  B tok/s  B/A     A tok/cpu-s  B tok/cpu-s  B/A     B mean batch rows")
    for repeat in range(args.repeats):
        order = "AB" if repeat % 2 == 0 else "BA"
        for side in order:
            if side == "A":
                sequential.append(run_sequential(engine, requests))
            else:
                batched.append(
                    run_batched(engine, requests, args.concurrency, args.max_batch_rows, args.max_wait_ms)
                )
        a, b = sequential[-1], batched[-1]
        # Same seeds, same max_new_tokens: both sides (and every repeat) must produce the very same tokens.
        if reference is None:
            reference = a.token_ids
        for name, run in (("A", a), ("B", b)):
            mismatched = [i for i, (x, y) in enumerate(zip(reference, run.token_ids)) if x != y]
            if mismatched:
                raise AssertionError(
                    f"repeat {repeat} side {name}: requests {mismatched} generated different tokens"
                )
        assert a.tokens == b.tokens
        print(
            f"{repeat:>6}  {order:>5}  {a.tokens_per_s:7.1f}  {b.tokens_per_s:7.1f}  "
            f"{b.tokens_per_s / a.tokens_per_s:6.2f}  {a.tokens_per_cpu_s:11.1f}  {b.tokens_per_cpu_s:11.1f}  "
            f"{b.tokens_per_cpu_s / a.tokens_per_cpu_s:6.2f}  {statistics.fmean(b.batch_rows):5.2f} "
            f"({len(b.batch_rows)} batches)"
        )

    ratios = [b.tokens_per_s / a.tokens_per_s for a, b in zip(sequential, batched)]
    cpu_ratios = [b.tokens_per_cpu_s / a.tokens_per_cpu_s for a, b in zip(sequential, batched)]
    tokens = sequential[0].tokens
    print()
    print(f"generated tokens per pass: {tokens} (identical on both sides and in every repeat)")
    print(f"load average at end: {load_average()}")
    print()
    print(
        "| side | tokens/s, median (min-max) | tokens/CPU-s, median (min-max) "
        "| latency p50 | latency p95 | mean batch rows |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, runs in (
        ("A: one at a time, `engine.generate([request])`", sequential),
        (f"B: `DynamicBatcher`, {args.concurrency} concurrent clients", batched),
    ):
        rates = [run.tokens_per_s for run in runs]
        cpu_rates = [run.tokens_per_cpu_s for run in runs]
        latencies = [s for run in runs for s in run.latencies_s]
        rows = [r for run in runs for r in run.batch_rows]
        print(
            f"| {name} | {statistics.median(rates):.1f} ({min(rates):.1f}-{max(rates):.1f}) "
            f"| {statistics.median(cpu_rates):.1f} ({min(cpu_rates):.1f}-{max(cpu_rates):.1f}) "
            f"| {percentile(latencies, 50) * 1000:.0f} ms | {percentile(latencies, 95) * 1000:.0f} ms "
            f"| {statistics.fmean(rows):.2f} |"
        )
    print()
    print(
        f"B/A tokens/s ratio: median {statistics.median(ratios):.2f}, "
        f"min {min(ratios):.2f}, max {max(ratios):.2f} over {len(ratios)} repeats"
    )
    print(
        f"B/A tokens per CPU-second ratio: median {statistics.median(cpu_ratios):.2f}, "
        f"min {min(cpu_ratios):.2f}, max {max(cpu_ratios):.2f} over {len(cpu_ratios)} repeats"
    )


if __name__ == "__main__":
    main()
