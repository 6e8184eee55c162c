"""--learner.sharding fsdp: the learner on two CPU ranks (gloo), its models sharded with FSDP2
(tests/trainer/fsdp_worker.py), against the same learner in this one process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from modalign.core.blobs import BlobStore
from modalign.core.config import ConfigError
from modalign.core.processes import ManagedProcess, free_port
from modalign.policy.families import UnsupportedModel
from modalign.policy.model import load_policy
from modalign.reward.model import RewardModel
from modalign.trainer.batches import Prompt
from modalign.trainer.checkpoint import load_checkpoint
from modalign.trainer.learner import LearnerConfig
from modalign.trainer.models import Models, full_state

from tests.families.tiny.mllama import build_mllama
from tests.trainer.fsdp_worker import DPO, PER_RANK_BATCH
from tests.trainer.learning import make_learner, seed_everything, traffic_pairs

pytestmark = pytest.mark.integration

RANKS = 2
GRADIENT_FREE = ("k_proj.bias", "head.bias")
"""Weights whose true gradient is 0 (attention's softmax ignores a key bias; the reward model's loss, a
difference of two scores, ignores their shared bias): Adam turns the float residue left in their
gradients, which differs with the order of additions, into steps of either sign."""


@pytest.fixture(scope="module")
def sharded_run(blobs: BlobStore, prompts: list[Prompt], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What two FSDP ranks wrote (fsdp_worker.py)."""
    out = tmp_path_factory.mktemp("fsdp")
    torchrun = ManagedProcess(
        "torchrun",
        [str(Path(sys.executable).with_name("torchrun")), "--nnodes", "1", "--nproc-per-node", str(RANKS),
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
         "-m", "tests.trainer.fsdp_worker", str(blobs.root), str(out)],
        ready=lambda: True, log_path=out / "torchrun.log",
    )
    torchrun.start()
    try:
        assert torchrun.process.wait(timeout=600) == 0, torchrun.log_tail()
    finally:
        torchrun.kill()
    return out


def weights(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key.removeprefix(f"{prefix}/"): value for key, value in tensors.items() if key.startswith(f"{prefix}/")}


def test_two_sharded_ranks_train_as_one_process_does(sharded_run: Path, blobs: BlobStore, prompts: list[Prompt]) -> None:
    """DPO and the reward model on shards of the same pairs: each rank's gradients are over its half of a
    minibatch, so one process taking whole minibatches (world size times larger) must land on the same
    weights, up to the order of float additions: within 2e-5 after three steps of 3e-4 (the learning rate),
    but for a few entries.
    Gradients left local to each rank differ by the step itself, and so does a wrong minibatch."""
    seed_everything(0)
    pairs = traffic_pairs(make_learner(blobs, algorithm="dpo"), prompts)
    seed_everything(0)
    single = make_learner(blobs, **(DPO | {"reward_batch_size": RANKS * PER_RANK_BATCH,
                                          "minibatch_size": RANKS * PER_RANK_BATCH}))
    before = {name: {key: value.clone() for key, value in full_state(getattr(single.models, name)).items()}
              for name in ("policy", "reward_model")}
    single.learn(pairs, prompts)

    sharded = load_file(sharded_run / "dpo.safetensors")
    for name in ("policy", "reward_model"):
        ours, start = weights(sharded, name), before[name]
        theirs = full_state(getattr(single.models, name))
        assert ours.keys() == theirs.keys()
        assert any(not torch.equal(ours[key], start[key]) for key in ours), f"the sharded {name} did not learn"
        for key in (key for key in ours if not key.endswith(GRADIENT_FREE)):
            apart = (ours[key] - theirs[key]).abs()
            # Float residue: within 2e-5 but for a few entries whose gradient is near zero, where Adam's
            # normalised step turns the residue into a fraction of a step (one entry of 49,152 at 2.9e-5 is
            # seen). A wrong minibatch or gradients left local move most entries by about a step (3e-4).
            assert apart.max().item() < 1e-4 and (apart > 2e-5).float().mean().item() < 1e-3, \
                f"{name} {key}: {apart.max().item():.2e} apart at most, {int((apart > 2e-5).sum())} entries beyond 2e-5"


