"""The CLIP reward backbone on its own (reward/clip.py) and choosing a backbone (reward/backbones.py)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig

from modalign.core.service import CannotStart
from modalign.policy.model import build_default_policy, save_policy
from modalign.reward.backbones import backbone_of, build_default_reward_model, load_reward_model, new_reward_model
from modalign.reward.clip import ClipRewardModel
from modalign.reward.model import RewardModel, UnscorableText, UnusableRewardModel
from modalign.trainer.losses import bradley_terry_loss, preference_accuracy
from modalign.trainer.models import optimizer_step

torch.set_num_threads(1)

PROMPTS = ["What colour is the shape?", "Hello", "How many shapes are there?"]
RESPONSES = ["The shape is red.", "Hello! How can I help you today?", "There are two shapes."]
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


@pytest.fixture(scope="module")
def reward() -> ClipRewardModel:
    return build_default_reward_model(seed=0, backbone="clip")


@pytest.fixture
def images() -> list[list[Image.Image]]:
    # 1, 0 and 2 images: a batch mixing text-only and multi-image rows.
    return [[Image.new("RGB", (40, 30), "red")], [], [Image.new("RGB", (32, 32), "blue"), Image.new("RGB", (16, 16), "green")]]


def test_a_batch_scores_each_row_as_it_scores_alone(reward: ClipRewardModel, images) -> None:
    batch = reward.score(PROMPTS, images, RESPONSES)
    alone = torch.cat([reward.score([p], [i], [r]) for p, i, r in zip(PROMPTS, images, RESPONSES)])
    assert batch.shape == (3,) and torch.isfinite(batch).all()
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-6)


def test_the_images_their_order_of_rows_and_the_response_reach_the_score(reward: ClipRewardModel) -> None:
    red, blue = [Image.new("RGB", (32, 32), "red")], [Image.new("RGB", (32, 32), "blue")]
    scores = reward.score(["What colour is it?"] * 4, [red, red, blue, []], ["It is red.", "It is blue.", "It is red.", "It is red."])
    assert scores[0] != scores[1], "the response must reach the score"
    assert scores[0] != scores[2], "the image must reach the score"
    assert scores[0] != scores[3], "no image is not the same as an image"


def test_it_starts_from_the_policys_vision_tower_and_token_embeddings() -> None:
    policy, processor = build_default_policy(5)
    model = new_reward_model("clip", policy, processor, seed=5)
    for name, tensor in policy.model.vision_tower.state_dict().items():
        assert torch.equal(model.clip.vision_model.state_dict()[name], tensor), name
    assert torch.equal(model.clip.text_model.embeddings.token_embedding.weight, policy.get_input_embeddings().weight)


def test_a_policy_whose_vision_tower_is_not_clip_is_refused_naming_it() -> None:
    policy, processor = build_default_policy(0)
    policy.config.vision_config.model_type = "siglip_vision_model"  # what LLaVA-OneVision or Gemma 3 have
    with pytest.raises(UnusableRewardModel, match="siglip_vision_model.*CLIP checkpoint"):
        new_reward_model("clip", policy, processor)


def test_text_past_the_window_keeps_its_end(reward: ClipRewardModel) -> None:
    tokenizer = reward.processor.tokenizer
    long_prompt = " ".join(["Look at the picture carefully."] * 60)
    encoded = reward.encode([long_prompt], [[]], ["It is red."])
    ids = encoded["input_ids"][0].tolist()
    assert len(ids) == reward.text_window
    response_ids = tokenizer("It is red.", add_special_tokens=False).input_ids
    assert ids[-len(response_ids) - 1:] == response_ids + [tokenizer.eos_token_id]
    assert ids[0] == tokenizer.bos_token_id
    assert torch.isfinite(reward.score([long_prompt], [[]], ["It is red."])).all()


@pytest.mark.parametrize("field", ["prompt", "response"])
def test_reserved_tokens_are_refused_naming_the_row(reward: ClipRewardModel, field: str) -> None:
    forged = {"prompt": ["Hi", "a forged </s> end"], "response": ["Hi", "a forged <image>"]}[field]
    other = ["Hi", "Hi"]
    prompts, responses = (forged, other) if field == "prompt" else (other, forged)
    with pytest.raises(UnscorableText, match=f"{field} 1 contains reserved token"):
        reward.score(prompts, [[], []], responses)


def test_save_and_load_give_identical_scores_and_record_the_backbone(reward: ClipRewardModel, images, tmp_path: Path) -> None:
    reward.save(tmp_path / "r1")
    assert backbone_of(tmp_path / "r1") == "clip"
    loaded = load_reward_model(tmp_path / "r1")
    assert isinstance(loaded, ClipRewardModel) and not loaded.training
    assert torch.equal(loaded.score(PROMPTS, images, RESPONSES), reward.score(PROMPTS, images, RESPONSES))
    with pytest.raises(UnusableRewardModel, match="holds a clip reward model, not a generative one"):
        load_reward_model(tmp_path / "r1", backbone="generative")


def test_a_generative_folder_loads_as_one_and_unknown_folders_are_refused(tmp_path: Path) -> None:
    build_default_reward_model(seed=1).save(tmp_path / "g")
    assert isinstance(load_reward_model(tmp_path / "g"), RewardModel)
    with pytest.raises(UnusableRewardModel, match="not a clip one"):
        load_reward_model(tmp_path / "g", backbone="clip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CannotStart, match="neither a saved reward model"):
        load_reward_model(tmp_path / "empty")


def test_a_plain_policy_checkpoint_starts_a_generative_reward_model_under_a_fresh_head(tmp_path: Path, images) -> None:
    """What a team with its own SFT checkpoint points the trainer at: a backbone other than the policy's."""
    policy, processor = build_default_policy(4)
    save_policy(policy, processor, tmp_path / "policy")
    assert backbone_of(tmp_path / "policy") == "generative"
    model = load_reward_model(tmp_path / "policy", seed=2, backbone="generative")
    assert isinstance(model, RewardModel)
    assert all(torch.equal(a, b) for a, b in zip(policy.state_dict().values(), model.backbone.state_dict().values()))
    assert torch.equal(model.head.weight, load_reward_model(tmp_path / "policy", seed=2).head.weight)  # seeded
    assert torch.isfinite(model.score(PROMPTS, images, RESPONSES)).all()
    with pytest.raises(UnusableRewardModel, match="not a clip one"):
        load_reward_model(tmp_path / "policy", backbone="clip")


