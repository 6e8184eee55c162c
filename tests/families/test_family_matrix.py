"""The family matrix: every supported family, on a tiny checkpoint built in code, through each part of the loop.

Per family: the engine decodes what transformers' own generate decodes; a batch mixing image counts gives each
request what it gets alone; seeded sampling replays; the reward model scores a batch as it scores each row; one
round of every registered algorithm trains the policy; the trainer's log-probs of logged responses equal the
engine's and a plain single-row forward pass; and the version it exports loads with the plain Auto classes.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor

from modalign.core.blobs import BlobStore
from modalign.policy.conversation import Part, Turn
from modalign.policy.engine import GenerationRequest, PolicyEngine, SamplingParams, mask_unsampleable
from modalign.policy.families import audio_sampling_rate, family_of, takes_audio
from modalign.policy.model import format_conversation, format_prompt, load_policy
from modalign.reward.model import RewardModel
from modalign.trainer.algorithms import ALGORITHMS
from modalign.trainer.batches import MediaCache, Prompt

from tests.clips import wav
from tests.families.tiny import TINY_CHECKPOINTS
from tests.trainer.learning import differing, make_learner, parameters, seed_everything, traffic_pairs

FAMILIES = sorted(TINY_CHECKPOINTS)


def square(colour: str, size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).rectangle((4, 4, size[0] // 2, size[1] // 2), fill=colour)
    return image


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp(request.param)
    TINY_CHECKPOINTS[request.param](folder, 0)
    return folder


@pytest.fixture(scope="module")
def policy(checkpoint: Path):
    return load_policy(checkpoint)


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> BlobStore:
    return BlobStore(tmp_path_factory.mktemp("blobs"))


@pytest.fixture(scope="module")
def prompts(blobs: BlobStore, policy) -> list[Prompt]:
    """Prompts with two images of different sizes, one image, and none; a conversation; and for a family that
    takes audio, a question spoken about an image."""
    shas = {}
    for colour, size in (("red", (32, 32)), ("blue", (64, 48)), ("green", (40, 32))):
        data = io.BytesIO()
        square(colour, size).save(data, "PNG")
        shas[colour] = blobs.put(data.getvalue())
    spoken = []
    if takes_audio(policy[1]):
        spoken = [Prompt((Turn("user", (Part("image", shas["red"]), Part("audio", blobs.put(wav(seconds=1.0))),
                                        Part("text", "Answer the question."))),))]
    return [
        Prompt.question("Compare these two pictures, please.", (shas["red"], shas["blue"])),
        Prompt.question("What colour is the square?", (shas["green"],)),
        Prompt.question("Hi", ()),
        # A conversation, formatted by the family's own chat template: images in two user turns, an answer between.
        Prompt((
            Turn("user", (Part("image", shas["green"]), Part("text", "What colour is the square?"))),
            Turn("assistant", (Part("text", "It is green."),)),
            Turn("user", (Part("text", "And in this one?"), Part("image", shas["red"]))),
        )),
    ] + spoken


def media_of(processor, blobs: BlobStore) -> MediaCache:
    """The prompts' images and clips as the trainer decodes them (clips at the processor's rate)."""
    return MediaCache(blobs, audio_sampling_rate(processor))


def requests_of(processor, blobs: BlobStore, prompts: list[Prompt], **params) -> list[GenerationRequest]:
    media = media_of(processor, blobs)
    return [
        GenerationRequest(
            format_conversation(processor, p.conversation), m.images,
            SamplingParams(**({"max_new_tokens": 8} | params)), audio=m.audio,
        )
        for p in prompts for m in [media.of_prompt(p)]
    ]


def test_the_engine_decodes_what_transformers_generate_decodes(policy, blobs, prompts) -> None:
    model, processor = policy
    engine = PolicyEngine(model, processor)
    for request in requests_of(processor, blobs, [prompts[0], prompts[1], *prompts[3:]], temperature=0.0):
        sample = engine.generate([request])[0][0]
        inputs = engine.family.encode(processor, request.prompt_text, request.images, request.audio)  # the processor's
        with torch.no_grad():
            expected = model.generate(
                **inputs, do_sample=False, max_new_tokens=8, suppress_tokens=engine.unsampleable_token_ids,
            )[0, inputs["input_ids"].shape[1]:].tolist()
        pad = engine.pad_token_id
        while expected and expected[-1] == pad and pad not in engine.eos_token_ids:
            expected.pop()
        assert sample.token_ids == expected


def test_a_mixed_batch_gives_each_request_what_it_gets_alone(policy, blobs, prompts) -> None:
    model, processor = policy
    engine = PolicyEngine(model, processor)
    for params in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 7}):
        requests = requests_of(processor, blobs, prompts, **params)
        together = engine.generate(requests)
        for request, batched in zip(requests, together):
            alone = engine.generate([request])[0][0]
            assert batched[0].token_ids == alone.token_ids, params
            torch.testing.assert_close(batched[0].logprobs, alone.logprobs, atol=1e-4, rtol=0)


# Families whose rows join a running batch (continuous batching); the others' caches (sliding windows,
# cross-attention to images) do not line up across rows started apart, and new requests wait instead.
JOINING = {"idefics3", "llava", "llava_onevision", "qwen2_5_omni_thinker", "qwen2_5_vl", "qwen2_vl", "qwen3_vl", "smolvlm"}


def test_requests_that_join_a_running_batch_get_what_they_get_alone(policy, blobs, prompts) -> None:
    model, processor = policy
    engine = PolicyEngine(model, processor)
    first, *later = requests_of(processor, blobs, [prompts[2], prompts[0], prompts[1], *prompts[3:]],
                                temperature=1.0, seed=5, max_new_tokens=12)
    batch = engine.start([first], [engine.encode(first)])
    answers = {}
    for _ in range(3):
        answers.update((id(r), s) for r, s in engine.step(batch))
    encoded = [engine.encode(r) for r in later]
    assert engine.joinable(batch, encoded) == (model.config.model_type in JOINING)
    if engine.joinable(batch, encoded):
        engine.join(batch, engine.start(later, encoded))
    else:
        answers.update((id(r), s) for r, s in zip(later, engine.generate_encoded(later, encoded)))
    while batch.rows:
        answers.update((id(r), s) for r, s in engine.step(batch))
    for request in [first, *later]:
        alone = engine.generate([request])[0][0]
        assert answers[id(request)][0].token_ids == alone.token_ids
        torch.testing.assert_close(answers[id(request)][0].logprobs, alone.logprobs, atol=1e-4, rtol=0)


def test_seeded_sampling_replays(policy, blobs, prompts) -> None:
    model, processor = policy
    engine = PolicyEngine(model, processor)
    request = requests_of(processor, blobs, prompts[:1], temperature=1.0, seed=11)[0]
    first, second = engine.generate([request])[0][0], engine.generate([request])[0][0]
    assert first.token_ids == second.token_ids and first.logprobs == second.logprobs


def test_the_reward_model_scores_a_batch_as_each_row_alone(policy, blobs, prompts) -> None:
    model, processor = policy
    reward_model = RewardModel(copy.deepcopy(model), processor, seed=0).eval()
    with torch.no_grad():
        reward_model.likelihood_weights.fill_(0.1)  # the likelihood features take part too
    conversations = [p.conversation for p in prompts]
    media = [media_of(processor, blobs).of_prompt(p) for p in prompts]
    images, audio = [m.images for m in media], [m.audio for m in media]
    responses = ["A red square.", "It is green.", "Hello! How can I help you today?", "It is red.", "Yes."][:len(prompts)]
    together = reward_model.score(conversations, images, responses, audio)
    alone = torch.cat([reward_model.score([c], [i], [r], [a]) for c, i, r, a in zip(conversations, images, responses, audio)])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=0)
    other = reward_model.score(conversations, images, ["Nothing."] * len(prompts), audio)
    assert not torch.allclose(together, other)  # the score reads the response


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_one_round_of_every_algorithm_trains_the_policy(checkpoint, blobs, prompts, algorithm) -> None:
    seed_everything(0)
    learner = make_learner(
        blobs, policy_model_dir=str(checkpoint), algorithm=algorithm, sample_prompts=2, samples_per_prompt=2,
        max_new_tokens=4, eval_prompts=2,
    )
    before = parameters(learner.models.policy)
    metrics = learner.learn(traffic_pairs(learner, prompts), prompts)
    assert all(torch.isfinite(torch.tensor(value)) for value in metrics.values()), metrics
    assert differing(before, parameters(learner.models.policy)), f"{algorithm} left every weight unchanged"


def test_the_trainers_logprobs_equal_the_engines_and_a_plain_forward(checkpoint, blobs, prompts, tmp_path) -> None:
    seed_everything(1)
    learner = make_learner(blobs, policy_model_dir=str(checkpoint), samples_per_prompt=2, max_new_tokens=6)
    policy, processor, batches = learner.models.policy, learner.models.processor, learner.batches
    samples = learner.sampler.sample(prompts, 1, seed=3)
    batch = batches.of_samples(prompts, samples)
    with torch.no_grad():
        recomputed = batches.logprobs(policy, batch)
    behaviour = torch.zeros_like(recomputed)
    for row, sample in enumerate(samples):
        behaviour[row, : len(sample.logprobs)] = torch.tensor(sample.logprobs)
    torch.testing.assert_close(recomputed, behaviour, atol=1e-4, rtol=0)

    # A plain forward of each row alone: the processor's own encoding, the response appended, the model's own
    # positions; inputs that run along the sequence extend over the response as generate extends them.
    family = family_of(policy.config.model_type)
    for row, (prompt, sample) in enumerate(zip(prompts, samples)):
        text = format_conversation(processor, prompt.conversation)
        media = learner.media.of_prompt(prompt)
        inputs = family.encode(processor, text, media.images, media.audio)  # the processor's own, as the engine gets it
        response = torch.tensor([sample.token_ids])
        inputs["input_ids"] = torch.cat([inputs["input_ids"], response], 1)
        for key in {"attention_mask"} | (family.sequence_keys & inputs.keys()):
            last = inputs[key][:, -1:]
            inputs[key] = torch.cat([inputs[key], last.expand(-1, response.shape[1], *last.shape[2:])], 1)
        with torch.no_grad():
            logits = policy(**inputs).logits[0, -response.shape[1] - 1 : -1].float()
        logits = mask_unsampleable(logits, batches.unsampleable_token_ids) / learner.config.sampling_temperature
        plain = torch.log_softmax(logits, -1).gather(-1, response[0].unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(recomputed[row, : len(sample.token_ids)], plain, atol=1e-4, rtol=0)

    # The published version loads with the plain Auto classes and generates what the trained policy generates.
    learner.learn(traffic_pairs(learner, prompts), prompts)
    learner.models.export_policy(tmp_path / "v1")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "v1", local_files_only=True).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path / "v1", local_files_only=True)
    assert not differing(parameters(policy), parameters(loaded))
    request = requests_of(processor, blobs, prompts[1:2], temperature=1.0, seed=5)
    served = PolicyEngine(loaded, loaded_processor).generate(request)[0][0]
    assert served.token_ids == PolicyEngine(policy, processor).generate(request)[0][0].token_ids


def test_bfloat16_on_the_cpu_decodes_what_transformers_generate_decodes(checkpoint) -> None:
    """--dtype bfloat16: the checkpoint served in bfloat16 decodes as transformers does in bfloat16."""
    model, processor = load_policy(checkpoint, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    engine = PolicyEngine(model, processor)
    request = GenerationRequest(
        format_prompt(processor, "What colour is the square?", 1), [square("red", (32, 32))],
        SamplingParams(temperature=0.0, max_new_tokens=6),
    )
    sample = engine.generate([request])[0][0]
    inputs = engine.family.encode(processor, request.prompt_text, request.images)
    inputs = {key: value.to(torch.bfloat16) if value.is_floating_point() else value for key, value in inputs.items()}
    with torch.no_grad():
        expected = model.generate(
            **inputs, do_sample=False, max_new_tokens=6, suppress_tokens=engine.unsampleable_token_ids,
        )[0, inputs["input_ids"].shape[1]:].tolist()
    assert sample.token_ids == expected[: len(sample.token_ids)] and len(sample.token_ids) >= 1
    assert all(torch.isfinite(torch.tensor(sample.logprobs)))
