"""Per-token estimators of KL(policy || reference) from tokens sampled from the policy.

Each takes the policy's and the reference's log-probs of the sampled tokens ([batch, length], nats) and returns a
per-token estimate of the same shape, following Schulman, "Approximating KL Divergence"
(http://joschu.net/blog/kl-approx.html), with r = p_ref / p_policy:
k1 = -log r (unbiased, high variance, can be negative): the per-token penalty in the reward (PPO, RLOO);
k3 = (r - 1) - log r (unbiased, low variance, >= 0): the penalty GRPO adds to its loss.
"""

from __future__ import annotations

import torch


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log p - log p_ref."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = exp(log r) - 1 - log r with log r = log p_ref - log p. Overflows if log r exceeds ~88 in float32."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - 1 - log_ratio


def adaptive_kl_coef(coef: float, kl: float, target: float, samples: int, horizon: int) -> float:
    """The KL coefficient after one batch, by Ziegler et al. (2019)'s proportional controller.

    coef grows when the measured KL (nats per response) is above target and shrinks when below, by at
    most 20% of samples / horizon per batch, and never by more than 20% in one batch (a batch larger than
    the horizon, as under torchrun, could otherwise flip its sign): a policy that drifts past its KL
    budget is pulled back rather than left there, and one far inside it is let move. samples: responses
    in the batch.
    """
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * min(samples / horizon, 1.0))


class KLController:
    """The KL coefficient on-policy algorithms penalise with: fixed (target 0), or adapted after every
    batch of episodes toward a target KL by adaptive_kl_coef, never below its starting value. The floor
    is there because a policy starts at KL 0: a free controller would spend the first batches shrinking
    the penalty toward nothing, and once the policy did drift past the target the coefficient would
    take many times as long to climb back. Every rank observes the same (gathered) KL, so the
    coefficient stays identical across ranks; it is checkpointed with the models."""

    def __init__(self, coef: float, target: float = 0.0, horizon: int = 10000) -> None:
        self.coef, self.floor, self.target, self.horizon = coef, coef, target, horizon

    def observe(self, kl: float, samples: int) -> None:
        """kl: the batch's mean KL to the reference, nats per response; samples: responses in it."""
        if self.target > 0:
            self.coef = max(self.floor, adaptive_kl_coef(self.coef, kl, self.target, samples, self.horizon))
