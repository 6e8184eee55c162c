"""Advantage estimators, registered by name so that adding one is writing one function (as verl does).

Every registered estimator is called as `estimator(token_rewards, response_mask, **options)` with
token_rewards and response_mask of shape [batch, length] (see `modalign.trainer.rewards`) and returns
(advantages, returns), both [batch, length] and zero outside the mask. Batches that hold k samples per prompt
are laid out prompt-major: rows [i * k, (i + 1) * k) are the k samples of prompt i.
"""

from __future__ import annotations

from typing import Callable

import torch

from modalign.trainer.masked import masked_sum
from modalign.trainer.registry import registrar

AdvantageEstimator = Callable[..., tuple[torch.Tensor, torch.Tensor]]
ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}

register_advantage_estimator = registrar(ADVANTAGE_ESTIMATORS, "advantage estimator")
"""Decorator that adds an estimator to ADVANTAGE_ESTIMATORS under a name."""


@register_advantage_estimator("gae")
def gae_advantages_and_returns(
    token_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    values: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) over the response tokens.

    token_rewards, values: [batch, length]; values[:, t] is the critic's estimate at response token t.
    Positions outside response_mask are skipped, not treated as steps: the step after a valid token is the next
    valid token, and the value after the last one is 0 (the episode ends). So right padding, left padding and
    masked-out spans inside a response (say, tool output) are all handled. Returns (advantages, returns) with
    returns = advantages + values, both zero outside the mask. Advantages are not whitened; see `masked_whiten`.
    """
    valid = response_mask.bool()
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages_reversed = []
    for t in reversed(range(token_rewards.size(1))):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        next_advantage = torch.where(valid[:, t], advantage, next_advantage)
        advantages_reversed.append(advantage)
    advantages = torch.stack(advantages_reversed[::-1], dim=1).masked_fill(~valid, 0.0)
    returns = (advantages + values).masked_fill(~valid, 0.0)
    return advantages, returns


def rloo_advantages(scores: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al., 2024): each sample's score minus the mean score of
    the other k - 1 samples of its prompt.

    scores: [num_prompts, k] sequence rewards, k >= 2. Returns [num_prompts, k]; each row sums to zero.
    """
    samples_per_prompt = scores.size(-1)
    if samples_per_prompt < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    baselines = (scores.sum(dim=-1, keepdim=True) - scores) / (samples_per_prompt - 1)
    return scores - baselines


GRPO_REWARD_SCALES = ("group", "batch", "none")


def grpo_advantages(scores: torch.Tensor, eps: float = 1e-4, scale: str = "group") -> torch.Tensor:
    """GRPO advantages (Shao et al., 2024): each score minus its prompt's group mean, divided by a standard
    deviation (the unbiased one, as TRL's): by scale, the group's ("group": the paper's and TRL's default),
    the whole batch's ("batch": Lite PPO, Liu et al., 2025), or none ("none": Dr. GRPO, Liu et al., 2025).
    Dividing by the group's std gives a group whose samples barely differ (noise in the reward model's
    scores) advantages as large as a group whose samples differ in kind; the batch's std keeps them small.

    scores: [num_prompts, k] sequence rewards, k >= 2. Returns [num_prompts, k]. A group whose samples all
    scored the same gets zero advantages: it carries no signal about which sample was better.
    """
    if scores.size(-1) < 2:
        raise ValueError("GRPO needs at least 2 samples per prompt")
    if scale not in GRPO_REWARD_SCALES:
        raise ValueError(f"scale must be one of {GRPO_REWARD_SCALES}, not {scale!r}")
    centred = scores - scores.mean(dim=-1, keepdim=True)
    if scale == "none":
        return centred
    std = scores.std(dim=-1, keepdim=True) if scale == "group" else scores.std()
    return centred / (std + eps)


def reward_to_go(token_rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Undiscounted sum of the rewards from each token to the end of its response: [batch, length], 0 on padding."""
    rewards = token_rewards.masked_fill(~response_mask.bool(), 0.0)
    return rewards.flip(-1).cumsum(-1).flip(-1).masked_fill(~response_mask.bool(), 0.0)


def _outcome_advantages(
    sequence_advantages: Callable[[torch.Tensor], torch.Tensor],
    token_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    samples_per_prompt: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a critic-free estimator on each response's total reward and give every token its response's advantage.

    The returns are the reward-to-go, the Monte-Carlo return a critic would be fitted to.
    """
    scores = masked_sum(token_rewards, response_mask, dim=-1).view(-1, samples_per_prompt)
    advantages = sequence_advantages(scores).reshape(-1, 1).expand_as(token_rewards)
    return advantages.masked_fill(~response_mask.bool(), 0.0), reward_to_go(token_rewards, response_mask)


@register_advantage_estimator("rloo")
def rloo_token_advantages(
    token_rewards: torch.Tensor, response_mask: torch.Tensor, samples_per_prompt: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rloo_advantages` of each response's summed reward, broadcast over its tokens (batch = prompts * k)."""
    return _outcome_advantages(rloo_advantages, token_rewards, response_mask, samples_per_prompt)


@register_advantage_estimator("grpo")
def grpo_token_advantages(
    token_rewards: torch.Tensor, response_mask: torch.Tensor, samples_per_prompt: int, eps: float = 1e-4,
    scale: str = "group",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`grpo_advantages` of each response's summed reward, broadcast over its tokens (batch = prompts * k)."""
    return _outcome_advantages(
        lambda scores: grpo_advantages(scores, eps, scale), token_rewards, response_mask, samples_per_prompt
    )
