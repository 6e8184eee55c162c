"""Training losses: the reward model's (Bradley-Terry), DPO's, PPO's clipped policy and value losses, and A2C's
unclipped ones.

Per-sequence inputs are [batch]; per-token inputs are [batch, length] with a response mask that is true on
response tokens, and per-token losses are averaged over those tokens only. Log-probs are in nats.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from modalign.trainer.masked import masked_mean


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Reward-model loss, mean over pairs of -log sigmoid(r_chosen - r_rejected - margin).

    chosen_rewards, rejected_rewards: [batch] scalar rewards of the preferred and the other response.
    margin: [batch] or a float, how much better the chosen response must score (as in Llama 2's reward model,
    from graded preferences); none by default. Returns a scalar.
    """
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin
    return -F.logsigmoid(difference).mean()


def preference_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs ([batch] each) whose chosen response scores strictly higher; a tie counts as wrong."""
    return (chosen_rewards > rejected_rewards).float().mean()


class DPOLoss(NamedTuple):
    losses: torch.Tensor
    """[batch] per-pair loss; average it for the training loss."""
    chosen_rewards: torch.Tensor
    """[batch] implicit reward beta * (log pi - log pi_ref) of the chosen response, detached."""
    rejected_rewards: torch.Tensor
    """[batch] the same for the rejected response."""


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> DPOLoss:
    """Direct preference optimisation (Rafailov et al., 2023) from sequence log-probs ([batch] each, see
    `sequence_logprobs`): -log sigmoid(beta * delta), with
    delta = (log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected).
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return DPOLoss(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def chosen_nll(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """The SFT term of RPO (Pang et al., 2024; TRL's DPO loss type "sft"): the negative log-likelihood per
    token of the chosen responses, over the whole batch: -sum(log pi(chosen)) / the chosen tokens. chosen_logps
    are sequence log-probs [batch], chosen_tokens their token counts [batch]."""
    return -chosen_logps.sum() / chosen_tokens.sum().clamp(min=1)


class PolicyLoss(NamedTuple):
    loss: torch.Tensor
    """Scalar clipped surrogate loss to minimise."""
    clip_fraction: torch.Tensor
    """Share of valid tokens whose gradient the clip removed, detached."""
    approx_kl: torch.Tensor
    """Mean over valid tokens of (log pi - log pi_old)^2 / 2, how far the update moved the policy, detached."""


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange: float = 0.2,
) -> PolicyLoss:
    """PPO's clipped surrogate (Schulman et al., 2017): mean over valid tokens of
    max(-A * ratio, -A * clip(ratio, 1 - cliprange, 1 + cliprange)), ratio = exp(logprobs - old_logprobs).

    logprobs: [batch, length] under the policy being trained; old_logprobs: under the policy that sampled the
    tokens; advantages: [batch, length]; response_mask: [batch, length].
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), response_mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), response_mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, response_mask)
    return PolicyLoss(loss, clip_fraction, approx_kl)


class ValueLoss(NamedTuple):
    loss: torch.Tensor
    """Scalar vf_coef * 0.5 * mean over valid tokens of the clipped squared error; add it to the policy loss."""
    clip_fraction: torch.Tensor
    """Share of valid tokens where the clipped error was the larger one, detached."""


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float = 0.2,
    vf_coef: float = 0.1,
) -> ValueLoss:
    """PPO's clipped value loss: the critic may move at most cliprange_value from the values seen at sampling,
    so one batch of noisy returns cannot drag it far.

    values: [batch, length] current predictions; old_values: those at sampling; returns: GAE returns; all
    [batch, length] with response_mask. The squared errors are in the reward's units squared.
    """
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_errors = (values - returns) ** 2
    clipped_errors = (clipped_values - returns) ** 2
    loss = vf_coef * 0.5 * masked_mean(torch.max(unclipped_errors, clipped_errors), response_mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_errors > unclipped_errors).float(), response_mask)
    return ValueLoss(loss, clip_fraction)


def a2c_policy_loss(logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """The advantage actor-critic's policy-gradient loss (Mnih et al., 2016): -mean over valid tokens of A * log pi.

    logprobs: [batch, length] under the policy being trained, which must be the policy that sampled the tokens
    (no ratio corrects for any other); advantages, response_mask: [batch, length]. Its gradient is PPO's clipped
    surrogate's at ratio 1, where the clip is inactive. The advantages are detached: they are constants of the
    update, and a gradient through them would train the critic with the policy's loss.
    """
    return -masked_mean(advantages.detach() * logprobs, response_mask)


def a2c_value_loss(
    values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor, vf_coef: float = 0.1
) -> torch.Tensor:
    """The critic's regression loss: vf_coef * 0.5 * mean over valid tokens of (values - returns)^2, unclipped.

    The 0.5 is PPO's convention (`ppo_value_loss`, TRL's), so one vf_coef weighs the critic alike in both; the
    gradient on each valid value is vf_coef * (value - return) / valid tokens, toward its return. values: [batch,
    length] current predictions; returns: regression targets (GAE returns); both [batch, length] with response_mask.
    """
    return vf_coef * 0.5 * masked_mean((values - returns.detach()) ** 2, response_mask)
