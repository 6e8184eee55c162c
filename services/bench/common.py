"""What every bench module shares: a measurement's two sides and their ratio, passes interleaved, closed-loop
clients, and a service started for the length of a measurement."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from modalign.core.launch import service_process
from modalign.core.processes import ManagedProcess
from modalign.core.service import ServiceConfig


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Side:
    per_second: list[float]
    """Throughput per repeat, in the measurement's unit (Measured.unit)."""
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class Comparison:
    """A measurement's two sides (each bench module's docstring says what they are)."""

    baseline: Side
    """A: what a user would run instead."""
    modalign: Side
    """B."""
    ratios: list[float]
    """B/A throughput per repeat."""

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)


T = TypeVar("T")


def interleaved(sides: dict[str, Callable[[], T]], repeats: int) -> dict[str, list[T]]:
    """Side "A" (the baseline) and side "B" (modalign): an untimed warm-up pass of each, then repeats timed
    passes of each, alternating which goes first (A B, B A, ...) so that drift in the machine's load falls
    on both alike."""
    for one_pass in sides.values():
        one_pass()
    passes: dict[str, list[T]] = {"A": [], "B": []}
    for repeat in range(repeats):
        for name in ("A", "B") if repeat % 2 == 0 else ("B", "A"):
            passes[name].append(sides[name]())
    return passes


def compared(passes: dict[str, list[T]], rate: Callable[[T], float], times: Callable[[T], list[float]]) -> Comparison:
    """The Comparison of interleaved passes: each side's rate per pass and the p50/p99 of the times its passes
    took per request or step (pooled), and B/A of the rates per repeat."""
    def side(runs: list[T]) -> Side:
        pooled = [t for one in runs for t in times(one)]
        return Side([rate(one) for one in runs], percentile(pooled, 50) * 1000, percentile(pooled, 99) * 1000)

    return Comparison(side(passes["A"]), side(passes["B"]), [rate(b) / rate(a) for a, b in zip(passes["A"], passes["B"])])


@dataclass(frozen=True)
class Measured:
    """One line of bench.json and bench.md: what was measured, in what unit, and its two sides."""

    traffic: str
    unit: str
    comparison: Comparison


@dataclass(frozen=True)
class Pass:
    wall_s: float
    latencies_s: list[float]

    @property
    def per_s(self) -> float:
        return len(self.latencies_s) / self.wall_s


def closed_loop(write: Callable[[], None], requests: int, concurrency: int,
                connect: Callable[[], Callable[[], None]] | None = None) -> Pass:
    """concurrency threads calling write() (or, with connect, each the writer connect() returns) until
    requests calls have returned; an exception in any ends the pass with it."""
    remaining = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[BaseException] = []
    go = threading.Barrier(concurrency + 1)

    def client() -> None:
        writer = connect() if connect is not None else write
        go.wait()
        try:
            while True:
                with lock:
                    if next(remaining, None) is None:
                        return
                started = time.perf_counter()
                writer()
                took = time.perf_counter() - started
                with lock:
                    latencies.append(took)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    go.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    return Pass(wall, latencies)


@contextmanager
def running(config: ServiceConfig, log_dir: Path, name: str) -> Iterator[ManagedProcess]:
    """The service config describes, in a process of its own with as many torch threads as this one, ready
    inside the with block and stopped by its PID at the end."""
    process = service_process(config, log_dir, name, env={"OMP_NUM_THREADS": str(torch.get_num_threads())})
    process.start()
    try:
        process.wait_ready(240)
        yield process
    finally:
        process.stop()