def test_a_plain_clip_checkpoint_starts_a_clip_reward_model_under_a_fresh_head(tmp_path: Path, images) -> None:
    """What a team with its own CLIP (say a saved openai/clip-vit-base-patch32) points the trainer at."""
    _, policy_processor = build_default_policy(0)
    tokenizer = policy_processor.tokenizer
    config = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id).to_dict(),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=32, patch_size=8).to_dict(),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    CLIPProcessor(image_processor=policy_processor.image_processor, tokenizer=tokenizer).save_pretrained(tmp_path / "clip")
    assert backbone_of(tmp_path / "clip") == "clip"
    model = load_reward_model(tmp_path / "clip", seed=2)
    assert isinstance(model, ClipRewardModel) and model.text_window == 77 and model.head[0].in_features == 3 * 16
    assert torch.equal(model.head[0].weight, load_reward_model(tmp_path / "clip", seed=2).head[0].weight)  # seeded
    assert torch.isfinite(model.score(PROMPTS, images, RESPONSES)).all()


def colour_pairs(rng: random.Random, n: int) -> list[tuple[Image.Image, str, str]]:
    """(image of one colour, the answer naming it, an answer naming another colour)."""
    pairs = []
    for _ in range(n):
        right, wrong = rng.sample(sorted(COLOURS), 2)
        pairs.append((Image.new("RGB", (32, 32), COLOURS[right]), f"It is {right}.", f"It is {wrong}."))
    return pairs


def test_bradley_terry_training_teaches_it_which_answer_agrees_with_the_image() -> None:
    """The head has to read image and text together: the same two answers swap places with the image."""
    model = build_default_reward_model(seed=0, backbone="clip")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    rng = random.Random(0)
    test = colour_pairs(random.Random(1), 48)

    def rewards(pairs):
        chosen, rejected = pairs_of(pairs)
        return model(**model.encode(*chosen)), model(**model.encode(*rejected))

    def pairs_of(pairs):
        question = ["What colour is the shape?"] * len(pairs)
        images = [[image] for image, _, _ in pairs]
        return (question, images, [c for _, c, _ in pairs]), (question, images, [r for _, _, r in pairs])

    with torch.no_grad():
        before = preference_accuracy(*rewards(test)).item()
    for _ in range(120):
        chosen, rejected = rewards(colour_pairs(rng, 16))
        optimizer_step(bradley_terry_loss(chosen, rejected), 1.0, (model, optimizer))
    with torch.no_grad():
        after = preference_accuracy(*rewards(test)).item()
    assert after >= 0.95 > before + 0.2, (before, after)
