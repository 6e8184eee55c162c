"""Benchmark: what the reward service's dynamic batching (services/reward/batching.py) buys concurrent callers.

Two real reward services (`modalign reward`, the same fresh model, seed 0), started side by side on
loopback, called over the Open Inference Protocol v2 (REST) by tritonclient, as the rollout controller
and users' tools call it:

  A  baseline: --max-batch-rows 1, every request a forward pass of its own (the service before batching;
     KServe still runs requests on its thread pool, several at once).
  B  the default, --max-batch-rows 64: requests waiting at the same time share one forward pass.

C client threads in a closed loop each send one-row requests (a question, a 32x32 PNG, an answer) until
the pass's N requests are answered; repeats alternate the order of the sides after an untimed warm-up.
Every score must match on both sides (the same model: to 1e-4), and the script fails otherwise.
Reported: requests per second per side (median, range), p50/p95 latency, and B/A per repeat.

Run from the repository root:

    .venv/bin/python benchmarks/reward_batching.py --requests 400 --concurrency 16 --repeats 3
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
from PIL import Image

from modalign.core.auth import AuthConfig
from modalign.core.launch import service_process
from modalign.core.processes import free_port
from modalign.reward.config import RewardServerConfig

COLOURS = ("red", "green", "blue", "yellow")


def image_b64(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue())


def inputs(index: int) -> list[httpclient.InferInput]:
    colour = COLOURS[index % len(COLOURS)]
    values = {"prompt": [[b"What colour is the square?"]], "response": [[f"It is {colour}, {index}.".encode()]],
              "images": [[image_b64(colour)]]}
    result = []
    for name, rows in values.items():
        array = np.array(rows if name == "images" else [row[0] for row in rows], dtype=object)
        infer_input = httpclient.InferInput(name, list(array.shape), "BYTES")
        infer_input.set_data_from_numpy(array)
        result.append(infer_input)
    return result


def run(url: str, requests: int, concurrency: int) -> tuple[float, list[float], dict[int, float]]:
    """(wall seconds, latencies, score by request index) of one closed-loop pass."""
    latencies: list[float] = []
    scores: dict[int, float] = {}
    counter = iter(range(requests))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client() -> None:
        connection = httpclient.InferenceServerClient(url)
        try:
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                started = time.perf_counter()
                result = connection.infer("reward", inputs(index))
                with lock:
                    latencies.append(time.perf_counter() - started)
                    scores[index] = float(result.as_numpy("score")[0])
        except BaseException as error:  # surfaced after join: a benchmark must not report a partial pass
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started, latencies, scores


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round((len(ordered) - 1) * q / 100)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="one-row requests per pass")
    parser.add_argument("--concurrency", type=int, default=16, help="client threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per side, after an untimed warm-up")
    args = parser.parse_args()
    processes, urls = {}, {}
    with tempfile.TemporaryDirectory(prefix="modalign-bench-") as logs:
        try:
            for side, rows in (("A", 1), ("B", 64)):
                config = RewardServerConfig(auth=AuthConfig(insecure=True), http_port=free_port(), grpc_port=free_port(),
                                            grace_period=1, max_batch_rows=rows)
                processes[side] = service_process(config, Path(logs), f"reward-{side}")
                processes[side].start()
                urls[side] = f"127.0.0.1:{config.http_port}"
            for process in processes.values():
                process.wait_ready(timeout_s=240)
            for side in ("A", "B"):
                run(urls[side], args.concurrency * 2, args.concurrency)  # warm-up
            passes: dict[str, list[tuple[float, list[float], dict[int, float]]]] = {"A": [], "B": []}
            for repeat in range(args.repeats):
                for side in ("A", "B") if repeat % 2 == 0 else ("B", "A"):
                    passes[side].append(run(urls[side], args.requests, args.concurrency))
        finally:
            for process in processes.values():
                process.stop()
    reference = passes["A"][0][2]
    for side, runs in passes.items():
        for _, _, scores in runs:
            if any(abs(scores[i] - reference[i]) > 1e-4 for i in reference):
                raise SystemExit(f"side {side} scored some request differently from side A")
    print(f"# {args.requests} one-row requests per pass, {args.concurrency} concurrent REST clients, "
          f"repeats {args.repeats}; the built-in reward model, one torch thread per service")
    print("| side | requests/s (median, range) | p50 latency | p95 latency |")
    print("| --- | --- | --- | --- |")
    for side, label in (("A", "A: --max-batch-rows 1 (no batching)"), ("B", "B: --max-batch-rows 64 (the default)")):
        rates = [args.requests / wall for wall, _, _ in passes[side]]
        latencies = [latency for _, run_latencies, _ in passes[side] for latency in run_latencies]
        print(f"| {label} | {statistics.median(rates):.1f} ({min(rates):.1f}-{max(rates):.1f}) | "
              f"{percentile(latencies, 50) * 1000:.0f} ms | {percentile(latencies, 95) * 1000:.0f} ms |")
    ratios = [a[0] / b[0] for a, b in zip(passes["A"], passes["B"])]
    print(f"B/A throughput: {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}), "
          "every score equal on both sides")


if __name__ == "__main__":
    main()
