"""What the gate decides on: the candidate policy measured against the last published one.

Both sample once per prompt, on the same prompts (drawn with a fixed seed) and the same sampling
seeds, so the comparison carries as little sampling noise as the prompts allow. The reward model's
accuracy on held-out pairs says whether its scores can be trusted at all.
"""

from __future__ import annotations

import random

import torch

from modalign.trainer.batches import Prompt, ResponseBatches
from modalign.trainer.join import PreferencePair
from modalign.trainer.metrics import mean
from modalign.trainer.models import Models
from modalign.trainer.reward_learning import RewardLearning
from modalign.trainer.sampling import Sampler, draw_prompts

PROMPT_SEED = 12345
SAMPLING_SEED = 777


@torch.no_grad()
def evaluate_candidate(
    models: Models, sampler: Sampler, reward: RewardLearning, batches: ResponseBatches,
    heldout: list[PreferencePair], prompts: list[Prompt], eval_prompts: int,
) -> dict[str, float]:
    """Held-out RM accuracy, and the candidate's samples against the published version's: reward, its
    gain, KL to the reference (nats per response), length, its ratio, and how often EOS was reached."""
    metrics = reward.heldout_accuracy(heldout)
    chosen = draw_prompts(prompts, eval_prompts, random.Random(PROMPT_SEED))
    if not chosen:
        return metrics
    candidate = sampler.sample(chosen, 1, seed=SAMPLING_SEED)
    published = sampler.sample(chosen, 1, seed=SAMPLING_SEED, model=models.published_policy)
    candidate_reward = reward.score(chosen, candidate).mean().item()
    published_reward = reward.score(chosen, published).mean().item()
    batch = batches.of_samples(chosen, candidate)
    logprobs = batches.logprobs(models.policy, batch)
    ref_logprobs = batches.logprobs(models.reference, batch)
    kl = ((logprobs - ref_logprobs) * batch.response_mask).sum(-1).mean().item()
    candidate_length = mean(len(s.token_ids) for s in candidate)
    published_length = mean(len(s.token_ids) for s in published)
    return metrics | {
        "reward_mean": candidate_reward,
        "reward_gain": candidate_reward - published_reward,
        "kl_to_reference": kl,
        "response_length_mean": candidate_length,
        "length_ratio": candidate_length / max(published_length, 1.0),
        "eos_rate": mean(s.finish_reason == "stop" for s in candidate),
    }
