"""Sampling for on-policy algorithms: responses from the current policy to prompts seen in traffic.

An episode is one sampled response, with what an update needs: the behaviour log-probs it was sampled
with (the importance-sampling denominator), the reference's log-probs, its reward-model score and its
per-token KL to the reference. Each rank samples its own episodes (from its own RNG); every rank
updates or none does.
"""

from __future__ import annotations

import random
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import PreTrainedModel, ProcessorMixin

from modalign.policy.engine import GenerationRequest, PolicyEngine, Sample, SamplingParams
from modalign.policy.model import format_conversation
from modalign.trainer import distributed
from modalign.trainer.batches import Prompt, ResponseBatch, ResponseBatches
from modalign.trainer.distributed import Shards
from modalign.trainer.kl import kl_k1
from modalign.trainer.metrics import History, new_history, summarise
from modalign.trainer.rewards import penalize_missing_eos


@dataclass
class Episodes:
    """Responses sampled from the current policy, with everything an on-policy update needs."""

    prompts: list[Prompt]
    """One per sample: each prompt repeated samples_per_prompt times, consecutively."""
    samples: list[Sample]
    batch: ResponseBatch
    old_logprobs: torch.Tensor
    """[batch, response_length] behaviour log-probs, as sampled."""
    ref_logprobs: torch.Tensor
    scores: torch.Tensor
    """[batch] reward-model scores, minus the missing-EOS penalty."""
    kl: torch.Tensor
    """[batch, response_length] k1 KL estimate to the reference, zero on padding."""


def episode_metrics(episodes: Episodes) -> dict[str, list[float]]:
    return {
        "reward_mean": [episodes.scores.mean().item()],
        "kl": [episodes.kl.sum(-1).mean().item()],
        "response_length_mean": [episodes.batch.response_mask.sum(-1).float().mean().item()],
    }


def behaviour_logprobs(samples: list[Sample], like: torch.Tensor) -> torch.Tensor:
    """The samples' own log-probs [batch, response_length], zero-padded to the shape of `like`."""
    padded = torch.zeros(like.shape, dtype=torch.float32)
    for row, sample in enumerate(samples):
        padded[row, : len(sample.logprobs)] = torch.tensor(sample.logprobs)
    return padded.to(like.device)


def draw_prompts(prompts: list[Prompt], count: int, rng: random.Random) -> list[Prompt]:
    """count prompts drawn with replacement (none when there are no prompts)."""
    return [rng.choice(prompts) for _ in range(count)] if prompts else []


class Sampler:
    """Samples from a policy with the engine the policy service uses, and turns samples into episodes."""

    def __init__(
        self, *, policy: PreTrainedModel, reference: PreTrainedModel, processor: ProcessorMixin,
        batches: ResponseBatches, score: Callable[[list[Prompt], list[Sample]], torch.Tensor], shards: Shards,
        temperature: float, max_new_tokens: int, prompts_per_batch: int, samples_per_prompt: int,
        missing_eos_penalty: float, batches_per_round: int,
        gathered: Callable[[], AbstractContextManager[None]],
    ) -> None:
        self.policy, self.reference, self.processor = policy, reference, processor
        self.batches, self.score, self.shards = batches, score, shards
        self.temperature, self.max_new_tokens = temperature, max_new_tokens
        self.prompts_per_batch, self.samples_per_prompt = prompts_per_batch, samples_per_prompt
        self.missing_eos_penalty, self.batches_per_round = missing_eos_penalty, batches_per_round
        self.gathered = gathered

    def sample(
        self, prompts: list[Prompt], samples_per_prompt: int, seed: int, model: PreTrainedModel | None = None
    ) -> list[Sample]:
        """samples_per_prompt responses to each prompt from model (the policy by default), grouped by
        prompt, with behaviour log-probs."""
        engine = PolicyEngine(model or self.policy, self.processor)
        params = SamplingParams(temperature=self.temperature, top_p=1.0, max_new_tokens=self.max_new_tokens)
        requests = [
            GenerationRequest(
                prompt_text=format_conversation(self.processor, prompt.conversation),
                images=media.images,
                params=SamplingParams(**{**params.__dict__, "seed": seed + index * samples_per_prompt}),
                n=samples_per_prompt,
                audio=media.audio,
            )
            for index, prompt in enumerate(prompts)
            for media in [self.batches.media.of_prompt(prompt)]
        ]
        return [sample for samples in engine.generate(requests) for sample in samples]

    def on_policy_updates(self, prompts: list[Prompt], update: Callable[[Episodes], History]) -> dict[str, float]:
        """batches_per_round times: fresh episodes, then update(episodes). Returns the mean metrics."""
        history = new_history()
        for _ in range(self.batches_per_round):
            # Sampled on whole weights (models.gathered): each rank's responses end when they end.
            with self.gathered():
                episodes = self.collect_episodes(prompts)
            # Every rank updates or none does: a rank with no prompts yet (its view of the generations
            # topic lags) must not leave the others waiting in a gradient all-reduce.
            if not all(distributed.all_gather(episodes is not None)):
                break
            for name, values in (update(episodes) | episode_metrics(episodes)).items():
                history[name] += values
        return summarise(history)

    @torch.no_grad()
    def collect_episodes(self, prompts: list[Prompt]) -> Episodes | None:
        """samples_per_prompt responses to each of prompts_per_batch prompts drawn from traffic, scored."""
        rng = self.shards.rank_rng
        chosen = draw_prompts(prompts, self.prompts_per_batch, rng)
        if not chosen:
            return None
        k = self.samples_per_prompt
        samples = self.sample(chosen, k, seed=rng.getrandbits(31))
        per_sample = [prompt for prompt in chosen for _ in range(k)]
        batch = self.batches.of_samples(per_sample, samples)
        old_logprobs = behaviour_logprobs(samples, like=batch.response_mask)
        ref_logprobs = self.batches.logprobs(self.reference, batch)
        has_eos = torch.tensor([s.finish_reason == "stop" for s in samples], device=batch.response_mask.device)
        scores = penalize_missing_eos(self.score(per_sample, samples), has_eos, self.missing_eos_penalty)
        kl = kl_k1(old_logprobs, ref_logprobs) * batch.response_mask
        return Episodes(per_sample, samples, batch, old_logprobs, ref_logprobs, scores, kl)
