"""PPO for RLHF (Ouyang et al., 2022; the details as in TRL's PPO and "The N+ Implementation Details
of RLHF with PPO", Huang et al., 2024).

Per update: sample responses to prompts seen in traffic; score each with the reward model at its last
token, minus a penalty when no EOS was produced; per-token rewards are -kl_coef * KL(policy || reference)
with the score added at the last token; the critic (initialised from the reward model) gives values at
every response token; GAE (gamma 1, lambda 0.95) gives advantages and returns; advantages are whitened
over valid tokens (unless --learner.whiten-advantages false); then several epochs of clipped policy loss
plus clipped value loss (plus, with --learner.sft-weight, an SFT term on users' chosen answers: PPO-ptx).
Log-probs are recomputed at the sampling temperature, and the episodes'
behaviour log-probs are the old log-probs. Everything before the epochs is `critic_advantages`, which A2C
(a2c.py) shares.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from modalign.trainer.advantages import ADVANTAGE_ESTIMATORS
from modalign.trainer.algorithms import register_algorithm
from modalign.trainer.algorithms.context import PolicyContext
from modalign.trainer.batches import Prompt
from modalign.trainer.join import PreferencePair
from modalign.trainer.logprobs import token_entropy
from modalign.trainer.losses import ppo_policy_loss, ppo_value_loss
from modalign.trainer.masked import masked_mean, masked_whiten
from modalign.trainer.metrics import History, new_history
from modalign.trainer.rewards import kl_penalized_token_rewards
from modalign.trainer.sampling import Episodes


@register_algorithm("ppo", uses_critic=True)
def ppo(ctx: PolicyContext, pairs: list[PreferencePair], prompts: list[Prompt]) -> dict[str, float]:
    return ctx.on_policy_updates(prompts, lambda episodes: ppo_update(ctx, episodes, pairs))


class CriticAdvantages(NamedTuple):
    values: torch.Tensor
    """[batch, response_length] the critic's values when the episodes were sampled, zero on padding."""
    advantages: torch.Tensor
    """GAE advantages of the KL-penalised token rewards, whitened over valid tokens unless
    --learner.whiten-advantages false."""
    returns: torch.Tensor
    """Unwhitened advantages plus values: what the critic regresses toward."""


def critic_advantages(ctx: PolicyContext, episodes: Episodes) -> CriticAdvantages:
    """What an actor-critic update (PPO's, A2C's) learns from: the episodes' per-token rewards (-kl_coef * KL on
    every token, the score on the last), the critic's values at sampling, and GAE over them."""
    config = ctx.config
    mask = episodes.batch.response_mask
    with torch.no_grad():
        values = ctx.values(episodes.batch) * mask
    token_rewards = kl_penalized_token_rewards(episodes.scores, episodes.kl, mask, ctx.kl.coef)
    advantages, returns = ADVANTAGE_ESTIMATORS["gae"](token_rewards, mask, values, gamma=config.gamma, lam=config.lam)
    if config.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return CriticAdvantages(values, advantages, returns)


def ppo_update(ctx: PolicyContext, episodes: Episodes, pairs: list[PreferencePair]) -> History:
    config = ctx.config
    batch = episodes.batch
    old_values, advantages, returns = critic_advantages(ctx, episodes)

    history = new_history()
    rows = list(range(len(episodes.samples)))
    for _ in range(config.policy_epochs):
        ctx.rng.shuffle(rows)
        for start in range(0, len(rows), config.minibatch_size):
            picked = rows[start:start + config.minibatch_size]
            sub = batch.select(picked)
            logits = ctx.batches.logits(ctx.policy, sub)
            logprobs = ctx.batches.logprobs_from_logits(logits, sub)
            policy_loss = ppo_policy_loss(logprobs, episodes.old_logprobs[picked], advantages[picked],
                                          sub.response_mask, config.cliprange)
            value_loss = ppo_value_loss(
                ctx.values(sub), old_values[picked], returns[picked], sub.response_mask,
                config.cliprange_value, config.vf_coef,
            )
            ctx.step(policy_loss.loss + value_loss.loss + ctx.users_answers_sft(pairs, history), critic=True)
            history["policy_loss"].append(policy_loss.loss.item())
            history["value_loss"].append(value_loss.loss.item())
            history["clip_fraction"].append(policy_loss.clip_fraction.item())
            history["value_clip_fraction"].append(value_loss.clip_fraction.item())
            history["approx_kl"].append(policy_loss.approx_kl.item())
            # Entropy of the distribution the episodes were sampled from: at the sampling temperature.
            entropy = token_entropy(logits.detach() / config.sampling_temperature)
            history["entropy"].append(masked_mean(entropy, sub.response_mask).item())
    return history
