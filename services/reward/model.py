"""The reward model: a multimodal backbone with a scalar head read at the last response token, plus
two learned weights on what the backbone's language model says of the response.

Pure torch and transformers; the protocol lives in server.py. Any image-text-to-text model that
AutoModelForImageTextToText + AutoProcessor load can be the backbone; the default is the policy's
default LLaVA, so a reward model can also start from any policy version in the model store.

Why the likelihood features: a reward model must tell a faithful answer from a hallucinated one, and
the backbone's language model, grounded by its own training, already does much of that: the log-
likelihood it gives an answer's tokens, given the image, drops where the answer names a colour or an
object that is not there. A fresh head on the last hidden state has to learn that comparison from a
few hundred noisy user pairs. So the score is

    r(x, y) = head(h_last) + w_logp * log p_backbone(y | x) + w_len * len(y)

with w_logp and w_len learned by the same Bradley-Terry loss, starting at 0 (a fresh model scores as
a plain head would). Measured on the demo's users' pairs of the warm-started policy's answers, this
raised held-out accuracy on faithful-versus-hallucinated pairs from 0.81 to 0.86 (docs/demo.md).
The length feature lets the model learn a length preference (or its absence) explicitly rather than
through the log-likelihood, which falls with every token.

Folder layout written by RewardModel.save:
    reward_config.json         format tag, the head's input width, whether likelihood features are on
    reward_head.safetensors    the scalar head (weight [1, hidden], bias [1]) and the likelihood weights [2]
    backbone/                  the backbone and its processor, as a policy folder (save_policy)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BatchFeature, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

from modalign.core.service import CannotStart
from modalign.policy.conversation import Conversation, as_conversation, image_keys
from modalign.policy.families import family_of
from modalign.policy.model import format_conversation, load_policy, save_policy

FORMAT = "modalign.reward/1"
CONFIG_FILE = "reward_config.json"
HEAD_FILE = "reward_head.safetensors"
BACKBONE_DIR = "backbone"


class UnusableRewardModel(CannotStart, ValueError):
    """A reward model folder or backbone choice that cannot be used; says why in one line."""


class UnscorableText(ValueError):
    """A prompt or response the model cannot take as given (reserved tokens, too long); says which row."""


def require_equal_batch_sizes(prompts: Sequence[object], images_per_sample: list[list[Image.Image]], responses: list[str]) -> None:
    if not len(prompts) == len(images_per_sample) == len(responses):
        raise ValueError(
            f"batch sizes differ: {len(prompts)} prompts, {len(images_per_sample)} image lists, "
            f"{len(responses)} responses"
        )


def prompt_conversation(
    tokenizer: PreTrainedTokenizerBase, row: int, prompt: str | Conversation, images: Sequence[Image.Image]
) -> Conversation:
    """Row `row`'s prompt as a conversation whose image parts match its images and whose text holds no
    reserved token (UnscorableText naming the row otherwise)."""
    conversation = as_conversation(prompt, len(images))
    if len(image_keys(conversation)) != len(images):
        raise UnscorableText(f"prompt {row} has {len(image_keys(conversation))} image parts for {len(images)} images")
    for turn in conversation:
        refuse_reserved_tokens(tokenizer, f"prompt {row}", turn.text)
    return conversation


@dataclass(frozen=True)
class EncodedRow:
    """One (prompt, response) row as a reward model encodes it, before it is padded into a batch with others
    (collate). Encoding a row (tokenising, processing its images) costs a small model about half what scoring
    it does, so the trainer keeps the rows it scores again and again (modalign.trainer.reward_learning)."""

    inputs: dict[str, torch.Tensor]
    response_length: int = 0
    """Tokens of the response and its EOS, where the model scores the response's likelihood."""

    @property
    def length(self) -> int:
        """Its tokens: the width it pads a batch to."""
        return self.inputs["input_ids"].shape[-1]

    @property
    def nbytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for tensor in self.inputs.values())


class RowEncoder(Protocol):
    def encode_row(self, row: int, prompt: str | Conversation, images: Sequence[Image.Image], response: str,
                   clips: Sequence[np.ndarray] = ()) -> EncodedRow: ...

    def collate(self, rows: Sequence[EncodedRow]) -> BatchFeature: ...