def test_sharded_ranks_sample_and_evaluate_at_their_own_pace_and_stay_one_model(sharded_run: Path) -> None:
    """PPO with each rank sampling other prompts (other lengths, other images): sampling and evaluation
    on gathered weights, training on shards; both ranks finish and hold the same whole weights."""
    ranks = [json.loads((sharded_run / f"rank{rank}.json").read_text()) for rank in range(RANKS)]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert all({"policy_loss", "value_loss", "rm_loss"} <= rank["metrics"].keys() for rank in ranks)
    assert all({"reward_gain", "kl_to_reference", "rm_heldout_accuracy"} <= rank["evaluation"].keys() for rank in ranks)
    # Their evaluations sampled different prompts: the gate's numbers are rank 0's (gate.py).
    assert ranks[0]["evaluation"]["reward_mean"] != ranks[1]["evaluation"]["reward_mean"]


def test_a_checkpoint_of_two_sharded_ranks_loads_into_one_process(sharded_run: Path, blobs: BlobStore) -> None:
    """The sharded checkpoint (torch.distributed.checkpoint) holds each tensor's global shape: one
    process loads the whole weights and the optimiser state the two ranks held between them."""
    expected = load_file(sharded_run / "ppo.safetensors")
    restored = make_learner(blobs, algorithm="ppo", sharding="fsdp")
    checkpoint = load_checkpoint(sharded_run / "checkpoint", into=lambda: {"learner": restored.state_dict()})
    restored.load_state_dict(checkpoint["learner"])
    models = restored.models
    for name, module in (("policy", models.policy), ("reward_model", models.reward_model), ("critic", models.critic)):
        loaded, saved = full_state(module), weights(expected, name)
        assert loaded.keys() == saved.keys()
        assert all(torch.equal(loaded[key], saved[key]) for key in saved), name
    optimizer = get_optimizer_state_dict(models.policy, models.policy_optimizer)["state"]
    saved_moments = weights(expected, "policy_optimizer")
    assert saved_moments and any(value.abs().sum() > 0 for value in saved_moments.values())
    for key, value in saved_moments.items():
        parameter, moment = key.rsplit("/", 1)
        assert torch.equal(optimizer[parameter][moment].reshape(value.shape), value), key

    # Without a state to fill, the rest reads (the ranks' states, for tools) and the shards read as None.
    unfilled = load_checkpoint(sharded_run / "checkpoint")["learner"]
    assert unfilled["shared_rng"] == checkpoint["learner"]["shared_rng"] and unfilled["policy"]["lm_head.weight"] is None
    # A trainer without FSDP is told to use it.
    replicated = make_learner(blobs, algorithm="ppo")
    with pytest.raises(ValueError, match="--learner.sharding fsdp"):
        replicated.load_state_dict(load_checkpoint(sharded_run / "checkpoint",
                                                   into=lambda: {"learner": restored.state_dict()})["learner"])


def test_a_sharded_trainer_publishes_whole_versions_that_load_anywhere(sharded_run: Path) -> None:
    """Rank 0 writes the versions from the weights gathered off every rank's shards."""
    expected = load_file(sharded_run / "ppo.safetensors")
    policy, _ = load_policy(sharded_run / "policy", dtype=torch.float32)
    assert all(torch.equal(value, expected[f"policy/{key}"]) for key, value in full_state(policy).items())
    reward = RewardModel.load(sharded_run / "reward")
    assert all(torch.equal(value, expected[f"reward_model/{key}"]) for key, value in full_state(reward).items())


def test_fsdp_is_for_full_fine_tuning_with_the_generative_reward_model() -> None:
    for overrides in ({"lora_rank": 4}, {"reward_backbone": "clip"}, {"sharding": "zero"}):
        with pytest.raises(ConfigError, match="fsdp shards|zero"):
            LearnerConfig(**({"sharding": "fsdp"} | overrides)).validate()


def test_fsdp_refuses_a_family_whose_batches_split_into_uneven_forward_passes(tmp_path: Path) -> None:
    """Mllama runs one forward pass per image count in a batch: ranks would take different numbers."""
    build_mllama(tmp_path / "mllama")
    with pytest.raises(UnsupportedModel, match="mllama: .*use ddp"):
        Models(policy_model_dir=str(tmp_path / "mllama"), reward_model_dir="", reward_backbone="generative", seed=0,
               device=torch.device("cpu"), policy_lr=1e-3, reward_lr=1e-3, with_critic=False, world_size=2,
               sharding="fsdp")
