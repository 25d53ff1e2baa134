"""Helpers shared by the loss functions: dtype promotion and masked means."""
from __future__ import annotations

import torch


def _float32_at_least(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs are promoted: log-sum-exp, softmax, log and BCE on soft targets
    need float32 (under autocast the network's logits are bfloat16/float16, whose 8/11-bit
    mantissas lose the differences of large logits)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _mean_over_valid(per_pixel: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    count = valid.sum()
    if count == 0:  # a batch with every pixel ignored: zero loss that keeps the graph
        return per_pixel.sum() * 0.0
    return (per_pixel * valid).sum() / count
