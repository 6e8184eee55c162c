"""Scripted users for the rollout tests, and policies with known behaviour for them to judge.

The users talk to modalign only through its public gRPC APIs. Their hidden preference is concise
answers: they rate a response from 5 (a few tokens) down to 1 (cut off at the length limit), with
some noise, and, when one prompt's two answers came from different versions, prefer the shorter.
"""

from __future__ import annotations

import copy
import io
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from PIL import Image

from modalign.core.kafka import KafkaConfig, make_producer, produce_durably
from modalign.core.modelstore import Manifest, ModelStore, Published
from modalign.core.ratelimit import politely
from modalign.policy.engine import GenerationRequest, PolicyEngine, SamplingParams
from modalign.policy.model import build_default_policy, format_prompt, save_policy
from modalign.v1 import common_pb2, events_pb2, feedback_pb2, feedback_pb2_grpc, policy_pb2, policy_pb2_grpc

MAX_NEW_TOKENS = 16
QUESTIONS = ("What colour is the shape?", "Describe the image.", "How many shapes are there?")



def policy_with_eos_logit(eos_logit: float, seed: int = 0, broken: bool = False):
    """The default policy with the end-of-sequence logit set to about eos_logit wherever it answers the
    users' prompts: about 14 tokens per answer at 3, 4 at 5, always the length limit at -20. broken:
    NaN weights, as a diverged training run leaves them; such a policy cannot generate."""
    model, processor = build_default_policy(seed)
    model = copy.deepcopy(model)
    rng = random.Random(seed)
    requests = [
        GenerationRequest(format_prompt(processor, rng.choice(QUESTIONS), 1), [Image.open(io.BytesIO(image_png(rng)))],
                          SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW_TOKENS, seed=index))
        for index in range(16)
    ]
    hidden: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_hook(lambda _m, args, _o: hidden.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        PolicyEngine(model, processor).generate(requests)
        hook.remove()
        states = torch.cat(hidden)
        # The EOS row that gives logit eos_logit at every hidden state the model reaches while answering,
        # in the least-squares sense.
        target = torch.full((states.shape[0], 1), eos_logit)
        model.lm_head.weight[processor.tokenizer.eos_token_id] = torch.linalg.lstsq(states, target).solution[:, 0]
        if broken:
            model.lm_head.weight.fill_(float("nan"))
    return model, processor


def save_model(folder: Path, eos_logit: float, broken: bool = False) -> Path:
    save_policy(*policy_with_eos_logit(eos_logit, broken=broken), folder)
    return folder


def publish(kafka: KafkaConfig, store: ModelStore, version: str, eos_logit: float, broken: bool = False) -> None:
    """What the trainer does: write the version to the model store, then announce it on policy-versions."""
    published = store.publish(
        Manifest(version=version, kind="policy", parent="test"),
        lambda staging: save_policy(*policy_with_eos_logit(eos_logit, broken=broken), staging),
    )
    announce(kafka, version, published)


def announce(kafka: KafkaConfig, version: str, published: Published) -> None:
    """The PolicyVersionPublished event of a version in the store."""
    event = events_pb2.PolicyVersionPublished(
        version=version, parent_version="test", uri=published.uri,
        manifest_sha256=published.manifest_sha256, algorithm="test",
    )
    event.published_at.GetCurrentTime()
    producer = make_producer(kafka)
    try:
        produce_durably(producer, kafka.topic("policy-versions"), [(version, event)], 30)
    finally:
        producer.close()


def hidden_rating(token_count: int, rng: random.Random) -> int:
    score = 5 if token_count <= 4 else 4 if token_count <= 8 else 3 if token_count <= 12 else 2 if token_count < MAX_NEW_TOKENS else 1
    if rng.random() < 0.2:  # users are noisy
        score += rng.choice((-1, 1))
    return min(max(score, 1), 5)


def image_png(rng: random.Random) -> bytes:
    image = Image.new("RGB", (32, 32), "white")
    colour = rng.choice(("red", "green", "blue"))
    x, y = rng.randint(0, 16), rng.randint(0, 16)
    image.paste(colour, (x, y, x + 12, y + 12))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Call:
    at: float
    replica: int
    session_id: str
    version: str
    code: grpc.StatusCode
    detail: str = ""


@dataclass
class Users:
    """Threads of users sending requests (alternating replicas) and feedback until stopped."""

    policy_addresses: list[str]
    feedback_address: str
    threads: int = 4
    seed: int = 0
    calls: list[Call] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for index in range(self.threads):
            worker = threading.Thread(target=self._run, args=(index,), daemon=True)
            worker.start()
            self._workers.append(worker)

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=60)

    def _run(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        channels = [grpc.insecure_channel(address) for address in self.policy_addresses]
        stubs = [policy_pb2_grpc.PolicyServiceStub(c) for c in channels]
        feedback_channel = grpc.insecure_channel(self.feedback_address)
        feedback = feedback_pb2_grpc.FeedbackServiceStub(feedback_channel)
        turn = index
        try:
            while not self._stop.is_set():
                request = policy_pb2.GenerateRequest(
                    text=rng.choice(QUESTIONS),
                    images=[common_pb2.Image(data=image_png(rng), mime_type="image/png")],
                    sampling=common_pb2.SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW_TOKENS,
                                                       seed=rng.getrandbits(31)),
                    user_id=f"user-{index}",
                )
                replies = []
                for _ in range(2 if rng.random() < 0.25 else 1):  # sometimes one prompt, two sessions
                    request.session_id = uuid.uuid4().hex
                    turn += 1
                    reply = self._generate(stubs, turn % len(stubs), request)
                    if reply is not None:
                        replies.append(reply)
                for reply in replies:
                    candidate = reply.candidates[0]
                    self._send(feedback, index, rating=feedback_pb2.Rating(
                        response_id=candidate.response_id, score=hidden_rating(candidate.token_count, rng)))
                if len(replies) == 2 and replies[0].policy_version != replies[1].policy_version:
                    first, second = (r.candidates[0] for r in replies)
                    if first.token_count != second.token_count:
                        chosen, rejected = sorted((first, second), key=lambda c: c.token_count)
                        self._send(feedback, index, preference=feedback_pb2.Preference(
                            chosen_response_id=chosen.response_id, rejected_response_id=rejected.response_id))
        finally:
            for channel in [*channels, feedback_channel]:
                channel.close()

    def _generate(self, stubs, replica: int, request) -> policy_pb2.GenerateResponse | None:
        try:
            reply = politely(stubs[replica].Generate, request, timeout=60)
        except grpc.RpcError as error:
            version = dict(error.trailing_metadata() or ()).get("policy-version", "")
            with self._lock:
                self.calls.append(Call(time.time(), replica, request.session_id, version, error.code(), error.details()))
            return None
        with self._lock:
            self.calls.append(Call(time.time(), replica, request.session_id, reply.policy_version, grpc.StatusCode.OK))
        return reply

    @staticmethod
    def _send(feedback, index: int, **kind) -> None:
        message = feedback_pb2.Feedback(feedback_id=uuid.uuid4().hex, user_id=f"user-{index}", **kind)
        message.client_time.FromSeconds(int(time.time()))
        politely(feedback.Submit, message, timeout=30)
