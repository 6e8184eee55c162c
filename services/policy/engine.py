"""Batched sampling from the policy with exact behaviour log-probs (batcher.py merges a server's
concurrent requests into these batches).

One engine may serve several versions on one copy of the weights: its own (the base) and LoRA adapter
versions added beside it (add_adapter); each request names its version, and a batch mixes rows of
different versions, each row through its own adapter (PEFT's mixed-batch forward).

Every sampled token comes with its log-probability under the distribution it was actually drawn from
(temperature, then top_p truncation). The trainer divides by these for importance ratios, so they
must be exact rather than re-derived later from a model that may have moved on.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from peft import PeftModel
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from modalign.core.version_names import STARTING_VERSION
from modalign.policy.adapters import BASE, attach
from modalign.policy.families import Inputs, family_of

log = logging.getLogger(__name__)

_SEED_MODULUS = 2**64  # torch generators take 64-bit seeds; candidate seeds wrap around


@dataclass
class SamplingParams:
    """How to sample. temperature 0 means greedy decoding; top_p 1 means no truncation."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int | None = None  # None: a random seed; candidate i uses seed + i
    stop: tuple[str, ...] = ()
    """Texts that end a candidate where they first appear: its text stops before the stop text, its
    token_ids end with the token that completed it (as vLLM's do), and it finishes with "stop"."""


@dataclass
class Sample:
    """One generated candidate.

    logprobs[j] is the log-probability (nats) of token_ids[j] under the distribution it was sampled
    from: log_softmax(logits / temperature) restricted to the top_p nucleus and renormalised; for greedy
    decoding, the untempered log_softmax. token_ids include the EOS token when one was produced; text
    excludes special tokens. seed is the one this candidate was sampled with (request seed + index),
    so a generation can be replayed; policy_version names the version that produced it.
    """

    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: Literal["stop", "length"]
    seed: int
    policy_version: str


@dataclass
class GenerationRequest:
    """A prompt (already formatted, e.g. by model.format_prompt) and its images, sampled n times.

    Callbacks run on the generating thread, in token order per candidate; keep them short (hand off to
    a queue). on_token(candidate_index, token_id, text_delta): the deltas of a candidate concatenate to
    its final text; text held back while a multi-byte character is incomplete is released by a later
    token, at the latest by the candidate's last one. on_finish(candidate_index, sample) is called as
    soon as that candidate stops. If a callback raises, it is logged and that request's callbacks are
    dropped; its generation and every other request's carry on.
    """

    prompt_text: str
    images: list[Image.Image]
    params: SamplingParams
    n: int = 1
    on_token: Callable[[int, int, str], None] | None = None
    on_finish: Callable[[int, Sample], None] | None = None
    version: str = ""
    """The version to sample from: the engine's own (empty) or one of its adapters (PolicyEngine.versions)."""


class PromptTooLong(ValueError):
    """A request whose prompt and new tokens would not fit the model's context; says by how much."""


def unsampleable_token_ids(tokenizer: Any, eos_token_ids: frozenset[int]) -> list[int]:
    """Special tokens a response must never contain: image placeholders, padding, BOS, role markers.

    A sampled "<image>" would be read as an image slot on the next forward pass and break it. Only the
    end-of-sequence tokens stay sampleable.
    """
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_encoder.values())
    return sorted(special - set(eos_token_ids))


