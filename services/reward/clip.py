"""The CLIP reward model: a dual encoder that scores how well a response agrees with the images.

The generative reward model (model.py) runs the whole VLM over prompt, images and response; this
one encodes the images and the text (the conversation's turns, then the response, one per line)
separately with a CLIPModel and reads the reward from a small learned head over the two embeddings:

    r(x, y) = head([i, t, i * t])     i: mean of the images' normalised embeddings (zero without images)
                                      t: normalised embedding of "turn\\n...turn\\nresponse"

trained with the same Bradley-Terry loss as the default backbone, encoders included. It is far
cheaper (two small encoders, no language model over the whole sequence), which is why users pick it;
it is also blunter: it sees the text through CLIP's window (77 tokens for OpenAI's checkpoints) and
the images through one pooled vector each, so it cannot read a response against the image token by
token as the generative backbone does. docs/models.md compares the two on the demo's users' pairs.

Where the CLIP comes from:
- a CLIP checkpoint folder (CLIPModel + CLIPProcessor, e.g. a downloaded openai/clip-vit-base-patch32)
  given as the reward model's starting folder: start_from_clip();
- otherwise, built from the policy (from_policy): its vision tower when that is a CLIP vision model
  (the default LLaVA's is), a fresh two-layer text encoder whose token embeddings start from the
  policy's, and the policy's tokenizer and image processor. The demo's warm start has already taught
  that vision tower the scenes, so the reward model starts from what the policy sees.

Text longer than the window keeps its end (the response and the end of the question): past the
window, CLIP cannot read it at all, and the response is what is being scored.

Folder layout written by save():
    reward_config.json         format tag "modalign.reward.clip/1", the head's embedding width
    reward_head.safetensors    the head
    backbone/                  the CLIPModel and its CLIPProcessor (save_pretrained of both)
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    BatchFeature,
    CLIPConfig,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    PreTrainedModel,
    ProcessorMixin,
)

from modalign.policy.conversation import Conversation
from modalign.reward.model import (
    CONFIG_FILE,
    HEAD_FILE,
    EncodedRow,
    UnusableRewardModel,
    encode_batch,
    last_token_index,
    prompt_conversation,
    refuse_reserved_tokens,
)

FORMAT = "modalign.reward.clip/1"
BACKBONE_DIR = "backbone"
TEXT_WINDOW = 128
"""Positions of the text encoder built from a policy: the demo's question and answer take under 60."""


