"""What the services' transports cost: each service called as users call it, against the same model
called in this process, on the same requests with the same batching.

  policy_grpc_vs_in_process   A: the policy engine's DynamicBatcher called in this process;
                              B: the policy service (its own process) over gRPC, Generate.
  policy_http_vs_in_process   A: as above; B: the same service's OpenAI-compatible HTTP API, through the
                              `openai` package (the image as a base64 data: URL).
  reward_oip_vs_in_process    A: the reward model's ScoringBatcher called in this process (the service's
                              batch bounds); B: the reward service (its own process) over the Open
                              Inference Protocol v2 REST API, through tritonclient, as the rollout
                              controller calls it.

Each side is `concurrency` client threads in a closed loop (each sends a request, waits for its answer,
sends the next) until the pass's requests are answered; repeats alternate the order of the sides after an
untimed warm-up of each. The requests ask about an image of their own (a PNG; the in-process side gets it
decoded, as a caller holding the image would). Policy answers are greedy, so every side must give each
request the same text, and the reward scores must agree to 1e-4: compare() fails otherwise. Reported per
side: requests per second and latency p50/p99; the ratio B/A of throughput per repeat (below 1: what the
transport, its serialisation and the other process cost). The services run with the torch threads this
process has, on the same machine, so B also pays for sharing the CPU with its client.
"""

from __future__ import annotations

import base64
import io
import random
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import openai
import torch
import tritonclient.http as triton
from PIL import Image

from modalign.bench.common import Comparison, Measured, closed_loop, compared, interleaved, running
from modalign.bench.serving import QUESTIONS, scene
from modalign.core.auth import AuthConfig
from modalign.core.kafka import KafkaConfig, ensure_topics
from modalign.core.processes import free_port
from modalign.policy.batcher import DynamicBatcher
from modalign.policy.config import PolicyConfig
from modalign.policy.engine import GenerationRequest, PolicyEngine, SamplingParams
from modalign.policy.model import build_default_policy, format_prompt
from modalign.reward.backbones import build_default_reward_model
from modalign.reward.batching import ScoringBatcher
from modalign.reward.config import RewardServerConfig
from modalign.reward.contract import ScoreBatch
from modalign.v1 import common_pb2, policy_pb2, policy_pb2_grpc

MAX_NEW_TOKENS = 16


@dataclass(frozen=True)
class Question:
    text: str
    png: bytes
    answer: str
    """A response to score (the reward side)."""

    @property
    def image(self) -> Image.Image:
        return Image.open(io.BytesIO(self.png)).convert("RGB")


def questions(count: int, seed: int = 0) -> list[Question]:
    rng = random.Random(seed)
    made = []
    for index in range(count):
        buffer = io.BytesIO()
        scene(rng).save(buffer, format="PNG")
        made.append(Question(rng.choice(QUESTIONS), buffer.getvalue(), f"There are {index % 3 + 1} shapes."))
    return made


def each_request(items: list[Question], call: Callable[[Question], object], answers: dict[int, object]
                 ) -> Callable[[], Callable[[], None]]:
    """connect() for closed_loop: every client thread takes the next question in turn and records its answer."""
    numbers = iter(range(len(items)))
    lock = threading.Lock()

    def connect() -> Callable[[], None]:
        def send() -> None:
            with lock:
                index = next(numbers) % len(items)
            answers[index] = call(items[index])
        return send
    return connect


def compare(sides: dict[str, Callable[[Question], object]], items: list[Question], *, concurrency: int,
            repeats: int, agree: Callable[[object, object], bool]) -> Comparison:
    """Side "A" against side "B", each calling its function once per question from concurrency threads;
    raises ValueError when B answers any question otherwise than A."""
    answers: dict[str, dict[int, object]] = {name: {} for name in sides}

    def one_pass(name: str) -> Callable:
        return lambda: closed_loop(lambda: None, len(items), concurrency,
                                   connect=each_request(items, sides[name], answers[name]))

    passes = interleaved({name: one_pass(name) for name in sides}, repeats)
    differing = [i for i in answers["A"] if not agree(answers["A"][i], answers["B"].get(i))]
    if differing:
        raise ValueError(f"requests {differing[:5]} answered differently in this process and by the service")
    return compared(passes, rate=lambda one: one.per_s, times=lambda one: one.latencies_s)


# --- the policy ------------------------------------------------------------------------------------


def in_process_policy(batcher: DynamicBatcher, processor) -> Callable[[Question], str]:
    def generate(question: Question) -> str:
        request = GenerationRequest(format_prompt(processor, question.text, 1), [question.image],
                                    SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS))
        return batcher.submit(request).result()[0].text
    return generate


