"""MBS (Park et al., ECCV 2024, "Mitigating Background Shift in Class-Incremental Semantic
Segmentation"), its losses as the official code computes them (RoadoneP/ECCV2024_MBS `main.py`,
`utils/loss.py`, `utils/utils.py make_scoremap`; shared/docs/METHODS_others.md §4.3-4.6).

Shapes as in the official code: logits (B, K, H, W) over the K current channels, old_logits
(B, K_old, H, W); labels (B, H, W) channel ids, 255 ignored; patches (B, N, D) on an h x w patch
grid (N = h w); class embeddings (B, K, D).
"""
from __future__ import annotations

import torch

from lightning_modules.losses.common import _float32_at_least

__all__ = ["selective_pseudo_labels", "afd_patch_weights", "adaptive_feature_distillation",
           "label_guided_distillation", "orthogonal_loss"]

IGNORE = 255


def selective_pseudo_labels(old_logits: torch.Tensor, labels: torch.Tensor, threshold: float = 0.7) -> torch.Tensor:
    """MBS's selective pseudo-labels (paper Eqs. 1-3, main.py), with p = softmax(old_logits):
        y' = argmax p   where y = 0, argmax p > 0 and max p >= threshold   (confident old object)
        y' = 255        where y' is still 0 and p_bg < sum_{c >= 1} p_c     (some object: not background)
        y' = y          elsewhere (the step's own labels, 255 kept).
    labels are the step's training labels (old classes are 0 there, so no old-class ground truth
    is ever used)."""
    probabilities = torch.softmax(_float32_at_least(old_logits), dim=1)
    scores, predicted = probabilities.max(dim=1)
    background = labels == 0
    out = torch.where(background & (predicted > 0) & (scores >= threshold), predicted, labels)
    some_object = probabilities[:, 0] < probabilities[:, 1:].sum(dim=1)
    return torch.where((out == 0) & some_object, torch.full_like(out, IGNORE), out)


def afd_patch_weights(old_patch_masks: torch.Tensor, labels_down: torch.Tensor, n_old: int) -> torch.Tensor:
    """The adaptive feature distillation's patch weights (utils.make_scoremap): (B, h, w) from the
    old model's patch-level masks (B, K_old, h, w), after its mask LayerNorm, and the pseudo-labels
    nearest-downsampled to the patch grid (B, h, w):
        w = softmax_c(masks)_bg   on background patches (label 0)
        w = 1                     on old-class patches (1 <= label < n_old: confident pseudo-labels)
        w = 0                     on new-class patches (label >= n_old) and ignored ones (255)."""
    weights = torch.softmax(_float32_at_least(old_patch_masks), dim=1)[:, 0].clamp(0, 1)
    labels_down = labels_down.long()
    old = (labels_down >= 1) & (labels_down < n_old)
    weights = torch.where(old, torch.ones_like(weights), weights)
    return torch.where((labels_down >= n_old) | (labels_down == IGNORE), torch.zeros_like(weights), weights)


def adaptive_feature_distillation(patches: torch.Tensor, old_patches: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_{i,d} w_i (P_id - P_old_id)^2 / (D #{i: w_i > 0}) over the batch (patches (B, N, D),
    weights (B, N)); 0 when no weight is positive (the official code divides by zero there)."""
    patches, old_patches = _float32_at_least(patches), _float32_at_least(old_patches)
    if patches.shape != old_patches.shape or weights.shape != patches.shape[:2]:
        raise ValueError(f"patches {tuple(patches.shape)}, old_patches {tuple(old_patches.shape)} and weights "
                         f"{tuple(weights.shape)} must be (B, N, D), (B, N, D) and (B, N)")
    weights = weights.to(patches.dtype)
    count = (weights > 0).sum() * patches.shape[-1]
    total = ((patches - old_patches) ** 2 * weights[..., None]).sum()
    if count == 0:
        return total * 0.0
    return total / count


def label_guided_distillation(logits: torch.Tensor, old_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MBS's label-guided output distillation (LGKD, Eq. 7; utils/loss.py LabelGuidedOutputDistillation):
    q = softmax(old_logits) zero-padded to the K channels; for every label id c of the batch other
    than 0 and 255, in the code's order (ascending ids), channel c of q becomes [y = c] q_bg (the
    old background probability where the label is c, 0 elsewhere) and q_bg becomes [y != c] q_bg;
        L = - mean over all B H W pixels (255 included) of (1/K) sum_c q_c log softmax(logits)_c.
    `labels` is the step's original ground truth (not the pseudo-labels); lambda applied by the caller.
    As in the code, channel c is overwritten over the whole batch: for a new class (zero-padded in
    q) that is the move above; an old-class id in `labels` (never in the step's training labels,
    where old classes are 0) would also zero that class's teacher probability elsewhere."""
    logits, old_logits = _float32_at_least(logits), _float32_at_least(old_logits)
    log_probabilities = torch.log_softmax(logits, dim=1)
    teacher = torch.softmax(old_logits, dim=1)
    targets = torch.zeros_like(log_probabilities)
    targets[:, : teacher.shape[1]] = teacher
    for c in torch.unique(labels).tolist():
        if c in (0, IGNORE):
            continue
        at_c = (labels == c).to(teacher.dtype)
        targets[:, c] = at_c * teacher[:, 0]
        targets[:, 0] = (1 - at_c) * targets[:, 0]
    return -(log_probabilities * targets).mean(dim=1).mean()


def orthogonal_loss(class_embeddings: torch.Tensor, n_old: int) -> torch.Tensor:
    """MBS's orthogonal objective (utils/loss.py OtrthogonalLoss): with e the L2-normalised class
    embeddings (B, K, D), S_b = e_b e_b^T with the column side detached, its diagonal and the rows
    of the old classes (bg included: rows < n_old) set to 0; L = mean of |S| over its non-zero
    entries (the official code's mask, so an exactly orthogonal pair does not count). The K_new / K
    weight is applied by the caller."""
    e = _float32_at_least(class_embeddings)
    e = e / e.norm(dim=-1, keepdim=True)
    similarity = torch.matmul(e, e.transpose(1, 2).detach())
    keep = ~torch.eye(similarity.shape[-1], dtype=torch.bool, device=similarity.device)
    keep[:n_old] = False
    similarity = similarity * keep
    nonzero = similarity != 0
    if not bool(nonzero.any()):
        return similarity.sum() * 0.0
    return similarity[nonzero].abs().mean()
