"""The spoken warm start builds a Qwen2.5-Omni thinker that saves, loads and is fed spoken questions like any
served policy (a tiny build, seconds); what a full build reaches is measured by its main, not here."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from modalign.demo.spoken_warmstart import (
    Inputs,
    SpokenWarmStartConfig,
    build_spoken_warm_start,
    evaluate,
    prompt_conversation,
    question_labels,
)
from modalign.policy.families import family_of, takes_audio
from modalign.policy.model import format_conversation, load_policy

torch.set_num_threads(1)

TINY = SpokenWarmStartConfig(vision_steps=2, audio_steps=2, sft_steps=4, clean_steps=2, batch_size=4, spoken=0.5)


def test_question_labels_name_the_kind_and_the_words_a_question_says() -> None:
    assert question_labels("exists", "Is there a red square in the image?") == {
        "kind": 4, "colour": 0, "shape": 1, "position": 4}
    assert question_labels("colour", "What colour is the shape at the top right?") == {
        "kind": 1, "colour": 4, "shape": 3, "position": 1}
    assert question_labels("position", "Where is the yellow shape?") == {"kind": 2, "colour": 3, "shape": 3, "position": 4}


def test_a_tiny_spoken_warm_start_is_cached_and_loads_as_an_audio_policy_that_hears_its_questions(tmp_path: Path) -> None:
    folder = build_spoken_warm_start(tmp_path, 0, TINY)
    assert folder.name.startswith("spoken-warmstart-") and (folder / "warmstart.json").exists()
    assert build_spoken_warm_start(tmp_path, 0, TINY) == folder  # the second build is the cached one
    model, processor = load_policy(folder)
    assert type(model).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration" and takes_audio(processor)

    # The served path (families.OmniRope) encodes the same prompt the build trained on: one token per quadrant.
    inputs = Inputs(processor)
    question = "Where is the red shape?"
    text = format_conversation(processor, prompt_conversation(question, spoken=True))
    row = family_of(model.config.model_type).encode(processor, text, [Image.new("RGB", (32, 32))], [inputs.clip(question)])
    assert row["input_ids"][0].tolist() == inputs.prompt(question, spoken=True)
    assert (row["input_ids"] == model.config.image_token_id).sum() == 4

    for spoken in (False, True):
        result = evaluate(model, inputs, spoken=spoken, n=4, batch_size=4, max_new_tokens=4)
        assert sum(result.styles.values()) == 4
