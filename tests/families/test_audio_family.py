"""The audio-capable family (Qwen2.5-Omni's thinker), on its tiny checkpoint, with spoken questions.

The family matrix proves it with images like every family; here its audio: the engine decodes what transformers'
own generate decodes for a prompt with an audio clip (and with a clip and an image), a batch mixing spoken, typed
and pictured rows gives each what it gets alone, rows with audio join a running batch, and the clip is read (a
different clip gives a different answer). A family without audio refuses a clip by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modalign.policy.conversation import Part, Turn
from modalign.policy.engine import GenerationRequest, PolicyEngine, SamplingParams
from modalign.policy.families import takes_audio
from modalign.policy.model import build_default_policy, format_conversation, load_policy

from tests.families.tiny.qwen_omni import SAMPLING_RATE, build_qwen2_5_omni


def tone(frequencies: tuple[float, ...], seconds: float) -> np.ndarray:
    """A clip of one tone after another (equal shares of the time), mono float32 at the checkpoint's rate."""
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    part = np.array_split(t, len(frequencies))
    return np.concatenate([0.3 * np.sin(2 * np.pi * f * s) for f, s in zip(frequencies, part)]).astype(np.float32)


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("qwen2_5_omni")
    build_qwen2_5_omni(folder, 0)
    return load_policy(folder)


def request(processor, parts: tuple[Part, ...], images: list[Image.Image], audio: list[np.ndarray],
            **params) -> GenerationRequest:
    text = format_conversation(processor, (Turn("user", parts),))
    return GenerationRequest(text, images, SamplingParams(**({"max_new_tokens": 8} | params)), audio=audio)


def spoken(processor, clip: np.ndarray, **params) -> GenerationRequest:
    return request(processor, (Part("audio", ""),), [], [clip], **params)


def spoken_with_image(processor, clip: np.ndarray, image: Image.Image, **params) -> GenerationRequest:
    return request(processor, (Part("image", ""), Part("audio", ""), Part("text", "Answer me.")), [image], [clip],
                   **params)


def typed(processor, **params) -> GenerationRequest:
    return request(processor, (Part("text", "What colour is it?"),), [], [], **params)


def test_its_processor_takes_audio_and_the_default_policys_does_not(policy) -> None:
    assert takes_audio(policy[1])
    assert not takes_audio(build_default_policy(0)[1])


def test_spoken_questions_decode_what_transformers_generate_decodes(policy) -> None:
    model, processor = policy
    engine = PolicyEngine(model, processor)
    image = Image.new("RGB", (48, 40), "red")
    for req in (spoken(processor, tone((220.0, 440.0), 1.5), temperature=0.0),
                spoken_with_image(processor, tone((330.0,), 0.7), image, temperature=0.0)):
        sample = engine.generate([req])[0][0]
        inputs = engine.family.encode(processor, req.prompt_text, req.images, req.audio)  # the processor's own
        assert "input_features" in inputs
        with torch.no_grad():
            expected = model.generate(
                **inputs, do_sample=False, max_new_tokens=8, suppress_tokens=engine.unsampleable_token_ids,
            )[0, inputs["input_ids"].shape[1]:].tolist()
        assert sample.token_ids == expected


def test_the_answer_depends_on_the_clip(policy) -> None:
    model, processor = policy
    engine = PolicyEngine(model, processor)
    answers = {tuple(engine.generate([spoken(processor, tone(f, 1.0), temperature=0.0)])[0][0].token_ids)
               for f in ((220.0,), (880.0, 110.0), (500.0, 1500.0, 300.0))}
    assert len(answers) > 1


def test_a_batch_mixing_spoken_typed_and_pictured_rows_gives_each_what_it_gets_alone(policy) -> None:
    model, processor = policy
    engine = PolicyEngine(model, processor)
    image = Image.new("RGB", (32, 32), "blue")
    for params in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 3}):
        requests = [
            spoken(processor, tone((220.0, 440.0), 2.0), **params),
            typed(processor, **params),
            spoken_with_image(processor, tone((660.0,), 0.5), image, **params),
            request(processor, (Part("image", ""), Part("text", "And this?")), [image], [], **params),
        ]
        together = engine.generate(requests)
        for req, batched in zip(requests, together):
            alone = engine.generate([req])[0][0]
            assert batched[0].token_ids == alone.token_ids, params
            torch.testing.assert_close(batched[0].logprobs, alone.logprobs, atol=1e-4, rtol=0)


def test_spoken_requests_join_a_running_batch_and_get_what_they_get_alone(policy) -> None:
    model, processor = policy
    engine = PolicyEngine(model, processor)
    params = {"temperature": 1.0, "seed": 9, "max_new_tokens": 12}
    first = typed(processor, **params)
    later = [spoken(processor, tone((300.0, 900.0), 1.2), **params),
             spoken_with_image(processor, tone((450.0,), 0.8), Image.new("RGB", (40, 32), "green"), **params)]
    batch = engine.start([first], [engine.encode(first)])
    answers = {}
    for _ in range(3):
        answers.update((id(r), s) for r, s in engine.step(batch))
    encoded = [engine.encode(r) for r in later]
    assert engine.joinable(batch, encoded)
    engine.join(batch, engine.start(later, encoded))
    while batch.rows:
        answers.update((id(r), s) for r, s in engine.step(batch))
    for req in [first, *later]:
        alone = engine.generate([req])[0][0]
        assert answers[id(req)][0].token_ids == alone.token_ids


def test_a_family_without_audio_refuses_a_clip_by_name(tmp_path: Path) -> None:
    model, processor = build_default_policy(0)
    engine = PolicyEngine(model, processor)
    req = GenerationRequest("Hi", [], SamplingParams(max_new_tokens=2), audio=[tone((220.0,), 0.5)])
    with pytest.raises(ValueError, match="takes no audio"):
        engine.encode(req)
