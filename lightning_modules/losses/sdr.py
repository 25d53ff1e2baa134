"""SDR (Michieli & Zanuttigh, CVPR 2021, "Continual Semantic Segmentation via Structure Preserving and
Projected Feature Alignment"), its latent-space terms as the official code computes them (LTTM/SDR
`utils/loss.py`: FeaturesClusteringSeparationLoss, DistillationEncoderPrototypesLoss,
FeaturesSparsificationLoss; `train.py`: `_update_running_stats`; shared/docs/METHODS_others.md §2).

Features are the encoder's output F (B, C, h, w); labels are nearest-downsampled to it with torch's
`mode="nearest"` (not nearest-exact), as the code does.

The official code gathers the features of a class with a boolean mask expanded over the channels
followed by `view`: `features[mask.expand(...)].view(C, -1)` in the prototype update and the
clustering, `.view(-1, C)` in the prototype matching. The mask selects elements in (b, c, h, w)
order, so the first view is the class's (C, N) matrix only when the class is in one image of the
batch (with several, its rows mix channels of different images), and the second never is (it mixes
channels even for one image). The published numbers come from that code, so `legacy=True` (the
default) reproduces it; `legacy=False` gathers each pixel's feature vector as the paper defines it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_modules.losses.common import _float32_at_least

__all__ = ["sdr_downsample_labels", "sdr_prototype_statistics", "sdr_apply_prototype_statistics",
           "sdr_update_prototypes", "sdr_prototype_matching_loss", "sdr_clustering_losses", "sdr_sparsity_loss"]


def sdr_downsample_labels(labels: torch.Tensor, size) -> torch.Tensor:
    """(B, H, W) labels -> (B, 1, h, w), torch's nearest (the code's `F.interpolate(...double(),
    mode="nearest")`)."""
    return F.interpolate(labels.unsqueeze(1).double(), size=tuple(size), mode="nearest").long()


def _class_features(features: torch.Tensor, mask: torch.Tensor, legacy: bool) -> torch.Tensor:
    """(C, N): the features at the N pixels of `mask` (B, 1, h, w); legacy: the code's
    boolean-mask-then-view gather (see the module docstring)."""
    channels = features.shape[1]
    if legacy:
        return features[mask.expand(-1, channels, -1, -1)].view(channels, -1)
    return features.permute(1, 0, 2, 3)[:, mask[:, 0]]


def _present(labels_down: torch.Tensor, drop_first: bool) -> list[int]:
    """The code's class lists: torch.unique, optionally without its first entry (the code's
    "exclude background": the first class present, background only if the batch has any), and
    without 255 when it is the last."""
    present = torch.unique(labels_down)
    if drop_first:
        present = present[1:]
    # The code indexes present[-1] unguarded and stops with an IndexError when nothing is left (a
    # batch whose only class, after the nearest downsampling, was dropped); here: no class.
    if len(present) and present[-1] == 255:
        present = present[:-1]
    return [int(c) for c in present]


def sdr_prototype_statistics(features: torch.Tensor, labels_down: torch.Tensor, num_classes: int,
                             exclude_background: bool = True, legacy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's contribution to the prototypes: (sums (num_classes, C), counts (num_classes,)),
    the per-class sums of the (gathered) features and the numbers of pixels, zero for absent classes.
    Summing contributions is how several processes' batches are applied (in rank order)."""
    features = _float32_at_least(features).detach()
    sums = features.new_zeros(num_classes, features.shape[1])
    counts = torch.zeros(num_classes, dtype=torch.long, device=features.device)
    for cl in _present(labels_down, exclude_background):
        gathered = _class_features(features, labels_down == cl, legacy)
        sums[cl] = gathered.sum(dim=-1)
        counts[cl] = gathered.shape[-1]
    return sums, counts