def encode_batch(
    model: RowEncoder, prompts: Sequence[str | Conversation], images_per_sample: list[list[Image.Image]],
    responses: list[str], audio_per_sample: Sequence[Sequence[np.ndarray]] | None = None,
) -> BatchFeature:
    """A reward model's padded batch of rows, each encoded by model.encode_row (which names the row in its errors)."""
    require_equal_batch_sizes(prompts, images_per_sample, responses)
    audio = audio_per_sample if audio_per_sample is not None else [()] * len(prompts)
    return model.collate([model.encode_row(row, prompt, images, response, clips) for row, (prompt, images, response, clips)
                          in enumerate(zip(prompts, images_per_sample, responses, audio, strict=True))])


def refuse_reserved_tokens(tokenizer: PreTrainedTokenizerBase, what: str, text: str) -> None:
    """Raises UnscorableText naming `what` when text holds a special or added token of the tokenizer: a
    forged "<image>" or "</s>" would shift image placeholders or end the sequence early."""
    forged = sorted({token for token in (*tokenizer.all_special_tokens, *tokenizer.added_tokens_encoder) if token in text})
    if forged:
        raise UnscorableText(f"{what} contains reserved token(s) {forged}")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended position of each row: right or left padding alike."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=-1)


class RewardModel(nn.Module):
    def __init__(
        self, backbone: PreTrainedModel, processor: ProcessorMixin, seed: int = 0, likelihood_features: bool = True
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.processor = processor
        self.family = family_of(backbone.config.model_type)
        text_config = backbone.config.get_text_config()
        self.max_positions: int = text_config.max_position_embeddings
        self.head = nn.Linear(text_config.hidden_size, 1)
        # Small, seeded init so a fresh model's rewards start near zero and are reproducible.
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.head.weight.normal_(0.0, 1.0 / (text_config.hidden_size + 1) ** 0.5, generator=generator)
            self.head.bias.zero_()
        # [w_logp, w_len]: weights of the response's log-likelihood and length; zero, so they start unused.
        self.likelihood_weights = nn.Parameter(torch.zeros(2)) if likelihood_features else None

    def encode(
        self, prompts: Sequence[str | Conversation], images_per_sample: list[list[Image.Image]], responses: list[str],
        audio_per_sample: Sequence[Sequence[np.ndarray]] | None = None,
    ) -> BatchFeature:
        """One padded batch: the chat-formatted prompt (a conversation, or a question's text) with its
        images and audio clips (none by default), then the response, then EOS."""
        return encode_batch(self, prompts, images_per_sample, responses, audio_per_sample)

    def encode_row(self, row: int, prompt: str | Conversation, images: Sequence[Image.Image], response: str,
                   clips: Sequence[np.ndarray] = ()) -> EncodedRow:
        """Row `row` of a batch (the number its errors name), unpadded."""
        tokenizer = self.processor.tokenizer
        conversation = prompt_conversation(tokenizer, row, prompt, images)
        refuse_reserved_tokens(tokenizer, f"response {row}", response)
        text = format_conversation(self.processor, conversation) + response + tokenizer.eos_token
        inputs = self.family.encode(self.processor, text, list(images), clips)
        length = int(inputs["attention_mask"].sum())
        if length > self.max_positions:
            raise UnscorableText(f"row {row} is {length} tokens, above the model's limit of {self.max_positions}")
        if self.likelihood_weights is None:
            return EncodedRow(inputs)
        # Tokens of the response and its EOS, which end the row: the ones the likelihood is taken of.
        return EncodedRow(inputs, len(tokenizer(response + tokenizer.eos_token, add_special_tokens=False).input_ids))

    def collate(self, rows: Sequence[EncodedRow]) -> BatchFeature:
        """Rows right-padded into one batch on the model's device."""
        inputs = self.family.model_inputs(self.backbone, [row.inputs for row in rows], self.processor.tokenizer.pad_token_id)
        if self.likelihood_weights is not None:
            inputs["response_lengths"] = torch.tensor([row.response_length for row in rows])
        return BatchFeature(inputs)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_lengths: torch.Tensor | None = None,
        **multimodal: torch.Tensor,
    ) -> torch.Tensor:
        """Rewards [B] for an encoded batch; differentiable, for Bradley-Terry training."""
        if self.likelihood_weights is not None and response_lengths is None:
            raise ValueError("this reward model scores the response's likelihood: pass encode()'s response_lengths")

        def rewards(inputs: dict[str, torch.Tensor], rows: torch.Tensor | None) -> torch.Tensor:
            # base_model skips the LM head: the head reads one hidden state, and the likelihood features
            # need the LM head's logits only at the response's positions.
            hidden = self.backbone.base_model(**inputs, use_cache=False).last_hidden_state
            last = last_token_index(inputs["attention_mask"])
            scores = self.head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last].to(self.head.weight.dtype))
            if self.likelihood_weights is None:
                return scores.squeeze(-1)
            lengths = response_lengths if rows is None else response_lengths[rows]
            features = torch.stack([self.response_logprob(hidden, inputs["input_ids"], last, lengths), lengths.float()], -1)
            return scores.squeeze(-1) + features.to(self.likelihood_weights.dtype) @ self.likelihood_weights

        return self.family.in_parts({"input_ids": input_ids, "attention_mask": attention_mask, **multimodal}, rewards)

    def response_logprob(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, last: torch.Tensor, response_lengths: torch.Tensor
    ) -> torch.Tensor:
        """[B] summed log-probabilities of each row's response tokens (ending at `last`) under the backbone's LM."""
        width = int(response_lengths.max())
        # Position t's logits predict token t + 1: response token j of a row ending at `last` sits at
        # last - length + 1 + j and is predicted from the position before it.
        offsets = torch.arange(width, device=input_ids.device)
        targets = (last - response_lengths + 1).unsqueeze(-1) + offsets
        valid = offsets < response_lengths.unsqueeze(-1)
        targets = torch.where(valid, targets, last.unsqueeze(-1)).clamp(min=1)
        predicting = hidden.gather(1, (targets - 1).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        logits = self.backbone.get_output_embeddings()(predicting).float()
        logprobs = torch.log_softmax(logits, -1).gather(-1, input_ids.gather(1, targets).unsqueeze(-1)).squeeze(-1)
        return (logprobs * valid).sum(-1)

    def score(
        self, prompts: Sequence[str | Conversation], images_per_sample: list[list[Image.Image]], responses: list[str],
        audio_per_sample: Sequence[Sequence[np.ndarray]] | None = None,
    ) -> torch.Tensor:
        """Rewards [B] on the model's device, without autograd; uses the current train/eval mode
        (models here load in eval)."""
        inputs = self.encode(prompts, images_per_sample, responses, audio_per_sample).to(self.head.weight.device)
        with torch.inference_mode():
            return self(**inputs)

    def save(self, folder: str | Path, whole: dict[str, torch.Tensor] | None = None) -> None:
        """whole: this model's state dict gathered from its shards (a trainer's FSDP), else its own."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if whole is None:
            save_policy(self.backbone, self.processor, folder / BACKBONE_DIR)
            tensors = dict(self.head.state_dict())
            if self.likelihood_weights is not None:
                tensors["likelihood_weights"] = self.likelihood_weights.detach()
        else:
            backbone = {name.removeprefix("backbone."): t for name, t in whole.items() if name.startswith("backbone.")}
            self.backbone.save_pretrained(folder / BACKBONE_DIR, state_dict=backbone, safe_serialization=True)
            self.processor.save_pretrained(folder / BACKBONE_DIR)
            tensors = {name.removeprefix("head."): t for name, t in whole.items() if not name.startswith("backbone.")}
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, folder / HEAD_FILE)
        config = {"format": FORMAT, "hidden_size": self.head.in_features, "backbone": BACKBONE_DIR,
                  "likelihood_features": self.likelihood_weights is not None}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> RewardModel:
        """Loads a folder written by save(), in eval mode."""
        folder = Path(folder)
        config = json.loads((folder / CONFIG_FILE).read_text())
        if config.get("format") != FORMAT:
            raise UnusableRewardModel(f"{folder / CONFIG_FILE} has format {config.get('format')!r}, expected {FORMAT!r}")
        backbone, processor = load_policy(folder / config["backbone"])
        # Folders written before the likelihood features existed have a plain head.
        model = cls(backbone, processor, likelihood_features=config.get("likelihood_features", False))
        if model.head.in_features != config["hidden_size"]:
            raise ValueError(
                f"backbone hidden size {model.head.in_features} does not match the head's {config['hidden_size']}"
            )
        tensors = load_file(folder / HEAD_FILE)
        if model.likelihood_weights is not None:
            model.likelihood_weights.data.copy_(tensors.pop("likelihood_weights"))
        model.head.load_state_dict(tensors)
        return model.eval()
