"""RLOO and GRPO: on-policy updates without a critic, the baseline coming from a prompt's other samples.

Per update: sample k responses to each of some prompts seen in traffic, score them with the reward
model (minus a penalty when no EOS was produced), turn the scores into per-sample advantages with the
registered estimator, and take clipped policy-gradient steps (the episodes' behaviour log-probs are
the importance-sampling denominator, so several epochs over one batch stay correct), plus, with
--learner.sft-weight, an SFT term on users' chosen answers (PPO-ptx).
KL to the reference: RLOO puts -kl_coef * KL into the reward (as TRL's RLOOTrainer); GRPO adds
kl_coef * k3 to the loss (as the GRPO paper and TRL's GRPOTrainer).
"""

from __future__ import annotations

from typing import Any

from modalign.trainer.advantages import ADVANTAGE_ESTIMATORS
from modalign.trainer.algorithms import register_algorithm
from modalign.trainer.algorithms.context import PolicyContext
from modalign.trainer.batches import Prompt
from modalign.trainer.join import PreferencePair
from modalign.trainer.kl import kl_k3
from modalign.trainer.logprobs import token_entropy
from modalign.trainer.losses import ppo_policy_loss
from modalign.trainer.masked import masked_mean
from modalign.trainer.metrics import History, new_history
from modalign.trainer.rewards import kl_penalized_token_rewards
from modalign.trainer.sampling import Episodes


def critic_free_update(ctx: PolicyContext, episodes: Episodes, pairs: list[PreferencePair], estimator: str,
                       kl_in_loss: bool, **estimator_options: Any) -> History:
    config = ctx.config
    k = config.samples_per_prompt
    mask = episodes.batch.response_mask
    kl_coef_in_reward = 0.0 if kl_in_loss else ctx.kl.coef
    token_rewards = kl_penalized_token_rewards(episodes.scores, episodes.kl, mask, kl_coef_in_reward)
    advantages, _ = ADVANTAGE_ESTIMATORS[estimator](token_rewards, mask, samples_per_prompt=k, **estimator_options)

    history = new_history()
    groups = list(range(len(episodes.samples) // k))
    per_minibatch = max(1, config.minibatch_size // k)
    for _ in range(config.policy_epochs):
        ctx.rng.shuffle(groups)  # minibatches of whole groups keep each prompt's samples together
        for start in range(0, len(groups), per_minibatch):
            rows = [g * k + j for g in groups[start:start + per_minibatch] for j in range(k)]
            sub = episodes.batch.select(rows)
            logits = ctx.batches.logits(ctx.policy, sub)
            logprobs = ctx.batches.logprobs_from_logits(logits, sub)
            clipped = ppo_policy_loss(logprobs, episodes.old_logprobs[rows], advantages[rows], sub.response_mask,
                                      config.cliprange)
            loss = clipped.loss
            if kl_in_loss:
                kl = masked_mean(kl_k3(logprobs, episodes.ref_logprobs[rows]), sub.response_mask)
                loss = loss + ctx.kl.coef * kl
            history["policy_loss"].append(loss.item())
            ctx.step(loss + ctx.users_answers_sft(pairs, history))
            history["clip_fraction"].append(clipped.clip_fraction.item())
            history["approx_kl"].append(clipped.approx_kl.item())
            # Entropy of the distribution the episodes were sampled from: at the sampling temperature.
            entropy = token_entropy(logits.detach() / config.sampling_temperature)
            history["entropy"].append(masked_mean(entropy, sub.response_mask).item())
    return history


@register_algorithm("rloo")
def rloo(ctx: PolicyContext, pairs: list[PreferencePair], prompts: list[Prompt]) -> dict[str, float]:
    return ctx.on_policy_updates(prompts, lambda episodes: critic_free_update(ctx, episodes, pairs, "rloo", False))


@register_algorithm("grpo")
def grpo(ctx: PolicyContext, pairs: list[PreferencePair], prompts: list[Prompt]) -> dict[str, float]:
    return ctx.on_policy_updates(prompts, lambda episodes: critic_free_update(
        ctx, episodes, pairs, "grpo", True, scale=ctx.config.grpo_scale_rewards))
