"""LoRA training of the policy (--learner.lora-rank): PEFT adapters on a frozen base that the reference
and the published version share, published as the adapter alone on a base published once.

On the real (tiny) default models, no Kafka (blobs and prompts: conftest.py); the family checks build
each family's tiny checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from modalign.core.blobs import BlobStore
from modalign.core.config import ConfigError, parse_config, with_overrides
from modalign.core.modelstore import MANIFEST, ChecksumMismatch, DirectoryStore, Manifest
from modalign.policy.adapters import ADAPTER_FOLDER, WEIGHTS
from modalign.policy.export import main as export_main
from modalign.policy.families import UnsupportedModel
from modalign.policy.model import load_policy
from modalign.reward.model import RewardModel
from modalign.trainer.batches import Prompt
from modalign.trainer.checkpoint import load_checkpoint, save_checkpoint
from modalign.trainer.learner import Learner, LearnerConfig
from modalign.trainer.lora import default_target_modules
from modalign.trainer.publishing import Publisher
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


def test_a_lora_version_is_its_adapter_on_a_base_published_once(
    blobs: BlobStore, prompts: list[Prompt], tmp_path: Path
) -> None:
    seed_everything(0)
    learner = make_learner(blobs, algorithm="dpo", **LORA)
    learner.learn(traffic_pairs(learner, prompts), prompts)
    store = DirectoryStore(tmp_path / "store")
    publisher = Publisher(store, producer=None, kafka=None, algorithm="dpo")
    base = publisher.base(learner.models)
    store.publish(Manifest(version="v1", kind="policy", base=base), learner.models.export_policy)

    # The version is the adapter alone; its base is a full version of its own, named by its files, so
    # another trainer started from the same checkpoint names the same base rather than publishing another.
    folder = store.fetch("policy", "v1")
    assert {p.name for p in folder.rglob("*") if p.is_file()} == {MANIFEST, "adapter_config.json", WEIGHTS}
    base_size = sum(p.stat().st_size for p in (store.root / "policy" / base["version"]).rglob("*") if p.is_file())
    assert (folder / ADAPTER_FOLDER / WEIGHTS).stat().st_size < base_size / 5
    other = make_learner(blobs, algorithm="dpo", **LORA)
    assert Publisher(store, producer=None, kafka=None, algorithm="dpo").base(other.models) == base
    assert store.versions("policy") == [base["version"], "v1"]

    # Loaded from the store, the adapter is merged into its base: an ordinary model with the adapter's tokens.
    merged, _ = load_policy(folder, device=torch.device("cpu"), dtype=torch.float32)
    assert tokens(learner, prompts, merged) == tokens(learner, prompts)

    # Another trainer going back to v1 (after a rollback) loads the adapter onto its own base.
    assert tokens(other, prompts) != tokens(learner, prompts)
    other.models.reset_policy(folder)
    assert tokens(other, prompts) == tokens(learner, prompts)
    assert tokens(other, prompts, other.models.published_policy) == tokens(learner, prompts)

    # A full checkpoint holds no adapter: a LoRA trainer refuses it rather than loading it as its base.
    full = make_learner(blobs, algorithm="dpo")
    full.models.export_policy(tmp_path / "full")
    assert not (tmp_path / "full" / ADAPTER_FOLDER).exists()
    with pytest.raises(ValueError, match="no LoRA adapter"):
        other.models.reset_policy(tmp_path / "full")

    # Exported: as stored, the adapter loads onto its base with PEFT; merged, transformers loads it alone.
    assert export_main(["v1", "--out", str(tmp_path / "adapter"), "--model-store", str(store.root)]) == 0
    on_base = PeftModel.from_pretrained(load_policy(store.fetch("policy", base["version"]))[0], tmp_path / "adapter")
    assert tokens(learner, prompts, on_base.merge_and_unload()) == tokens(learner, prompts)
    assert export_main(["v1", "--merged", "--out", str(tmp_path / "merged"), "--model-store", str(store.root)]) == 0
    assert not (tmp_path / "merged" / MANIFEST).exists()
    assert tokens(learner, prompts, load_policy(tmp_path / "merged")[0]) == tokens(learner, prompts)


def test_an_adapter_whose_base_was_replaced_or_whose_files_changed_is_refused(
    blobs: BlobStore, prompts: list[Prompt], tmp_path: Path
) -> None:
    seed_everything(0)
    learner = make_learner(blobs, algorithm="dpo", **LORA)
    store = DirectoryStore(tmp_path)
    base = Publisher(store, producer=None, kafka=None, algorithm="dpo").base(learner.models)
    for version, names in (("v1", base), ("v2", base | {"manifest_sha256": "0" * 64}),
                           ("v3", {"version": "../v1", "manifest_sha256": "0" * 64})):
        store.publish(Manifest(version=version, kind="policy", base=names), learner.models.export_policy)
    store.fetch("policy", "v1")
    with pytest.raises(ChecksumMismatch, match="not the base it was trained on"):
        store.fetch("policy", "v2")
    with pytest.raises(ChecksumMismatch, match="not a version"):
        store.fetch("policy", "v3")
    weights = store.root / "policy" / "v1" / ADAPTER_FOLDER / WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(ChecksumMismatch, match="sha256 differs"):
        store.fetch("policy", "v1")
    # A LoRA trainer goes back only to adapters on its own base.
    publisher = Publisher(store, producer=None, kafka=None, algorithm="dpo")
    assert publisher.foreign_adapter("v1", learner.models) is None
    full = make_learner(blobs, algorithm="dpo")
    store.publish(Manifest(version="v4", kind="policy"), full.models.export_policy)
    assert publisher.foreign_adapter("v4", learner.models) == "it is a full checkpoint, not an adapter"
    other_store = DirectoryStore(tmp_path / "other")
    seed_everything(1)
    stranger = make_learner(blobs, algorithm="dpo", seed=1, **LORA)
    other_base = Publisher(other_store, producer=None, kafka=None, algorithm="dpo").base(stranger.models)
    assert other_base["version"] != base["version"]
    shutil.copytree(other_store.root / "policy" / other_base["version"], store.root / "policy" / other_base["version"])
    store.publish(Manifest(version="v5", kind="policy", base=other_base), stranger.models.export_policy)
    refusal = publisher.foreign_adapter("v5", learner.models)
    assert refusal == f"it adapts {other_base['version']}, not this trainer's base {base['version']}"

    # An adapter outside the store is not loaded as if it were a model.
    learner.models.export_policy(tmp_path / "adapter-only")
    with pytest.raises(UnsupportedModel, match="LoRA adapter without its base"):
        load_policy(tmp_path / "adapter-only")


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


def test_the_reward_model_and_the_critic_can_be_adapters_on_the_policys_base(
    blobs: BlobStore, prompts: list[Prompt], tmp_path: Path
) -> None:
    """--learner.reward-lora: one copy of the model holds the policy, the reward model and PPO's critic,
    each training an adapter (and a head) of its own; none moves another's outputs; the reward model
    publishes as an ordinary reward model folder and checkpoints with its adapter alone."""
    seed_everything(0)
    learner = make_learner(blobs, algorithm="ppo", reward_lora=True, reward_epochs=3, **LORA)
    models = learner.models
    base = {id(p) for p in models.policy.parameters()}
    for scorer in (models.reward_model, models.value_model):
        own = [p for p in scorer.parameters() if id(p) not in base]
        assert sum(p.numel() for p in own) < 200, "a head of its own; every other weight is the policy's"
    optimised = [name for name, p in models.policy.named_parameters()
                 if any(p is q for q in models.reward_optimizer.param_groups[0]["params"])]
    assert optimised and all(".reward." in name for name in optimised), optimised[:3]

    pairs = traffic_pairs(learner, prompts)
    before = parameters(models.policy)
    learner.learn(pairs, prompts)
    assert models.critic_from_trained_reward_model
    changed = differing(parameters(models.policy), before)
    assert all("lora_" in name for name in changed), "the base stays frozen"
    assert {name.split("lora_")[1].split(".")[1] for name in changed} == {"default", "reward", "value"}

    # Each adapter only moves its own model's outputs.
    batch = learner.batches.of_samples(prompts, learner.sampler.sample(prompts, 1, seed=1))
    samples = learner.sampler.sample(prompts, 1, seed=2)
    policy_logprobs, rewards = learner.batches.logprobs(models.policy, batch), learner.reward.score(prompts, samples)
    reward_state = models.reward_model.state_dict()
    models.reward_model.load_state_dict({key: value + 0.05 for key, value in reward_state.items()})
    assert torch.equal(learner.batches.logprobs(models.policy, batch), policy_logprobs)
    assert not torch.allclose(learner.reward.score(prompts, samples), rewards)
    models.reward_model.load_state_dict(reward_state)
    assert torch.equal(learner.reward.score(prompts, samples), rewards)

    # Published: the base with the reward adapter merged in, scoring as the trainer's reward model does.
    models.export_reward(tmp_path / "r1")
    published = RewardModel.load(tmp_path / "r1")
    inputs = published.encode([p.conversation for p in prompts], [learner.media.of_prompt(p).images for p in prompts],
                              [s.text for s in samples])
    with torch.no_grad():
        torch.testing.assert_close(published(**inputs), rewards, rtol=1e-5, atol=1e-5)

    # Checkpointed with the adapters and heads alone, and restored into another learner's base.
    save_checkpoint(tmp_path / "checkpoint", {"learner": learner.state_dict()})
    restored = make_learner(blobs, algorithm="ppo", reward_lora=True, **LORA)
    restored.load_state_dict(load_checkpoint(tmp_path / "checkpoint")["learner"])
    assert torch.equal(restored.reward.score(prompts, samples), rewards)
    assert not differing(parameters(restored.models.policy), parameters(models.policy))

    for refused in ({}, {"lora_rank": 4, "reward_backbone": "clip"}, {"lora_rank": 4, "reward_model_dir": "rm"}):
        with pytest.raises(ConfigError, match="reward model an adapter"):
            LearnerConfig(reward_lora=True, **refused).validate()


def test_qlora_trains_adapters_on_a_four_bit_base_and_publishes_them_on_its_float32_checkpoint(
    blobs: BlobStore, prompts: list[Prompt], tmp_path: Path
) -> None:
    """--learner.lora-bits 4: the frozen base is held in 4-bit NF4 (bitsandbytes, here on the CPU), the
    three adapters train on it, and the versions are adapters on the float32 checkpoint it came from."""
    seed_everything(0)
    qlora = {**LORA, "lora_bits": 4, "reward_lora": True}
    learner = make_learner(blobs, algorithm="ppo", **qlora)
    models = learner.models
    projection = models.policy.get_decoder().layers[0].self_attn.q_proj.base_layer
    assert isinstance(projection, bnb.nn.Linear4bit)
    stored = projection.weight.numel() * projection.weight.element_size()
    assert stored * 8 == projection.in_features * projection.out_features * 4, "4 bits a weight, not 32"

    def weights() -> dict[str, torch.Tensor]:  # by parameter: a 4-bit model's state_dict disturbs it (lora.py)
        return {name: p.detach().clone() for name, p in models.policy.named_parameters()}

    batch = learner.batches.of_samples(prompts, learner.sampler.sample(prompts, 1, seed=1))
    reference, policy = (learner.batches.logprobs(model, batch) for model in (models.reference, models.policy))
    before = weights()
    learner.learn(traffic_pairs(learner, prompts), prompts)
    changed = differing(weights(), before)
    assert {name.split("lora_")[1].split(".")[1] for name in changed} == {"default", "reward", "value"}
    assert torch.equal(learner.batches.logprobs(models.reference, batch), reference), "the 4-bit base is frozen"
    assert not torch.allclose(learner.batches.logprobs(models.policy, batch), policy)

    # The base version is the float32 checkpoint's files; the reward model merges into it, not into 4 bits.
    models.export_base(tmp_path / "base")
    base, _ = load_policy(tmp_path / "base")
    assert all(p.dtype == torch.float32 for p in base.parameters())
    models.export_policy(tmp_path / "v1")
    assert (tmp_path / "v1" / ADAPTER_FOLDER / WEIGHTS).exists()
    models.export_reward(tmp_path / "r1")
    published = RewardModel.load(tmp_path / "r1")
    assert type(published.backbone.get_decoder().layers[0].self_attn.q_proj) is torch.nn.Linear

    save_checkpoint(tmp_path / "checkpoint", {"learner": learner.state_dict()})
    restored = make_learner(blobs, algorithm="ppo", **qlora)
    restored.load_state_dict(load_checkpoint(tmp_path / "checkpoint")["learner"])
    adapters = {name: p for name, p in restored.models.policy.named_parameters() if "lora_" in name}
    assert not differing(adapters, {name: p for name, p in weights().items() if "lora_" in name})
    # bitsandbytes' CPU kernels repack a 4-bit weight once it has run, and the packed path rounds
    # differently from the first: close, not bit-identical, until both models have run alike.
    torch.testing.assert_close(restored.batches.logprobs(restored.models.policy, batch),
                               learner.batches.logprobs(models.policy, batch), rtol=0, atol=1e-2)

    with pytest.raises(ConfigError, match="reward-lora"):
        LearnerConfig(lora_rank=4, lora_bits=4).validate()
