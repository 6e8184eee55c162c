"""Policy serving: modalign's continuous batching against the serving loop a user would script with
transformers, on the same model and the same requests, in this one process.

  A  baseline, static batching with transformers: a worker takes the oldest arrived request, waits up
     to max_wait_ms for more until max_batch_rows are gathered, runs the processor on them (left
     padding) and model.generate (greedy, up to the batch's largest max_new_tokens, the engine's
     never-sampled special tokens suppressed as the engine suppresses them), cuts each row at its EOS
     and its own max_new_tokens, hands the results back, and takes the next batch.
  B  modalign: DynamicBatcher (policy/batcher.py) with the same bounds: requests join the running batch
     between decoding steps, and leave it as soon as they end.

Requests arrive as a Poisson process (rate per second) with at most `concurrency` outstanding (an
arrival waits for a free slot); a rate of 0 submits them all at once (one static batch's worth). Each
asks a question about its own image and wants its own number of tokens, greedily, so both sides must
produce the same tokens: compare() checks this request by request. Reported per side: useful tokens per
second (each request's own tokens; what A generates past a row's end is waste) and latency from arrival
to answer (p50, p99); the ratio B/A of throughput per repeat. Repeats are interleaved (A B, then B A, ...)
so that drift in the machine's load falls on both alike.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageDraw

from modalign.bench.common import Comparison, compared, interleaved
from modalign.policy.batcher import DynamicBatcher
from modalign.policy.config import PolicyConfig
from modalign.policy.engine import GenerationRequest, PolicyEngine, SamplingParams
from modalign.policy.model import IMAGE_SIZE, format_prompt

QUESTIONS = ("What colour is the shape?", "How many shapes are there?", "Where is the circle?", "Describe the image.")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")


def scene(rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), rng.choice(("white", "gray")))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):
        x, y = rng.randint(0, IMAGE_SIZE - 8), rng.randint(0, IMAGE_SIZE - 8)
        draw.ellipse((x, y, x + 8, y + 8), fill=rng.choice(COLOURS))
    return image


def make_requests(processor, count: int, min_new: int, max_new: int, seed: int) -> list[GenerationRequest]:
    rng = random.Random(seed)
    return [GenerationRequest(format_prompt(processor, rng.choice(QUESTIONS), 1), [scene(rng)],
                              SamplingParams(temperature=0.0, max_new_tokens=rng.randint(min_new, max_new)))
            for _ in range(count)]


class StaticGenerateServer:
    """Side A: the loop a user would script around transformers' generate."""

    def __init__(self, engine: PolicyEngine, max_batch_rows: int, max_wait_ms: float) -> None:
        self.model, self.processor, self.engine = engine.model, engine.processor, engine
        self.max_batch_rows, self.max_wait_s = max_batch_rows, max_wait_ms / 1000
        self.queue: deque[tuple[GenerationRequest, Future]] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.worker = threading.Thread(target=self.run, daemon=True)
        self.worker.start()

    def submit(self, request: GenerationRequest) -> Future:
        future: Future = Future()
        with self.cond:
            self.queue.append((request, future))
            self.cond.notify()
        return future

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.worker.join()

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closed:
                    self.cond.wait()
                if not self.queue:
                    return
                deadline = time.monotonic() + self.max_wait_s
                while len(self.queue) < self.max_batch_rows and (left := deadline - time.monotonic()) > 0:
                    self.cond.wait(left)
                batch = [self.queue.popleft() for _ in range(min(len(self.queue), self.max_batch_rows))]
            for (_, future), tokens in zip(batch, self.generate([request for request, _ in batch])):
                future.set_result(tokens)

    @torch.inference_mode()
    def generate(self, requests: list[GenerationRequest]) -> list[list[int]]:
        inputs = self.processor(text=[r.prompt_text for r in requests], images=[r.images for r in requests],
                                padding=True, padding_side="left", return_tensors="pt")
        out = self.model.generate(**inputs, do_sample=False, max_new_tokens=max(r.params.max_new_tokens for r in requests),
                                  suppress_tokens=self.engine.unsampleable_token_ids,
                                  pad_token_id=self.engine.pad_token_id)
        answers = []
        for request, row in zip(requests, out[:, inputs["input_ids"].shape[1]:].tolist()):
            row = row[:request.params.max_new_tokens]
            end = next((i + 1 for i, token in enumerate(row) if token in self.engine.eos_token_ids), len(row))
            answers.append(row[:end])
        return answers


@dataclass
class Run:
    wall: float
    tokens: list[list[int]]
    latencies: list[float]


def run(submit: Callable[[GenerationRequest], Future], token_ids: Callable[[Any], list[int]],
        requests: list[GenerationRequest], rate: float, concurrency: int, seed: int) -> Run:
    """Poisson arrivals at rate with at most concurrency outstanding; token_ids(answer) reads the tokens of
    what submit(request)'s future resolves to."""
    rng = random.Random(seed)
    slots = threading.Semaphore(concurrency)
    tokens: list[list[int] | None] = [None] * len(requests)
    latencies = [0.0] * len(requests)
    done = threading.Event()
    remaining = [len(requests)]
    lock = threading.Lock()
    started = time.perf_counter()

    def finished(index: int, arrived: float, future: Future) -> None:
        tokens[index] = token_ids(future.result())
        latencies[index] = time.perf_counter() - arrived
        slots.release()
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0:
                done.set()

    next_arrival = started
    for index, request in enumerate(requests):
        next_arrival += rng.expovariate(rate) if rate > 0 else 0.0
        time.sleep(max(0.0, next_arrival - time.perf_counter()))
        slots.acquire()
        arrived = time.perf_counter()
        submit(request).add_done_callback(lambda f, i=index, a=arrived: finished(i, a, f))
    done.wait()
    return Run(time.perf_counter() - started, tokens, latencies)  # type: ignore[arg-type]  # every slot filled


def compare(engine: PolicyEngine, requests: list[GenerationRequest], *, rate: float, concurrency: int,
            policy: PolicyConfig, repeats: int) -> Comparison:
    """Both sides on the same requests (module docstring), after an untimed warm-up of each, with policy's
    batch bounds (max_batch_rows, max_batch_wait_ms). Raises ValueError when a side answers any request with
    other tokens than transformers' generate."""

    def side_a() -> Run:
        server = StaticGenerateServer(engine, policy.max_batch_rows, policy.max_batch_wait_ms)
        try:
            return run(server.submit, lambda tokens: tokens, requests, rate, concurrency, seed=1)
        finally:
            server.close()

    def side_b() -> Run:
        batcher = DynamicBatcher(engine, max_batch_rows=policy.max_batch_rows, max_wait_ms=policy.max_batch_wait_ms)
        try:
            return run(batcher.submit, lambda samples: samples[0].token_ids, requests, rate, concurrency, seed=1)
        finally:
            batcher.close()

    runs = interleaved({"A": side_a, "B": side_b}, repeats)
    reference = runs["A"][0].tokens
    for name, passes in runs.items():
        for one in passes:
            differing = [i for i, (mine, theirs) in enumerate(zip(one.tokens, reference)) if mine != theirs]
            if differing:
                raise ValueError(f"side {name} answered requests {differing[:5]} differently from transformers' generate")
    useful = sum(len(tokens) for tokens in reference)
    return compared(runs, rate=lambda one: useful / one.wall, times=lambda one: one.latencies)