def sdr_apply_prototype_statistics(prototypes: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor,
                                   batch_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The code's cumulative moving average, per class present in the batch:
        P_c <- (sum_c + n_c P_c) / (n_c + m_c),   n_c <- n_c + m_c."""
    prototypes, counts = prototypes.clone(), counts.clone()
    for cl in torch.nonzero(batch_counts > 0).flatten().tolist():
        prototypes[cl] = (sums[cl] + counts[cl] * prototypes[cl]) / (counts[cl] + batch_counts[cl])
        counts[cl] = counts[cl] + batch_counts[cl]
    return prototypes, counts


def sdr_update_prototypes(features: torch.Tensor, labels_down: torch.Tensor, prototypes: torch.Tensor,
                          counts: torch.Tensor, exclude_background: bool = True,
                          legacy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """SDR's prototypes, updated from one batch (the code's `_update_running_stats`): for every class
    present in labels_down (B, 1, h, w) (without the first class present when exclude_background:
    the code drops `cl_present[0]`, background when the batch has any, its smallest class otherwise;
    without 255), the running mean of its features (gathered as the code, or per pixel with
    legacy=False) and its pixel count. Returns new tensors (prototypes (K, C), counts (K,))."""
    sums, batch_counts = sdr_prototype_statistics(features, labels_down, prototypes.shape[0], exclude_background,
                                                  legacy)
    return sdr_apply_prototype_statistics(prototypes, counts, sums.to(prototypes.dtype), batch_counts)


def sdr_prototype_matching_loss(features: torch.Tensor, old_logits: torch.Tensor, labels: torch.Tensor,
                                prototypes: torch.Tensor, n_old: int, legacy: bool = True) -> torch.Tensor:
    """SDR's prototype matching (`DistillationEncoderPrototypesLoss`, `sumafter`), steps >= 1:
    old-class pixels are the old model's argmax on the background pixels (label 0), both
    nearest-downsampled to the features; for each such class c (without 0), with mu_c the batch mean
    of its features (gathered with the code's `.view(-1, C)` when legacy),
        L = sum_c MSE(mu_c, P_c) / #classes     (P detached)."""
    if old_logits.shape[1] != n_old:
        raise ValueError(f"old_logits has {old_logits.shape[1]} channels, n_old is {n_old}")
    features = _float32_at_least(features)
    size = features.shape[-2:]
    labels_down = sdr_downsample_labels(labels, size)
    old_down = F.interpolate(old_logits.argmax(dim=1, keepdim=True).double(), size=tuple(size), mode="nearest").long()
    pseudo = old_down * (labels_down == 0).long()
    present = [c for c in torch.unique(pseudo).tolist() if c != 0]
    loss = features.sum() * 0.0
    channels = features.shape[1]
    for cl in present:
        mask = pseudo == cl
        if legacy:
            current = features[mask.expand_as(features)].view(-1, channels)
        else:
            current = _class_features(features, mask, legacy=False).T
        loss = loss + F.mse_loss(current.mean(dim=0), prototypes.detach()[cl].to(features.dtype)) / len(present)
    return loss


def sdr_clustering_losses(features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
                          legacy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """SDR's contrastive clustering (`FeaturesClusteringSeparationLoss`, steps >= 1), with labels
    (B, H, W) nearest-downsampled to the features, every class present but 255 (background included):
        attractive: for each class c in turn, L += MSE(F_c, P_c) over its gathered features, then
                    L /= #classes (the code divides the running sum after each class);
        repulsive:  the mean of 1 / ||mu_c - mu_c'|| over the finite entries of the pairwise
                    distances of the batch's class means mu (with gradient; the diagonal's 1/0 is
                    left out), 0 when that mean is NaN (a single class).
    Returns (attractive, repulsive)."""
    features = _float32_at_least(features)
    labels_down = sdr_downsample_labels(labels, features.shape[-2:])
    present = _present(labels_down, drop_first=False)
    attractive = features.sum() * 0.0
    repulsive = features.sum() * 0.0
    local_means = features.new_zeros(prototypes.shape[0], features.shape[1])
    for cl in present:
        gathered = _class_features(features, labels_down == cl, legacy)
        local_means[cl] = gathered.mean(dim=-1)
        target = prototypes[cl].to(features.dtype).unsqueeze(1).expand(-1, gathered.shape[1])
        attractive = attractive + F.mse_loss(gathered, target)
        attractive = attractive / len(present)
    if present:
        reduced = local_means[present]
        inverse = 1 / torch.cdist(reduced.unsqueeze(0), reduced.unsqueeze(0)).squeeze()
        candidate = inverse[~torch.isinf(inverse)].mean()
        if not torch.isnan(candidate):
            repulsive = candidate
    if torch.isnan(attractive):  # the code: `if torch.isnan(lfc): lfc = 0`
        attractive = features.sum() * 0.0
    return attractive, repulsive


def sdr_sparsity_loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SDR's feature sparsification (`FeaturesSparsificationLoss`, normalisation
    `max_maskedforclass`, shrinking `exponential`, loss `ratio`), with labels (B, H, W)
    nearest-downsampled to the features: every pixel's features divided by the maximum over all
    channels and pixels of its class across the batch (+1e-15; 255 is a class of its own;
    background is left out only when it is the only class), then
        L = mean over pixels of  sum_j exp(f_j) / (sum_j f_j + 1e-15),
    and 0 when the normalised features sum to 0."""
    features = _float32_at_least(features)
    labels_down = sdr_downsample_labels(labels, features.shape[-2:])
    classes = torch.unique(labels_down)
    if classes[-1] == 0:
        classes = classes[:-1]
    normalised = torch.zeros_like(features)
    for cl in classes.tolist():
        mask = labels_down == cl
        peak = torch.max(features[mask.expand(-1, features.shape[1], -1, -1)])
        normalised = normalised + (features / (peak + 1e-15)) * mask.to(features.dtype)
    if not normalised.sum() > 0:
        return features.sum() * 0.0
    ratio = torch.exp(normalised).sum(dim=1, keepdim=True) / (normalised.sum(dim=1, keepdim=True) + 1e-15)
    return ratio.mean()
