"""Log-probabilities and entropies of tokens under a policy's logits."""

from __future__ import annotations

import torch

from modalign.trainer.masked import masked_sum


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability (nats) of each token in `token_ids` under softmax(logits / temperature).

    logits: [..., vocab], where logits[..., t, :] is the distribution that produced token_ids[..., t]: a causal
    LM's output must be shifted by one position first. token_ids: [...] integer. Returns [...].
    Sample and score at the same temperature, or the importance ratios of PPO are off.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


def sequence_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability (nats) of each whole response: token log-probs summed over the tokens `mask` selects.

    logits: [batch, length, vocab] aligned with token_ids as for `token_logprobs`; token_ids, mask: [batch, length].
    Returns [batch]. This is what DPO compares between policy and reference.
    """
    return masked_sum(token_logprobs(logits, token_ids, temperature), mask, dim=-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) at every position: logits [..., vocab] -> [...]."""
    log_probs = torch.log_softmax(logits, dim=-1)
    # Masked-out tokens (logit -inf) have p = 0 and contribute 0, not 0 * -inf = NaN. Their log-prob is zeroed
    # before the product rather than the product after it: torch.where would still send 0 * NaN = NaN back
    # through the unselected branch, so an entropy bonus in a loss would poison every weight.
    finite_log_probs = log_probs.masked_fill(log_probs == float("-inf"), 0.0)
    return -(log_probs.exp() * finite_log_probs).sum(dim=-1)
