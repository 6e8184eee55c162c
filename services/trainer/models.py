"""The models the trainer holds, their optimisers, and their state.

- policy: trained; published_policy: the last version the gate accepted (the baseline of the next
  evaluation, and what a refused candidate reverts to); reference: the starting policy, frozen, for
  the KL penalty. With every weight trained (FullPolicy) the last two are copies of the policy; with
  LoRA (lora.py) they are the same base weights under another adapter, or none.
- reward_model: trained on every round's pairs (Bradley-Terry); generative or CLIP (reward/backbones.py).
- value_model: the critic, only for algorithms that declare one (PPO); a generative reward model whose
  head reads every position.
Dropout stays off (eval mode) in every model: gradients flow in eval mode, and sampling and training
then see the same network. Under torchrun the trained modules are wrapped in DistributedDataParallel
(the `training_*` attributes): forward passes that should average gradients go through those.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, ProcessorMixin

from modalign.policy.model import build_default_policy, load_policy, save_policy
from modalign.reward.backbones import AnyRewardModel, is_saved_reward_model, load_reward_model, new_reward_model
from modalign.reward.model import RewardModel
from modalign.trainer.lora import LoraPolicy, LoraSettings


class TokenValues(torch.nn.Module):
    """PPO's critic: a reward model whose scalar head reads every position, not only the last."""

    def __init__(self, model: RewardModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, logit_positions: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """[batch, response_length] values at the positions that precede each response token."""
        def values(part: dict[str, torch.Tensor], rows: torch.Tensor | None) -> torch.Tensor:
            hidden = self.model.backbone.base_model(**part, use_cache=False).last_hidden_state
            positions = logit_positions if rows is None else logit_positions[rows]
            index = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
            return self.model.head(hidden.gather(1, index).to(self.model.head.weight.dtype)).squeeze(-1).float()

        return self.model.family.in_parts(inputs, values)


def optimizer_step(
    loss: torch.Tensor, max_grad_norm: float, *updates: tuple[torch.nn.Module, torch.optim.Optimizer]
) -> None:
    """One optimiser step of each (model, optimizer) on loss, gradients clipped per model."""
    for _, optimizer in updates:
        optimizer.zero_grad()
    loss.backward()
    for model, optimizer in updates:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()


class FullPolicy:
    """The policy with every weight trained; the reference and the last published version are copies
    of it. The same interface as lora.LoraPolicy."""

    def __init__(self, policy: PreTrainedModel, processor: ProcessorMixin) -> None:
        self.policy, self.processor = policy, processor
        self.reference = copy.deepcopy(policy).requires_grad_(False)
        self.published = copy.deepcopy(policy).requires_grad_(False)

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.policy.parameters()

    def accept(self) -> None:
        self.published.load_state_dict(self.policy.state_dict())

    def revert(self) -> None:
        self.policy.load_state_dict(self.published.state_dict())

    def reset(self, folder: Path | None) -> None:
        start = (load_policy(folder, device=self.policy.device, dtype=torch.float32)[0] if folder is not None
                 else self.reference)
        weights = start.state_dict()
        self.policy.load_state_dict(weights)
        self.published.load_state_dict(weights)

    def export(self, folder: Path) -> None:
        save_policy(self.policy, self.processor, folder)

    def state_dict(self) -> dict[str, Any]:
        """The reference is rebuilt, not saved."""
        return {"policy": self.policy.state_dict(), "published_policy": self.published.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.published.load_state_dict(state["published_policy"])


class Models:
    """Builds the models from their starting points and keeps them, their optimisers and wrappers."""

    def __init__(
        self, *, policy_model_dir: str, reward_model_dir: str, reward_backbone: str, seed: int, device: torch.device,
        policy_lr: float, reward_lr: float, with_critic: bool, world_size: int, lora: LoraSettings | None = None,
    ) -> None:
        self.device = device
        self.world_size = world_size
        if policy_model_dir:
            # float32 whatever the checkpoint's dtype: these are the master weights (LearnerConfig.dtype).
            base, self.processor = load_policy(policy_model_dir, device=device, dtype=torch.float32)
        else:
            model, self.processor = build_default_policy(seed)
            base = model.to(device)
        # The reward model and the critic start from copies of the policy taken before LoRA adapts it.
        if reward_model_dir:
            self.reward_model = load_reward_model(reward_model_dir, seed, reward_backbone).to(device, torch.float32)
        else:
            self.reward_model = new_reward_model(reward_backbone, copy.deepcopy(base), self.processor, seed).to(device)
        # The critic reads every position of a generative backbone: it starts as a copy of a generative
        # reward model (taken again after the first round of training when that one starts untrained),
        # and as a fresh head on a copy of the policy beside a CLIP one.
        if not with_critic:
            self.value_model = None
        elif isinstance(self.reward_model, RewardModel):
            self.value_model = copy.deepcopy(self.reward_model)
        else:
            self.value_model = RewardModel(copy.deepcopy(base), self.processor, seed=seed,
                                           likelihood_features=False).to(device).eval()
        self.critic_from_trained_reward_model = (
            bool(reward_model_dir) and is_saved_reward_model(reward_model_dir)
        ) or not isinstance(self.reward_model, RewardModel)
        self.versions = (LoraPolicy(base, self.processor, lora, Path(policy_model_dir) if policy_model_dir else None)
                         if lora is not None else FullPolicy(base, self.processor))
        self.policy, self.reference = self.versions.policy, self.versions.reference
        self.published_policy = self.versions.published
        self.policy_optimizer = torch.optim.AdamW(self.versions.trainable_parameters(), lr=policy_lr, weight_decay=0.0)
        self.reward_optimizer = torch.optim.AdamW(self.reward_model.parameters(), lr=reward_lr, weight_decay=0.0)
        self.value_optimizer = (
            torch.optim.AdamW(self.value_model.parameters(), lr=policy_lr, weight_decay=0.0)
            if self.value_model is not None else None
        )
        self.critic = TokenValues(self.value_model) if self.value_model is not None else None
        self.training_policy, self.training_reward_model, self.training_critic = (
            self._data_parallel(module) for module in (self.policy, self.reward_model, self.critic)
        )

    def _data_parallel(self, module: torch.nn.Module | None) -> torch.nn.Module | None:
        if module is None or self.world_size == 1:
            return module
        # Unused parameters: the reward model's backbone keeps an LM head it never calls.
        return torch.nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)

    def start_critic_from_trained_reward_model(self) -> None:
        """Called after each round's reward-model training: the first time, the critic copies it."""
        if self.value_model is not None and not self.critic_from_trained_reward_model:
            self.value_model.load_state_dict(self.reward_model.state_dict())
            self.value_optimizer.state.clear()
            self.critic_from_trained_reward_model = True

    def parameter_digest(self) -> str:
        """A short hash of every trained weight: equal on every rank while they stay in step."""
        digest = hashlib.sha256()
        for module in (self.policy, self.reward_model, self.value_model):
            for tensor in (module.state_dict().values() if module is not None else ()):
                digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    # --- versions ---------------------------------------------------------------------------------

    def accept_candidate(self) -> None:
        """The gate passed: the current policy becomes the baseline of the next evaluation."""
        self.versions.accept()

    def revert_policy(self) -> None:
        """The gate refused the candidate: continue from the last published policy."""
        self.versions.revert()
        self.policy_optimizer.state.clear()

    def reset_policy(self, folder: Path | None) -> None:
        """Start again from a published policy (its folder; None: the starting policy, the reference)."""
        self.versions.reset(folder)
        self.policy_optimizer.state.clear()

    def export_policy(self, folder: Path) -> None:
        """The policy as a version: every weight, or with LoRA its adapter alone (see adapts_base)."""
        self.versions.export(folder)

    @property
    def adapts_base(self) -> bool:
        """Whether the policy is a LoRA adapter: its versions then name the base they adapt (export_base)."""
        return isinstance(self.versions, LoraPolicy)

    def export_base(self, folder: Path) -> None:
        assert isinstance(self.versions, LoraPolicy), "only a LoRA policy has a base of its own"
        self.versions.export_base(folder)

    def export_reward(self, folder: Path) -> None:
        self.reward_model.save(folder)

    # --- checkpoint state -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (see trainer/checkpoint.py); the reference is rebuilt, not saved."""
        state = self.versions.state_dict() | {
            "reward_model": self.reward_model.state_dict(),
            "policy_optimizer": self.policy_optimizer.state_dict(),
            "reward_optimizer": self.reward_optimizer.state_dict(),
        }
        if self.value_model is not None:
            state |= {"value_model": self.value_model.state_dict(), "value_optimizer": self.value_optimizer.state_dict(),
                      "critic_from_trained_reward_model": self.critic_from_trained_reward_model}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.versions.load_state_dict(state)
        self.reward_model.load_state_dict(state["reward_model"])
        self.policy_optimizer.load_state_dict(state["policy_optimizer"])
        self.reward_optimizer.load_state_dict(state["reward_optimizer"])
        if self.value_model is not None:
            self.value_model.load_state_dict(state["value_model"])
            self.value_optimizer.load_state_dict(state["value_optimizer"])
            self.critic_from_trained_reward_model = state["critic_from_trained_reward_model"]


def max_positions(policy: PreTrainedModel, reward_model: AnyRewardModel) -> int:
    """The longest prompt + response both models can take (a CLIP reward model takes any: it truncates)."""
    policy_positions = policy.config.get_text_config().max_position_embeddings
    return policy_positions if reward_model.max_positions is None else min(reward_model.max_positions, policy_positions)


def reserved_tokens(*processors: ProcessorMixin) -> list[str]:
    """Special and added tokens of the processors' tokenizers: text that must not appear in user edits."""
    return sorted({
        token for processor in processors
        for token in (*processor.tokenizer.all_special_tokens, *processor.tokenizer.added_tokens_encoder)
    })
