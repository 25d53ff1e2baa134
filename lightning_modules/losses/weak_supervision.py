"""Learning from image-level labels: WILSON's localizer terms, nGWP + focal scores and PAMR (from
Single-Stage, Araslanov & Roth 2020, which the image-label baselines reuse)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_modules.losses.common import _float32_at_least

__all__ = ["ngwp_focal_scores", "masked_localizer_probabilities", "wilson_targets", "pamr", "pseudo_label_masks",
           "balanced_self_training_loss", "soft_segmentation_bce", "pseudo_mask_bce"]


# --- WILSON (Cermelli et al., CVPR 2022), as its official code computes it ------------------
# (shared/docs/METHODS_wilson_mib.md §3). Every step-1 term works at feature resolution.
def ngwp_focal_scores(logits: torch.Tensor) -> torch.Tensor:
    """Image-level class scores of WILSON's localizer: normalised global weighted pooling plus
    the focal penalty (from Single-Stage, Araslanov & Roth 2020), for every channel of (B, C, H, W):
        m_ic = softmax_c(z_i)
        s_c  = sum_i m_ic z_ic / (1 + sum_i m_ic)  +  (1 - mean_i m_ic)^3 * log(0.01 + mean_i m_ic)
    The official code uses 1 in the nGWP denominator where the paper says "a small constant";
    gamma = 3 and lambda = 0.01 as in both. Returns (B, C)."""
    logits = _float32_at_least(logits)
    z = logits.flatten(2)
    m = torch.softmax(z, dim=1)
    ngwp = (m * z).sum(dim=-1) / (1.0 + m.sum(dim=-1))
    mean_mass = m.mean(dim=-1)
    return ngwp + (1.0 - mean_mass) ** 3 * torch.log(0.01 + mean_mass)


def masked_localizer_probabilities(localizer_logits: torch.Tensor, n_old: int, new_labels: torch.Tensor) -> torch.Tensor:
    """softmax over all channels of the localizer, then every old foreground channel and every
    absent new class set to 0 (background kept). Not renormalised, as in the official code."""
    batch, channels = localizer_logits.shape[:2]
    if new_labels.shape != (batch, channels - n_old):
        raise ValueError(f"new_labels has shape {tuple(new_labels.shape)}; expected ({batch}, {channels - n_old}): "
                         f"one entry per new class of the {channels}-channel localizer with {n_old} old channels")
    probabilities = torch.softmax(_float32_at_least(localizer_logits), dim=1)
    keep = torch.cat([probabilities.new_ones(batch, 1), probabilities.new_zeros(batch, n_old - 1),
                      new_labels.to(probabilities.dtype)], dim=1)
    return probabilities * keep[:, :, None, None]


def wilson_targets(old_logits: torch.Tensor, localizer_logits: torch.Tensor, new_labels: torch.Tensor,
                   alpha: float = 0.5) -> torch.Tensor:
    """WILSON's soft segmentation targets (Eq. 6-7 as coded), (B, C, H, W).

    old_logits (B, n_old, H, W) with n_old counting background; localizer_logits (B, C, H, W)
    from the localizer in eval mode; new_labels (B, C - n_old), the multi-hot of the new classes.
        m    = softmax(localizer) with old foreground channels and absent new classes zeroed
               (background kept, not renormalised)
        h_c  = 1 where m_c equals the channel maximum (the argmax, ties all set), else 0;
               with the masking the argmax runs over {bg} ∪ present new classes, where the paper
               writes argmax over all classes
        q    = alpha h + (1 - alpha) m
        T_c  = sigmoid(old_c) for old foreground c;  T_c = q_c for new c;
        T_bg = min(sigmoid(old_bg), q_bg).
    """
    n_old = old_logits.shape[1]
    if old_logits.shape[0] != localizer_logits.shape[0] or old_logits.shape[2:] != localizer_logits.shape[2:]:
        raise ValueError(f"old_logits {tuple(old_logits.shape)} and localizer_logits {tuple(localizer_logits.shape)} "
                         "must share batch and spatial size")
    if not 0 < n_old < localizer_logits.shape[1]:
        raise ValueError(f"old_logits has {n_old} channels; the localizer needs more ({localizer_logits.shape[1]})")
    masked = masked_localizer_probabilities(localizer_logits, n_old, new_labels)
    argmax = (masked >= masked.amax(dim=1, keepdim=True)).to(masked.dtype)
    soft = alpha * argmax + (1.0 - alpha) * masked
    old_probabilities = torch.sigmoid(_float32_at_least(old_logits)).to(soft.dtype)
    background = torch.minimum(old_probabilities[:, :1], soft[:, :1])
    return torch.cat([background, old_probabilities[:, 1:], soft[:, n_old:]], dim=1)


def _offsets(dilation: int, centre: bool) -> list[tuple[int, int]]:
    return [(dy * dilation, dx * dilation) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if centre or (dy, dx) != (0, 0)]


def _neighbourhood(x: torch.Tensor, dilations, centre: bool) -> torch.Tensor:
    """(B, K, H, W) -> (B, K, P, H, W): the values at the 3x3 neighbours of every pixel at each
    dilation (P = 8 or 9 per dilation), borders replicated."""
    height, width = x.shape[-2:]
    shifted = []
    for d in dilations:
        padded = F.pad(x, [d, d, d, d], mode="replicate")
        shifted += [padded[..., d + dy: d + dy + height, d + dx: d + dx + width] for dy, dx in _offsets(d, centre)]
    return torch.stack(shifted, dim=2)


def pamr(image: torch.Tensor, masks: torch.Tensor, iterations: int = 10, dilations=(1, 2, 4, 8, 12)) -> torch.Tensor:
    """Pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), parameter-free, as WILSON uses it.

    image (B, 3, H, W) already resized to the masks' size (WILSON: bilinear, align_corners=True,
    un-normalised RGB); masks (B, C, H, W). For every pixel i and neighbour n among the 8 of the
    3x3 neighbourhood at each dilation (borders replicated):
        k_in = - mean over RGB of |I_i - I_n| / (0.1 sigma_i + 1e-8),
    with sigma_i the (unbiased) standard deviation, per colour channel, of the 9 values of the
    neighbourhoods of i at all dilations together (centre counted once per dilation);
        a_in = softmax over n of k_in,
    and `iterations` times:  mask_i <- sum_n a_in mask_n.
    Each step is a convex combination of neighbouring values per channel: a constant mask stays
    constant, and it commutes with scaling channels (masking before or after is the same)."""
    if image.shape[0] != masks.shape[0] or image.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"image {tuple(image.shape)} must be resized to the masks' batch and size {tuple(masks.shape)}")
    dilations = tuple(int(d) for d in dilations)
    image, masks = _float32_at_least(image), _float32_at_least(masks)
    sigma = _neighbourhood(image, dilations, centre=True).std(dim=2, keepdim=True)
    differences = (_neighbourhood(image, dilations, centre=False) - image.unsqueeze(2)).abs()
    affinity = torch.softmax((-differences / (0.1 * sigma + 1e-8)).mean(dim=1), dim=1)  # (B, P, H, W)
    for _ in range(iterations):
        masks = (_neighbourhood(masks, dilations, centre=False) * affinity.unsqueeze(1)).sum(dim=2)
    return masks


def pseudo_label_masks(refined: torch.Tensor, background_cutoff: float = 0.7, foreground_cutoff: float = 0.6,
                       floor: float = 0.2) -> torch.Tensor:
    """Binary pseudo-masks for WILSON's localizer self-training (Single-Stage's `pseudo_gtmask`),
    (B, C, H, W) of 0/1:
        M_ic = [ r_ic > max(kappa_c * max_j r_jc, floor) ],  kappa_bg = 0.7, kappa_c = 0.6 otherwise,
    then pixels active in two or more classes are cleared. The 0.2 floor is in the code, not in
    the supplement."""
    peaks = refined.flatten(2).amax(dim=-1)
    cutoffs = torch.cat([peaks[:, :1] * background_cutoff, peaks[:, 1:] * foreground_cutoff], dim=1).clamp_min(floor)
    active = refined > cutoffs[:, :, None, None]
    unambiguous = active.sum(dim=1, keepdim=True) <= 1
    return (active & unambiguous).to(refined.dtype)


def balanced_self_training_loss(localizer_logits: torch.Tensor, masks: torch.Tensor, new_labels: torch.Tensor) -> torch.Tensor:
    """L_SSS: class-balanced cross-entropy of the (train-mode) localizer on binary pseudo-masks
    (Single-Stage's `balanced_mask_loss_ce`, as WILSON calls it).
        y_i   = argmax_c M_ic; pixels with no active class are ignored (loss 0, still counted)
        N_c   = sum_i M_ic,  N = sum_c N_c,  w_c = (N - N_c) / (1 + N)
        l_b   = mean over all H*W pixels of w_{y_i} * CE(z_i, y_i)   (softmax over all channels)
        L     = mean over images of [#classes in M == #new labels + 1] * l_b
    (the image weight drops images whose masks miss a labelled class or the background)."""
    logits = _float32_at_least(localizer_logits)
    batch = logits.shape[0]
    target = masks.argmax(dim=1).masked_fill(masks.sum(dim=1) < 1, 255)
    counts = masks.flatten(2).sum(dim=-1)
    total = counts.sum(dim=-1, keepdim=True)
    class_weight = (total - counts) / (1.0 + total)
    pixel_weight = (masks * class_weight[:, :, None, None]).sum(dim=1)
    per_pixel = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    per_image = (pixel_weight * per_pixel).reshape(batch, -1).mean(dim=-1)
    image_weight = ((counts > 0).sum(dim=-1) == new_labels.sum(dim=-1) + 1).to(per_image.dtype)
    return (image_weight * per_image).mean()


def soft_segmentation_bce(logits: torch.Tensor, targets: torch.Tensor, image_weights: torch.Tensor | None = None) -> torch.Tensor:
    """L_SEG: BCE with logits on soft targets, summed over classes, mean over pixels per image,
    then the weighted mean over images (weights default to 1):
        l_b = mean_i sum_c BCE(p_ic, T_ic);   L = sum_b w_b l_b / (sum_b w_b + 1e-5)."""
    logits = _float32_at_least(logits)
    per_image = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    per_image = per_image.sum(dim=1).reshape(logits.shape[0], -1).mean(dim=-1)
    if image_weights is None:
        image_weights = torch.ones_like(per_image)
    return (image_weights * per_image).sum() / (image_weights.sum() + 1e-5)


# --- the image-label baselines' segmentation training (WILSON's table, METHODS_others.md §5) -----
def pseudo_mask_bce(logits: torch.Tensor, pseudo_masks: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
    """WILSON's loss for training on hard pseudo-masks (its `IcarlLoss` with `icarl_bkg = -1`,
    fcdl94/WILSON utils/loss.py), at image resolution:
        Y    = one-hot of pseudo_masks over the C channels (a 255 is no class: an all-zero row)
        T_c  = sigmoid(old_c) for old foreground channels 1..n_old-1
        T_c  = Y_c for the new channels n_old..C-1
        T_bg = min(Y_bg, sigmoid(old_bg))
        L    = mean over pixels of sum_c BCE(sigmoid(logits_c), T_c)
    logits (B, C, H, W) and old_logits (B, n_old, H, W) upsampled to the masks' size (bilinear,
    as the official code does before the loss); pseudo_masks (B, H, W) channel ids after the train
    label lookup (old classes and abstained pixels are 0 there: PROTOCOL.md §4)."""
    logits = _float32_at_least(logits)
    channels, n_old = logits.shape[1], old_logits.shape[1]
    if logits.shape[0] != pseudo_masks.shape[0] or logits.shape[-2:] != pseudo_masks.shape[-2:]:
        raise ValueError(f"logits {tuple(logits.shape)} and pseudo_masks {tuple(pseudo_masks.shape)} must share "
                         "batch and spatial size")
    if old_logits.shape[0] != logits.shape[0] or old_logits.shape[-2:] != logits.shape[-2:] or not 0 < n_old <= channels:
        raise ValueError(f"old_logits {tuple(old_logits.shape)} must share batch and size with logits "
                         f"{tuple(logits.shape)} and have 1..{channels} channels")
    masks = pseudo_masks.long()
    outside = (masks < 0) | ((masks >= channels) & (masks != 255))
    if bool(outside.any()):
        raise ValueError(f"pseudo_masks hold ids outside 0..{channels - 1} and 255")
    one_hot = F.one_hot(masks.masked_fill(masks == 255, channels), channels + 1)[..., :channels]
    targets = one_hot.permute(0, 3, 1, 2).to(logits.dtype)
    old_probabilities = torch.sigmoid(_float32_at_least(old_logits)).to(logits.dtype)
    targets = torch.cat([torch.minimum(targets[:, :1], old_probabilities[:, :1]), old_probabilities[:, 1:],
                         targets[:, n_old:]], dim=1)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(dim=1).mean()
