"""Batches of prompts with responses, and the log-probabilities a policy gives their response tokens.

Every algorithm and the evaluation read a policy the same way: prompt and response token ids
right-padded into one batch (images alongside), a forward pass, and the logits at the positions that
predict each response token, restricted to the tokens the engine can sample (so importance ratios
between sampled and recomputed log-probs start at exactly 1).
"""

from __future__ import annotations

import io
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable

import torch
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from modalign.core.blobs import BlobStore
from modalign.policy.engine import Sample, mask_unsampleable
from modalign.trainer.join import PreferencePair, Response
from modalign.trainer.logprobs import token_logprobs


@dataclass(frozen=True)
class Prompt:
    """A prompt seen in traffic, to sample responses to."""

    text: str
    image_sha256: tuple[str, ...]


@dataclass
class ResponseBatch:
    """Prompts with responses, right-padded, plus where each response token's logit sits."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    logit_positions: torch.Tensor
    """[batch, response_length]: the position whose logits predict response token j (its index - 1)."""
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    images_per_row: list[int]
    """How many of pixel_values' images belong to each row, in row order."""

    def select(self, rows: list[int]) -> ResponseBatch:
        """The sub-batch of the given rows, with their images."""
        starts = [sum(self.images_per_row[:row]) for row in range(len(self.images_per_row))]
        images = [i for row in rows for i in range(starts[row], starts[row] + self.images_per_row[row])]
        index = torch.tensor(rows, device=self.input_ids.device)
        return ResponseBatch(
            input_ids=self.input_ids[index], attention_mask=self.attention_mask[index],
            pixel_values=self.pixel_values[torch.tensor(images, device=self.input_ids.device)] if images else None,
            logit_positions=self.logit_positions[index], response_ids=self.response_ids[index],
            response_mask=self.response_mask[index], images_per_row=[self.images_per_row[row] for row in rows],
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.pixel_values is not None:
            inputs["pixel_values"] = self.pixel_values
        return inputs


class ImageCache:
    """Decoded images by sha256, from the blob store; the most recently used 1024 are kept."""

    def __init__(self, blobs: BlobStore, capacity: int = 1024) -> None:
        self.blobs = blobs
        self.capacity = capacity
        self._images: OrderedDict[str, Image.Image] = OrderedDict()

    def get(self, shas: Iterable[str]) -> list[Image.Image]:
        return [self._image(sha) for sha in shas]

    def of_prompt(self, prompt: Prompt) -> list[Image.Image]:
        return self.get(prompt.image_sha256)

    def of_pair(self, pair: PreferencePair) -> list[Image.Image]:
        return self.get(ref.sha256 for ref in pair.prompt.images)

    def _image(self, sha256: str) -> Image.Image:
        if sha256 not in self._images:
            self._images[sha256] = Image.open(io.BytesIO(self.blobs.get(sha256))).convert("RGB")
            while len(self._images) > self.capacity:
                self._images.popitem(last=False)
        self._images.move_to_end(sha256)
        return self._images[sha256]


class ResponseBatches:
    """Builds response batches for the policy's processor and reads log-probs off them."""

    def __init__(
        self, processor: ProcessorMixin, images: ImageCache, device: torch.device, pixel_dtype: torch.dtype,
        unsampleable_token_ids: torch.Tensor, sampling_temperature: float,
    ) -> None:
        self.processor = processor
        self.images = images
        self.device = device
        self.pixel_dtype = pixel_dtype
        self.unsampleable_token_ids = unsampleable_token_ids
        self.sampling_temperature = sampling_temperature
        """The default temperature of log-probs: the one responses are sampled at."""

    def build(
        self, prompt_ids: list[list[int]], response_ids: list[list[int]], images: list[list[Image.Image]]
    ) -> ResponseBatch:
        pad = self.processor.tokenizer.pad_token_id
        rows = len(prompt_ids)
        length = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
        width = max(1, max(len(r) for r in response_ids))
        input_ids = torch.full((rows, length), pad, dtype=torch.long)
        attention_mask = torch.zeros((rows, length), dtype=torch.long)
        logit_positions = torch.zeros((rows, width), dtype=torch.long)
        response = torch.full((rows, width), pad, dtype=torch.long)
        response_mask = torch.zeros((rows, width), dtype=torch.bool)
        for row, (prompt, answer) in enumerate(zip(prompt_ids, response_ids)):
            sequence = list(prompt) + list(answer)
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention_mask[row, : len(sequence)] = 1
            logit_positions[row, : len(answer)] = torch.arange(len(prompt) - 1, len(sequence) - 1)
            response[row, : len(answer)] = torch.tensor(answer, dtype=torch.long)
            response_mask[row, : len(answer)] = True
        flat_images = [image for row_images in images for image in row_images]
        pixel_values = (
            self.processor.image_processor(flat_images, return_tensors="pt")["pixel_values"] if flat_images else None
        )
        return ResponseBatch(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
            pixel_values=pixel_values.to(self.device, self.pixel_dtype) if pixel_values is not None else None,
            logit_positions=logit_positions.to(self.device), response_ids=response.to(self.device),
            response_mask=response_mask.to(self.device), images_per_row=[len(row_images) for row_images in images],
        )

    def of_samples(self, prompts: list[Prompt], samples: list[Sample]) -> ResponseBatch:
        """Sampled responses (one prompt per sample), with the token ids the engine produced."""
        return self.build(
            [s.prompt_token_ids for s in samples], [s.token_ids for s in samples],
            [self.images.of_prompt(p) for p in prompts],
        )

    def of_pairs(self, pairs: list[PreferencePair]) -> ResponseBatch:
        """Rows [0, n) the chosen responses of the n pairs, rows [n, 2n) the rejected ones."""
        prompt_ids = [list(p.prompt.prompt_token_ids) for p in pairs] * 2
        answers = [self.token_ids(p.chosen) for p in pairs] + [self.token_ids(p.rejected) for p in pairs]
        return self.build(prompt_ids, answers, [self.images.of_pair(p) for p in pairs] * 2)

    def token_ids(self, response: Response) -> list[int]:
        """A logged response's token ids as generated; an edit's text tokenised, EOS-terminated."""
        if response.token_ids is not None:
            return list(response.token_ids)
        tokenizer = self.processor.tokenizer
        return tokenizer(response.text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]

    def logits(self, model: torch.nn.Module, batch: ResponseBatch) -> torch.Tensor:
        """[batch, response_length, vocab] logits that predict each response token."""
        logits = model(**batch.model_inputs(), use_cache=False).logits
        index = batch.logit_positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
        # The same distribution the engine samples from, so importance ratios start at exactly 1.
        return mask_unsampleable(logits.gather(1, index).float(), self.unsampleable_token_ids)

    def logprobs(self, model: torch.nn.Module | PreTrainedModel, batch: ResponseBatch,
                 temperature: float | None = None) -> torch.Tensor:
        """[batch, response_length] log-probs of the response tokens, at the sampling temperature by default."""
        return self.logprobs_from_logits(self.logits(model, batch), batch, temperature)

    def logprobs_from_logits(
        self, logits: torch.Tensor, batch: ResponseBatch, temperature: float | None = None
    ) -> torch.Tensor:
        """Log-probs of batch's response tokens under logits; 0 on padding (whose pad token is -inf)."""
        temperature = self.sampling_temperature if temperature is None else temperature
        logprobs = token_logprobs(logits, batch.response_ids, temperature=temperature)
        return torch.where(batch.response_mask, logprobs, 0.0)
