"""LoRA training of the policy with PEFT: the base weights stay frozen and shared, only adapters train.

One copy of the base holds three policies as PEFT adapters on it:
- "default", the adapter being trained (the policy);
- "published", the last version the gate accepted (the baseline of the next evaluation, and what a
  refused candidate reverts to);
- no adapter at all, the starting policy: the reference of the KL penalty is the base with its
  adapters disabled, not a second copy of the model.
With --learner.reward-lora the same base also holds the reward model ("reward") and PPO's critic
("value"), each an adapter with a scalar head of its own (AdapterRewardModel): the trainer then holds
one copy of the model in all, and gradients and optimiser state for adapters and heads only.

A published version is the trained adapter alone (policy/adapters.py: PEFT's format in adapter/), on
the base the trainer started from, which is published once as a full version of its own
(export_base); a rollback reloads the adapter of the version the trainer goes back to.

The trainer keeps every model in eval mode (models.py), so that sampling and training see the same
network; an adapter dropout would therefore never apply, and there is no flag for one.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import PreTrainedModel, ProcessorMixin

from modalign.core.modelstore import MANIFEST, base_folder
from modalign.policy.adapters import ADAPTER_FOLDER, WEIGHTS, AdapterMismatch, adapter_weights, load_weights
from modalign.policy.families import UnsupportedModel
from modalign.policy.model import load_policy, save_policy
from modalign.reward.model import RewardModel

PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
"""The linear layers adapted by default: attention and MLP projections, by the names every supported
family's text model gives them."""
_NOT_TEXT = ("vision", "visual", "perceiver", "multi_modal_projector")
"""Parts of a model's decoder that are not its text model (Idefics's decoder holds its vision tower)."""
TRAINED, PUBLISHED = "default", "published"
REWARD, VALUE = "reward", "value"
"""The adapters of the reward model and of the critic, with --learner.reward-lora."""


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    target_modules: tuple[str, ...] = ()
    """Empty: default_target_modules(model)."""
    bits: int = 0
    """4: the base is held in 4-bit NF4 (QLoRA; load it with load_policy(four_bit=True)); 0: as loaded."""


def default_target_modules(model: PreTrainedModel) -> list[str]:
    """Full names of the text model's attention and MLP projections: the vision tower and the projector
    keep their pretrained weights, as in LLaVA's own LoRA recipe."""
    decoder = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    targets = [
        f"{prefix}.{name}" if prefix else name for name, module in decoder.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS
        and not any(part in name for part in _NOT_TEXT)
    ]
    if not targets:
        raise UnsupportedModel(
            f"{model.config.model_type}: its text model has none of the layers LoRA adapts by default "
            f"({', '.join(sorted(PROJECTIONS))}); name them with --learner.lora-target-modules")
    return targets


def adapter_parameters(model: torch.nn.Module, name: str) -> dict[str, torch.nn.Parameter]:
    """The weights of the adapter `name` in a model PEFT injected adapters into, by PEFT's saved names
    (the adapter's name left out)."""
    marker = f".{name}."
    return {key.replace(marker, "."): parameter for key, parameter in model.named_parameters() if marker in key}


