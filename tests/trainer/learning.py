"""What learner tests share: small settings, and the feedback the services would log, built from real samples."""

from __future__ import annotations

import io
import random

import torch
from PIL import Image, ImageDraw

from modalign.core.blobs import BlobStore
from modalign.policy.conversation import ROLE_VALUES
from modalign.policy.engine import Sample
from modalign.trainer.batches import Prompt
from modalign.trainer.join import PreferencePair, Response
from modalign.trainer.learner import Learner, LearnerConfig
from modalign.v1 import common_pb2, events_pb2

SMALL = {
    "sample_prompts": 4, "samples_per_prompt": 4, "max_new_tokens": 8,
    "policy_updates_per_round": 1, "policy_epochs": 1, "reward_epochs": 1, "eval_prompts": 4,
}


def square_images(blobs: BlobStore) -> dict[str, str]:
    """sha256 of a 32x32 PNG with a square of each colour, put in blobs."""
    shas = {}
    for colour in ("red", "blue", "green"):
        image = Image.new("RGB", (32, 32), "white")
        ImageDraw.Draw(image).rectangle((4, 4, 20, 20), fill=colour)
        data = io.BytesIO()
        image.save(data, "PNG")
        shas[colour] = blobs.put(data.getvalue())
    return shas


def mixed_prompts(images: dict[str, str]) -> list[Prompt]:
    """Prompts of different lengths with zero, one and two images."""
    return [
        Prompt.question("Hi", ()),
        Prompt.question("What colour is the square?", (images["red"],)),
        Prompt.question("Compare these two pictures, please.", (images["blue"], images["green"])),
        Prompt.question("Where?", (images["green"],)),
    ]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def make_learner(blobs: BlobStore, **overrides) -> Learner:
    return Learner(LearnerConfig(**(SMALL | overrides)), blobs)


def logged_generation(learner: Learner, prompt: Prompt) -> events_pb2.GenerationLogged:
    """The generation event the policy service would log for prompt: its conversation, last question and images,
    and the expanded prompt token ids."""
    encoded = learner.batches.encode_prompt(prompt)
    return events_pb2.GenerationLogged(
        prompt_text=prompt.text, images=[common_pb2.ImageRef(sha256=sha) for sha in prompt.image_sha256],
        prompt_token_ids=encoded["input_ids"][0].tolist(),
        conversation=[
            common_pb2.LoggedMessage(role=ROLE_VALUES[turn.role], content=[
                common_pb2.LoggedContentPart(image=common_pb2.ImageRef(sha256=part.value)) if part.kind == "image"
                else common_pb2.LoggedContentPart(text=part.value)
                for part in turn.parts
            ])
            for turn in prompt.conversation
        ],
    )


def logged(sample: Sample) -> Response:
    return Response(sample.text, tuple(sample.token_ids), tuple(sample.logprobs))


def traffic_pairs(learner: Learner, prompts: list[Prompt]) -> list[PreferencePair]:
    """Per prompt: a preference between two logged samples, and an edit preferred over a logged sample."""
    samples = learner.sampler.sample(prompts, 2, seed=1)
    pairs = []
    for i, prompt in enumerate(prompts):
        first, second = samples[2 * i], samples[2 * i + 1]
        generation = logged_generation(learner, prompt)
        pairs.append(PreferencePair(f"p{i}", "preference", generation, logged(first), logged(second)))
        pairs.append(PreferencePair(f"e{i}", "edit", generation, Response("A red square.", None, None), logged(first)))
    return pairs


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names of the weights that are not bitwise equal (names, so that a failure does not print every tensor)."""
    assert a.keys() == b.keys()
    return [name for name in a if not torch.equal(a[name], b[name])]
