"""What every tiny checkpoint builder does the same way: seeded initialisation and saving."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel, ProcessorMixin

from modalign.policy.model import save_policy


def init_model(model_class: type[PreTrainedModel], config: object, seed: int) -> PreTrainedModel:
    """Initialise under a forked RNG: the same seed gives the same weights, and the caller's global RNG is left
    alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config)


def save_checkpoint(
    model: PreTrainedModel, processor: ProcessorMixin, folder: Path, eos_tokens: tuple[str, ...],
    bos_token: str | None = None,
) -> None:
    """Set the generation ids as the family's real generation config does (EOS: the given tokens, the first
    closing every assistant turn; BOS: bos_token, else the tokenizer's) and save model and processor."""
    tokenizer = processor.tokenizer
    eos_ids = [tokenizer.convert_tokens_to_ids(token) for token in eos_tokens]
    model.generation_config.bos_token_id = (
        tokenizer.convert_tokens_to_ids(bos_token) if bos_token is not None else tokenizer.bos_token_id
    )
    model.generation_config.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    save_policy(model.eval(), processor, folder)
