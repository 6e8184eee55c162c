"""The simulated users' hidden preference, and the report's statistics and KL estimate."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from modalign.core.audio import decode_audio, decode_input_audio
from modalign.demo.report import HELD_OUT_SEED, held_out_examples, held_out_prompts, kl_to
from modalign.demo.scenes import examples, hallucinated_answer, reference_answer
from modalign.demo.speech import synthesise
from modalign.demo.users import openai_message, preference, rating, request_for
from modalign.evaluation.metrics import mean_interval, wilson_interval
from modalign.evaluation.run import answers_of
from modalign.policy.engine import PolicyEngine
from modalign.policy.families import audio_sampling_rate
from modalign.policy.generations import shorthand_conversation
from modalign.policy.model import build_default_policy
from modalign.policy.omni import build_omni_policy
from modalign.v1 import common_pb2


@pytest.fixture
def stream():
    return examples(7)


def test_faithfulness_comes_first_and_style_breaks_ties_only_between_equals(stream) -> None:
    rng = random.Random(0)
    for _ in range(200):
        example = next(stream)
        concise = reference_answer(example.scene, example.question, "concise")
        verbose = reference_answer(example.scene, example.question, "verbose")
        wrong_concise = hallucinated_answer(example.scene, example.question, "concise", rng)
        assert preference(verbose, wrong_concise, example) == 1.0  # faithful beats concise
        assert preference(concise, verbose, example) == 1.0  # equally faithful: concise wins
        assert preference(concise, concise, example) == 0.5
        assert rating(concise, example) == 5 and rating(verbose, example) == 4
        if example.question.kind == "exists" and example.question.target is not None:
            assert rating(wrong_concise, example) == 4  # "No." where it is there: a miss, nothing false
        else:
            assert rating(wrong_concise, example) <= 2


def test_intervals_cover_their_estimates() -> None:
    low, high = wilson_interval(30, 100)
    assert low < 0.3 < high and high - low == pytest.approx(0.18, abs=0.01)
    assert wilson_interval(0, 50)[0] == pytest.approx(0.0)
    mean, (low, high) = mean_interval([1.0, 0.0, 0.5, 1.0])
    assert mean == pytest.approx(0.625) and low < mean < high


@pytest.mark.parametrize("spoken", [False, True], ids=["typed", "spoken"])
def test_kl_scores_each_answer_as_its_sampler_did(spoken: bool) -> None:
    """Scored by the policy that sampled them, answers give KL 0 to float precision: the teacher-forced
    log-probs match the sampler's own, masking (and a spoken question's clip) included. A perturbed policy is
    measurably away."""
    torch.set_num_threads(1)
    model, processor = build_omni_policy(seed=0) if spoken else build_default_policy(seed=0)
    prompts = held_out_prompts(held_out_examples(12), audio_sampling_rate(processor) if spoken else None)
    assert all((p.clip is not None) == spoken for p in prompts)
    reference = PolicyEngine(model, processor, "v0")
    assert kl_to(reference, answers_of(reference, prompts, 6, HELD_OUT_SEED), prompts) == pytest.approx(0, abs=1e-4)
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in perturbed.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    moved = answers_of(PolicyEngine(perturbed, processor, "v1"), prompts, 6, HELD_OUT_SEED)
    assert kl_to(reference, moved, prompts) > 0.1


@pytest.mark.parametrize("shorthand", [False, True], ids=["conversation", "shorthand"])
def test_a_spoken_question_is_the_scene_and_a_wav_of_the_question_with_no_text(stream, shorthand: bool) -> None:
    """What a speaking user sends, over gRPC (a request) and over HTTP (its OpenAI message): the question is only
    in the clip, and the clip is the question said aloud."""
    example = next(stream)
    request = request_for(example, n=2, seed=1, shorthand=shorthand, spoken=True)
    wav = synthesise(example.question.text).wav
    turn = shorthand_conversation(request)[0]
    assert [part.WhichOneof("part") for part in turn.content] == ["image", "audio"]
    assert turn.content[1].audio == common_pb2.Audio(data=wav, mime_type="audio/wav") and not request.text
    assert decode_audio(turn.content[1].audio.data, "audio/wav", 16_000).seconds > 0.5

    message = openai_message(turn)
    assert [part["type"] for part in message["content"]] == ["image_url", "input_audio"]
    assert decode_input_audio(message["content"][1]["input_audio"]["data"],
                              message["content"][1]["input_audio"]["format"]) == (wav, "audio/wav")

    typed = request_for(example, n=2, seed=1, shorthand=shorthand)
    assert [part.WhichOneof("part") for part in shorthand_conversation(typed)[0].content] == ["image", "text"]
