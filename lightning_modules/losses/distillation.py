"""Output and feature distillation from the old model: MiB's unbiased KD (and, later, LwF's KD, ILT, LwF-MC)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_modules.losses.common import _float32_at_least

__all__ = ["unbiased_knowledge_distillation"]


def unbiased_knowledge_distillation(logits: torch.Tensor, old_logits: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """MiB's unbiased knowledge distillation, as its code computes it.

    With n_old = old_logits.shape[1] (bg included), q = softmax(alpha * old_logits) over the old
    channels, and the new model's
        log p^(bg) = LSE_{k in {0} ∪ new} z_k - LSE_all z_k  (new bg absorbs bg and new classes)
        log p^(c)  = z_c - LSE_all z_k                       for old foreground c = 1..n_old-1,
        L = - mean over all pixels of [ q_0 log p^(bg) + sum_{c=1}^{n_old-1} q_c log p^(c) ] / n_old.
    The division by n_old is in MiB's code (the paper formula has no such normalisation); alpha
    multiplies the old logits (an inverse temperature). Every pixel counts: no masking.
    """
    n_old = old_logits.shape[1]
    if not 0 < n_old < logits.shape[1]:
        raise ValueError(f"old_logits has {n_old} channels; it needs fewer than the new model's {logits.shape[1]}")
    logits, old_logits = _float32_at_least(logits), _float32_at_least(old_logits)
    total = torch.logsumexp(logits, dim=1)
    bg_and_new = torch.cat([logits[:, :1], logits[:, n_old:]], dim=1)
    log_bg = torch.logsumexp(bg_and_new, dim=1) - total
    log_old_fg = logits[:, 1:n_old] - total.unsqueeze(1)
    q = torch.softmax(alpha * old_logits, dim=1)
    per_pixel = (q[:, 0] * log_bg + (q[:, 1:] * log_old_fg).sum(dim=1)) / n_old
    return -per_pixel.mean()
