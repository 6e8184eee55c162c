"""Batches of prompts with responses, and the log-probabilities a policy gives their response tokens.

Every algorithm and the evaluation read a policy the same way: prompt and response token ids
right-padded into one batch (images alongside), a forward pass, and the logits at the positions that
predict each response token, restricted to the tokens the engine can sample (so importance ratios
between sampled and recomputed log-probs start at exactly 1).
"""

from __future__ import annotations

import io
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from modalign.core.audio import AudioLimits, decode_audio
from modalign.core.blobs import BlobStore
from modalign.policy.conversation import Conversation, audio_keys, image_keys, last_user_text, logged, single_question
from modalign.policy.engine import Sample, mask_unsampleable
from modalign.policy.families import Inputs, family_of
from modalign.policy.model import format_conversation
from modalign.trainer.join import PreferencePair, Response
from modalign.trainer.logprobs import token_logprobs
from modalign.v1 import events_pb2


@dataclass(frozen=True)
class Prompt:
    """A prompt seen in traffic, to sample responses to: a whole conversation, images keyed by sha256."""

    conversation: Conversation

    @classmethod
    def question(cls, text: str, image_sha256: tuple[str, ...] = ()) -> Prompt:
        """The single-question shorthand: one user turn, its images, then its text."""
        return cls(single_question(text, image_sha256))

    @classmethod
    def of(cls, generation: events_pb2.GenerationLogged) -> Prompt:
        """The prompt a logged generation answered: its whole conversation."""
        return cls(logged(generation))

    @property
    def text(self) -> str:
        """The last user turn's text."""
        return last_user_text(self.conversation)

    @property
    def image_sha256(self) -> tuple[str, ...]:
        """Every image of the conversation, in order."""
        return tuple(image_keys(self.conversation))

    @property
    def audio_sha256(self) -> tuple[str, ...]:
        """Every audio clip of the conversation, in order."""
        return tuple(audio_keys(self.conversation))


@dataclass
class ResponseBatch:
    """Prompts with responses, right-padded, plus where each response token's logit sits."""

    rows: list[Inputs]
    """Each row's own inputs (prompt then response, unpadded, on the CPU): sub-batches collate from them."""
    inputs: Inputs
    """The model's inputs: the rows collated, with position ids, on the device."""
    logit_positions: torch.Tensor
    """[batch, response_length]: the position whose logits predict response token j (its index - 1)."""
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    collate: Callable[[list[Inputs]], Inputs] = field(repr=False)

    def select(self, rows: list[int]) -> ResponseBatch:
        """The sub-batch of the given rows, with their images."""
        index = torch.tensor(rows, device=self.response_ids.device)
        picked = [self.rows[row] for row in rows]
        return ResponseBatch(
            rows=picked, inputs=self.collate(picked), logit_positions=self.logit_positions[index],
            response_ids=self.response_ids[index], response_mask=self.response_mask[index], collate=self.collate,
        )


@dataclass(frozen=True)
class Media:
    """A prompt's images and audio clips, decoded, each in the order the model reads them."""

    images: list[Image.Image]
    audio: list[np.ndarray]
    """Mono float samples at the processor's sampling rate."""


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class RecentlyUsed(Generic[K, V]):
    """Values by key, each made on its first use; the most recently used are kept while their sizes (1 each,
    or size(value)) add up to at most capacity, the least recently used forgotten first."""

    def __init__(self, capacity: int, size: Callable[[V], int] = lambda _: 1) -> None:
        self.capacity, self._size = capacity, size
        self._values: OrderedDict[K, V] = OrderedDict()
        self._total = 0

    def __len__(self) -> int:
        return len(self._values)

    def get(self, key: K, make: Callable[[], V]) -> V:
        if key in self._values:
            self._values.move_to_end(key)
            return self._values[key]
        value = make()
        self._values[key] = value
        self._total += self._size(value)
        while self._total > self.capacity and self._values:
            self._total -= self._size(self._values.popitem(last=False)[1])
        return value


class MediaCache:
    """Decoded images and audio clips by sha256, from the blob store; the 2 x capacity most recently used,
    images and clips together, are kept. Clips are decoded at sampling_rate, the policy processor's (None: a
    model without audio)."""

    def __init__(self, blobs: BlobStore, sampling_rate: int | None = None, capacity: int = 1024) -> None:
        self.blobs = blobs
        self.sampling_rate = sampling_rate
        self.capacity = capacity
        self._decoded: RecentlyUsed[tuple[str, str], Any] = RecentlyUsed(2 * capacity)

    def of_prompt(self, prompt: Prompt) -> Media:
        return Media([self._get("image", sha) for sha in prompt.image_sha256],
                     [self._get("audio", sha) for sha in prompt.audio_sha256])

    def of_pair(self, pair: PreferencePair) -> Media:
        return self.of_prompt(Prompt.of(pair.prompt))

    def _get(self, kind: str, sha256: str) -> Any:
        return self._decoded.get((kind, sha256), lambda: self._decode(kind, self.blobs.get(sha256)))

    def _decode(self, kind: str, data: bytes) -> Any:
        if kind == "image":
            return Image.open(io.BytesIO(data)).convert("RGB")
        if self.sampling_rate is None:
            raise ValueError("a prompt has audio, but the policy's model takes no audio")
        # Checked when a client sent it; decoded again without the client's limits on length.
        return decode_audio(data, None, self.sampling_rate, AudioLimits(max_bytes=len(data), max_seconds=math.inf)).samples


