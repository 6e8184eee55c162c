"""LoRA training of the policy with PEFT: the base weights stay frozen and shared, only adapters train.

One copy of the base holds three policies as PEFT adapters on it:
- "default", the adapter being trained (the policy);
- "published", the last version the gate accepted (the baseline of the next evaluation, and what a
  refused candidate reverts to);
- no adapter at all, the starting policy: the reference of the KL penalty is the base with its
  adapters disabled, not a second copy of the model.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import PreTrainedModel, ProcessorMixin

from modalign.core.modelstore import MANIFEST, base_folder
from modalign.policy.adapters import ADAPTER_FOLDER, adapter_weights, load_weights
from modalign.policy.families import UnsupportedModel
from modalign.policy.model import save_policy

PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
"""The linear layers adapted by default: attention and MLP projections, by the names every supported
family's text model gives them."""
_NOT_TEXT = ("vision", "visual", "perceiver", "multi_modal_projector")
"""Parts of a model's decoder that are not its text model (Idefics's decoder holds its vision tower)."""
TRAINED, PUBLISHED = "default", "published"


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    target_modules: tuple[str, ...] = ()
    """Empty: default_target_modules(model)."""


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


class AdapterView(torch.nn.Module):
    """One policy on the shared base, as a model of its own: the published adapter, or none (the
    reference). Forward passes switch to it and back; every other attribute is the policy's (config,
    generation_config, device, ...), so that the engine and the batches take it like any model. Its
    weights are the policy's: it holds no parameters itself."""

    def __init__(self, peft_model: PeftModel, adapter: str | None) -> None:
        super().__init__()
        self.__dict__["_peft"] = peft_model  # not a submodule: the weights belong to the policy
        self.adapter = adapter

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        peft = self.__dict__["_peft"]
        model = peft.get_base_model()
        if self.adapter is None:
            with peft.disable_adapter():
                return model(*args, **kwargs)
        peft.set_adapter(self.adapter, inference_mode=True)
        try:
            return model(*args, **kwargs)
        finally:
            peft.set_adapter(TRAINED)  # trainable again; the published adapter stays frozen

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_peft"].get_base_model(), name)


class LoraPolicy:
    """The policy as a trained adapter on a frozen base, with the published adapter and the reference
    beside it on the same weights. The same interface as models.FullPolicy."""

    def __init__(self, base: PreTrainedModel, processor: ProcessorMixin, settings: LoraSettings,
                 source: Path | None = None) -> None:
        """source: the checkpoint folder base was loaded from; None: base was built in code."""
        config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0,
                            target_modules=list(settings.target_modules) or default_target_modules(base))
        self.processor, self.source = processor, source
        self.peft = get_peft_model(base, config, adapter_name=TRAINED)
        self.peft.add_adapter(PUBLISHED, config)
        self.peft.set_adapter(TRAINED)  # trainable; every other adapter frozen
        self.peft.eval()
        self.policy: PreTrainedModel = self.peft.get_base_model()
        """The base with its adapters injected: it runs the trained adapter and holds every weight."""
        self.reference = AdapterView(self.peft, None)
        self.published = AdapterView(self.peft, PUBLISHED)
        self._start = self._adapter(TRAINED)
        self._load_adapter(PUBLISHED, self._start)

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]:
        return (p for p in self.policy.parameters() if p.requires_grad)

    def _adapter(self, name: str) -> dict[str, torch.Tensor]:
        return {key: tensor.detach().clone()
                for key, tensor in get_peft_model_state_dict(self.peft, adapter_name=name).items()}

    def _load_adapter(self, name: str, weights: dict[str, torch.Tensor]) -> None:
        load_weights(self.peft, name, weights)

    def accept(self) -> None:
        self._load_adapter(PUBLISHED, self._adapter(TRAINED))

    def revert(self) -> None:
        self._load_adapter(TRAINED, self._adapter(PUBLISHED))

    def reset(self, folder: Path | None) -> None:
        """Both adapters from a version published by a LoRA trainer on this base (None: the starting
        policy, no change to the base). Raises AdapterMismatch (a ValueError) for a full checkpoint or
        an adapter that does not fit."""
        weights = self._start if folder is None else adapter_weights(folder)
        self._load_adapter(TRAINED, weights)
        self._load_adapter(PUBLISHED, weights)

    def export(self, folder: Path) -> None:
        """The trained adapter, in adapter/: megabytes, where the model is gigabytes."""
        self.peft.save_pretrained(folder / ADAPTER_FOLDER, selected_adapters=[TRAINED])
        (folder / ADAPTER_FOLDER / "README.md").unlink(missing_ok=True)  # PEFT's blank model card

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
        self._load_adapter(TRAINED, state["policy"])
        self._load_adapter(PUBLISHED, state["published_policy"])
