import pytest
import torch
from PIL import Image

from modalign.policy.model import build_default_policy

# On 2 cores, one intra-op thread per process: oversubscribed threads made a forward 9x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def policy():
    return build_default_policy(seed=0)


@pytest.fixture
def images() -> list[Image.Image]:
    return [Image.new("RGB", (40, 30), "red"), Image.new("RGBA", (32, 32), (0, 0, 255, 255))]
