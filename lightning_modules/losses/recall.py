"""RECALL (Maracani et al., ICCV 2021, "RECALL: Replay-based Continual Learning in Semantic
Segmentation"), its label computations as the official code does them (LTTM/RECALL, TensorFlow 1;
shared/docs/METHODS_others.md §3): the "label mixing" (background inpainting) of the new step's
images. RECALL's loss is plain softmax cross-entropy (lightning_modules.losses.cross_entropy).
"""
from __future__ import annotations

import torch

__all__ = ["recall_inpaint_labels"]

IGNORE = 255


def recall_inpaint_labels(labels: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
    """The new step's labels with its background inpainted by the previous model (RECALL's label
    mixing): void (255) first becomes background, then every background pixel takes the previous
    model's argmax (an old class, or background); pixels of the step's new classes keep their label.

        y0 = 0 where y = 255, else y
        y' = argmax_c old_logits_c   where y0 = 0;   y' = y0 elsewhere

    labels (B, H, W): the step's training labels in channel ids (old classes are background there:
    no old-class ground truth is read); old_logits (B, K_old, H, W) at the labels' resolution."""
    if old_logits.dim() != 4 or labels.shape != (old_logits.shape[0], *old_logits.shape[2:]):
        raise ValueError(f"labels {tuple(labels.shape)} and old_logits {tuple(old_logits.shape)} must be "
                         "(B, H, W) and (B, K_old, H, W)")
    background = (labels == 0) | (labels == IGNORE)
    return torch.where(background, old_logits.argmax(dim=1).to(labels.dtype), labels)
