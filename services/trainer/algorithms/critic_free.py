"""RLOO and GRPO: on-policy updates without a critic, the baseline coming from a prompt's other samples.

Per update: sample k responses to each of some prompts seen in traffic, score them with the reward
model (minus a penalty when no EOS was produced), turn the scores into per-sample advantages with the
registered estimator, and take clipped policy-gradient steps (the rollout's behaviour log-probs are
the importance-sampling denominator, so several epochs over one batch stay correct).
KL to the reference: RLOO puts -kl_coef * KL into the reward (as TRL's RLOOTrainer); GRPO adds
kl_coef * k3 to the loss (as the GRPO paper and TRL's GRPOTrainer).
"""

from __future__ import annotations

from collections import defaultdict

from modalign.trainer.advantages import ADVANTAGE_ESTIMATORS
from modalign.trainer.algorithms import register_algorithm
from modalign.trainer.join import PreferencePair
from modalign.trainer.kl import kl_k3
from modalign.trainer.learner import Learner, Prompt, Rollouts
from modalign.trainer.logprobs import token_entropy
from modalign.trainer.losses import ppo_policy_loss
from modalign.trainer.masked import masked_mean
from modalign.trainer.rewards import kl_penalized_token_rewards


def critic_free_update(learner: Learner, rollouts: Rollouts, estimator: str, kl_in_loss: bool) -> dict[str, list[float]]:
    config = learner.config
    k = config.samples_per_prompt
    mask = rollouts.batch.response_mask
    kl_coef_in_reward = 0.0 if kl_in_loss else config.kl_coef
    token_rewards = kl_penalized_token_rewards(rollouts.scores, rollouts.kl, mask, kl_coef_in_reward)
    advantages, _ = ADVANTAGE_ESTIMATORS[estimator](token_rewards, mask, samples_per_prompt=k)

    history: dict[str, list[float]] = defaultdict(list)
    groups = list(range(len(rollouts.samples) // k))
    per_minibatch = max(1, config.minibatch_size // k)
    for _ in range(config.policy_epochs):
        learner.rank_rng.shuffle(groups)  # minibatches of whole groups keep each prompt's samples together
        for start in range(0, len(groups), per_minibatch):
            rows = [g * k + j for g in groups[start:start + per_minibatch] for j in range(k)]
            sub = rollouts.batch.select(rows)
            logits = learner.response_logits(learner.training_policy, sub)
            logprobs = learner.logprobs_from_logits(logits, sub)
            clipped = ppo_policy_loss(logprobs, rollouts.old_logprobs[rows], advantages[rows], sub.response_mask,
                                      config.cliprange)
            loss = clipped.loss
            if kl_in_loss:
                kl = masked_mean(kl_k3(logprobs, rollouts.ref_logprobs[rows]), sub.response_mask)
                loss = loss + config.kl_coef * kl
            learner.step(loss, (learner.policy, learner.policy_optimizer))
            history["policy_loss"].append(loss.item())
            history["clip_fraction"].append(clipped.clip_fraction.item())
            history["approx_kl"].append(clipped.approx_kl.item())
            # Entropy of the distribution the rollouts were sampled from: at the rollout temperature.
            entropy = token_entropy(logits.detach() / config.rollout_temperature)
            history["entropy"].append(masked_mean(entropy, sub.response_mask).item())
    return history


@register_algorithm("rloo")
def rloo(learner: Learner, pairs: list[PreferencePair], prompts: list[Prompt]) -> dict[str, float]:
    return learner.on_policy_updates(prompts, lambda rollouts: critic_free_update(learner, rollouts, "rloo", False))


@register_algorithm("grpo")
def grpo(learner: Learner, pairs: list[PreferencePair], prompts: list[Prompt]) -> dict[str, float]:
    return learner.on_policy_updates(prompts, lambda rollouts: critic_free_update(learner, rollouts, "grpo", True))
