"""The models the trainer holds, their optimisers, and their state.

- policy: trained; published_policy: the last version the gate accepted (the baseline of the next
  evaluation, and what a refused candidate reverts to); reference: the starting policy, frozen, for
  the KL penalty. With every weight trained (FullPolicy) the last two are copies of the policy; with
  LoRA (lora.py) they are the same base weights under another adapter, or none.
- reward_model: trained on every round's pairs (Bradley-Terry); generative or CLIP (reward/backbones.py).
- value_model: the critic, only for algorithms that declare one (PPO); a generative reward model whose
  head reads every position.
Dropout stays off (eval mode) in every model: gradients flow in eval mode, and sampling and training
then see the same network.

Under torchrun the trained modules (policy, reward model, critic) are distributed one of two ways
(--learner.sharding):
- ddp: every rank holds every weight and its optimiser state; DistributedDataParallel wrappers (the
  `training_*` attributes) average the gradients. Forward passes that should average gradients go
  through those; other passes use the modules themselves, on each rank at its own pace.
- fsdp: FSDP2 (fully_shard) splits each trained module's weights, gradients and optimiser state across
  the ranks, by text decoder layer and then the rest of the model (the vision tower included: it runs
  only for rows with images, and a part that one rank runs and another skips would strand a
  collective). Every forward pass all-gathers weights, so each is a collective that every rank must
  take alike; training steps are (shared_minibatches). Sampling, scoring and evaluation are not:
  a response ends when it ends. Those run inside gathered(), on every module's full weights, taken
  once and freed after. The reference and the last published policy stay whole on every rank (frozen,
  no gradients or optimiser state, and the published one is what a version is exported from).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel, ProcessorMixin

from modalign.policy.families import Family, UnsupportedModel, family_of
from modalign.policy.model import build_default_policy, load_policy, save_policy
from modalign.reward.backbones import AnyRewardModel, is_saved_reward_model, load_reward_model, new_reward_model
from modalign.reward.model import RewardModel
from modalign.trainer import distributed
from modalign.trainer.lora import REWARD, VALUE, AdapterRewardModel, LoraPolicy, LoraSettings

SHARDINGS = ("ddp", "fsdp")
_FULL = StateDictOptions(full_state_dict=True)


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of module, whole on every rank: under FSDP a collective every rank must call."""
    return get_model_state_dict(module, options=_FULL)


def load_full_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads whole weights into module, each rank keeping its own shard under FSDP."""
    set_model_state_dict(module, state, options=_FULL)


def decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The text decoder layers of the first Hugging Face model in module (the policy, or a reward
    model's backbone); none for a model without a text decoder (a CLIP reward model)."""
    for part in module.modules():
        if isinstance(part, PreTrainedModel):
            try:
                layers = getattr(part.get_decoder(), "layers", None)
            except (AttributeError, NotImplementedError, ValueError):
                return []
            return list(layers) if isinstance(layers, torch.nn.ModuleList) else []
    return []


def shard(module: torch.nn.Module) -> None:
    """FSDP2 in place: each text decoder layer is a unit of its own (gathered only while it runs);
    everything else, the vision tower included, belongs to the root unit, gathered for every pass."""
    for layer in decoder_layers(module):
        fully_shard(layer)
    fully_shard(module)


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

        # A critic that is an adapter on the policy's base runs with its adapter on.
        with self.model.active() if isinstance(self.model, AdapterRewardModel) else contextlib.nullcontext():
            return self.model.family.in_parts(inputs, values)


