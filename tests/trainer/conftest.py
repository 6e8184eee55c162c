"""What the trainer's tests share: one torch thread per process, and the learner tests' blobs and prompts."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image, ImageDraw

from modalign.core.blobs import BlobStore
from modalign.trainer.batches import Prompt

# On 2 cores, one intra-op thread per process: oversubscribed threads made torch 9x slower (docs/architecture.md).
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> BlobStore:
    return BlobStore(tmp_path_factory.mktemp("blobs"))


@pytest.fixture(scope="module")
def images(blobs: BlobStore) -> dict[str, str]:
    """sha256 of a 32x32 PNG with a square of each colour."""
    shas = {}
    for colour in ("red", "blue", "green"):
        image = Image.new("RGB", (32, 32), "white")
        ImageDraw.Draw(image).rectangle((4, 4, 20, 20), fill=colour)
        data = io.BytesIO()
        image.save(data, "PNG")
        shas[colour] = blobs.put(data.getvalue())
    return shas


@pytest.fixture(scope="module")
def prompts(images: dict[str, str]) -> list[Prompt]:
    """Prompts of different lengths with zero, one and two images."""
    return [
        Prompt.question("Hi", ()),
        Prompt.question("What colour is the square?", (images["red"],)),
        Prompt.question("Compare these two pictures, please.", (images["blue"], images["green"])),
        Prompt.question("Where?", (images["green"],)),
    ]
