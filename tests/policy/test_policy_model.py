import pytest
import torch

from modalign.policy.conversation import single_question
from modalign.policy.generations import shorthand_conversation
from modalign.policy.model import (
    NUM_IMAGE_TOKENS,
    build_default_policy,
    build_tokenizer,
    format_prompt,
    load_policy,
    save_policy,
)
from modalign.v1 import common_pb2, policy_pb2


def test_default_policy_is_small_and_in_eval_mode(policy):
    model, _ = policy
    assert 500_000 < model.num_parameters() < 3_000_000
    assert not model.training


def test_same_seed_same_weights_and_global_rng_untouched():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, _ = build_default_policy(seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    b, _ = build_default_policy(seed=7)
    c, _ = build_default_policy(seed=8)
    for (name, pa), pb, _pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_tokenizer_is_deterministic_and_covers_any_text():
    first, second = build_tokenizer(), build_tokenizer()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    text = "Zwölf Boxkämpfer 🙂 — 東京 \t tabs\nnew line"
    ids = first(text, add_special_tokens=False)["input_ids"]
    assert first.unk_token_id not in ids
    assert first.decode(ids) == text
    # Domain words are single tokens, so answers stay short.
    for word in ["Ġred", "Ġblue", "Ġcircle", "Ġthree", "Ġleft"]:
        assert word in first.get_vocab(), word


def test_format_prompt_places_images_before_text(policy):
    _, processor = policy
    prompt = format_prompt(processor, "What colour is the circle?", num_images=2)
    assert prompt == "<s><|user|>\n<image><image>What colour is the circle?</s>\n<|assistant|>\n"


@pytest.mark.parametrize("forged", ["<image>", "</s>", "<|assistant|>"])
def test_format_prompt_rejects_reserved_tokens_in_user_text(policy, forged):
    _, processor = policy
    with pytest.raises(ValueError, match="reserved"):
        format_prompt(processor, f"look {forged} here", num_images=1)


def test_processor_expands_images_and_forward_runs(policy, images):
    model, processor = policy
    prompt = format_prompt(processor, "How many shapes?", num_images=len(images))
    inputs = processor(text=prompt, images=images, return_tensors="pt")
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    ids = inputs["input_ids"][0]
    assert int((ids == model.config.image_token_id).sum()) == 2 * NUM_IMAGE_TOKENS
    with torch.inference_mode():
        logits = model(**inputs).logits
    assert logits.shape == (1, ids.numel(), len(processor.tokenizer))
    assert torch.isfinite(logits).all()


def test_images_change_the_logits(policy, images):
    model, processor = policy
    prompt = format_prompt(processor, "What colour?", num_images=1)
    with torch.inference_mode():
        red = model(**processor(text=prompt, images=images[:1], return_tensors="pt")).logits[0, -1]
        blue = model(**processor(text=prompt, images=images[1:], return_tensors="pt")).logits[0, -1]
    assert not torch.allclose(red, blue)


def test_save_load_round_trip_gives_identical_logits(policy, images, tmp_path):
    model, processor = policy
    save_policy(model, processor, tmp_path)
    loaded_model, loaded_processor = load_policy(tmp_path)
    assert not loaded_model.training
    assert (tmp_path / "model.safetensors").exists()
    prompt = format_prompt(loaded_processor, "Where is the square?", num_images=2)
    assert prompt == format_prompt(processor, "Where is the square?", num_images=2)
    inputs = processor(text=prompt, images=images, return_tensors="pt")
    loaded_inputs = loaded_processor(text=prompt, images=images, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], loaded_inputs["input_ids"])
    assert torch.equal(inputs["pixel_values"], loaded_inputs["pixel_values"])
    with torch.inference_mode():
        assert torch.equal(model(**inputs).logits, loaded_model(**loaded_inputs).logits)


def test_the_single_question_shorthand_is_the_conversation_a_shorthand_request_logs() -> None:
    """single_question (the trainer's, the evaluation's and the warm start's prompts) has the parts, in the order,
    of the turn the policy builds from a shorthand request: images, the spoken clip, then the text if any."""
    image, clip = common_pb2.Image(data=b"i", mime_type="image/png"), common_pb2.Audio(data=b"a", mime_type="audio/wav")
    for text, audio in (("What is there?", None), ("", clip), ("and this?", clip)):
        request = policy_pb2.GenerateRequest(text=text, images=[image], **({"audio": audio} if audio else {}))
        logged = [part.WhichOneof("part") for part in shorthand_conversation(request)[0].content]
        built = single_question(text, ["key"], ["key"] if audio else [])
        assert [part.kind for part in built[0].parts] == logged and built[0].text == text
