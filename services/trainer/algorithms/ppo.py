"""PPO for RLHF (Ouyang et al., 2022; the details as in TRL's PPO and "The N+ Implementation Details
of RLHF with PPO", Huang et al., 2024).

Per update: sample responses to prompts seen in traffic; score each with the reward model at its last
token, minus a penalty when no EOS was produced; per-token rewards are -kl_coef * KL(policy || reference)
with the score added at the last token; the critic (initialised from the reward model) gives values at
every response token; GAE (gamma 1, lambda 0.95) gives advantages and returns; advantages are whitened
over valid tokens; then several epochs of clipped policy loss plus clipped value loss. Log-probs are
recomputed at the rollout temperature, and the rollout's behaviour log-probs are the old log-probs.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from modalign.trainer.advantages import ADVANTAGE_ESTIMATORS
from modalign.trainer.algorithms import register_algorithm
from modalign.trainer.join import PreferencePair
from modalign.trainer.learner import Learner, Prompt, Rollouts
from modalign.trainer.logprobs import token_entropy
from modalign.trainer.losses import ppo_policy_loss, ppo_value_loss
from modalign.trainer.masked import masked_mean, masked_whiten
from modalign.trainer.rewards import kl_penalized_token_rewards


@register_algorithm("ppo")
def ppo(learner: Learner, pairs: list[PreferencePair], prompts: list[Prompt]) -> dict[str, float]:
    return learner.on_policy_updates(prompts, lambda rollouts: ppo_update(learner, rollouts))


def ppo_update(learner: Learner, rollouts: Rollouts) -> dict[str, list[float]]:
    config = learner.config
    batch, mask = rollouts.batch, rollouts.batch.response_mask
    with torch.no_grad():
        old_values = learner.token_values(batch) * mask
    token_rewards = kl_penalized_token_rewards(rollouts.scores, rollouts.kl, mask, config.kl_coef)
    advantages, returns = ADVANTAGE_ESTIMATORS["gae"](token_rewards, mask, old_values, gamma=config.gamma, lam=config.lam)
    if config.whiten_advantages:
        advantages = masked_whiten(advantages, mask)

    history: dict[str, list[float]] = defaultdict(list)
    rows = list(range(len(rollouts.samples)))
    for _ in range(config.policy_epochs):
        learner.rank_rng.shuffle(rows)
        for start in range(0, len(rows), config.minibatch_size):
            picked = rows[start:start + config.minibatch_size]
            sub = batch.select(picked)
            logits = learner.response_logits(learner.training_policy, sub)
            logprobs = learner.logprobs_from_logits(logits, sub)
            policy_loss = ppo_policy_loss(logprobs, rollouts.old_logprobs[picked], advantages[picked],
                                          sub.response_mask, config.cliprange)
            value_loss = ppo_value_loss(
                learner.token_values(sub), old_values[picked], returns[picked], sub.response_mask,
                config.cliprange_value, config.vf_coef,
            )
            learner.step(
                policy_loss.loss + value_loss.loss,
                (learner.policy, learner.policy_optimizer), (learner.value_model, learner.value_optimizer),
            )
            history["policy_loss"].append(policy_loss.loss.item())
            history["value_loss"].append(value_loss.loss.item())
            history["clip_fraction"].append(policy_loss.clip_fraction.item())
            history["value_clip_fraction"].append(value_loss.clip_fraction.item())
            history["approx_kl"].append(policy_loss.approx_kl.item())
            # Entropy of the distribution the rollouts were sampled from: at the rollout temperature.
            entropy = token_entropy(logits.detach() / config.rollout_temperature)
            history["entropy"].append(masked_mean(entropy, sub.response_mask).item())
    return history
