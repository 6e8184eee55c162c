"""What the trainer's tests share: one torch thread per process, and the learner tests' blobs and prompts."""

from __future__ import annotations

import pytest
import torch

from modalign.core.blobs import BlobStore
from modalign.trainer.batches import Prompt

from tests.trainer.learning import mixed_prompts, square_images

# On 2 cores, one intra-op thread per process: oversubscribed threads made torch 9x slower (docs/architecture.md).
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> BlobStore:
    return BlobStore(tmp_path_factory.mktemp("blobs"))


@pytest.fixture(scope="module")
def images(blobs: BlobStore) -> dict[str, str]:
    return square_images(blobs)


@pytest.fixture(scope="module")
def prompts(images: dict[str, str]) -> list[Prompt]:
    return mixed_prompts(images)
