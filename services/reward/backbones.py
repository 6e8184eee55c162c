"""The reward model's backbones, by name, and the one way to build or load a reward model of either.

- generative (the default, model.py): the policy's own kind of VLM reads prompt, images and response
  together, with a scalar head and the backbone's likelihood of the response;
- clip (clip.py): a CLIP dual encoder with a head over the image and text embeddings; cheaper to run,
  less exact.

Chosen where a reward model starts fresh: the trainer's --learner.reward-backbone and the reward
service's --backbone. A saved reward model records its backbone, so loading needs no flag.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, PreTrainedModel, ProcessorMixin

from modalign.policy.families import supported_model_types
from modalign.policy.model import build_default_policy, load_policy
from modalign.reward import clip, model
from modalign.reward.clip import ClipRewardModel
from modalign.reward.config import BACKBONES
from modalign.reward.model import CONFIG_FILE, RewardModel, UnusableRewardModel

AnyRewardModel = RewardModel | ClipRewardModel
_FORMATS = {model.FORMAT: "generative", clip.FORMAT: "clip"}


def new_reward_model(backbone: str, policy: PreTrainedModel, processor: ProcessorMixin, seed: int = 0) -> AnyRewardModel:
    """A fresh reward model of the named backbone, in eval mode. The generative one takes `policy` itself as
    its backbone (pass a copy to train them apart); the CLIP one copies what it needs of it."""
    if backbone == "generative":
        return RewardModel(policy, processor, seed=seed).eval()
    if backbone == "clip":
        return ClipRewardModel.from_policy(policy, processor, seed=seed)
    raise UnusableRewardModel(f"unknown reward backbone {backbone!r}; known: {', '.join(BACKBONES)}")


def backbone_of(folder: str | Path) -> str:
    """The backbone of a folder: a saved reward model's (from its reward_config.json), or for a plain
    checkpoint (a starting point under a fresh head) "clip" for a CLIP one and "generative" for an
    image-text-to-text one of a supported family. Raises UnusableRewardModel for anything else."""
    folder = Path(folder)
    if is_saved_reward_model(folder):
        format = json.loads((folder / CONFIG_FILE).read_text()).get("format")
        if format not in _FORMATS:
            raise UnusableRewardModel(f"{folder / CONFIG_FILE} has format {format!r}, expected one of {sorted(_FORMATS)}")
        return _FORMATS[format]
    model_type = _model_type(folder)
    if model_type == "clip":
        return "clip"
    if model_type in supported_model_types():
        return "generative"
    raise UnusableRewardModel(f"{folder} is neither a saved reward model (no {CONFIG_FILE}) nor a CLIP or "
                              f"image-text-to-text checkpoint (model_type {model_type!r})")


def is_saved_reward_model(folder: str | Path) -> bool:
    """Whether a folder holds a trained reward model (written by save), not a plain starting checkpoint."""
    return (Path(folder) / CONFIG_FILE).is_file()


def _model_type(folder: Path) -> str | None:
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True).model_type
    except (OSError, ValueError):
        return None


def load_reward_model(folder: str | Path, seed: int = 0, backbone: str | None = None) -> AnyRewardModel:
    """A saved reward model of either backbone, or a fresh head (seeded) on a plain CLIP or
    image-text-to-text checkpoint; in eval mode. With `backbone`, a folder of another backbone is
    refused (UnusableRewardModel)."""
    folder = Path(folder)
    found = backbone_of(folder)
    if backbone is not None and found != backbone:
        raise UnusableRewardModel(f"{folder} holds a {found} reward model, not a {backbone} one")
    if is_saved_reward_model(folder):
        return RewardModel.load(folder) if found == "generative" else ClipRewardModel.load(folder)
    if found == "clip":
        return ClipRewardModel.start_from_clip(folder, seed=seed)
    return RewardModel(*load_policy(folder), seed=seed).eval()


def build_default_reward_model(seed: int = 0, backbone: str = "generative") -> AnyRewardModel:
    """A fresh reward model on the default policy, in eval mode; the same seed, the same weights."""
    return new_reward_model(backbone, *build_default_policy(seed), seed=seed)
