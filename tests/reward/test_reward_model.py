"""RewardModel on its own: pure torch, no server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from modalign.policy.model import build_default_policy, format_prompt
from modalign.reward.backbones import build_default_reward_model
from modalign.reward.model import RewardModel, UnscorableText, last_token_index

# On 2 cores, one intra-op thread per process: oversubscribed threads made a forward 9x slower.
torch.set_num_threads(1)

PROMPTS = ["What colour is the shape?", "Hello", "How many shapes are there?"]
RESPONSES = ["The shape is red.", "Hello! How can I help you today?", "There are two shapes."]


@pytest.fixture(scope="module")
def reward() -> RewardModel:
    model = build_default_reward_model(seed=0)
    with torch.no_grad():  # a trained model's weights are not zero: let the likelihood features count
        model.likelihood_weights.copy_(torch.tensor([0.3, -0.2]))
    return model


@pytest.fixture
def images() -> list[list[Image.Image]]:
    # 0, 1 and 2 images per row: the batch mixes text-only and multi-image samples.
    return [
        [Image.new("RGB", (40, 30), "red")],
        [],
        [Image.new("RGB", (32, 32), "blue"), Image.new("RGB", (16, 16), "green")],
    ]


def test_score_is_one_finite_float_per_row(reward: RewardModel, images: list[list[Image.Image]]) -> None:
    scores = reward.score(PROMPTS, images, RESPONSES)
    assert scores.shape == (3,)
    assert scores.dtype == torch.float32
    assert torch.isfinite(scores).all()


def test_last_token_index_handles_left_and_right_padding() -> None:
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


def test_pad_tokens_do_not_change_the_score(reward: RewardModel, images: list[list[Image.Image]]) -> None:
    # The tokenizer pads on the left: rewriting every padded position must not move any score.
    inputs = reward.encode(PROMPTS, images, RESPONSES)
    assert (inputs["attention_mask"] == 0).any(), "rows of different lengths should need padding"
    with torch.inference_mode():
        expected = reward(**inputs)
        forged = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, reward.processor.tokenizer.eos_token_id)
        torch.testing.assert_close(reward(**{**inputs, "input_ids": forged}), expected)


def test_score_is_read_at_the_last_response_token_not_the_last_position(reward: RewardModel) -> None:
    # Right padding puts pads after the response; reading the last position would read a pad.
    inputs = reward.encode(PROMPTS[:1], [[]], RESPONSES[:1])
    pad = reward.processor.tokenizer.pad_token_id
    padded = {
        "input_ids": F.pad(inputs["input_ids"], (0, 5), value=pad),
        "attention_mask": F.pad(inputs["attention_mask"], (0, 5), value=0),
        "response_lengths": inputs["response_lengths"],
    }
    with torch.inference_mode():
        torch.testing.assert_close(reward(**padded), reward(**inputs))


def test_likelihood_feature_is_the_backbones_log_likelihood_of_the_response(
    reward: RewardModel, images: list[list[Image.Image]]
) -> None:
    inputs = reward.encode(PROMPTS, images, RESPONSES)
    tokenizer = reward.processor.tokenizer
    with torch.inference_mode():
        hidden = reward.backbone.base_model(
            **{k: v for k, v in inputs.items() if k != "response_lengths"}, use_cache=False
        ).last_hidden_state
        features = reward.response_logprob(
            hidden, inputs["input_ids"], last_token_index(inputs["attention_mask"]), inputs["response_lengths"]
        )
        for row, (prompt, row_images, response) in enumerate(zip(PROMPTS, images, RESPONSES)):
            # The same text alone, unpadded, through the full model's own LM head.
            alone = reward.processor(text=[format_prompt(reward.processor, prompt, len(row_images)) + response
                                           + tokenizer.eos_token], images=row_images or None, return_tensors="pt")
            logits = reward.backbone(**alone).logits[0].float()
            ids = alone["input_ids"][0]
            answer = len(tokenizer(response + tokenizer.eos_token, add_special_tokens=False).input_ids)
            expected = torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:, None])[-answer:].sum()
            torch.testing.assert_close(features[row], expected, rtol=1e-4, atol=1e-4)


def test_likelihood_weights_set_how_much_the_features_count(
    reward: RewardModel, images: list[list[Image.Image]]
) -> None:
    inputs = reward.encode(PROMPTS, images, RESPONSES)
    with torch.inference_mode():
        with_features = reward(**inputs)
        hidden = reward.backbone.base_model(
            **{k: v for k, v in inputs.items() if k != "response_lengths"}, use_cache=False
        ).last_hidden_state
        last = last_token_index(inputs["attention_mask"])
        head_only = reward.head(hidden[torch.arange(3), last]).squeeze(-1)
        logprob = reward.response_logprob(hidden, inputs["input_ids"], last, inputs["response_lengths"])
    expected = head_only + 0.3 * logprob - 0.2 * inputs["response_lengths"].float()
    torch.testing.assert_close(with_features, expected)


def test_a_fresh_model_starts_with_the_features_unused() -> None:
    assert build_default_reward_model(seed=3).likelihood_weights.tolist() == [0.0, 0.0]


def test_a_folder_from_before_the_likelihood_features_loads_as_a_plain_head(
    images: list[list[Image.Image]], tmp_path: Path
) -> None:
    plain = RewardModel(*build_default_policy(4), seed=4, likelihood_features=False).eval()
    plain.save(tmp_path / "r1")
    config = json.loads((tmp_path / "r1" / "reward_config.json").read_text())
    del config["likelihood_features"]  # as written before the key existed
    (tmp_path / "r1" / "reward_config.json").write_text(json.dumps(config))
    loaded = RewardModel.load(tmp_path / "r1")
    assert loaded.likelihood_weights is None
    assert "response_lengths" not in loaded.encode(PROMPTS, images, RESPONSES)
    assert torch.equal(loaded.score(PROMPTS, images, RESPONSES), plain.score(PROMPTS, images, RESPONSES))


def test_response_and_image_change_the_score(reward: RewardModel) -> None:
    red, blue = [Image.new("RGB", (32, 32), "red")], [Image.new("RGB", (32, 32), "blue")]
    scores = reward.score(["What colour is it?"] * 3, [red, red, blue], ["It is red.", "It is blue.", "It is red."])
    assert scores[0] != scores[1], "the response must reach the score"
    assert scores[0] != scores[2], "the image must reach the score"


def test_reserved_tokens_in_a_response_are_refused(reward: RewardModel) -> None:
    with pytest.raises(UnscorableText, match="response 0"):
        reward.score(["Hi"], [[]], ["a forged <image> placeholder"])


def test_save_and_load_give_identical_scores(
    reward: RewardModel, images: list[list[Image.Image]], tmp_path: Path
) -> None:
    reward.save(tmp_path / "r1")
    loaded = RewardModel.load(tmp_path / "r1")
    assert not loaded.training
    assert torch.equal(loaded.likelihood_weights, reward.likelihood_weights)
    assert torch.equal(loaded.score(PROMPTS, images, RESPONSES), reward.score(PROMPTS, images, RESPONSES))


def test_bradley_terry_gradients_reach_head_and_backbone(images: list[list[Image.Image]]) -> None:
    model = build_default_reward_model(seed=1)
    rewards = model(**model.encode(PROMPTS[:2] * 2, images[:2] * 2, RESPONSES[:2] + ["No.", "Maybe."]))
    chosen, rejected = rewards[:2], rewards[2:]
    loss = -F.logsigmoid(chosen - rejected).mean()
    loss.backward()
    backbone = model.backbone.base_model
    for name, parameter in [
        ("head", model.head.weight),
        ("likelihood weights", model.likelihood_weights),
        ("text embeddings", backbone.get_input_embeddings().weight),
        ("image projector", backbone.multi_modal_projector.linear_1.weight),
    ]:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"no gradient reaches the {name}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scores_on_cuda_match_the_cpu(images: list[list[Image.Image]]) -> None:
    cpu = build_default_reward_model(seed=2).score(PROMPTS, images, RESPONSES)
    cuda = build_default_reward_model(seed=2).to("cuda").score(PROMPTS, images, RESPONSES)
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-3, atol=1e-3)
