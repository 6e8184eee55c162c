"""Reductions over the valid entries of a padded batch: every RLHF statistic is taken over real tokens only.

A mask is a bool or 0/1 tensor of the same shape as the values it selects. Padded entries are filled with 0
before reducing, so padding that holds inf or NaN (say, the log-prob of a pad token) cannot leak into a result.
"""

from __future__ import annotations

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is true, over `dim` (all dimensions when None)."""
    selected = values.masked_fill(~mask.bool(), 0.0)
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is true, over `dim` (all dimensions when None).

    An all-padding selection gives 0 rather than NaN, so one empty micro-batch cannot poison a training step.
    """
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased (Bessel-corrected) variance of `values` over all entries where `mask` is true (a scalar)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    count = mask.sum()
    if count < 2:
        raise ValueError(f"an unbiased variance needs at least 2 valid entries, the mask selects {int(count)}")
    return variance * count / (count - 1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalise `values` to zero mean and unit variance, with both statistics taken over valid entries only
    (PPO's advantage whitening, as TRL's). Every entry is transformed, padding included; zero the padding
    afterwards if it must stay 0. 1e-8 is added to the (unbiased) variance.
    """
    mean, variance = masked_mean(values, mask), masked_var(values, mask)
    return (values - mean) * torch.rsqrt(variance + 1e-8)
