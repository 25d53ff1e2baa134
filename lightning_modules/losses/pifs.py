"""PIFS (Cermelli et al., BMVC 2021, "Prototype-based Incremental Few-Shot Semantic Segmentation"),
the weight imprinting it starts from (WI) and AMP's proxy adaptation, as the official code computes
them (fcdl94/FSS `methods/imprinting.py: WeightImprinting, AMP`, `methods/trainer.py`, `utils/loss.py`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_modules.losses.common import _float32_at_least
from lightning_modules.losses.distillation import knowledge_distillation

__all__ = ["imprinting_sums", "imprinted_weights", "prototype_distillation", "mean_feature_sums"]


def imprinting_sums(features: torch.Tensor, labels: torch.Tensor, channels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's share of weight imprinting (the official WI `warm_up_`).

    features (B, D, h, w) are bilinearly upsampled (align_corners=False) to the labels' (B, H, W)
    size, as the official code upsamples its head's output to the image. For every image b and
    requested channel k present in its labels, with P_bk its pixels of class k,
        m_bk = n( sum_{p in P_bk} n(f_p) )     (n: division by the L2 norm over D),
    the direction of the masked mean of the unit features. Returns, in float64,
        sums   (K, D): sum over the images of m_bk,
        images (K,)  : how many images contributed to each channel (int64).
    The imprinted weight is imprinted_weights(sums), whatever the batches or processes were."""
    if features.dim() != 4 or labels.dim() != 3 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"features {tuple(features.shape)} must be (B, D, h, w) and labels {tuple(labels.shape)} "
                         "(B, H, W) of the same batch")
    if features.shape[-2:] != labels.shape[-2:]:
        features = F.interpolate(features, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    features = _float32_at_least(features)
    sums = features.new_zeros(len(channels), features.shape[1], dtype=torch.float64)
    images = torch.zeros(len(channels), dtype=torch.int64, device=features.device)
    unit = F.normalize(features, dim=1)
    for b in range(labels.shape[0]):
        for k, channel in enumerate(channels):
            mask = labels[b] == channel
            if mask.any():
                sums[k] += F.normalize(unit[b][:, mask].sum(dim=1), dim=0).double()
                images[k] += 1
    return sums, images


def mean_feature_sums(features: torch.Tensor, labels: torch.Tensor, num_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's share of AMP's proxy adaptation (the official AMP `warm_up_`): features upsampled
    as in imprinting_sums; for every image b and channel k in 0..num_channels-1 present in its
    labels, the plain mean of its pixels' features (not normalised),
        a_bk = (1 / |P_bk|) sum_{p in P_bk} f_p.
    Returns float64 sums (K, D) over the images and the images per channel (K,) (int64); the
    adapted proxy of k is n(sums_k / images_k)."""
    if features.shape[-2:] != labels.shape[-2:]:
        features = F.interpolate(features, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    features = _float32_at_least(features)
    sums = features.new_zeros(num_channels, features.shape[1], dtype=torch.float64)
    images = torch.zeros(num_channels, dtype=torch.int64, device=features.device)
    for b in range(labels.shape[0]):
        for channel in labels[b].unique().tolist():
            if 0 <= channel < num_channels:
                sums[channel] += features[b][:, labels[b] == channel].mean(dim=1).double()
                images[channel] += 1
    return sums, images


def imprinted_weights(sums: torch.Tensor) -> torch.Tensor:
    """The new classes' cosine-classifier weights from imprinting_sums' totals: w_k = n(sums_k),
    the normalised mean over the shots of their normalised masked means (what the official code
    imprints: `F.normalize(sum_features, dim=1)`)."""
    return F.normalize(sums, dim=1)


def prototype_distillation(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """PIFS's prototype-based distillation (`--loss_kd 10` with `--dist_warm_start`): the
    knowledge distillation of the official `KnowledgeDistillationLoss` (alpha 1) from the teacher
    that the step starts from, the old model with the new classes' imprinted prototypes, so that
    the scores of the old *and* the new classes are distilled. With C channels in both,
        L = - mean over pixels i of (1 / C) sum_c softmax(t_i)_c log softmax(z_i)_c."""
    if teacher_logits.shape != logits.shape:
        raise ValueError(f"the teacher's logits {tuple(teacher_logits.shape)} must cover the same classes as the "
                         f"network's {tuple(logits.shape)} (the imprinted new classes included)")
    return knowledge_distillation(logits, teacher_logits, alpha=1.0)