class ResponseBatches:
    """Builds response batches for the policy's family and processor, and reads log-probs off them."""

    def __init__(
        self, policy: PreTrainedModel, processor: ProcessorMixin, media: MediaCache, device: torch.device,
        unsampleable_token_ids: torch.Tensor, sampling_temperature: float, prompt_cache_size: int = 4096,
    ) -> None:
        self.policy = policy
        """Any model of the policy's family (position ids depend on the architecture, not the weights)."""
        self.processor = processor
        self.family = family_of(policy.config.model_type)
        self.media = media
        self.device = device
        self.unsampleable_token_ids = unsampleable_token_ids
        self.sampling_temperature = sampling_temperature
        """The default temperature of log-probs: the one responses are sampled at."""
        self._prompts: RecentlyUsed[Prompt, Inputs] = RecentlyUsed(prompt_cache_size)

    def encode_prompt(self, prompt: Prompt) -> Inputs:
        """The prompt's row as the engine encodes it (the policy's chat template, its images); recently
        used prompts are kept, since every round reads the same prompts many times."""
        def encode() -> Inputs:
            media = self.media.of_prompt(prompt)
            return self.family.encode(self.processor, format_conversation(self.processor, prompt.conversation),
                                      media.images, media.audio)
        return self._prompts.get(prompt, encode)

    def build(self, prompts: list[Prompt], response_ids: list[list[int]]) -> ResponseBatch:
        rows, prompt_lengths = [], []
        for prompt, answer in zip(prompts, response_ids, strict=True):
            encoded = self.encode_prompt(prompt)
            prompt_lengths.append(encoded["input_ids"].shape[1])
            rows.append(self.family.extend(encoded, list(answer)))
        width = max(1, max(len(r) for r in response_ids))
        logit_positions = torch.zeros((len(rows), width), dtype=torch.long)
        response = torch.full((len(rows), width), self.processor.tokenizer.pad_token_id, dtype=torch.long)
        response_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for row, (length, answer) in enumerate(zip(prompt_lengths, response_ids)):
            logit_positions[row, : len(answer)] = torch.arange(length - 1, length + len(answer) - 1)
            response[row, : len(answer)] = torch.tensor(answer, dtype=torch.long)
            response_mask[row, : len(answer)] = True
        return ResponseBatch(
            rows=rows, inputs=self.collate(rows), logit_positions=logit_positions.to(self.device),
            response_ids=response.to(self.device), response_mask=response_mask.to(self.device), collate=self.collate,
        )

    def collate(self, rows: list[Inputs]) -> Inputs:
        """Rows right-padded into the model's inputs, with their position ids."""
        return self.family.model_inputs(self.policy, rows, self.processor.tokenizer.pad_token_id)

    def of_samples(self, prompts: list[Prompt], samples: list[Sample]) -> ResponseBatch:
        """Sampled responses (one prompt per sample), with the token ids the engine produced."""
        return self.build(prompts, [s.token_ids for s in samples])

    def of_pairs(self, pairs: list[PreferencePair]) -> ResponseBatch:
        """Rows [0, n) the chosen responses of the n pairs, rows [n, 2n) the rejected ones."""
        prompts = [Prompt.of(p.prompt) for p in pairs] * 2
        answers = [self.token_ids(p.chosen) for p in pairs] + [self.token_ids(p.rejected) for p in pairs]
        return self.build(prompts, answers)

    def of_chosen(self, pairs: list[PreferencePair]) -> ResponseBatch:
        """The chosen responses of the pairs, one row each."""
        return self.build([Prompt.of(p.prompt) for p in pairs], [self.token_ids(p.chosen) for p in pairs])

    def pair_width(self, pair: PreferencePair) -> int:
        """Tokens of the pair's longer row (its prompt, then its response): the width it pads a batch to."""
        prompt = self.encode_prompt(Prompt.of(pair.prompt))["input_ids"].shape[1]
        return prompt + max(len(self.token_ids(pair.chosen)), len(self.token_ids(pair.rejected)))

    def token_ids(self, response: Response) -> list[int]:
        """A logged response's token ids as generated; an edit's text tokenised, EOS-terminated."""
        if response.token_ids is not None:
            return list(response.token_ids)
        tokenizer = self.processor.tokenizer
        return tokenizer(response.text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]

    def logits(self, model: torch.nn.Module, batch: ResponseBatch) -> torch.Tensor:
        """[batch, response_length, vocab] logits that predict each response token."""
        def response_logits(inputs: Inputs, rows: torch.Tensor | None) -> torch.Tensor:
            logits = model(**inputs, use_cache=False).logits
            positions = batch.logit_positions if rows is None else batch.logit_positions[rows]
            return logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))

        # The same distribution the engine samples from, so importance ratios start at exactly 1.
        logits = self.family.in_parts(batch.inputs, response_logits)
        return mask_unsampleable(logits.float(), self.unsampleable_token_ids)

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
