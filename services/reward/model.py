"""The reward model: a multimodal backbone with a scalar head read at the last response token.

Pure torch and transformers; the protocol lives in server.py. Any image-text-to-text model that
AutoModelForImageTextToText + AutoProcessor load can be the backbone; the default is the policy's
default LLaVA, so a reward model can also start from any policy version in the model store.

Folder layout written by RewardModel.save:
    reward_config.json         format tag and the head's input width
    reward_head.safetensors    the scalar head (weight [1, hidden], bias [1])
    backbone/                  the backbone and its processor, as a policy folder (save_policy)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BatchFeature, PreTrainedModel, ProcessorMixin

from modalign.policy.model import build_default_policy, format_prompt, load_policy, save_policy

FORMAT = "modalign.reward/1"
CONFIG_FILE = "reward_config.json"
HEAD_FILE = "reward_head.safetensors"
BACKBONE_DIR = "backbone"


class UnscorableText(ValueError):
    """A prompt or response the model cannot take as given (reserved tokens, too long); says which row."""


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended position of each row: right or left padding alike."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=-1)


class RewardModel(nn.Module):
    def __init__(self, backbone: PreTrainedModel, processor: ProcessorMixin, seed: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.processor = processor
        text_config = backbone.config.get_text_config()
        self.max_positions: int = text_config.max_position_embeddings
        self.head = nn.Linear(text_config.hidden_size, 1)
        # Small, seeded init so a fresh model's rewards start near zero and are reproducible.
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.head.weight.normal_(0.0, 1.0 / (text_config.hidden_size + 1) ** 0.5, generator=generator)
            self.head.bias.zero_()

    def encode(
        self, prompt_texts: list[str], images_per_sample: list[list[Image.Image]], responses: list[str]
    ) -> BatchFeature:
        """One padded batch: chat-formatted prompt with its images, then the response, then EOS."""
        if not len(prompt_texts) == len(images_per_sample) == len(responses):
            raise ValueError(
                f"batch sizes differ: {len(prompt_texts)} prompts, {len(images_per_sample)} image lists, "
                f"{len(responses)} responses"
            )
        tokenizer = self.processor.tokenizer
        reserved = set(tokenizer.all_special_tokens) | set(tokenizer.added_tokens_encoder)
        texts = []
        for row, (prompt, images, response) in enumerate(zip(prompt_texts, images_per_sample, responses, strict=True)):
            try:
                formatted = format_prompt(self.processor, prompt, len(images))
            except ValueError as error:
                raise UnscorableText(f"prompt {row}: {error}") from error
            # A forged "<image>" or "</s>" in the response would shift image placeholders or end the
            # sequence early, so responses are held to the same rule as prompts.
            forged = sorted(token for token in reserved if token in response)
            if forged:
                raise UnscorableText(f"response {row} contains reserved token(s) {forged}")
            texts.append(formatted + response + tokenizer.eos_token)
        flat_images = [image for images in images_per_sample for image in images]
        inputs = self.processor(text=texts, images=flat_images or None, padding=True, return_tensors="pt")
        lengths = inputs["attention_mask"].sum(dim=-1)
        too_long = [(row, int(length)) for row, length in enumerate(lengths) if length > self.max_positions]
        if too_long:
            row, length = too_long[0]
            raise UnscorableText(f"row {row} is {length} tokens, above the model's limit of {self.max_positions}")
        return inputs

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **multimodal: torch.Tensor
    ) -> torch.Tensor:
        """Rewards [B] for an encoded batch; differentiable, for Bradley-Terry training."""
        # base_model skips the LM head: only the hidden states are needed, not vocabulary logits.
        hidden = self.backbone.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **multimodal
        ).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, last_token_index(attention_mask)]
        return self.head(last.to(self.head.weight.dtype)).squeeze(-1)

    def score(
        self, prompt_texts: list[str], images_per_sample: list[list[Image.Image]], responses: list[str]
    ) -> torch.Tensor:
        """Rewards [B] on the model's device, without autograd; uses the current train/eval mode
        (models here load in eval)."""
        inputs = self.encode(prompt_texts, images_per_sample, responses).to(self.head.weight.device)
        with torch.inference_mode():
            return self(**inputs)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_policy(self.backbone, self.processor, folder / BACKBONE_DIR)
        save_file({name: tensor.contiguous() for name, tensor in self.head.state_dict().items()}, folder / HEAD_FILE)
        config = {"format": FORMAT, "hidden_size": self.head.in_features, "backbone": BACKBONE_DIR}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> RewardModel:
        """Loads a folder written by save(), in eval mode."""
        folder = Path(folder)
        config = json.loads((folder / CONFIG_FILE).read_text())
        if config.get("format") != FORMAT:
            raise ValueError(f"{folder / CONFIG_FILE} has format {config.get('format')!r}, expected {FORMAT!r}")
        backbone, processor = load_policy(folder / config["backbone"])
        model = cls(backbone, processor)
        if model.head.in_features != config["hidden_size"]:
            raise ValueError(
                f"backbone hidden size {model.head.in_features} does not match the head's {config['hidden_size']}"
            )
        model.head.load_state_dict(load_file(folder / HEAD_FILE))
        return model.eval()


def build_default_reward_model(seed: int = 0) -> RewardModel:
    """A fresh reward model on the default policy backbone, in eval mode; the same seed, the same weights."""
    backbone, processor = build_default_policy(seed)
    return RewardModel(backbone, processor, seed=seed).eval()
