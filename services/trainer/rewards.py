"""Per-token rewards for on-policy RL: a KL penalty on every token and the reward model's score on the last."""

from __future__ import annotations

import torch


def penalize_missing_eos(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract `penalty` from the score of every response that ended without an EOS token (it was cut off).

    scores: [batch] reward-model scores; has_eos: [batch] bool. Returns a new [batch] tensor. Without this a
    policy can learn to ramble to the length limit whenever truncated text happens to score well.
    """
    return torch.where(has_eos, scores, scores - penalty)


def _last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last true entry of each row of a [batch, length] mask, as [batch] int64."""
    valid = mask.bool()
    if not valid.any(dim=-1).all():
        raise ValueError("every response needs at least one valid token")
    length = valid.size(-1)
    return length - 1 - valid.flip(-1).int().argmax(dim=-1)


def kl_penalized_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float = 0.05
) -> torch.Tensor:
    """Per-token rewards: -kl_coef * kl on every valid token, plus the sequence score on the last valid token.

    scores: [batch] reward-model scores of whole responses; kl: [batch, length] per-token KL estimates
    (see `modalign.trainer.kl`); response_mask: [batch, length], true on response tokens (EOS included).
    Returns [batch, length], zero on padding. Summed over a row it is score - kl_coef * sum(kl), the
    KL-regularised return that PPO (through GAE) and RLOO (as a sequence reward) maximise.
    """
    rewards = (-kl_coef * kl).masked_fill(~response_mask.bool(), 0.0)
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, _last_valid_index(response_mask)] += scores
    return rewards
