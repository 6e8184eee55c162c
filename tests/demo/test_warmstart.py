"""The warm start builds a loadable Hugging Face policy, once per settings (a tiny build, seconds)."""

import dataclasses
import json
from collections import Counter
from itertools import islice

import pytest
import torch

from modalign.demo.scenes import examples
from modalign.demo.warmstart import WarmStartConfig, build_warm_start, config_hash, evaluate, main
from modalign.policy.model import load_policy

# On 2 cores, one intra-op thread per process: oversubscribed threads made a forward 9x slower.
torch.set_num_threads(1)

TINY = WarmStartConfig(vision_steps=3, sft_steps=6, clean_steps=2, batch_size=4)


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
                                                                  batch_size=4))
