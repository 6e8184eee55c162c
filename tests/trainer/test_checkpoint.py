"""The trainer's checkpoint: safetensors and versioned JSON, nothing pickled, written atomically.

No broker and no models: a TrainerState with every kind of content (pairs of each source, a joiner with
waiting feedback and ratings, prompts, a pending version) and optimiser and RNG state of a small module.
"""

from __future__ import annotations

import io
import json
import random
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from modalign.policy.conversation import Part, Turn
from modalign.trainer import join
from modalign.trainer import state as state_module
from modalign.trainer.batches import Prompt
from modalign.trainer.checkpoint import (
    FORMAT,
    READABLE,
    CheckpointFormatError,
    load_checkpoint,
    remove_interrupted_writes,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from modalign.trainer.join import FeedbackJoiner, JoinLimits, PreferencePair, Response
from modalign.trainer.state import PendingVersion, RecentIds, TrainerState
from modalign.v1 import feedback_pb2

from tests.trainer.test_join import generation, preference, rating, received


def edit(generation_, text: str):
    return received(edit=feedback_pb2.Edit(response_id=generation_.response_id, edited_text=text))


def full_state() -> TrainerState:
    joiner = FeedbackJoiner()
    a, b, c = generation(text="red"), generation(text="blue"), generation(text="green")
    for g in (a, b):
        joiner.add_generation(g)
    pairs, _ = joiner.add_feedback(preference(a, b), (0, 7), now=1.0)
    edited, _ = joiner.add_feedback(edit(a, "It is red."), (1, 3), now=1.0)
    joiner.add_feedback(rating(a, 4), (0, 8), now=1.0)
    joiner.add_feedback(preference(a, c), (0, 9), now=2.5)  # c is not logged yet: it waits
    rated = PreferencePair("r1", "rating", a, Response("red", (4, 5), (-0.1, -0.2), "v3"),
                           Response("blue", (6,), (-1.5,)), margin=2.0)
    state = TrainerState(
        positions={("feedback", 0): 10, ("feedback", 1): 4, ("generations", 0): 3},
        joiner=joiner, pending_pairs=pairs + [rated], heldout_pairs=edited, replay_pairs=[rated] + pairs,
        prompts=OrderedDict([("k1", Prompt.question("What colour?", ("a" * 64,))), ("k2", Prompt.question("Hi", ()))]),
        rounds=12, learning_rounds=5, parent_version="v3", rollout_offset=9,
        pending_publish=PendingVersion("v4", "v3", {"kl_to_reference": 0.25, "reward_gain": float("nan")},
                                       [{"topic": "feedback", "partition": 0, "offset": 10}]),
    )
    for feedback_id in ("f1", "f2", "f3"):
        state.consumed_ids.add(feedback_id)
    state.record_trained(["f1", "f2"])
    return state


def learner_like_state() -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
    """A module with tied weights and an AdamW that has taken steps: what a learner's state holds."""
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = embedding.weight  # tied, as a language model's head and embeddings often are
    model = torch.nn.Sequential(embedding, head)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.tensor([1, 2])).sum().backward()
        optimizer.step()
    return model, optimizer, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "shared_rng": random.Random(3).getstate(), "flag": True}


def assert_same_state(loaded: TrainerState, original: TrainerState) -> None:
    for name in ("positions", "trained_ids", "pending_pairs", "heldout_pairs", "replay_pairs", "prompts", "rounds",
                 "learning_rounds", "parent_version", "rollout_offset"):
        assert getattr(loaded, name) == getattr(original, name), name
    assert list(loaded.consumed_ids) == list(original.consumed_ids)
    assert loaded.joiner.generations == original.joiner.generations
    assert loaded.joiner.waiting == original.joiner.waiting and loaded.joiner.ratings == original.joiner.ratings
    assert loaded.pending_publish.version == "v4" and loaded.pending_publish.trained_through[0]["offset"] == 10


