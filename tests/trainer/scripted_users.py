"""Scripted users for trainer tests: they talk to modalign only through its public gRPC APIs.

Their hidden preference: an answer should say the colour of the square in the image. Shown two
candidates, they prefer the one that names it; when neither does, they edit one to name it. Some users
rate instead (rating_share): 5 for an answer that names the colour, 1 for one that does not, which is
the evidence a canary is judged on.
"""

from __future__ import annotations

import io
import math
import random
import re
import time
import uuid
from collections import Counter

import grpc
from PIL import Image, ImageDraw

from modalign.v1 import common_pb2, feedback_pb2, feedback_pb2_grpc, policy_pb2, policy_pb2_grpc

COLOURS = ("red", "green", "blue")
QUESTIONS = ("What colour is the square?", "Describe the image.", "What do you see?", "Which colour is the shape?")


def square_image(colour: str, rng: random.Random) -> bytes:
    image = Image.new("RGB", (32, 32), "white")
    x, y, size = rng.randint(0, 14), rng.randint(0, 14), rng.randint(8, 16)
    ImageDraw.Draw(image).rectangle((x, y, x + size, y + size), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def names_colour(text: str, colour: str) -> bool:
    return re.search(rf"\b{colour}\b", text.lower()) is not None


def prompt(rng: random.Random, n: int, max_new_tokens: int = 12) -> tuple[policy_pb2.GenerateRequest, str]:
    colour = rng.choice(COLOURS)
    request = policy_pb2.GenerateRequest(
        text=rng.choice(QUESTIONS),
        images=[common_pb2.Image(data=square_image(colour, rng), mime_type="image/png")],
        sampling=common_pb2.SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=rng.getrandbits(32)),
        n=n, user_id=f"user-{rng.randint(1, 20)}", session_id=uuid.uuid4().hex,
    )
    return request, colour


def feedback_for(reply: policy_pb2.GenerateResponse, colour: str, user_id: str, rate: bool = False
                 ) -> feedback_pb2.Feedback:
    """What a user says about two candidates, by the hidden preference; rate: a 1-5 rating of the first."""
    first, second = reply.candidates[0], reply.candidates[1]
    feedback = feedback_pb2.Feedback(feedback_id=f"fb-{uuid.uuid4().hex}", user_id=user_id)
    feedback.client_time.FromSeconds(int(time.time()))
    if rate:
        feedback.rating.CopyFrom(feedback_pb2.Rating(response_id=first.response_id,
                                                     score=5 if names_colour(first.text, colour) else 1))
        return feedback
    good = [c for c in (first, second) if names_colour(c.text, colour)]
    if len(good) == 1:
        other = second if good[0] is first else first
        feedback.preference.CopyFrom(feedback_pb2.Preference(
            chosen_response_id=good[0].response_id, rejected_response_id=other.response_id))
    elif not good:
        feedback.edit.CopyFrom(feedback_pb2.Edit(response_id=first.response_id,
                                                 edited_text=f"{first.text.strip()} {colour}".strip()))
    else:
        feedback.rating.CopyFrom(feedback_pb2.Rating(response_id=first.response_id, score=5))
    return feedback


def interact(policy: policy_pb2_grpc.PolicyServiceStub, feedback: feedback_pb2_grpc.FeedbackServiceStub,
             rng: random.Random, rating_share: float = 0.0) -> feedback_pb2.Feedback:
    """One user turn: ask about an image for two candidates, then say which is better (or rate one)."""
    request, colour = prompt(rng, n=2)
    reply = policy.Generate(request, timeout=60)
    said = feedback_for(reply, colour, request.user_id, rate=rating_share > 0 and rng.random() < rating_share)
    for attempt in range(5):
        try:
            feedback.Submit(said, timeout=30)
            return said
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == 4:
                raise
    return said


def colour_counts(policy: policy_pb2_grpc.PolicyServiceStub, prompts: int, seed: int) -> Counter[tuple[str, bool]]:
    """Sampled answers to held-out images, counted by (version that answered, whether it named the square's colour)."""
    rng = random.Random(seed)
    counts: Counter[tuple[str, bool]] = Counter()
    for _ in range(prompts):
        request, colour = prompt(rng, n=1)
        reply = policy.Generate(request, timeout=60)
        counts[reply.policy_version, names_colour(reply.candidates[0].text, colour)] += 1
    return counts


def colour_rate(policy: policy_pb2_grpc.PolicyServiceStub, prompts: int, seed: int) -> tuple[float, set[str]]:
    """Share of sampled answers to held-out images that name the square's colour, and the versions seen."""
    counts = colour_counts(policy, prompts, seed)
    return sum(n for (_, named), n in counts.items() if named) / prompts, {version for version, _ in counts}


def two_proportion_z(after: float, before: float, n: int, n_before: int | None = None) -> float:
    """z of the difference between two rates, measured on n and n_before (default: n) held-out prompts."""
    n_before = n if n_before is None else n_before
    pooled = (after * n + before * n_before) / (n + n_before)
    return (after - before) / math.sqrt(max(pooled * (1 - pooled) * (1 / n + 1 / n_before), 1e-12))