class ClipRewardModel(nn.Module):
    def __init__(self, clip: CLIPModel, processor: CLIPProcessor, seed: int = 0) -> None:
        super().__init__()
        self.clip = clip
        self.processor = processor
        self.text_window: int = clip.config.text_config.max_position_embeddings
        width = clip.config.projection_dim
        self.head = nn.Sequential(nn.Linear(3 * width, width), nn.GELU(), nn.Linear(width, 1))
        # Seeded init, the output layer small: a fresh model's rewards start near zero and are reproducible.
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer, scale in ((self.head[0], 1.0), (self.head[2], 0.1)):
                layer.weight.normal_(0.0, scale / layer.in_features ** 0.5, generator=generator)
                layer.bias.zero_()

    @property
    def max_positions(self) -> None:
        """No limit on prompt + response: text past the window is cut, not refused (see the module doc)."""
        return None

    def encode(
        self, prompts: Sequence[str | Conversation], images_per_sample: list[list[Image.Image]], responses: list[str],
        audio_per_sample: Sequence[Sequence[np.ndarray]] | None = None,
    ) -> BatchFeature:
        """Text ids (right padded) and, for the images of all rows together, pixel values and the
        row each image belongs to. CLIP hears nothing: audio clips are refused."""
        return encode_batch(self, prompts, images_per_sample, responses, audio_per_sample)

    def encode_row(self, row: int, prompt: str | Conversation, images: Sequence[Image.Image], response: str,
                   clips: Sequence[np.ndarray] = ()) -> EncodedRow:
        """Row `row` of a batch (the number its errors name): its text ids and its images' pixel values."""
        if clips:
            raise ValueError("the CLIP reward model takes no audio")
        tokenizer = self.processor.tokenizer
        conversation = prompt_conversation(tokenizer, row, prompt, images)
        refuse_reserved_tokens(tokenizer, f"response {row}", response)
        text = "\n".join(turn.text for turn in conversation)
        # bos (where the tokenizer has one), the text's last tokens that fit, and eos, whose state
        # is the text's embedding.
        start = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        fits = self.text_window - len(start) - 1
        ids = tokenizer(f"{text}\n{response}", add_special_tokens=False).input_ids
        inputs = {"input_ids": torch.tensor(start + ids[max(len(ids) - fits, 0):] + [tokenizer.eos_token_id])}
        if images:
            inputs["pixel_values"] = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return EncodedRow(inputs)

    def collate(self, rows: Sequence[EncodedRow]) -> BatchFeature:
        """Text ids right padded, and the pixel values of every row's images with the row each belongs to."""
        tokenizer = self.processor.tokenizer
        ids = [row.inputs["input_ids"] for row in rows]
        width = max(len(row_ids) for row_ids in ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        images = [(number, row.inputs["pixel_values"]) for number, row in enumerate(rows) if "pixel_values" in row.inputs]
        inputs = {
            "input_ids": torch.stack([nn.functional.pad(row_ids, (0, width - len(row_ids)), value=pad) for row_ids in ids]),
            "attention_mask": torch.stack([(torch.arange(width) < len(row_ids)).long() for row_ids in ids]),
            "image_rows": torch.tensor([number for number, pixels in images for _ in range(len(pixels))], dtype=torch.long),
        }
        if images:
            inputs["pixel_values"] = torch.cat([pixels for _, pixels in images])
        return BatchFeature(inputs)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_rows: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rewards [B] for an encoded batch; differentiable, for Bradley-Terry training."""
        hidden = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # Pooled at the last attended token (the eos encode() appended): CLIP's own pooling looks for
        # the eos id, which older configs give wrongly.
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        text = nn.functional.normalize(self.clip.text_projection(pooled), dim=-1)
        image = torch.zeros_like(text)
        if pixel_values is not None:
            vision = self.clip.vision_model(pixel_values=pixel_values.to(self.clip.dtype)).pooler_output
            embeddings = nn.functional.normalize(self.clip.visual_projection(vision), dim=-1).to(text.dtype)
            counts = torch.bincount(image_rows, minlength=text.shape[0]).clamp(min=1).unsqueeze(-1)
            image = image.index_add(0, image_rows, embeddings) / counts
        features = torch.cat([image, text, image * text], dim=-1)
        return self.head(features.to(self.head[0].weight.dtype)).squeeze(-1)

    def score(
        self, prompts: Sequence[str | Conversation], images_per_sample: list[list[Image.Image]], responses: list[str],
        audio_per_sample: Sequence[Sequence[np.ndarray]] | None = None,
    ) -> torch.Tensor:
        """Rewards [B] on the model's device, without autograd."""
        inputs = self.encode(prompts, images_per_sample, responses, audio_per_sample).to(self.head[0].weight.device)
        with torch.inference_mode():
            return self(**inputs)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.clip.save_pretrained(folder / BACKBONE_DIR, safe_serialization=True)
        self.processor.save_pretrained(folder / BACKBONE_DIR)
        save_file({name: tensor.contiguous() for name, tensor in self.head.state_dict().items()}, folder / HEAD_FILE)
        config = {"format": FORMAT, "projection_dim": self.clip.config.projection_dim, "backbone": BACKBONE_DIR}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> ClipRewardModel:
        """Loads a folder written by save(), in eval mode."""
        folder = Path(folder)
        config = json.loads((folder / CONFIG_FILE).read_text())
        model = cls.start_from_clip(folder / config["backbone"])
        model.head.load_state_dict(load_file(folder / HEAD_FILE))
        return model

    @classmethod
    def start_from_clip(cls, folder: str | Path, seed: int = 0) -> ClipRewardModel:
        """A fresh head on a CLIP checkpoint folder (CLIPModel + CLIPProcessor), in eval mode."""
        folder = Path(folder)
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        clip = CLIPModel.from_pretrained(folder, local_files_only=True)
        return cls(clip, processor, seed=seed).eval()

    @classmethod
    def from_policy(cls, policy: PreTrainedModel, processor: ProcessorMixin, seed: int = 0) -> ClipRewardModel:
        """A fresh CLIP reward model that sees with the policy's CLIP vision tower and reads with the
        policy's tokenizer (see the module doc), in eval mode. Raises UnusableRewardModel when the
        policy's vision tower is not a CLIP vision model: start from a CLIP checkpoint folder then."""
        vision_config = policy.config.vision_config
        if vision_config.model_type != "clip_vision_model":
            raise UnusableRewardModel(
                f"the policy's vision tower is {vision_config.model_type!r}, not CLIP's: a CLIP reward model "
                "for it needs a CLIP checkpoint folder as its starting reward model"
            )
        tokenizer = processor.tokenizer
        embeddings = policy.get_input_embeddings().weight
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=embeddings.shape[1], intermediate_size=2 * embeddings.shape[1],
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=TEXT_WINDOW,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            projection_dim=vision_config.projection_dim,
        )
        config = CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                            projection_dim=vision_config.projection_dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            clip = CLIPModel(config)
        with torch.no_grad():
            # LLaVA keeps its CLIPVisionModel at model.vision_tower.
            clip.vision_model.load_state_dict(policy.model.vision_tower.state_dict())
            clip.text_model.embeddings.token_embedding.weight.copy_(embeddings[: len(tokenizer)])
        clip_processor = CLIPProcessor(image_processor=copy.deepcopy(processor.image_processor), tokenizer=copy.deepcopy(tokenizer))
        return cls(clip.to(embeddings.device), clip_processor, seed=seed).eval()