def trained_parameters(model: torch.nn.Module) -> Iterator[torch.nn.Parameter]:
    """What a model's optimiser updates: an adapter reward model's adapter and head, else every weight."""
    return iter(model.trainable_parameters()) if isinstance(model, AdapterRewardModel) else model.parameters()


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

    # The policy may be sharded (FSDP); the reference and the published copy never are.

    def accept(self) -> None:
        self.published.load_state_dict(full_state(self.policy))

    def revert(self) -> None:
        load_full_state(self.policy, self.published.state_dict())

    def reset(self, folder: Path | None) -> None:
        start = (load_policy(folder, device=self.published.device, dtype=torch.float32)[0] if folder is not None
                 else self.reference)
        weights = start.state_dict()
        load_full_state(self.policy, weights)
        self.published.load_state_dict(weights)

    def export(self, folder: Path, whole: dict[str, torch.Tensor] | None = None) -> None:
        """whole: the policy's weights gathered from its shards (FSDP), else its own."""
        if whole is None:
            save_policy(self.policy, self.processor, folder)
        else:
            self.policy.save_pretrained(folder, state_dict=whole, safe_serialization=True)
            self.processor.save_pretrained(folder)

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
        reward_lora: bool = False, sharding: str = "ddp",
    ) -> None:
        """reward_lora (with lora): the reward model and the critic are adapters on the policy's base
        (lora.AdapterRewardModel) rather than copies of the model."""
        self.device = device
        self.world_size = world_size
        self.sharding = sharding
        self.sharded = sharding == "fsdp" and world_size > 1
        self.reward_lora = reward_lora
        self._whole: dict[str, dict[str, torch.Tensor]] | None = None
        if lora is not None and lora.bits:
            if not policy_model_dir:
                # QLoRA quantises a checkpoint as it loads: the built-in model is saved first, and that
                # folder is the base its versions name (lora.LoraPolicy.export_base copies it).
                self._built_in = tempfile.TemporaryDirectory(prefix="modalign-base-")
                save_policy(*build_default_policy(seed), self._built_in.name)
                policy_model_dir = self._built_in.name
            base, self.processor = load_policy(policy_model_dir, device=device, dtype=torch.float32, four_bit=True)
        elif policy_model_dir:
            # float32 whatever the checkpoint's dtype: these are the master weights (LearnerConfig.dtype).
            base, self.processor = load_policy(policy_model_dir, device=device, dtype=torch.float32)
        else:
            model, self.processor = build_default_policy(seed)
            base = model.to(device)
        if self.sharded and type(family_of(base.config.model_type)).split is not Family.split:
            raise UnsupportedModel(f"{base.config.model_type}: its batches split by image count into a number of "
                                   "forward passes that differs between ranks, which FSDP cannot shard; use ddp")
        if reward_lora:
            self._adapters_on_one_base(base, policy_model_dir, lora, with_critic, seed)
        else:
            self._copies(base, policy_model_dir, reward_model_dir, reward_backbone, lora, with_critic, seed)
        self.critic = TokenValues(self.value_model) if self.value_model is not None else None
        # Sharded before the optimisers are made: FSDP replaces each parameter with its shard.
        self.training_policy = self._distribute(self.policy, lambda: list(self.versions.trainable_parameters()))
        self.training_reward_model = self._distribute(self.reward_model, lambda: list(trained_parameters(self.reward_model)))
        self.training_critic = self._distribute(self.critic, lambda: list(trained_parameters(self.value_model)))
        self.policy_optimizer = torch.optim.AdamW(self.versions.trainable_parameters(), lr=policy_lr, weight_decay=0.0)
        self.reward_optimizer = torch.optim.AdamW(trained_parameters(self.reward_model), lr=reward_lr, weight_decay=0.0)
        self.value_optimizer = (
            torch.optim.AdamW(trained_parameters(self.value_model), lr=policy_lr, weight_decay=0.0)
            if self.value_model is not None else None
        )

    def _adapters_on_one_base(self, base: PreTrainedModel, policy_model_dir: str, lora: LoraSettings | None,
                              with_critic: bool, seed: int) -> None:
        if lora is None:
            raise ValueError("the reward model is an adapter on the policy's base only when the policy is one")
        self.versions = LoraPolicy(base, self.processor, lora, Path(policy_model_dir) if policy_model_dir else None,
                                   scorers=(REWARD, VALUE) if with_critic else (REWARD,), seed=seed)
        self.policy, self.reference = self.versions.policy, self.versions.reference
        self.published_policy = self.versions.published
        self.reward_model = AdapterRewardModel(self.versions, REWARD, seed).to(self.device)
        self.value_model = AdapterRewardModel(self.versions, VALUE, seed).to(self.device) if with_critic else None
        self.critic_from_trained_reward_model = False  # the critic copies the reward model once it trained

    def _copies(self, base: PreTrainedModel, policy_model_dir: str, reward_model_dir: str, reward_backbone: str,
                lora: LoraSettings | None, with_critic: bool, seed: int) -> None:
        device = self.device
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
        self.versions = (LoraPolicy(base, self.processor, lora, Path(policy_model_dir) if policy_model_dir else None,
                                    seed=seed)
                         if lora is not None else FullPolicy(base, self.processor))
        self.policy, self.reference = self.versions.policy, self.versions.reference
        self.published_policy = self.versions.published

    def _distribute(self, module: torch.nn.Module | None,
                    trained: Callable[[], list[torch.nn.Parameter]]) -> torch.nn.Module | None:
        """The module forward passes that average gradients go through (see the module docstring);
        trained(): the weights its optimiser updates."""
        if module is None or self.world_size == 1:
            return module
        if self.sharded:
            shard(module)
            return module
        if self.reward_lora:
            # The policy, the reward model and the critic share one base, each with adapters of its own
            # that train: each wrapper averages its own alone, or two would reduce the same gradients.
            own = {id(parameter) for parameter in trained()}
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                module, [name for name, parameter in module.named_parameters() if id(parameter) not in own])
        # Unused parameters: the reward model's backbone keeps an LM head it never calls.
        return torch.nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)

    def _sharded_modules(self) -> list[FSDPModule]:
        return [part for module in (self.policy, self.reward_model, self.critic) if module is not None
                for part in module.modules() if isinstance(part, FSDPModule)]

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Every sharded module's full weights on every rank for the duration, so that forward passes
        run without collectives, as many as each rank needs (sampling, scoring, evaluation). Every
        rank must enter it together: gathering is a collective. A no-op unless sharded."""
        units = self._sharded_modules()
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(True, recurse=False)

    @contextlib.contextmanager
    def whole_weights(self) -> Iterator[None]:
        """For the duration, rank 0 holds the policy's and the reward model's whole weights (on the CPU),
        gathered from their shards, so that it alone can export them; every rank must enter it together.
        A no-op unless sharded: each rank then holds the whole weights anyway."""
        if not self.sharded:
            yield
            return
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        self._whole = {"policy": get_model_state_dict(self.policy, options=options),
                       "reward_model": get_model_state_dict(self.reward_model, options=options)}
        try:
            yield
        finally:
            self._whole = None

    def start_critic_from_trained_reward_model(self) -> None:
        """Called after each round's reward-model training: the first time, the critic copies it."""
        if self.value_model is not None and not self.critic_from_trained_reward_model:
            self.value_model.load_state_dict(self.reward_model.state_dict())
            self.value_optimizer.state.clear()
            self.critic_from_trained_reward_model = True

    def parameter_digest(self) -> str:
        """A short hash of every trained weight: equal on every rank while they stay in step. Under FSDP,
        of every rank's shards, gathered as digests rather than weights (a collective, but a cheap one):
        the whole model, which no rank holds."""
        digest = hashlib.sha256()
        for module in (self.policy, self.reward_model, self.value_model):
            if module is None:
                continue
            # An adapter reward model's own state is its adapter and head; else the parameters, not the
            # state_dict (see lora.py on 4-bit bases).
            state = module.state_dict() if isinstance(module, AdapterRewardModel) else dict(module.named_parameters())
            for tensor in state.values():
                local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
                digest.update(local.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        if self.sharded:
            return hashlib.sha256("".join(distributed.all_gather(digest.hexdigest())).encode()).hexdigest()[:16]
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
        """The policy as a version: every weight, or with LoRA its adapter alone (see adapts_base).
        Sharded: on rank 0, inside whole_weights()."""
        if self.sharded:
            self.versions.export(folder, self._gathered_whole("policy"))
        else:
            self.versions.export(folder)

    @property
    def adapts_base(self) -> bool:
        """Whether the policy is a LoRA adapter: its versions then name the base they adapt (export_base)."""
        return isinstance(self.versions, LoraPolicy)

    def export_base(self, folder: Path) -> None:
        assert isinstance(self.versions, LoraPolicy), "only a LoRA policy has a base of its own"
        self.versions.export_base(folder)

    def export_reward(self, folder: Path) -> None:
        """Sharded: on rank 0, inside whole_weights()."""
        if self.sharded:
            self.reward_model.save(folder, self._gathered_whole("reward_model"))
        else:
            self.reward_model.save(folder)

    def _gathered_whole(self, name: str) -> dict[str, torch.Tensor]:
        if not self._whole or not self._whole[name]:
            raise RuntimeError("a sharded model is exported on rank 0 inside whole_weights()")
        return self._whole[name]

    # --- checkpoint state -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (see trainer/checkpoint.py); the reference is rebuilt, not saved.
        Under --learner.sharding fsdp the weights and optimiser states are each rank's shards (DTensors,
        which the checkpoint writes in a sharded format any number of ranks can load) and the optimiser
        states are keyed by parameter name, not position; every rank must call it together."""
        state = self.versions.state_dict() | {
            "sharding": self.sharding,
            "reward_model": self.reward_model.state_dict(),
            "policy_optimizer": self._optimizer_state(self.policy, self.policy_optimizer),
            "reward_optimizer": self._optimizer_state(self.reward_model, self.reward_optimizer),
        }
        if self.value_model is not None:
            state |= {"value_model": self.value_model.state_dict(),
                      "value_optimizer": self._optimizer_state(self.value_model, self.value_optimizer),
                      "critic_from_trained_reward_model": self.critic_from_trained_reward_model}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        written_with = state.get("sharding", "ddp")  # checkpoints from before FSDP lack it
        if written_with != self.sharding:
            raise ValueError(f"this checkpoint was written with --learner.sharding {written_with}; resume it with "
                             f"the same (this trainer has {self.sharding})")
        self.versions.load_state_dict(state)
        self.reward_model.load_state_dict(state["reward_model"])
        self._load_optimizer_state(self.policy, self.policy_optimizer, state["policy_optimizer"])
        self._load_optimizer_state(self.reward_model, self.reward_optimizer, state["reward_optimizer"])
        if self.value_model is not None:
            self.value_model.load_state_dict(state["value_model"])
            self._load_optimizer_state(self.value_model, self.value_optimizer, state["value_optimizer"])
            self.critic_from_trained_reward_model = state["critic_from_trained_reward_model"]

    def _optimizer_state(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        # By name under FSDP: a checkpoint then loads into any number of ranks (and the state is made,
        # zero, before the first step, so that a fresh trainer has the tensors a sharded load fills in).
        if self.sharding == "fsdp":
            return get_optimizer_state_dict(module, optimizer)
        return optimizer.state_dict()

    def _load_optimizer_state(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict[str, Any]) -> None:
        if self.sharding == "fsdp":
            # Not strict: a weight no forward pass uses (LLaVA's last vision layer norm) never has state.
            set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(strict=False))
        else:
            optimizer.load_state_dict(state)


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
