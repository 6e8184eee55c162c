"""The warm start builds a loadable Hugging Face policy, once per settings (a tiny build, seconds)."""

import copy
import dataclasses
import json
from collections import Counter
from itertools import islice

import pytest
import torch

from modalign.demo.scenes import examples, reference_answer
from modalign.demo.warmstart import (
    WarmStartConfig,
    _Tokens,
    answer_drift,
    build_warm_start,
    config_hash,
    evaluate,
    learn_yes_no,
    main,
    training_batch,
)
from modalign.policy.model import load_policy

# On 2 cores, one intra-op thread per process: oversubscribed threads made a forward 9x slower.
torch.set_num_threads(1)

TINY = WarmStartConfig(vision_steps=3, sft_steps=6, clean_steps=2, batch_size=4, yes_no_steps=2)


def test_a_tiny_warm_start_is_cached_and_loads_with_load_policy(tmp_path, capsys):
    folder = build_warm_start(tmp_path, 0, TINY)
    assert folder.parent == tmp_path and config_hash(0, TINY) in folder.name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left

    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert build_warm_start(tmp_path, 0, TINY) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == written  # found, not built again

    model, processor = load_policy(folder)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.image_seq_length == 4  # one image token per quadrant
    result = evaluate(model, processor, n=4, batch_size=4, max_new_tokens=4)
    assert set(result.accuracy) <= {"count", "colour", "position", "describe", "exists"}
    assert 0.0 <= result.hallucination <= 1.0
    held_out = Counter(example.question.kind for example in islice(examples(12345), 4))  # evaluate's default seed
    assert result.hallucination_by_kind.keys() == held_out.keys()
    assert sum(rate * held_out[kind] for kind, rate in result.hallucination_by_kind.items()) / 4 == pytest.approx(
        result.hallucination)

    main([str(folder), "-n", "4"])  # the command docs/demo.md measures warm starts and versions with
    printed_folder, evaluation = capsys.readouterr().out.strip().split(" ", 1)
    assert printed_folder == str(folder)
    assert sum(json.loads(evaluation)["styles"].values()) == 4


def test_different_settings_are_different_cache_entries():
    assert config_hash(0, TINY) != config_hash(0, dataclasses.replace(TINY, batch_size=8))
    assert config_hash(0, TINY) != config_hash(1, TINY)
    assert config_hash(0, TINY) == config_hash(0, WarmStartConfig(vision_steps=3, sft_steps=6, clean_steps=2,
                                                                  batch_size=4, yes_no_steps=2))


def test_answer_drift_is_the_kl_from_the_start_over_answer_tokens_only():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, 8, -100]])  # 4 answer tokens, predicted at (0,1) (0,2) (1,0) (1,1)
    start = torch.randn(2, 4, 10)
    assert answer_drift(start, start, labels).item() == pytest.approx(0.0, abs=1e-6)

    moved = start.clone()
    moved[0, 3] += torch.randn(10) * 5  # the last position predicts no answer token: no drift
    moved[1, 2] += torch.randn(10) * 5
    assert answer_drift(moved, start, labels).item() == pytest.approx(0.0, abs=1e-6)

    moved[0, 1] += torch.randn(10)  # predicts the first answer token
    p_start, log_p = start[0, 1].softmax(-1), moved[0, 1].log_softmax(-1)
    expected = (p_start * (p_start.log() - log_p)).sum() / 4  # KL(start || model), averaged over the 4 tokens
    assert answer_drift(moved, start, labels).item() == pytest.approx(expected.item(), rel=1e-4)


def test_the_yes_no_stage_learns_yes_no_answers_and_holds_the_other_kinds(tmp_path):
    """The drift rows are what keep the other kinds: with none (a batch of yes/no questions only) the same
    steps move the other kinds' answers ten times as far and more. Both runs learn the yes/no answers."""
    model, processor = load_policy(build_warm_start(tmp_path, 0, dataclasses.replace(TINY, yes_no_steps=0)))
    tokens = _Tokens(processor)
    held_out = list(islice(examples(999), 64))
    yes_no = training_batch(asked := [e for e in held_out if e.question.kind == "exists"],
                            [reference_answer(e.scene, e.question) for e in asked], tokens)
    other = training_batch(kept := [e for e in held_out if e.question.kind != "exists"],
                           [reference_answer(e.scene, e.question, "verbose") for e in kept], tokens)
    other_labels = other.pop("labels")

    @torch.no_grad()
    def measure(policy) -> tuple[float, float]:
        policy.eval()
        return policy(**yes_no).loss.item(), answer_drift(policy(**other).logits, model(**other).logits, other_labels).item()

    start_loss, _ = measure(model)
    after = {}
    for share in (0.5, 1.0):
        policy = copy.deepcopy(model)
        learn_yes_no(policy, tokens, dataclasses.replace(TINY, batch_size=8, yes_no_steps=25, yes_no_lr=3e-3,
                                                         yes_no_share=share), seed=0)
        after[share] = measure(policy)
    (held_loss, held_drift), (alone_loss, alone_drift) = after[0.5], after[1.0]
    assert held_loss < 0.2 * start_loss and alone_loss < 0.2 * start_loss  # measured: 5.2 to 0.28 and 0.20
    assert held_drift < alone_drift / 10, after  # measured: 0.11 against 5.0