def policy_over_grpc(address: str) -> Callable[[Question], str]:
    stub = policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(address))

    def generate(question: Question) -> str:
        reply = stub.Generate(policy_pb2.GenerateRequest(
            text=question.text, images=[common_pb2.Image(data=question.png, mime_type="image/png")],
            sampling=common_pb2.SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS)), timeout=120)
        return reply.candidates[0].text
    return generate


def policy_over_http(base_url: str) -> Callable[[Question], str]:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)

    def generate(question: Question) -> str:
        url = "data:image/png;base64," + base64.b64encode(question.png).decode()
        reply = client.chat.completions.create(
            model="modalign", temperature=0.0, max_tokens=MAX_NEW_TOKENS,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": question.text}]}])
        return reply.choices[0].message.content or ""
    return generate


def measure_policy(bootstrap_servers: str, work: Path, *, requests: int, concurrency: int,
                   repeats: int) -> dict[str, Measured]:
    model, processor = build_default_policy(0)
    policy = PolicyConfig(listen=f"127.0.0.1:{free_port()}", http_listen=f"127.0.0.1:{free_port()}", metrics_port=0,
                          auth=AuthConfig(insecure=True), follow="none", blob_dir=work / "blobs",
                          kafka=KafkaConfig(bootstrap_servers=bootstrap_servers,
                                            topic_prefix=f"bench-policy-{uuid.uuid4().hex[:6]}."))
    ensure_topics(policy.kafka)
    batcher = DynamicBatcher(PolicyEngine(model, processor), max_batch_rows=policy.max_batch_rows,
                             max_wait_ms=policy.max_batch_wait_ms)
    items = questions(requests)
    traffic = (f"{requests} requests (a question, a 32x32 PNG, {MAX_NEW_TOKENS} greedy tokens at most), "
               f"{concurrency} clients in a closed loop")
    try:
        with running(policy, work / "logs", "policy"):
            in_process = in_process_policy(batcher, processor)
            transports = {"policy_grpc_vs_in_process": policy_over_grpc(policy.address),
                          "policy_http_vs_in_process": policy_over_http(policy.http_url)}
            return {name: Measured(traffic, "requests/s", compare(
                        {"A": in_process, "B": call}, items, concurrency=concurrency, repeats=repeats,
                        agree=lambda mine, theirs: mine == theirs))
                    for name, call in transports.items()}
    finally:
        batcher.close()


# --- the reward model ------------------------------------------------------------------------------


def in_process_reward(batcher: ScoringBatcher) -> Callable[[Question], float]:
    def score(question: Question) -> float:
        scores, _ = batcher.submit(ScoreBatch([question.text], [[question.image]], [question.answer], [[]])).result()
        return float(scores[0])
    return score


def reward_over_oip(url: str) -> Callable[[Question], float]:
    local = threading.local()  # a tritonclient connection is one thread's

    def score(question: Question) -> float:
        if not hasattr(local, "client"):
            local.client = triton.InferenceServerClient(url)
        inputs = []
        for name, value in (("prompt", question.text.encode()), ("response", question.answer.encode()),
                            ("images", base64.b64encode(question.png))):
            array = np.array([[value]] if name == "images" else [value], dtype=object)
            part = triton.InferInput(name, list(array.shape), "BYTES")
            part.set_data_from_numpy(array)
            inputs.append(part)
        return float(local.client.infer("reward", inputs).as_numpy("score")[0])
    return score


def measure_reward(work: Path, *, requests: int, concurrency: int, repeats: int) -> dict[str, Measured]:
    reward = RewardServerConfig(auth=AuthConfig(insecure=True), http_port=free_port(), grpc_port=free_port(),
                                grace_period=1, torch_threads=torch.get_num_threads())
    model = build_default_reward_model(reward.seed)
    batcher = ScoringBatcher(lambda batch: (model.score(batch.prompts, batch.images, batch.responses), "v0"),
                             reward.max_batch_rows, reward.max_batch_wait_ms)
    try:
        with running(reward, work / "logs", "reward"):
            comparison = compare({"A": in_process_reward(batcher), "B": reward_over_oip(f"127.0.0.1:{reward.http_port}")},
                                 questions(requests), concurrency=concurrency, repeats=repeats,
                                 agree=lambda mine, theirs: theirs is not None and abs(mine - theirs) <= 1e-4)
    finally:
        batcher.close()
    return {"reward_oip_vs_in_process": Measured(
        f"{requests} one-row requests (a question, a 32x32 PNG, an answer), {concurrency} clients in a closed loop",
        "requests/s", comparison)}
