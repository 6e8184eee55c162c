"""One rank of tests/trainer/test_fsdp.py, run under torchrun: learners sharded with FSDP2 learn, evaluate,
checkpoint and export, and write what the test compares into OUT.

    torchrun --nproc-per-node 2 -m tests.trainer.fsdp_worker BLOB_DIR OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from modalign.core.blobs import BlobStore
from modalign.trainer import distributed
from modalign.trainer.checkpoint import save_checkpoint
from modalign.trainer.learner import Learner, LearnerConfig
from modalign.trainer.models import full_state

from tests.trainer.learning import SMALL, make_learner, mixed_prompts, seed_everything, square_images, traffic_pairs

PER_RANK_BATCH = 4
"""Pairs per rank per step: the one-process run the test compares with takes world size times as many."""
DPO = {"algorithm": "dpo", "reward_epochs": 3, "policy_epochs": 3}
"""Three steps of each model on the test's 8 pairs."""


def whole(learner: Learner) -> dict[str, torch.Tensor]:
    """Every trained weight, and the policy's optimiser state, gathered whole (a collective)."""
    models = learner.models
    tensors = {f"{name}/{key}": value.cpu() for name, module in
               (("policy", models.policy), ("reward_model", models.reward_model), ("critic", models.critic))
               if module is not None for key, value in full_state(module).items()}
    optimizer = get_optimizer_state_dict(models.policy, models.policy_optimizer,
                                         options=StateDictOptions(full_state_dict=True))
    for key, state in optimizer["state"].items():
        for name, value in state.items():
            tensors[f"policy_optimizer/{key}/{name}"] = value.cpu()
    return tensors


def main(blob_dir: Path, out: Path) -> None:
    torch.set_num_threads(1)
    rank, world_size = distributed.init_from_environment("cpu")
    blobs = BlobStore(blob_dir)
    prompts = mixed_prompts(square_images(blobs))
    # The same pairs on every rank, sampled from an unsharded learner's starting policy.
    seed_everything(0)
    pairs = traffic_pairs(make_learner(blobs, algorithm="dpo"), prompts)

    # DPO on shards of the same pairs: compared with one process taking whole minibatches.
    seed_everything(0)
    dpo = Learner(LearnerConfig(**(SMALL | DPO | {"sharding": "fsdp", "reward_batch_size": PER_RANK_BATCH,
                                                  "minibatch_size": PER_RANK_BATCH})), blobs, rank, world_size)
    dpo.learn(pairs, prompts)
    dpo_weights = whole(dpo)

    # PPO, each rank sampling from prompts of its own (other lengths, other images): responses end when
    # they end on each rank, and the evaluation samples as many as each rank has prompts.
    seed_everything(0)
    ppo = Learner(LearnerConfig(**(SMALL | {"algorithm": "ppo", "sharding": "fsdp"})), blobs, rank, world_size)
    own_prompts = prompts[:2] if rank == 0 else prompts[1:]
    metrics = ppo.learn(pairs, own_prompts)
    evaluation = ppo.evaluate(pairs, own_prompts)
    digest = ppo.models.parameter_digest()
    save_checkpoint(out / "checkpoint", {"learner": ppo.state_dict()}, rank=rank)
    ppo_weights = whole(ppo)
    with ppo.models.whole_weights():
        if rank == 0:
            ppo.models.export_policy(out / "policy")
            ppo.models.export_reward(out / "reward")
    if rank == 0:
        save_file(dpo_weights, out / "dpo.safetensors")
        save_file(ppo_weights, out / "ppo.safetensors")
    (out / f"rank{rank}.json").write_text(json.dumps({"digest": digest, "metrics": metrics, "evaluation": evaluation}))
    distributed.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
