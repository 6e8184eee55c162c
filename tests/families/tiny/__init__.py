"""Tiny randomly initialised checkpoints of each supported model family, built in code (no hub) and
saved as normal Hugging Face folders: the family-matrix tests and the demo's other-family runs use them.

Each builder writes a folder that AutoModelForImageTextToText + AutoProcessor load, with the family's
own special tokens and a chat template like the family's real one, small enough to train on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from modalign.policy.model import build_default_policy, save_policy

from tests.families.tiny.idefics import build_idefics, build_idefics3, build_smolvlm
from tests.families.tiny.llava_gemma import build_gemma3, build_llava_onevision
from tests.families.tiny.mllama import build_mllama
from tests.families.tiny.qwen import build_qwen2_5_vl, build_qwen2_vl, build_qwen3_vl
from tests.families.tiny.qwen_omni import build_qwen2_5_omni


def build_llava(folder: Path, seed: int = 0) -> None:
    """The project's default policy: LLaVA with a CLIP vision tower and a Llama text model."""
    save_policy(*build_default_policy(seed), folder)


TINY_CHECKPOINTS: dict[str, Callable[[Path, int], None]] = {
    "llava": build_llava,
    "llava_onevision": build_llava_onevision,
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
    "qwen3_vl": build_qwen3_vl,
    "qwen2_5_omni": build_qwen2_5_omni,
    "idefics3": build_idefics3,
    "smolvlm": build_smolvlm,
    "gemma3": build_gemma3,
    "idefics": build_idefics,
    "mllama": build_mllama,
}