def test_the_trainer_state_optimiser_and_rng_round_trip(tmp_path: Path) -> None:
    original = full_state()
    model, optimizer, learner = learner_like_state()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    rng = rng_state()
    expected_draws = (random.random(), np.random.rand(), torch.rand(1).item())
    save_checkpoint(tmp_path, {"ranks": [original.to_json()], "learner": learner, "rng": [rng]})

    checkpoint = load_checkpoint(tmp_path)
    assert_same_state(TrainerState.from_json(checkpoint["ranks"][0]), original)
    restore_rng_state(checkpoint["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected_draws
    assert checkpoint["learner"]["shared_rng"] == random.Random(3).getstate()

    # A fresh model and optimiser restored from the checkpoint take the very same next step.
    fresh_model, fresh_optimizer, _ = learner_like_state()
    fresh_model.load_state_dict(checkpoint["learner"]["model"])
    fresh_optimizer.load_state_dict(checkpoint["learner"]["optimizer"])
    for m, o in ((model, optimizer), (fresh_model, fresh_optimizer)):
        o.zero_grad()
        m(torch.tensor([3, 4])).sum().backward()
        o.step()
    assert torch.equal(fresh_model[0].weight, model[0].weight)


def test_the_checkpoint_names_no_python_class_and_loads_after_its_classes_are_renamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = full_state()
    save_checkpoint(tmp_path, {"ranks": [original.to_json()], "learner": learner_like_state()[2]})
    manifest = (tmp_path / "checkpoint.json").read_text()
    assert json.loads(manifest)["format"] == FORMAT and "modalign" not in manifest

    # The classes the state was written from are renamed: the old names are gone from their modules.
    @dataclass(frozen=True)
    class RenamedPair(PreferencePair):
        pass

    legacy = io.BytesIO()
    torch.save(original, legacy)  # the format-1 way, for contrast
    monkeypatch.delattr(join, "PreferencePair")
    monkeypatch.delattr(join, "FeedbackJoiner")
    monkeypatch.setattr(state_module, "PreferencePair", RenamedPair)
    with pytest.raises(AttributeError, match="PreferencePair|FeedbackJoiner"):
        torch.load(io.BytesIO(legacy.getvalue()), weights_only=False)  # a pickle names its classes

    loaded = TrainerState.from_json(load_checkpoint(tmp_path)["ranks"][0])
    assert all(type(pair) is RenamedPair for pair in loaded.pending_pairs + loaded.heldout_pairs)
    assert [p.feedback_id for p in loaded.pending_pairs] == [p.feedback_id for p in original.pending_pairs]
    assert loaded.pending_pairs[0].received == original.pending_pairs[0].received


def test_an_unknown_or_old_format_is_refused_naming_the_format_found_and_expected(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, {"ranks": [full_state().to_json()]})
    manifest = json.loads((tmp_path / "checkpoint.json").read_text())
    tensor_files = sorted(tmp_path.glob("tensors-*.safetensors"))
    (tmp_path / "checkpoint.json").write_text(json.dumps(manifest | {"format": 99}))
    with pytest.raises(CheckpointFormatError, match=f"format 99.*reads {READABLE}"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointFormatError):
        remove_interrupted_writes(tmp_path)  # refused, not cleaned up: another release may own it
    assert sorted(tmp_path.glob("tensors-*.safetensors")) == tensor_files

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save({"ranks": []}, legacy / "checkpoint.pt")
    with pytest.raises(CheckpointFormatError, match=f"format-1 checkpoint.*reads {READABLE}"):
        load_checkpoint(legacy)


def test_an_interrupted_write_leaves_the_previous_checkpoint_and_its_leftovers_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = full_state()
    save_checkpoint(tmp_path, {"ranks": [first.to_json()], "learner": learner_like_state()[2]})
    second = full_state()
    second.rounds = 13

    def crash(*_) -> None:
        raise OSError("killed before the rename")

    monkeypatch.setattr("modalign.trainer.checkpoint.os.replace", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, {"ranks": [second.to_json()], "learner": learner_like_state()[2]})
    monkeypatch.undo()
    assert len(list(tmp_path.glob("tensors-*.safetensors"))) == 2 and list(tmp_path.glob(".checkpoint.json.*.tmp"))
    assert TrainerState.from_json(load_checkpoint(tmp_path)["ranks"][0]).rounds == 12

    remove_interrupted_writes(tmp_path)
    assert len(list(tmp_path.glob("tensors-*.safetensors"))) == 1 and not list(tmp_path.glob(".checkpoint.json.*"))
    assert TrainerState.from_json(load_checkpoint(tmp_path)["ranks"][0]).rounds == 12
    save_checkpoint(tmp_path, {"ranks": [second.to_json()], "learner": learner_like_state()[2]})
    assert len(list(tmp_path.glob("tensors-*.safetensors"))) == 1  # the previous tensors go once unreferenced
    assert TrainerState.from_json(load_checkpoint(tmp_path)["ranks"][0]).rounds == 13


def test_the_remembered_feedback_ids_are_bounded_and_keep_the_most_recent() -> None:
    recent = RecentIds(3, ["a", "b"])
    for feedback_id in ("c", "d", "b"):
        recent.add(feedback_id)
    assert list(recent) == ["c", "d", "b"] and "a" not in recent and len(recent) == 3

    state = TrainerState(consumed_ids=RecentIds(4))
    state.record_trained([f"f{i}" for i in range(10)])
    assert state.trained_ids == ["f6", "f7", "f8", "f9"]
    restored = TrainerState.from_json(state.to_json(), JoinLimits(max_generations=7), recent_ids=2)
    assert restored.trained_ids == ["f8", "f9"] and restored.consumed_ids.limit == 2
    assert restored.joiner.limits.max_generations == 7  # this run's limits, not the writer's


def test_prompts_checkpointed_as_conversations_and_before_them_both_load() -> None:
    state = full_state()
    follow_up = Prompt((Turn("user", (Part("image", "a" * 64), Part("text", "What colour?"))),
                        Turn("assistant", (Part("text", "Red."),)), Turn("user", (Part("text", "Sure?"),))))
    state.prompts["k3"] = follow_up
    data = json.loads(json.dumps(state.to_json()))
    assert TrainerState.from_json(data).prompts == state.prompts
    # Written before conversations were logged: [key, text, image shas].
    data["prompts"] = [["k1", "What colour?", ["a" * 64]], ["k2", "Hi", []]]
    assert list(TrainerState.from_json(data).prompts.values()) == [state.prompts["k1"], state.prompts["k2"]]