class AdapterView(torch.nn.Module):
    """One policy on the shared base, as a model of its own: the published adapter, or none (the
    reference). Forward passes switch to it and back; every other attribute is the policy's (config,
    generation_config, device, ...), so that the engine and the batches take it like any model. Its
    weights are the policy's: it holds no parameters itself."""

    def __init__(self, policy: LoraPolicy, adapter: str | None) -> None:
        super().__init__()
        self.__dict__["_lora"] = policy  # not a submodule: the weights belong to the policy
        self.adapter = adapter

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        lora = self.__dict__["_lora"]
        with lora.using(self.adapter):
            return lora.policy(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_lora"].policy, name)


class LoraPolicy:
    """The policy as a trained adapter on a frozen base, with the published adapter and the reference
    beside it on the same weights. The same interface as models.FullPolicy."""

    def __init__(self, base: PreTrainedModel, processor: ProcessorMixin, settings: LoraSettings,
                 source: Path | None = None, scorers: tuple[str, ...] = (), seed: int = 0) -> None:
        """source: the checkpoint folder base was loaded from; None: base was built in code. scorers: the
        adapters of reward models on this base (AdapterRewardModel), added beside the policy's. seed:
        of the adapters' initialisation, so that every torchrun rank starts from the same ones."""
        config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0,
                            target_modules=list(settings.target_modules) or default_target_modules(base))
        if settings.bits and source is None:
            raise ValueError("a 4-bit base is quantised as it loads: give the checkpoint folder it came from")
        self.processor, self.source, self.config, self.bits = processor, source, config, settings.bits
        with torch.random.fork_rng(devices=[]):  # the caller's RNG undisturbed
            torch.manual_seed(seed)
            self.peft = get_peft_model(base, config, adapter_name=TRAINED)
            for name in (PUBLISHED, *scorers):
                self.peft.add_adapter(name, config)
        self.peft.set_adapter(TRAINED)  # trainable; every other adapter frozen, ...
        for name in scorers:  # ... but the reward model's and the critic's, which train too
            for parameter in adapter_parameters(self.peft, name).values():
                parameter.requires_grad_(True)
        self._trains = [(parameter, parameter.requires_grad) for parameter in self.peft.parameters()]
        self.peft.eval()
        self.policy: PreTrainedModel = self.peft.get_base_model()
        """The base with its adapters injected: it runs the trained adapter and holds every weight."""
        self.reference = AdapterView(self, None)
        self.published = AdapterView(self, PUBLISHED)
        self._start = self._adapter(TRAINED)
        self.load_adapter(PUBLISHED, self._start)

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]:
        return iter(adapter_parameters(self.policy, TRAINED).values())

    @contextmanager
    def using(self, adapter: str | None) -> Iterator[None]:
        """Forward passes run the adapter `adapter` (None: none, the base) for the duration, then the
        trained policy's again. Which weights train does not change: PEFT's adapter switches freeze
        every adapter but the active one, and a weight frozen before its backward pass gets no gradient
        (the reward model's backward runs after its forward, when the policy's adapter is on again)."""
        try:
            if adapter is None:
                with self.peft.disable_adapter():
                    yield
            else:
                self.peft.set_adapter(adapter)
                yield
        finally:
            self.peft.set_adapter(TRAINED)
            for parameter, trains in self._trains:
                parameter.requires_grad_(trains)

    # Adapters are read and written through their parameters, never the model's state_dict: on
    # bitsandbytes' CPU backend a state_dict of a 4-bit model that has run reshuffles the weights it
    # repacked for its kernels, and the frozen base changes (bitsandbytes 0.50.2).

    def _adapter(self, name: str) -> dict[str, torch.Tensor]:
        return {key: parameter.detach().clone() for key, parameter in adapter_parameters(self.peft, name).items()}

    def load_adapter(self, name: str, weights: dict[str, torch.Tensor]) -> None:
        """Copies weights (PEFT's saved form) into the adapter `name`; raises AdapterMismatch (a
        ValueError) unless they fill it exactly."""
        targets = adapter_parameters(self.peft, name)
        unfit = [key for key, tensor in weights.items() if key not in targets or targets[key].shape != tensor.shape]
        missing = sorted(targets.keys() - weights.keys())
        if unfit or missing:
            raise AdapterMismatch(f"the adapter does not fit this base: unexpected {unfit[:3]}, missing {missing[:3]}")
        with torch.no_grad():
            for key, tensor in weights.items():
                targets[key].copy_(tensor)

    def accept(self) -> None:
        self.load_adapter(PUBLISHED, self._adapter(TRAINED))

    def revert(self) -> None:
        self.load_adapter(TRAINED, self._adapter(PUBLISHED))

    def reset(self, folder: Path | None) -> None:
        """Both adapters from a version published by a LoRA trainer on this base (None: the starting
        policy, no change to the base). Raises AdapterMismatch (a ValueError) for a full checkpoint or
        an adapter that does not fit."""
        weights = self._start if folder is None else adapter_weights(folder)
        self.load_adapter(TRAINED, weights)
        self.load_adapter(PUBLISHED, weights)

    def export(self, folder: Path) -> None:
        """The trained adapter, in adapter/ in PEFT's format: megabytes, where the model is gigabytes."""
        (folder / ADAPTER_FOLDER).mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(folder / ADAPTER_FOLDER)
        save_file(self._adapter(TRAINED), folder / ADAPTER_FOLDER / WEIGHTS)

    def merged(self, adapter: str) -> PreTrainedModel:
        """A plain model: the base with the adapter `adapter` merged in. A 4-bit base is merged from the
        checkpoint's own weights (float32), as QLoRA adapters are, not from its quantised copy."""
        if self.bits:
            full, _ = load_policy(self.source, device=self.policy.device, dtype=torch.float32)
            copy_of = get_peft_model(full, self.config, adapter_name=adapter)
            load_weights(copy_of, adapter, self._adapter(adapter))  # a float32 copy: PEFT's own loading is safe
            return copy_of.merge_and_unload()
        copy_of = copy.deepcopy(self.peft)
        copy_of.set_adapter(adapter)
        return copy_of.merge_and_unload(adapter_names=[adapter])

    def export_base(self, folder: Path) -> None:
        """The base the adapters adapt, as a full checkpoint: the files it was loaded from, byte for
        byte (so that a policy service started from the same folder can tell it is the same model),
        or, built in code or merged from an adapter version, saved from its weights."""
        if self.source is not None and base_folder(self.source) is None:
            shutil.copytree(self.source, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MANIFEST))
        else:
            save_policy(copy.deepcopy(self.peft).unload(), self.processor, folder)

    def state_dict(self) -> dict[str, Any]:
        """The adapters only: the base is the starting checkpoint, loaded again on restart."""
        return {"policy": self._adapter(TRAINED), "published_policy": self._adapter(PUBLISHED)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_adapter(TRAINED, state["policy"])
        self.load_adapter(PUBLISHED, state["published_policy"])


class AdapterRewardModel(torch.nn.Module):
    """A generative reward model (or PPO's critic) that is a LoRA adapter on the policy's base with a
    head of its own: a reward.model.RewardModel whose backbone is the policy's shared base, run with
    this adapter on. Only the adapter and the head train (trainable_parameters); its state is theirs
    alone (state_dict), portable from one such model to another (the critic starts as a copy of the
    reward model); its published version is the base with the adapter merged in, an ordinary reward
    model folder the reward service loads as any other."""

    def __init__(self, policy: LoraPolicy, adapter: str, seed: int) -> None:
        super().__init__()
        self.__dict__["_policy"] = policy  # not a submodule: the base is reached through scorer
        self.adapter = adapter
        self.scorer = RewardModel(policy.policy, policy.processor, seed=seed)

    def active(self) -> AbstractContextManager[None]:
        """This adapter on for the duration; then the policy's again."""
        return self.__dict__["_policy"].using(self.adapter)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        with self.active():
            return self.scorer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # encode, processor, family, max_positions, backbone, head
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["scorer"], name)

    def _own(self) -> dict[str, torch.Tensor]:
        """The head's weights (and the likelihood weights), by their names in a RewardModel."""
        scorer = self._modules["scorer"]
        own = {f"head.{name}": tensor for name, tensor in scorer.head.named_parameters()}
        if scorer.likelihood_weights is not None:
            own["likelihood_weights"] = scorer.likelihood_weights
        return own

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [*adapter_parameters(self.__dict__["_policy"].policy, self.adapter).values(), *self._own().values()]

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        adapter = self.__dict__["_policy"]._adapter(self.adapter)
        return ({f"adapter/{key}": tensor for key, tensor in adapter.items()}
                | {key: tensor.detach().clone() for key, tensor in self._own().items()})

    def load_state_dict(self, state: Any, strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        self.__dict__["_policy"].load_adapter(
            self.adapter, {key.removeprefix("adapter/"): tensor for key, tensor in state.items() if key.startswith("adapter/")})
        with torch.no_grad():
            for key, tensor in self._own().items():
                tensor.copy_(state[key])

    def save(self, folder: Path) -> None:
        """A reward model folder: the base with this adapter merged in, and the head."""
        policy = self.__dict__["_policy"]
        standalone = RewardModel(policy.merged(self.adapter), policy.processor,
                                 likelihood_features=self._modules["scorer"].likelihood_weights is not None)
        with torch.no_grad():
            for key, tensor in standalone.named_parameters():
                if key in self._own():
                    tensor.copy_(self._own()[key])
        standalone.save(folder)
