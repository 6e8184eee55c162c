"""Model families: how modalign feeds each kind of image-text-to-text model (and image-audio-text-to-text).

Every part of the loop (the policy engine, the reward model, the trainer's batches) feeds a model the
same way: each row (a prompt with its images, then possibly response tokens) is encoded alone by the
checkpoint's own processor, and rows are collated into one padded batch. Rows are encoded alone
because that is what makes a request's tokens independent of its batch companions, and because
processors differ in how they batch (some refuse a batch mixing rows with and without images).

What differs between families is small, and declared here rather than branched on at each caller:
- inputs that belong to a whole row rather than to each image (Idefics3 and Idefics hold a row's
  images as [rows, images, ...]; LLaVA and Qwen list every image, or patch, along one dimension);
- inputs that run along the sequence (Flamingo-style cross-attention masks say which images each
  token sees; Qwen and Gemma 3 mark which tokens are image tokens): padded with the tokens, and over
  generated tokens extended by repeating the prompt's last position, as transformers' generate does;
- how positions are counted (Qwen2-VL's multimodal rope gives image tokens 3-D positions);
- what a decoding step needs besides the new token and the cache (Idefics keeps its image features).

A checkpoint whose family is not registered here is refused at load time, before any weight is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin, SequenceFeatureExtractor

from modalign.core.service import CannotStart

Inputs = dict[str, torch.Tensor]


class UnsupportedModel(CannotStart, ValueError):
    """A checkpoint modalign cannot serve or train: the message names what is wrong and what is supported."""


@dataclass(frozen=True)
class Family:
    """The generic path: 1-D positions, per-image inputs listed along their first dimension."""

    name: str
    model_types: tuple[str, ...]
    row_keys: frozenset[str] = frozenset()
    """Inputs whose first dimension is the row (a row's images padded inside it)."""
    sequence_keys: frozenset[str] = frozenset()
    """Inputs whose first two dimensions are row and token position."""
    step_keys: frozenset[str] = frozenset()
    """Sequence inputs a decoding step takes too (at the new token's position), e.g. cross-attention masks."""

    def encode(
        self, processor: ProcessorMixin, text: str, images: list[Image.Image], audio: Sequence[np.ndarray] = ()
    ) -> Inputs:
        """One row: the formatted prompt (image and audio placeholders expanded), its images and its audio
        clips (mono float samples at the processor's sampling rate), batch dimension 1."""
        media: dict[str, Any] = {"images": [images]} if images else {}
        if audio:
            if not takes_audio(processor):
                raise ValueError(f"this model ({type(processor).__name__}) takes no audio")
            media["audio"] = list(audio)
        return dict(processor(text=[text], return_tensors="pt", **media))

    def extend(self, row: Inputs, token_ids: list[int]) -> Inputs:
        """The row followed by token_ids (a response): sequence inputs repeat the prompt's last position,
        as they do for tokens the model generates."""
        if not token_ids:
            return row
        added = len(token_ids)
        extended = dict(row)
        extended["input_ids"] = torch.cat([row["input_ids"], torch.tensor([token_ids], dtype=row["input_ids"].dtype)], 1)
        extended["attention_mask"] = torch.cat([row["attention_mask"], row["attention_mask"].new_ones(1, added)], 1)
        for key in self.sequence_keys & row.keys():
            last = row[key][:, -1:]
            extended[key] = torch.cat([row[key], last.expand(-1, added, *last.shape[2:])], 1)
        return extended

    def collate(
        self, rows: list[Inputs], pad_token_id: int, side: Literal["left", "right"],
        device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
    ) -> Inputs:
        """Rows into one batch: tokens padded on `side`; a row's images padded with zeros to the batch's
        largest (what the processors themselves do); floating inputs cast to dtype."""
        width = max(row["input_ids"].shape[1] for row in rows)
        batch: Inputs = {}
        for key in sorted({key for row in rows for key in row}):
            along_sequence = key in ("input_ids", "attention_mask") or key in self.sequence_keys
            if along_sequence or key in self.row_keys:
                template = next(row[key] for row in rows if key in row)
                parts = [row[key] if key in row else _empty_row(template, row, along_sequence) for row in rows]
            else:  # listed per image: rows without images contribute nothing
                parts = [row[key] for row in rows if key in row]
            fill = pad_token_id if key == "input_ids" else 0
            value = torch.cat(_pad_to_largest(parts, width if along_sequence else None, side, fill))
            batch[key] = value.to(device, dtype) if dtype is not None and value.is_floating_point() else value.to(device)
        return batch

    def model_inputs(self, model: PreTrainedModel, rows: list[Inputs], pad_token_id: int) -> Inputs:
        """Rows right-padded onto the model's device and dtype, with their position ids: the inputs of a
        forward pass over whole sequences (training, scoring)."""
        batch = self.collate(rows, pad_token_id, "right", model.device, model.dtype)
        batch["position_ids"] = self.positions(model, batch)[0]
        return batch

    def positions(self, model: PreTrainedModel, batch: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids of a padded batch, and each row's next position. Positions count real tokens
        only, so a padded row sees the same positions as it does alone."""
        mask = batch["attention_mask"]
        return (mask.cumsum(-1) - 1).clamp(min=0), mask.sum(-1)

    def step_positions(self, next_position: torch.Tensor) -> torch.Tensor:
        """Position ids of one decoding step, from each row's next position."""
        return next_position.unsqueeze(-1)

    def groups(self, rows: list[Inputs]) -> list[list[int]]:
        """The rows (their indices) that may share a batch in the engine: all of them but in Mllama."""
        return [list(range(len(rows)))]

    def split(self, batch: Inputs) -> list[tuple[torch.Tensor | None, Inputs]]:
        """The forward passes a right-padded batch (model_inputs) takes, each with the batch rows it
        holds: one, (None, batch), but in Mllama. Right padding is what lets a part keep the batch's width."""
        return [(None, batch)]

    def in_parts(self, batch: Inputs, forward: Callable[[Inputs, torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
        """forward(inputs, rows) on each part of split(batch) (rows: the part's batch rows, None for the
        whole batch), the outputs (one per row along the first dimension) put back in batch order."""
        parts = self.split(batch)
        if len(parts) == 1:
            rows, inputs = parts[0]
            return forward(inputs, rows)
        outputs = torch.cat([forward(inputs, rows) for rows, inputs in parts])
        return outputs[torch.argsort(torch.cat([rows for rows, _ in parts]))]

    def step_inputs(self, batch: Inputs, prefill: Any) -> Inputs:
        """What each decoding step passes besides the new token, the attention mask and the cache (one row
        per batch row, selected as rows finish)."""
        return {key: batch[key][:, -1:] for key in self.step_keys & batch.keys()}


@dataclass(frozen=True)
class MultimodalRope(Family):
    """Qwen2-VL and its successors: image tokens get (time, height, width) positions, text tokens
    continue from the largest position before them, so positions run ahead of or behind token counts."""

    def positions(self, model: PreTrainedModel, batch: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        mask = batch["attention_mask"]
        position_ids = self.rope_index(model, batch)
        real = mask.bool().unsqueeze(0).expand_as(position_ids[-3:])
        next_position = position_ids[-3:].masked_fill(~real, -1).amax(dim=(0, 2)) + 1
        return position_ids, next_position

    def step_positions(self, next_position: torch.Tensor) -> torch.Tensor:
        return next_position.view(1, -1, 1).expand(3, -1, -1)

    def rope_index(self, model: PreTrainedModel, batch: Inputs) -> torch.Tensor:
        """The model's own 3-D (or text + 3-D) positions of a padded batch."""
        position_ids, _ = model.model.get_rope_index(
            batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=batch.get("image_grid_thw"),
            attention_mask=batch["attention_mask"],
        )
        return position_ids


@dataclass(frozen=True)
class OmniRope(MultimodalRope):
    """Qwen2.5-Omni's thinker: Qwen2-VL's multimodal rope over images and audio clips, each found by its start
    token (audio tokens advance like text). Its audio inputs are listed one row per clip, like images."""

    def rope_index(self, model: PreTrainedModel, batch: Inputs) -> torch.Tensor:
        features = batch.get("feature_attention_mask")
        position_ids, _ = model.model.get_rope_index(
            batch["input_ids"], image_grid_thw=batch.get("image_grid_thw"), attention_mask=batch["attention_mask"],
            audio_seqlens=None if features is None else features.sum(-1),
        )
        return position_ids


@dataclass(frozen=True)
class GatedCrossAttention(Family):
    """Idefics (Flamingo's design): text layers cross-attend to image features through tanh gates. Its
    processor takes a prompt as text pieces and images in order; the image features computed at prefill
    are passed to every decoding step, since they are not part of the cache."""

    def encode(
        self, processor: ProcessorMixin, text: str, images: list[Image.Image], audio: Sequence[np.ndarray] = ()
    ) -> Inputs:
        if audio:
            raise ValueError(f"this model ({type(processor).__name__}) takes no audio")
        pieces: list[str | Image.Image] = []
        for index, piece in enumerate(text.split(_IDEFICS_IMAGE)):
            if index:
                pieces.append(images[index - 1])
            if piece:
                pieces.append(piece)
        return dict(processor(text=[pieces], return_tensors="pt"))

    def step_inputs(self, batch: Inputs, prefill: Any) -> Inputs:
        inputs = super().step_inputs(batch, prefill)
        features = prefill.image_outputs.last_hidden_state  # [rows * images, tokens, width]
        inputs["image_encoder_embeddings"] = features.view(batch["input_ids"].shape[0], -1, *features.shape[1:])
        return inputs


@dataclass(frozen=True)
class CrossAttentionLayers(Family):
    """Mllama (Llama 3.2 Vision): separate text layers cross-attend to the vision encoder's tiles, gated.

    Rows with different numbers of images never share a forward pass. A token that no image precedes
    attends to none, and Mllama then lets it attend uniformly to every image slot of its row (only the
    layer's MLP output is masked out), padded slots included: a row batched with rows of more images
    would average over their padding, and a row without images, which alone skips the cross-attention
    layers entirely, would not skip them. So the engine decodes each image count as its own batch
    (groups) and a right-padded forward pass runs once per image count (split)."""

    def groups(self, rows: list[Inputs]) -> list[list[int]]:
        counts = [_image_count(row) for row in rows]
        return [[i for i, n in enumerate(counts) if n == count] for count in sorted(set(counts))]

    def split(self, batch: Inputs) -> list[tuple[torch.Tensor | None, Inputs]]:
        if "aspect_ratio_ids" not in batch:
            return [(None, batch)]
        # A padded image slot has aspect ratio id 0; a real image's is 1 or more.
        counts = (batch["aspect_ratio_ids"] != 0).sum(-1)
        if bool((counts == counts[0]).all()):
            return [(None, _drop_image_slots(batch, int(counts[0])))]
        parts = []
        for count in sorted(set(counts.tolist())):
            rows = (counts == count).nonzero().squeeze(-1)
            parts.append((rows, _drop_image_slots({key: value[rows] for key, value in batch.items()}, count)))
        return parts


def _image_count(row: Inputs) -> int:
    return row["pixel_values"].shape[1] if "pixel_values" in row else 0


def _drop_image_slots(batch: Inputs, count: int) -> Inputs:
    """A Mllama batch whose rows all have `count` images, without the padded slots beyond them (and
    without any image input when count is 0: what the processor gives a batch of text-only rows)."""
    if count == 0:
        return {key: value for key, value in batch.items() if key not in _MLLAMA_IMAGE_KEYS}
    trimmed = dict(batch)
    for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        trimmed[key] = batch[key][:, :count]
    trimmed["cross_attention_mask"] = batch["cross_attention_mask"][:, :, :count]
    return trimmed


_MLLAMA_IMAGE_KEYS = frozenset({"pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"})
_IDEFICS_IMAGE = "<image>"
"""Where an image goes in an Idefics prompt: the text the processor replaces by the image's tokens."""

FAMILIES: tuple[Family, ...] = (
    Family("llava", ("llava",)),
    Family("llava-onevision", ("llava_onevision",)),
    Family("gemma3", ("gemma3",), sequence_keys=frozenset({"token_type_ids"})),
    MultimodalRope("qwen2-vl", ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"), sequence_keys=frozenset({"mm_token_type_ids"})),
    OmniRope("qwen2.5-omni", ("qwen2_5_omni_thinker",)),
    Family("idefics3", ("idefics3", "smolvlm"), row_keys=frozenset({"pixel_values", "pixel_attention_mask"})),
    GatedCrossAttention(
        "idefics", ("idefics",), row_keys=frozenset({"pixel_values"}),
        sequence_keys=frozenset({"image_attention_mask"}), step_keys=frozenset({"image_attention_mask"}),
    ),
    CrossAttentionLayers(
        "mllama", ("mllama",), row_keys=frozenset({"pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"}),
        sequence_keys=frozenset({"cross_attention_mask"}), step_keys=frozenset({"cross_attention_mask"}),
    ),
)
_BY_MODEL_TYPE: Mapping[str, Family] = {model_type: family for family in FAMILIES for model_type in family.model_types}


def audio_sampling_rate(processor: ProcessorMixin) -> int | None:
    """The sampling rate the checkpoint's audio feature extractor takes clips at; None for a model without audio."""
    extractor = getattr(processor, "feature_extractor", None)
    return extractor.sampling_rate if isinstance(extractor, SequenceFeatureExtractor) else None


def takes_audio(processor: ProcessorMixin) -> bool:
    """Whether the checkpoint's processor turns audio into model inputs (it has an audio feature extractor)."""
    return audio_sampling_rate(processor) is not None


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def family_of(model_type: str) -> Family:
    """The family of a config's model_type, or UnsupportedModel naming it and the supported ones."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise UnsupportedModel(
            f"model type {model_type!r} is not a supported image-text-to-text family; "
            f"supported: {', '.join(supported_model_types())}"
        ) from None


def _empty_row(template: torch.Tensor, row: Inputs, along_sequence: bool) -> torch.Tensor:
    """A row's zero-image value of a row or sequence input it lacks (it has no images)."""
    leading = [1, row["input_ids"].shape[1]] if along_sequence else [1]
    return template.new_zeros(*leading, *([0] * (template.dim() - len(leading))))


def _pad_to_largest(
    parts: list[torch.Tensor], width: int | None, side: Literal["left", "right"], fill: int
) -> list[torch.Tensor]:
    """Pad every dimension after the first to the largest among parts (dimension 1 to `width` on `side`
    when given, the others at the end)."""
    sizes = [max(part.shape[dim] for part in parts) for dim in range(1, parts[0].dim())]
    if width is not None:
        sizes[0] = width
    padded = []
    for part in parts:
        if list(part.shape[1:]) == sizes:
            padded.append(part)
            continue
        out = part.new_full((part.shape[0], *sizes), fill)
        region = [slice(None)] + [slice(0, n) for n in part.shape[1:]]
        if width is not None and side == "left":
            region[1] = slice(width - part.shape[1], width)
        out[tuple(region)] = part
        padded.append(out)
    return padded
