"""Measurement: the bytes a trainer holds in weights, gradients and optimiser state, per way of training.

For a randomly initialised LLaVA-style checkpoint (--hidden, --layers; the built-in model's vision tower
and vocabulary), each configuration builds the trainer's models as `modalign trainer` does (Learner),
gives every trained weight a gradient and takes one AdamW step (so the optimiser's moments exist, as
after the first round), then counts every distinct tensor storage the models, their gradients and
their optimisers hold: shared weights (a LoRA base, the reward model on the policy's base) count once,
a 4-bit base counts its packed weights and block scales. Activations and the KV cache are not in it
(they depend on batch and sequence length). Not a timing: the count is exact, and the same on any
machine.

Run from the repository root:

    .venv/bin/python benchmarks/trainer_memory.py --hidden 512 --layers 4
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from adapter_versions import build_model  # benchmarks/adapter_versions.py, beside this script

from modalign.core.blobs import BlobStore
from modalign.policy.model import save_policy
from modalign.trainer.learner import Learner, LearnerConfig

CONFIGURATIONS = {
    "full": {},
    "LoRA": {"lora_rank": 16},
    "LoRA + reward-lora": {"lora_rank": 16, "reward_lora": True},
    "QLoRA (4-bit base) + reward-lora": {"lora_rank": 16, "reward_lora": True, "lora_bits": 4},
}


def held_bytes(learner: Learner) -> int:
    models = learner.models
    optimizers = [o for o in (models.policy_optimizer, models.reward_optimizer, models.value_optimizer) if o is not None]
    for optimizer in optimizers:  # a gradient for every trained weight, then one step: the moments exist
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                parameter.grad = torch.zeros_like(parameter)
        optimizer.step()
    tensors: list[torch.Tensor] = []
    for module in (models.policy, models.reference, models.published_policy, models.reward_model, models.value_model):
        if module is None:
            continue
        for parameter in module.parameters():
            tensors += [parameter] + ([parameter.grad] if parameter.grad is not None else [])
        tensors += list(module.buffers())
        for parameter in module.parameters():  # a 4-bit weight's block scales live beside it (bitsandbytes)
            if getattr(parameter, "quant_state", None) is not None:
                tensors.append(parameter.quant_state.absmax)
    for optimizer in optimizers:
        tensors += [value for state in optimizer.state.values() for value in state.values()
                    if isinstance(value, torch.Tensor)]
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in tensors}
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512, help="hidden size of the text model")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the text model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "policy"
        model, processor = build_model(args.hidden, args.layers)
        parameters = sum(p.numel() for p in model.parameters())
        save_policy(model, processor, folder)
        del model
        print(f"# a {parameters / 1e6:.1f}M-parameter LLaVA (text model {args.hidden} x {args.layers} layers); "
              f"MiB of weights, gradients and AdamW state the trainer holds")
        print("| training | DPO / RLOO / GRPO | PPO / A2C |")
        print("| --- | --- | --- |")
        for name, settings in CONFIGURATIONS.items():
            sizes = []
            for algorithm in ("dpo", "ppo"):
                config = LearnerConfig(policy_model_dir=str(folder), algorithm=algorithm, **settings)
                config.validate()
                sizes.append(held_bytes(Learner(config, BlobStore(Path(work) / "blobs"))) / 2**20)
            print(f"| {name} | {sizes[0]:.1f} | {sizes[1]:.1f} |")


if __name__ == "__main__":
    main()
