"""Losses shared by methods, as plain functions of tensors.

Shapes: logits (B, C, H, W) over the C channels of the current model, in the order
[bg, step-0 classes, step-1 classes, ...]; labels (B, H, W) of channel indices, 255 ignored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _mean_over_valid(per_pixel: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    count = valid.sum()
    if count == 0:  # a batch with every pixel ignored: zero loss that keeps the graph
        return per_pixel.sum() * 0.0
    return (per_pixel * valid).sum() / count


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Softmax cross-entropy, mean over the non-ignored pixels."""
    valid = labels != ignore_index
    per_pixel = F.cross_entropy(logits, labels.masked_fill(~valid, 0), reduction="none")
    return _mean_over_valid(per_pixel, valid)


def unbiased_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, n_old: int, ignore_index: int = 255) -> torch.Tensor:
    """MiB's unbiased cross-entropy (Cermelli et al., CVPR 2020), as its code computes it.

    With LSE the log-sum-exp over channels and channels 0..n_old-1 the old model's (bg included):
        log p~(bg) = LSE_{k < n_old} z_k - LSE_all z_k   (background competes with bg ∪ old classes)
        log p~(c)  = z_c - LSE_all z_k                   for new channels c >= n_old
    every label below n_old counts as background, and
        L = - mean over the non-ignored pixels i of log p~(y_i).
    (MiB's code averages over all pixels; its training labels contain no 255, so the two agree.)
    """
    if not 0 < n_old <= logits.shape[1]:
        raise ValueError(f"n_old={n_old} must be in 1..{logits.shape[1]} (the number of channels)")
    total = torch.logsumexp(logits, dim=1)
    log_bg = torch.logsumexp(logits[:, :n_old], dim=1) - total
    log_new = logits[:, n_old:] - total.unsqueeze(1)
    log_probs = torch.cat([log_bg.unsqueeze(1), log_new], dim=1)  # channel 0 = bg, 1.. = new classes
    valid = labels != ignore_index
    target = torch.where(labels < n_old, torch.zeros_like(labels), labels - n_old + 1).masked_fill(~valid, 0)
    per_pixel = -log_probs.gather(1, target.unsqueeze(1)).squeeze(1)
    return _mean_over_valid(per_pixel, valid)


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
    total = torch.logsumexp(logits, dim=1)
    bg_and_new = torch.cat([logits[:, :1], logits[:, n_old:]], dim=1)
    log_bg = torch.logsumexp(bg_and_new, dim=1) - total
    log_old_fg = logits[:, 1:n_old] - total.unsqueeze(1)
    q = torch.softmax(alpha * old_logits, dim=1)
    per_pixel = (q[:, 0] * log_bg + (q[:, 1:] * log_old_fg).sum(dim=1)) / n_old
    return -per_pixel.mean()
