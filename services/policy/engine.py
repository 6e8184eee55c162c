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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from peft import PeftModel
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin
from transformers.cache_utils import DynamicLayer

from modalign.core.version_names import STARTING_VERSION
from modalign.policy.adapters import BASE, attach
from modalign.policy.families import Family, Inputs, family_of

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
    """A prompt (already formatted, e.g. by model.format_prompt), its images and audio clips, sampled n times.

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
    audio: Sequence[np.ndarray] = ()
    """Audio clips, in the order of the prompt's audio placeholders: mono float samples at the processor's rate."""


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


class _Answer:
    """A request being answered: its candidates as they finish, and whether its callbacks still run."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.samples: list[Sample | None] = [None] * request.n
        self.callbacks_on = request.on_token is not None or request.on_finish is not None


@dataclass
class _Row:
    """Decoding state of one candidate."""

    answer: _Answer
    request_index: int
    """Its request's index among those started together (their prefill rows)."""
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
    """Samples candidates for many requests as one left-padded batch with a KV cache: generate() whole,
    or start(), step() and join() a RunningBatch (continuous batching, batcher.py).

    One thread (e.g. a batcher.DynamicBatcher's worker) decodes at a time; add_adapter and
    remove_adapter may come from another, and wait for the step in progress to end.
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
                if version in self._peft.active_adapters:  # PEFT's active adapter, unused here (adapter_names)
                    self._peft.set_adapter(next(iter(self._adapters)), inference_mode=True)
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
        row = self.family.encode(self.processor, request.prompt_text, request.images, request.audio)
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

    def generate_encoded(
        self, requests: list[GenerationRequest], encoded: list[Inputs]
    ) -> list[list[Sample]]:
        """generate() for requests already passed through encode(): one running batch per group of rows
        the family can batch together (all of them but in Mllama), decoded until every row ends."""
        samples: dict[int, list[Sample]] = {}
        for group in self.family.groups(encoded) if requests else []:
            batch = self.start([requests[i] for i in group], [encoded[i] for i in group])
            while batch.rows:
                for request, candidates in self.step(batch):
                    samples[id(request)] = candidates
        return [samples[id(request)] for request in requests]

    def joinable(self, batch: RunningBatch, encoded: list[Inputs]) -> bool:
        """Whether requests (encoded) may join batch between two of its steps (continuous batching): when
        the family batches them with the batch's rows and every cache layer is a plain one that grows by
        a token a step (not a sliding window or a cross-attention cache, whose shapes do not line up)."""
        return (type(self.family).step_inputs is Family.step_inputs and not self.family.step_keys
                and len(self.family.groups(encoded)) == 1 and batch.cache_joinable)

    @torch.inference_mode()
    def start(self, requests: list[GenerationRequest], encoded: list[Inputs]) -> RunningBatch:
        """A running batch of the requests' candidates (rows the family can batch together), prefilled:
        each distinct prompt once, then each of its n candidates gets a copy of its cache."""
        with self._lock:
            answers = [_Answer(request) for request in requests]
            rows = self._make_rows(answers, encoded)
            logits, cache, attention_mask, next_position, step_inputs = self._prefill(
                encoded, [r.version or self.policy_version for r in requests])
            row_request = torch.tensor([row.request_index for row in rows], device=logits.device)
            cache.batch_select_indices(row_request)
            step_inputs = {key: value[row_request] for key, value in step_inputs.items()}
            return RunningBatch(
                rows, logits[row_request], cache, attention_mask[row_request], next_position[row_request],
                step_inputs, torch.tensor([r.params.temperature for r in rows], device=logits.device),
                torch.tensor([r.params.top_p for r in rows], device=logits.device),
            )

    @torch.inference_mode()
    def join(self, batch: RunningBatch, joining: RunningBatch) -> None:
        """Adds joining's rows (just started) to batch (between two of its steps; see joinable)."""
        with self._lock:
            batch.join(joining)

    @torch.inference_mode()
    def drop(self, batch: RunningBatch, requests: list[GenerationRequest]) -> None:
        """Takes the rows of requests out of batch, between two of its steps, unfinished."""
        with self._lock:
            batch.drop(requests)

    @torch.inference_mode()
    def step(self, batch: RunningBatch) -> list[tuple[GenerationRequest, list[Sample]]]:
        """One decoding step of every row: a token each, finished rows leave. Returns the requests whose
        last candidate finished in this step, with their candidates."""
        with self._lock:
            return self._step(batch)

    def _step(self, batch: RunningBatch) -> list[tuple[GenerationRequest, list[Sample]]]:
        active, logits = batch.rows, batch.logits
        # The uniforms come from per-row CPU generators: a row's stream depends only on its seed,
        # never on its batch companions or on the device.
        uniforms = torch.cat([torch.rand(1, generator=r.generator, dtype=torch.float64) for r in active])
        if not torch.isfinite(logits).all():
            # A diverged model (NaN or inf weights) would otherwise sample arbitrary token ids.
            raise NonFiniteLogits(f"policy {', '.join(sorted({r.version for r in active}))} produced NaN or infinite logits")
        logprobs = sampling_logprobs(mask_unsampleable(logits, self.unsampleable_token_ids), batch.temperature, batch.top_p)
        tokens = draw_tokens(logprobs, batch.temperature <= 0, uniforms.to(logits.device))
        token_logprobs = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

        keep, finished = [], []
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
            answer = row.answer
            if answer.callbacks_on:
                self._stream(row)
            if row.finish_reason is not None:
                sample = self._to_sample(row)
                answer.samples[row.candidate_index] = sample
                if answer.callbacks_on and answer.request.on_finish is not None:
                    self._call(answer.request.on_finish, row, row.candidate_index, sample)
                if all(s is not None for s in answer.samples):
                    finished.append((answer.request, answer.samples))
        batch.keep(keep, tokens)
        if batch.rows:
            out = self._forward(
                [row.version for row in batch.rows],
                input_ids=batch.tokens.unsqueeze(-1),
                attention_mask=batch.attention_mask,
                position_ids=self.family.step_positions(batch.next_position),
                cache=batch.cache,
                use_cache=True,
                logits_to_keep=1,
                **batch.step_inputs,
            )
            batch.stepped(out.logits[:, -1], out.cache)
        return finished  # type: ignore[return-value]  # every candidate of a finished request is filled

    def _make_rows(self, answers: list[_Answer], encoded: list[Inputs]) -> list[_Row]:
        rows = []
        for request_index, (answer, inputs) in enumerate(zip(answers, encoded)):
            request = answer.request
            prompt_ids = inputs["input_ids"][0].tolist()
            base_seed = request.params.seed if request.params.seed is not None else secrets.randbits(63)
            for candidate_index in range(request.n):
                seed = (base_seed + candidate_index) % _SEED_MODULUS
                generator = torch.Generator(device="cpu")
                generator.manual_seed(seed)
                rows.append(_Row(answer, request_index, candidate_index, prompt_ids, request.params, seed, generator,
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

    def _stream(self, row: _Row) -> None:
        request = row.answer.request
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
        self._call(request.on_token, row, row.candidate_index, row.token_ids[-1], delta)

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
    def _call(callback: Callable[..., None], row: _Row, *args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            # A consumer that went away (e.g. a cancelled stream) must not fail the batch it shares.
            log.exception("generation callback failed; dropping the callbacks of its request")
            row.answer.callbacks_on = False


class RunningBatch:
    """Rows decoded together, between two steps: the logits of each row's next token, the KV cache and
    the inputs the next forward pass needs. PolicyEngine.start makes one, step advances it, join adds
    the rows of requests that arrive meanwhile (continuous batching)."""

    def __init__(
        self, rows: list[_Row], logits: torch.Tensor, cache: Any, attention_mask: torch.Tensor,
        next_position: torch.Tensor, step_inputs: Inputs, temperature: torch.Tensor, top_p: torch.Tensor,
    ) -> None:
        self.rows, self.logits, self.cache, self.attention_mask = rows, logits, cache, attention_mask
        self.next_position, self.step_inputs, self.temperature, self.top_p = next_position, step_inputs, temperature, top_p
        self.tokens = torch.empty(0, dtype=torch.long, device=logits.device)
        """Each row's last sampled token: the input of the next forward pass."""

    @property
    def width(self) -> int:
        """Positions in the cache: the longest row's, the others left-padded."""
        return self.attention_mask.shape[1]

    @property
    def cache_joinable(self) -> bool:
        return all(type(layer) is DynamicLayer for layer in getattr(self.cache, "layers", [None]))

    def keep(self, keep: list[int], tokens: torch.Tensor) -> None:
        """After a step's sampling: only the rows at the indices keep go on (finished rows leave: later
        steps compute only for rows still generating), with tokens, the ones just sampled."""
        self.tokens = self._select(keep, tokens)
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(len(self.rows), 1)], dim=-1)

    def drop(self, requests: list[GenerationRequest]) -> None:
        """Between steps: the rows of requests leave, unfinished (their callers went away)."""
        leaving = {id(request) for request in requests}
        self.logits = self._select([i for i, row in enumerate(self.rows) if id(row.answer.request) not in leaving],
                                   self.logits)

    def _select(self, keep: list[int], per_row: torch.Tensor) -> torch.Tensor:
        """Keeps the rows at the indices keep; returns per_row (one entry per row) cut alike."""
        if len(keep) == len(self.rows):
            return per_row
        index = torch.tensor(keep, dtype=torch.long, device=self.logits.device)
        self.cache.batch_select_indices(index)
        self.attention_mask, self.next_position = self.attention_mask[index], self.next_position[index]
        self.temperature, self.top_p = self.temperature[index], self.top_p[index]
        self.step_inputs = {key: value[index] for key, value in self.step_inputs.items()}
        self.rows = [self.rows[i] for i in keep]
        # Positions no remaining row uses (the left padding of rows that left) leave the cache.
        unused = int(self.attention_mask.any(0).long().argmax()) if self.rows else 0
        if unused and self.cache_joinable:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., unused:, :], layer.values[..., unused:, :]
            self.attention_mask = self.attention_mask[:, unused:]
        return per_row[index]

    def stepped(self, logits: torch.Tensor, cache: Any) -> None:
        self.logits, self.cache, self.next_position = logits, cache, self.next_position + 1

    def join(self, other: RunningBatch) -> None:
        """Appends other's rows (a batch just started), left-padding the shorter cache to the longer."""
        width = max(self.width, other.width)
        for layer, joining in zip(self.cache.layers, other.cache.layers, strict=True):
            layer.keys = torch.cat([_left_pad(layer.keys, width), _left_pad(joining.keys, width)])
            layer.values = torch.cat([_left_pad(layer.values, width), _left_pad(joining.values, width)])
        self.attention_mask = torch.cat([_left_pad(self.attention_mask, width), _left_pad(other.attention_mask, width)])
        self.logits = torch.cat([self.logits, other.logits])
        self.next_position = torch.cat([self.next_position, other.next_position])
        self.temperature, self.top_p = torch.cat([self.temperature, other.temperature]), torch.cat([self.top_p, other.top_p])
        self.rows = self.rows + other.rows


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """tensor ([rows, positions] or [rows, heads, positions, dim]) with zeros before its positions up to width."""
    missing = width - (tensor.shape[1] if tensor.dim() == 2 else tensor.shape[-2])
    if missing == 0:
        return tensor
    if tensor.dim() == 2:
        return torch.cat([tensor.new_zeros(tensor.shape[0], missing), tensor], dim=1)
    return torch.cat([tensor.new_zeros(*tensor.shape[:2], missing, tensor.shape[-1]), tensor], dim=-2)


class NonFiniteLogits(RuntimeError):
    """The model's logits contain NaN or inf: nothing can be sampled from them."""
