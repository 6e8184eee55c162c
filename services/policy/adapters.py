"""LoRA adapter versions: a published version that is an adapter on a base version (PEFT's format).

A trainer with --learner.lora-rank publishes only its adapter, in the version's adapter/ folder; the
version's manifest names the base it adapts (modelstore.Manifest.base). Loaders either merge the
adapter into its base (load_policy, for evaluation and export) or keep one base and add each version's
adapter beside the others (attach, for serving stable and canary on one copy of the weights).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import PreTrainedModel

ADAPTER_FOLDER = "adapter"
"""Where a version's folder holds its adapter."""
WEIGHTS = "adapter_model.safetensors"
BASE = "__base__"
"""PEFT's name, in a mixed batch, for rows that use no adapter."""


class AdapterMismatch(ValueError):
    """An adapter whose weights do not fit the base it is loaded onto."""


def is_adapter_version(folder: Path) -> bool:
    return (folder / ADAPTER_FOLDER / WEIGHTS).is_file()


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The adapter weights of a version's folder (PEFT's keys, without adapter names)."""
    if not is_adapter_version(folder):
        raise AdapterMismatch(f"{folder.name} holds no LoRA adapter ({ADAPTER_FOLDER}/{WEIGHTS})")
    return load_file(folder / ADAPTER_FOLDER / WEIGHTS)


def load_weights(peft: PeftModel, name: str, weights: dict[str, torch.Tensor]) -> None:
    """Puts weights into the adapter `name` of peft; raises AdapterMismatch unless they fill it exactly."""
    try:
        result = set_peft_model_state_dict(peft, weights, adapter_name=name)
    except RuntimeError as error:  # a tensor of another shape: another base, or another rank
        raise AdapterMismatch(f"the adapter does not fit this base: {str(error).splitlines()[0]}") from error
    missing = [key for key in result.missing_keys if f".{name}." in key]
    if missing or result.unexpected_keys:
        raise AdapterMismatch(f"the adapter does not fit this base: missing {missing[:3]}, "
                              f"unexpected {list(result.unexpected_keys)[:3]}")


def attach(model: PreTrainedModel | PeftModel, name: str, folder: Path) -> PeftModel:
    """model with the adapter of the version in folder added as `name` (a PeftModel is added to; a
    plain model is wrapped, its weights shared, not copied). Raises AdapterMismatch if it does not fit,
    leaving no half-added adapter behind."""
    weights = adapter_weights(folder)
    config = LoraConfig.from_pretrained(str(folder / ADAPTER_FOLDER))
    config.inference_mode = True
    # Where the trainer loaded its base from is not where this base was loaded from; both are the base.
    config.base_model_name_or_path = getattr(model, "name_or_path", None)
    if isinstance(model, PeftModel):
        model.add_adapter(name, config)
        peft = model
    else:
        peft = get_peft_model(model, config, adapter_name=name)
    try:
        load_weights(peft, name, weights)
    except AdapterMismatch:
        if len(peft.peft_config) > 1:
            peft.delete_adapter(name)
        else:
            peft.unload()  # the plain model again
        raise
    return peft.eval()


def merged(model: PreTrainedModel, folder: Path) -> PreTrainedModel:
    """model with the adapter of the version in folder merged into its weights (a full checkpoint)."""
    return attach(model, "default", folder).merge_and_unload()
