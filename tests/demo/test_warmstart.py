"""The warm start builds a loadable Hugging Face policy, once per settings (a tiny build, seconds)."""

import dataclasses
import json

import torch

from modalign.demo.scenes import faithfulness
from modalign.demo.warmstart import WarmStartConfig, build_warm_start, config_hash, evaluate, main, teach_yes_no
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

    main([str(folder), "-n", "4"])  # the command docs/demo.md measures warm starts and versions with
    printed_folder, evaluation = capsys.readouterr().out.strip().split(" ", 1)
    assert printed_folder == str(folder)
    assert sum(json.loads(evaluation)["styles"].values()) == 4


def test_different_settings_are_different_cache_entries():
    assert config_hash(0, TINY) != config_hash(0, dataclasses.replace(TINY, batch_size=8))
    assert config_hash(0, TINY) != config_hash(1, TINY)
    assert config_hash(0, TINY) == config_hash(0, WarmStartConfig(vision_steps=3, sft_steps=6, clean_steps=2,
                                                                  batch_size=4, yes_no_steps=2))
    assert config_hash(0, TINY) != config_hash(0, dataclasses.replace(TINY, yes_no_steps=0))


def test_stage_3_trains_on_faithful_yes_no_answers_then_restyles():
    """teach_yes_no's first yes_no_steps batches are yes/no questions alone with their true concise answers;
    the style steps after them are back to every kind of question, in both styles, some hallucinated."""
    config = dataclasses.replace(TINY, sft_steps=42, clean_steps=2, yes_no_steps=3, batch_size=8)
    seen = []

    def inputs_of(batch, answers, _rng):
        seen.append(list(zip(batch, answers)))
        return {"input_ids": torch.ones((1, 1), dtype=torch.long), "labels": torch.ones((1, 1), dtype=torch.long)}

    class Recorder(torch.nn.Module):  # stands in for the model: the test is about what it is trained on
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, **_inputs):
            return type("Output", (), {"loss": (self.weight - 1).pow(2).sum()})()

    teach_yes_no(Recorder(), config, 0, inputs_of)
    assert len(seen) == 3 + 40
    yes_no, style = seen[:3], seen[3:]
    for example, answer in (pair for batch in yes_no for pair in batch):
        assert example.question.kind == "exists"
        assert answer == ("Yes." if example.question.answer_is_yes else "No.")
    styled = [pair for batch in style for pair in batch]
    assert len({example.question.kind for example, _ in styled}) == 5
    assert any(answer.startswith("Sure!") for _, answer in styled)
    assert any(faithfulness(answer, example.scene, example.question).hallucinated for example, answer in styled)

    seen.clear()
    teach_yes_no(Recorder(), dataclasses.replace(config, yes_no_steps=0), 0, inputs_of)
    assert not seen  # stage 3 off: no yes/no steps and no second pass of style steps