def mask_unsampleable(logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """logits with the given tokens at -inf; the policy's distribution for sampling and for training."""
    if not token_ids:
        return logits
    return logits.index_fill(-1, torch.tensor(token_ids, device=logits.device), float("-inf"))


def sampling_logprobs(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the distribution each row samples from, shape (rows, vocab), float32.

    Rows with temperature 0 (greedy) get the untempered log_softmax. Otherwise logits are divided by
    the row's temperature and, when top_p < 1, restricted to the smallest set of most probable tokens
    whose mass reaches top_p (ties broken towards the lower token id), then renormalised; tokens
    outside the nucleus get -inf.
    """
    logits = logits.float()
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, 1.0, temperature).unsqueeze(-1)
    truncate = (top_p < 1) & ~greedy
    if truncate.any():
        probs = torch.softmax(scaled, dim=-1)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        # The most probable token always stays: its mass_before is 0 < top_p.
        keep_sorted = mass_before < top_p.unsqueeze(-1)
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        keep |= ~truncate.unsqueeze(-1)  # rows with top_p = 1 keep every token, exactly
        scaled = scaled.masked_fill(~keep, float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


def draw_tokens(logprobs: torch.Tensor, greedy: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Pick one token per row: argmax for greedy rows, else inverse-CDF sampling with the row's uniform.

    Inverse-CDF with a pre-drawn uniform (rather than torch.multinomial) lets every row use its own
    random stream while the arithmetic stays one batched operation.
    """
    probs = logprobs.double().exp()
    cdf = torch.cumsum(probs, dim=-1)
    total = cdf[:, -1:]
    # Strictly below the total, so the first cdf entry above the target is a token with mass.
    target = torch.minimum(uniforms.to(cdf).unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
    sampled = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return torch.where(greedy, logprobs.argmax(dim=-1), sampled)


@dataclass
class _Row:
    """Decoding state of one candidate."""

    request_index: int
    candidate_index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    generator: torch.Generator
    version: str
    token_ids: list[int]
    logprobs: list[float]
    emitted_text: str = ""
    finish_reason: Literal["stop", "length"] | None = None
    stopped_text: str | None = None
    """The text up to a stop text that ended the row; None: the decoded tokens are the text."""


class PolicyEngine:
    """Samples candidates for many requests as one left-padded batch with a KV cache.

    One thread (e.g. a batcher.DynamicBatcher's worker) calls generate at a time; add_adapter and
    remove_adapter may come from another, and wait for the batch in progress to end.
    """

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, policy_version: str = STARTING_VERSION) -> None:
        self.model = model.eval()
        self._peft: PeftModel | None = None
        """The model with its adapters, once one is added: forward passes go through it to pick each row's."""
        self._adapters: set[str] = set()
        self._lock = threading.Lock()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.family = family_of(model.config.model_type)
        self.policy_version = policy_version
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos_ids)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(eos_ids)
        self.unsampleable_token_ids = unsampleable_token_ids(self.tokenizer, self.eos_token_ids)
        self.max_positions: int = model.config.get_text_config().max_position_embeddings

    @property
    def versions(self) -> frozenset[str]:
        """Every version this engine serves: its own and its adapters'."""
        return frozenset({self.policy_version, *self._adapters})

    def add_adapter(self, version: str, folder: Path) -> None:
        """Serves version, the LoRA adapter version in folder (adapters.py), beside the others on the
        same weights; a hot load, the base is not read again. Raises AdapterMismatch if it does not fit."""
        with self._lock:
            if version in self.versions:
                raise ValueError(f"{version} is already served by this engine")
            self._peft = attach(self._peft or self.model, version, folder)
            self._adapters.add(version)

    def remove_adapter(self, version: str) -> None:
        """Stops serving an adapter version (a request for it fails from now on)."""
        with self._lock:
            if version not in self._adapters:
                return
            assert self._peft is not None
            self._adapters.discard(version)
            if self._adapters:
                self._peft.delete_adapter(version)
            else:  # the last one: back to the plain model, no adapter layers left in it
                self._peft.unload()
                self._peft = None

    def _forward(self, rows: list[str], **inputs: Any) -> Any:
        """The model's forward pass, each row through its version's adapter (none for the base's rows)."""
        if self._peft is None:
            return self.model(**inputs)
        return self._peft(**inputs, adapter_names=[BASE if v == self.policy_version else v for v in rows])

    def encode(self, request: GenerationRequest) -> Inputs:
        """Validate a request and run the processor on it (image placeholders expanded), on the CPU."""
        params = request.params
        if request.version and request.version not in self.versions:
            raise ValueError(f"this engine serves {sorted(self.versions)}, not {request.version}")
        if request.n < 1:
            raise ValueError(f"n must be at least 1, got {request.n}")
        if not (params.temperature >= 0 and params.temperature != float("inf")):
            raise ValueError(f"temperature must be finite and >= 0, got {params.temperature}")
        if not 0 < params.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {params.max_new_tokens}")
        row = self.family.encode(self.processor, request.prompt_text, request.images)
        length = row["input_ids"].shape[1]
        if length + params.max_new_tokens > self.max_positions:
            raise PromptTooLong(
                f"the prompt is {length} tokens, which with max_new_tokens {params.max_new_tokens} exceeds the "
                f"model's context of {self.max_positions} tokens"
            )
        return row

    def generate(self, requests: list[GenerationRequest]) -> list[list[Sample]]:
        """Sample request.n candidates for every request; returns them per request, in order."""
        return self.generate_encoded(requests, [self.encode(request) for request in requests])

    @torch.inference_mode()
    def generate_encoded(
        self, requests: list[GenerationRequest], encoded: list[Inputs]
    ) -> list[list[Sample]]:
        """generate() for requests already passed through encode()."""
        if not requests:
            return []
        with self._lock:
            return self._generate_groups(requests, encoded)

    def _generate_groups(self, requests: list[GenerationRequest], encoded: list[Inputs]) -> list[list[Sample]]:
        groups = self.family.groups(encoded)
        if len(groups) > 1:  # rows the family cannot batch together (Mllama's image counts): one batch each
            samples: list[list[Sample]] = [[] for _ in requests]
            for group in groups:
                for index, candidates in zip(group, self._generate([requests[i] for i in group], [encoded[i] for i in group])):
                    samples[index] = candidates
            return samples
        return self._generate(requests, encoded)

    def _generate(self, requests: list[GenerationRequest], encoded: list[Inputs]) -> list[list[Sample]]:
        """Sample every request's candidates as one batch."""
        rows = self._make_rows(requests, encoded)
        callbacks_on = [r.on_token is not None or r.on_finish is not None for r in requests]
        samples: list[list[Sample | None]] = [[None] * r.n for r in requests]

        # Prefill each distinct prompt once, then give each of its n candidates a copy of its cache.
        logits, cache, attention_mask, next_position, step_inputs = self._prefill(
            encoded, [r.version or self.policy_version for r in requests])
        row_request = torch.tensor([row.request_index for row in rows], device=logits.device)
        cache.batch_select_indices(row_request)
        logits, attention_mask, next_position = logits[row_request], attention_mask[row_request], next_position[row_request]
        step_inputs = {key: value[row_request] for key, value in step_inputs.items()}

        active = rows
        temperature = torch.tensor([r.params.temperature for r in active], device=logits.device)
        top_p = torch.tensor([r.params.top_p for r in active], device=logits.device)
        while True:
            # The uniforms come from per-row CPU generators: a row's stream depends only on its seed,
            # never on its batch companions or on the device.
            uniforms = torch.cat([torch.rand(1, generator=r.generator, dtype=torch.float64) for r in active])
            if not torch.isfinite(logits).all():
                # A diverged model (NaN or inf weights) would otherwise sample arbitrary token ids.
                raise NonFiniteLogits(f"policy {', '.join(sorted({r.version for r in active}))} produced NaN or infinite logits")
            logprobs = sampling_logprobs(mask_unsampleable(logits, self.unsampleable_token_ids), temperature, top_p)
            tokens = draw_tokens(logprobs, temperature <= 0, uniforms.to(logits.device))
            token_logprobs = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

            keep = []
            for i, (row, token, token_logprob) in enumerate(zip(active, tokens.tolist(), token_logprobs.tolist())):
                row.token_ids.append(token)
                row.logprobs.append(token_logprob)
                if token in self.eos_token_ids:
                    row.finish_reason = "stop"
                elif row.params.stop and (text := self._until_stop(row)) is not None:
                    row.finish_reason, row.stopped_text = "stop", text
                elif len(row.token_ids) >= row.params.max_new_tokens:
                    row.finish_reason = "length"
                else:
                    keep.append(i)
                if callbacks_on[row.request_index]:
                    self._stream(requests[row.request_index], row, callbacks_on)
                if row.finish_reason is not None:
                    sample = self._to_sample(row)
                    samples[row.request_index][row.candidate_index] = sample
                    if callbacks_on[row.request_index] and requests[row.request_index].on_finish is not None:
                        self._call(requests[row.request_index].on_finish, callbacks_on, row, row.candidate_index, sample)
            if not keep:
                break
            if len(keep) < len(active):
                # Finished rows leave the batch: later steps compute only for rows still generating.
                index = torch.tensor(keep, device=logits.device)
                cache.batch_select_indices(index)
                attention_mask, next_position, tokens = attention_mask[index], next_position[index], tokens[index]
                temperature, top_p = temperature[index], top_p[index]
                step_inputs = {key: value[index] for key, value in step_inputs.items()}
                active = [active[i] for i in keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(active), 1)], dim=-1)
            out = self._forward(
                [row.version for row in active],
                input_ids=tokens.unsqueeze(-1),
                attention_mask=attention_mask,
                position_ids=self.family.step_positions(next_position),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
                **step_inputs,
            )
            logits, cache, next_position = out.logits[:, -1], out.cache, next_position + 1
        return samples  # type: ignore[return-value]  # every row finished, so every slot is filled

    def _make_rows(self, requests: list[GenerationRequest], encoded: list[Inputs]) -> list[_Row]:
        rows = []
        for request_index, (request, inputs) in enumerate(zip(requests, encoded)):
            prompt_ids = inputs["input_ids"][0].tolist()
            base_seed = request.params.seed if request.params.seed is not None else secrets.randbits(63)
            for candidate_index in range(request.n):
                seed = (base_seed + candidate_index) % _SEED_MODULUS
                generator = torch.Generator(device="cpu")
                generator.manual_seed(seed)
                rows.append(_Row(request_index, candidate_index, prompt_ids, request.params, seed, generator,
                                 request.version or self.policy_version, [], []))
        return rows

    def _prefill(self, encoded: list[Inputs], versions: list[str]) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor, Inputs]:
        """Run the prompts (one row each, left-padded so each ends where generation continues) through
        the model; return last-position logits, the cache, the attention mask, each row's next position
        and the inputs every decoding step needs."""
        batch = self.family.collate(encoded, self.pad_token_id, "left", self.model.device, self.model.dtype)
        position_ids, next_position = self.family.positions(self.model, batch)
        out = self._forward(versions, **batch, position_ids=position_ids, use_cache=True, logits_to_keep=1)
        step_inputs = self.family.step_inputs(batch, out)
        return out.logits[:, -1], out.cache, batch["attention_mask"], next_position, step_inputs

    def _decode(self, token_ids: list[int]) -> str:
        # No clean-up of spaces: it rewrites earlier text (" ," -> ","), so a prefix's decoding would
        # stop being a prefix of the whole decoding and streamed deltas would not add up.
        return self.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _until_stop(self, row: _Row) -> str | None:
        """The row's text before the first stop text in it, or None when there is none yet."""
        text = self._decode(row.token_ids)
        found = [index for stop in row.params.stop if (index := text.find(stop)) >= 0]
        return text[: min(found)] if found else None

    def _text(self, row: _Row) -> str:
        return row.stopped_text if row.stopped_text is not None else self._decode(row.token_ids)

    def _stream(self, request: GenerationRequest, row: _Row, callbacks_on: list[bool]) -> None:
        if request.on_token is None:
            return
        text = self._text(row)
        if row.finish_reason is None and row.params.stop:
            # Text that may yet turn out to be the start of a stop text is held back until it is not.
            held = max((n for stop in row.params.stop for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
            text = text[: len(text) - held]
        if row.finish_reason is None and (text.endswith("\ufffd") or not text.startswith(row.emitted_text)):
            # An incomplete UTF-8 sequence (or a decoding that will still change): wait for more tokens.
            delta = ""
        else:
            delta = text[len(row.emitted_text) :]
            row.emitted_text = text
        self._call(request.on_token, callbacks_on, row, row.candidate_index, row.token_ids[-1], delta)

    def _to_sample(self, row: _Row) -> Sample:
        assert row.finish_reason is not None
        return Sample(
            prompt_token_ids=row.prompt_token_ids,
            token_ids=row.token_ids,
            logprobs=row.logprobs,
            text=self._text(row),
            finish_reason=row.finish_reason,
            seed=row.seed,
            policy_version=row.version,
        )

    @staticmethod
    def _call(callback: Callable[..., None], callbacks_on: list[bool], row: _Row, *args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            # A consumer that went away (e.g. a cancelled stream) must not fail the batch it shares.
            log.exception("generation callback failed; dropping callbacks of request %d", row.request_index)
            callbacks_on[row.request_index] = False


class NonFiniteLogits(RuntimeError):
    """The model's logits contain NaN or inf: nothing can be sampled from them."""
