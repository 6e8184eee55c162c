"""A2C for RLHF: advantage actor-critic (Mnih et al., 2016, the synchronous variant) on PPO's episodes and critic.

Per batch of episodes, everything up to the advantages is PPO's (`critic_advantages`): responses sampled from the
current policy to prompts seen in traffic, scored by the reward model minus the missing-EOS penalty, per-token
rewards -kl_coef * KL(policy || reference) with the score on the last token, the critic's values (the critic
initialised from the reward model), GAE advantages (whitened unless --learner.whiten-advantages false) and returns.
Then ONE gradient step on the whole batch, of the policy loss -mean(A * log pi) over response tokens plus the
critic's vf_coef * 0.5 * mean((V - R)^2): no probability ratio and no clipping of either.

Without a ratio the gradient is right only for the policy that sampled the episodes, hence one step per batch:
--learner.policy-epochs and --learner.minibatch-size do not apply, and a step holds the activations of the whole
batch (--learner.sample-prompts x --learner.samples-per-prompt responses) at once. Like PPO it has no entropy
bonus; it logs the entropy. Log-probs are recomputed at the sampling temperature.
"""

from __future__ import annotations

from modalign.trainer.algorithms import register_algorithm
from modalign.trainer.algorithms.context import PolicyContext
from modalign.trainer.algorithms.ppo import critic_advantages
from modalign.trainer.batches import Prompt
from modalign.trainer.join import PreferencePair
from modalign.trainer.logprobs import token_entropy
from modalign.trainer.losses import a2c_policy_loss, a2c_value_loss
from modalign.trainer.masked import masked_mean
from modalign.trainer.metrics import History, new_history
from modalign.trainer.sampling import Episodes


@register_algorithm("a2c", uses_critic=True)
def a2c(ctx: PolicyContext, pairs: list[PreferencePair], prompts: list[Prompt]) -> dict[str, float]:
    return ctx.on_policy_updates(prompts, lambda episodes: a2c_update(ctx, episodes, pairs))


def a2c_update(ctx: PolicyContext, episodes: Episodes, pairs: list[PreferencePair]) -> History:
    config = ctx.config
    batch, mask = episodes.batch, episodes.batch.response_mask
    _, advantages, returns = critic_advantages(ctx, episodes)

    logits = ctx.batches.logits(ctx.policy, batch)
    logprobs = ctx.batches.logprobs_from_logits(logits, batch)
    policy_loss = a2c_policy_loss(logprobs, advantages, mask)
    value_loss = a2c_value_loss(ctx.values(batch), returns, mask, config.vf_coef)
    history = new_history()
    ctx.step(policy_loss + value_loss + ctx.users_answers_sft(pairs, history), critic=True)
    history["policy_loss"].append(policy_loss.item())
    history["value_loss"].append(value_loss.item())
    # The recomputed log-probs against the sampler's: 0 up to rounding when learner and sampler agree. A2C has no
    # ratio to correct a mismatch, so a rise here means its gradient is for a policy other than the one sampled.
    approx_kl = masked_mean(0.5 * (logprobs.detach() - episodes.old_logprobs) ** 2, mask)
    history["approx_kl"].append(approx_kl.item())
    # Entropy of the distribution the episodes were sampled from: at the sampling temperature.
    entropy = token_entropy(logits.detach() / config.sampling_temperature)
    history["entropy"].append(masked_mean(entropy, mask).item())
    return history
