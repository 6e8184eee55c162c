"""LoRA training of the policy (--learner.lora-rank): PEFT adapters on a frozen base that the reference
and the published version share, published as a merged checkpoint with the adapter beside it.

On the real (tiny) default models, no Kafka (blobs and prompts: conftest.py); the family checks build
each family's tiny checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from modalign.core.blobs import BlobStore
from modalign.core.config import ConfigError, parse_config, with_overrides
from modalign.policy.model import load_policy
from modalign.trainer.batches import Prompt
from modalign.trainer.checkpoint import load_checkpoint, save_checkpoint
from modalign.trainer.learner import Learner
from modalign.trainer.lora import ADAPTER_FOLDER, default_target_modules
from modalign.trainer.service import TrainerConfig

from tests.families.tiny import TINY_CHECKPOINTS
from tests.trainer.learning import differing, make_learner, parameters, seed_everything, traffic_pairs

LORA = {"lora_rank": 4, "policy_lr": 1e-2}  # a large rate, so that one round moves the adapter visibly


def tokens(learner: Learner, prompts: list[Prompt], model: torch.nn.Module | None = None) -> list[list[int]]:
    return [s.token_ids for s in learner.sampler.sample(prompts, 2, seed=3, model=model)]


@pytest.mark.parametrize("algorithm", ["dpo", "rloo", "ppo"])
def test_lora_trains_only_the_adapter_and_the_reference_is_the_untouched_base(
    blobs: BlobStore, prompts: list[Prompt], algorithm: str
) -> None:
    seed_everything(0)
    learner = make_learner(blobs, algorithm=algorithm, **LORA)
    models = learner.models
    batch = learner.batches.of_samples(prompts, learner.sampler.sample(prompts, 1, seed=1))
    reference_before = learner.batches.logprobs(models.reference, batch)
    policy_before = parameters(models.policy)
    assert list(models.reference.parameters()) == [] and list(models.published_policy.parameters()) == []

    learner.learn(traffic_pairs(learner, prompts), prompts)

    changed = differing(parameters(models.policy), policy_before)
    assert changed and all("lora_" in name and ".default." in name for name in changed), changed
    assert torch.equal(learner.batches.logprobs(models.reference, batch), reference_before)
    assert not torch.allclose(learner.batches.logprobs(models.policy, batch), reference_before)
    trainable = sum(p.numel() for p in models.versions.trainable_parameters())
    assert 0 < trainable < sum(p.numel() for p in models.policy.parameters()) / 10


def test_a_lora_version_is_published_merged_and_reloads_as_its_adapter(
    blobs: BlobStore, prompts: list[Prompt], tmp_path: Path
) -> None:
    seed_everything(0)
    learner = make_learner(blobs, algorithm="dpo", **LORA)
    learner.learn(traffic_pairs(learner, prompts), prompts)
    learner.models.export_policy(tmp_path / "v1")

    # The merged checkpoint is an ordinary one: what the policy service loads serves the adapter's tokens.
    merged, _ = load_policy(tmp_path / "v1", device=torch.device("cpu"), dtype=torch.float32)
    assert tokens(learner, prompts, merged) == tokens(learner, prompts)
    adapter = tmp_path / "v1" / ADAPTER_FOLDER / "adapter_model.safetensors"
    assert adapter.stat().st_size < (tmp_path / "v1" / "model.safetensors").stat().st_size / 10

    # Another trainer going back to v1 (after a rollback) loads the adapter onto its own base.
    other = make_learner(blobs, algorithm="dpo", **LORA)
    assert tokens(other, prompts) != tokens(learner, prompts)
    other.models.reset_policy(tmp_path / "v1")
    assert tokens(other, prompts) == tokens(learner, prompts)
    assert tokens(other, prompts, other.models.published_policy) == tokens(learner, prompts)

    # A full checkpoint holds no adapter: a LoRA trainer refuses it rather than loading it as its base.
    full = make_learner(blobs, algorithm="dpo")
    full.models.export_policy(tmp_path / "full")
    assert not (tmp_path / "full" / ADAPTER_FOLDER).exists()
    with pytest.raises(ValueError, match="no LoRA adapter"):
        other.models.reset_policy(tmp_path / "full")


def test_lora_reverts_to_the_published_adapter_and_checkpoints_adapters_only(
    blobs: BlobStore, prompts: list[Prompt], tmp_path: Path
) -> None:
    seed_everything(0)
    learner = make_learner(blobs, algorithm="dpo", **LORA)
    models = learner.models
    pairs = traffic_pairs(learner, prompts)
    learner.learn(pairs, prompts)
    models.accept_candidate()
    accepted = tokens(learner, prompts)
    assert tokens(learner, prompts, models.published_policy) == accepted
    learner.learn(pairs, prompts)
    assert tokens(learner, prompts) != accepted
    assert tokens(learner, prompts, models.published_policy) == accepted  # the published adapter stayed

    save_checkpoint(tmp_path, {"learner": learner.state_dict()})
    saved = load_checkpoint(tmp_path)["learner"]
    assert saved["policy"] and all("lora_" in key for key in saved["policy"])  # no base weights
    restored = make_learner(blobs, algorithm="dpo", **LORA)
    restored.load_state_dict(saved)
    assert not differing(parameters(restored.models.policy), parameters(models.policy))

    models.revert_policy()
    assert tokens(learner, prompts) == accepted
    assert not models.policy_optimizer.state
    assert not any(p.requires_grad for name, p in models.policy.named_parameters() if ".default." not in name)


@pytest.mark.parametrize("family", sorted(TINY_CHECKPOINTS))
def test_the_default_targets_are_each_familys_text_projections(family: str, tmp_path: Path) -> None:
    TINY_CHECKPOINTS[family](tmp_path, 0)
    model, _ = load_policy(tmp_path, device=torch.device("cpu"), dtype=torch.float32)
    targets = default_target_modules(model)
    text_layers = model.config.get_text_config().num_hidden_layers
    assert len(targets) >= 4 * text_layers  # at least q, k, v and o of every layer
    assert not [t for t in targets if any(part in t for part in ("vision", "visual", "perceiver", "projector"))]
    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=targets))
    assert {name for name, _ in adapted.named_modules() if name.endswith("lora_A")}


def test_a_negative_lora_rank_is_refused_naming_its_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="positive rank, not -1") as refused:
        with_overrides(TrainerConfig(), {"learner.lora_rank": -1})
    assert refused.value.field == "learner.lora_rank"
    with pytest.raises(SystemExit) as exited:
        parse_config(TrainerConfig, ["--learner.lora-rank", "-1"])
    assert exited.value.code == 2 and "--learner.lora-rank" in capsys.readouterr().err
