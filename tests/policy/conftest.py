import copy

import pytest
import torch
from PIL import Image

from modalign.policy.model import build_default_policy, format_prompt

# On 2 cores, one intra-op thread per process: oversubscribed threads made a forward 9x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def policy():
    return build_default_policy(seed=0)


@pytest.fixture
def images() -> list[Image.Image]:
    return [Image.new("RGB", (40, 30), "red"), Image.new("RGBA", (32, 32), (0, 0, 255, 255))]


ANSWER = "Red 🙂."


@pytest.fixture(scope="session")
def taught_answer() -> str:
    return ANSWER


@pytest.fixture(scope="session")
def taught_policy(policy):
    """A copy of the policy trained for a moment to answer ANSWER and stop: a model that really emits
    EOS and a multi-byte character, so stopping and streaming are tested on genuine behaviour."""
    base, processor = policy
    model = copy.deepcopy(base).train()
    tokenizer = processor.tokenizer
    red = Image.new("RGB", (32, 32), "red")
    inputs = processor(text=format_prompt(processor, "What colour is it?", 1), images=[red], return_tensors="pt")
    answer = tokenizer(ANSWER, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_ids = inputs["input_ids"][0].tolist()
    input_ids = torch.tensor([prompt_ids + answer])
    labels = torch.tensor([[-100] * len(prompt_ids) + answer])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss = model(input_ids=input_ids, pixel_values=inputs["pixel_values"], labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), processor
