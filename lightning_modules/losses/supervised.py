"""Supervised segmentation losses on pixel labels: softmax CE, MiB's unbiased CE, per-class BCE."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_modules.losses.common import _float32_at_least, _mean_over_valid

__all__ = ["cross_entropy", "unbiased_cross_entropy", "bce_one_hot"]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Softmax cross-entropy, mean over the non-ignored pixels."""
    logits = _float32_at_least(logits)
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
    logits = _float32_at_least(logits)
    total = torch.logsumexp(logits, dim=1)
    log_bg = torch.logsumexp(logits[:, :n_old], dim=1) - total
    log_new = logits[:, n_old:] - total.unsqueeze(1)
    log_probs = torch.cat([log_bg.unsqueeze(1), log_new], dim=1)  # channel 0 = bg, 1.. = new classes
    valid = labels != ignore_index
    target = torch.where(labels < n_old, torch.zeros_like(labels), labels - n_old + 1).masked_fill(~valid, 0)
    per_pixel = -log_probs.gather(1, target.unsqueeze(1)).squeeze(1)
    return _mean_over_valid(per_pixel, valid)


def bce_one_hot(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """WILSON's step-0 loss (its `--bce`): per-class BCE with logits on one-hot targets,
        L = mean over non-ignored pixels i of  sum_c BCE(z_ic, [y_i = c]).
    Step 1 uses sigmoid(old logits) as targets, so the step-0 model is trained with sigmoids,
    not a softmax. (The official code zeroes ignored pixels but keeps them in the mean; its
    training labels contain no 255, so the two agree.)"""
    logits = _float32_at_least(logits)
    valid = labels != ignore_index
    targets = F.one_hot(labels.masked_fill(~valid, 0), logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
    per_pixel = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(dim=1)
    return _mean_over_valid(per_pixel, valid)
