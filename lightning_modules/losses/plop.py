"""PLOP (Douillard et al., CVPR 2021), as its official code computes it (arthurdouillard/CVPR2021_PLOP,
`train.py`: `find_median`, the "entropy" pseudo-labelling of `train`, `features_distillation` with
`_local_pod`; shared/docs/METHODS_others.md §1).

Notation: K = n_classes, every class of the step including background and the new ones; K_old =
old_logits.shape[1] (background included); p = softmax of the old logits over its K_old channels.
PLOP's entropy of a pixel is
    H(p) = - (1 / log(K_old + 1e-8)) * mean_c p_c log(p_c + 1e-8)
(the code's `entropy`: a mean over classes, not a sum), and the value it bins and thresholds is
u = H(p) / log(K).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lightning_modules.losses.common import _float32_at_least

__all__ = ["plop_entropy", "plop_entropy_histograms", "plop_thresholds", "plop_pseudo_labels", "local_pod",
           "pod_embedding"]


def plop_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """PLOP's per-pixel entropy of (B, C, H, W) probabilities, (B, H, W):
        H = - (1 / log(C + 1e-8)) * mean_c p_c log(p_c + 1e-8)."""
    factor = 1.0 / math.log(probabilities.shape[1] + 1e-8)
    return -factor * torch.mean(probabilities * torch.log(probabilities + 1e-8), dim=1)


def plop_entropy_histograms(old_logits: torch.Tensor, labels: torch.Tensor, n_classes: int,
                            bins: int = 100) -> torch.Tensor:
    """The class-wise histograms PLOP's thresholds are read from, (n_classes, bins) int64.

    Pixels whose training label is 0 are counted in the row of the old model's argmax, in the bin
    floor(u * bins) (clamped to bins - 1) of u = H(p) / log(n_classes) (see the module docstring;
    the code's `(values * nb_bins).long()`). Integer counts: histograms of several batches and
    processes are summed."""
    if old_logits.shape[0] != labels.shape[0] or old_logits.shape[2:] != labels.shape[1:]:
        raise ValueError(f"old_logits {tuple(old_logits.shape)} and labels {tuple(labels.shape)} must share "
                         "batch and spatial size")
    probabilities = torch.softmax(_float32_at_least(old_logits), dim=1)
    background = labels == 0
    values = plop_entropy(probabilities)[background].reshape(-1) / math.log(n_classes)
    rows = probabilities.argmax(dim=1)[background].reshape(-1)
    columns = torch.clamp((values * bins).long(), max=bins - 1)
    histograms = torch.zeros(n_classes, bins, dtype=torch.long, device=old_logits.device)
    histograms.index_put_((rows, columns), torch.ones_like(rows), accumulate=True)
    return histograms


def _legacy_median(histogram: torch.Tensor, bins: int) -> torch.Tensor:
    """The official `find_median` walk, reproduced literally (float32 tensors where the code has
    them): it adds the *bin index* k, not the bin's count, to the running sum; `int(k / bins *
    bins)` is k - 1 for some k (29, 57, 58 with 100 bins); a median on an empty bin is
    (half - running) / 0: NaN (0/0) or +-inf."""
    total = histogram.sum()
    half = total / 2
    running_sum = 0.0
    for lower_border in range(bins):
        lower_border = lower_border / bins
        bin_index = int(lower_border * bins)
        if half >= running_sum and half <= (running_sum + histogram[bin_index]):
            break
        running_sum += lower_border * bins
    return lower_border + ((half - running_sum) / histogram[bin_index].sum()) * (1 / bins)


def _true_median(histogram: torch.Tensor, bins: int) -> float:
    """The median of the binned values, linearly interpolated inside its bin (float64)."""
    counts = histogram.double()
    half = float(counts.sum()) / 2
    cumulative = 0.0
    for b in range(bins):
        count = float(counts[b])
        if count > 0 and cumulative + count >= half:
            return (b + (half - cumulative) / count) / bins
        cumulative += count
    return 1.0


def plop_thresholds(histograms: torch.Tensor, base_threshold: float = 0.001, legacy_median: bool = True) -> torch.Tensor:
    """PLOP's class-wise entropy thresholds, (n_classes,) float32: tau_c = max(median_c, base_threshold);
    a class the old model never predicts (an empty histogram row) gets base_threshold.

    legacy_median=True: the official code's median walk (_legacy_median), with its errors; a NaN
    median stays NaN through Python's max(NaN, 0.001) (as in the code), so every pixel of that
    class is rejected; an infinite one accepts them all. False: the true median of the histogram."""
    n_classes, bins = histograms.shape
    thresholds = torch.zeros(n_classes, dtype=torch.float32)
    histograms = histograms.detach().cpu()
    for c in range(n_classes):
        if histograms[c].sum() <= 0:
            continue
        thresholds[c] = _legacy_median(histograms[c], bins) if legacy_median else _true_median(histograms[c], bins)
    return torch.tensor([max(t, base_threshold) for t in thresholds], dtype=torch.float32)


def plop_pseudo_labels(old_logits: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor,
                       n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PLOP's pseudo-labels of the "background" pixels (the code's `labels < n_old`, n_old =
    old_logits.shape[1]): the old model's argmax c where u = H(p) / log(n_classes) < tau_c, else 255
    (rejected); other pixels keep their label. Returns (labels, adaptive factor of shape (B,)), the
    factor nu_b = #accepted background pixels / (#background pixels + 1e-6)."""
    n_old = old_logits.shape[1]
    probabilities = torch.softmax(_float32_at_least(old_logits), dim=1)
    pseudo = probabilities.argmax(dim=1)
    valid = (plop_entropy(probabilities) / math.log(n_classes)) < thresholds.to(probabilities.device)[pseudo]
    background = labels < n_old
    out = labels.clone()
    out[~valid & background] = 255
    out[valid & background] = pseudo[valid & background]
    factor = (valid & background).float().sum(dim=(1, 2)) / (background.float().sum(dim=(1, 2)) + 1e-6)
    return out, factor


def pod_embedding(x: torch.Tensor, scales=(1, 2, 4)) -> torch.Tensor:
    """Local POD's embedding of (B, C, H, W): for each scale s, s x s regions of side k = W // s
    (taken from the last dimension for both axes, remainders dropped, as the code's `_local_pod`);
    per region the mean over the width (C * k values) and over the height (C * k values);
    concatenated, (B, D)."""
    batch, width = x.shape[0], x.shape[-1]
    parts = []
    for scale in scales:
        k = width // scale
        for i in range(scale):
            for j in range(scale):
                region = x[..., i * k:(i + 1) * k, j * k:(j + 1) * k]
                parts += [region.mean(dim=3).reshape(batch, -1), region.mean(dim=2).reshape(batch, -1)]
    return torch.cat(parts, dim=1)


def local_pod(old_maps, new_maps, weights, n_classes: int, n_new: int, scales=(1, 2, 4)) -> torch.Tensor:
    """Local POD (the `--pod local` of PLOP's preset), over L pairs of (B, C, H, W) maps, the last
    pair being the pre-upsampling logits: when the new logits have more channels than the old
    ones, the new-class channels n_old.. are summed into channel 0 first ("extra_channels: sum").
    Each map is squared (no normalisation anywhere: the code forces it off), embedded by
    pod_embedding, and
        L = (1 / L) sum_l w_l sqrt(n_classes / n_new) mean_b || Phi(old_l^2) - Phi(new_l^2) ||_2
    (a map with w_l <= 0 adds nothing but still counts in 1/L, as in the code)."""
    if not (len(old_maps) == len(new_maps) == len(weights)) or not old_maps:
        raise ValueError(f"{len(old_maps)} old maps, {len(new_maps)} new maps and {len(weights)} weights: "
                         "one weight per pair of maps")
    schedule = math.sqrt(n_classes / n_new)
    total = None
    for index, (old, new, weight) in enumerate(zip(old_maps, new_maps, weights)):
        old, new = _float32_at_least(old), _float32_at_least(new)
        if old.shape[1] != new.shape[1]:
            if index != len(old_maps) - 1:
                raise ValueError(f"map {index}: only the last pair (the logits) may differ in channels")
            n_old = old.shape[1]
            new = torch.cat([new[:, :1] + new[:, n_old:].sum(dim=1, keepdim=True), new[:, 1:n_old]], dim=1)
        if old.shape != new.shape:
            raise ValueError(f"map {index}: old {tuple(old.shape)} and new {tuple(new.shape)} differ")
        if weight <= 0:
            continue
        difference = pod_embedding(old.pow(2), scales) - pod_embedding(new.pow(2), scales)
        term = weight * schedule * torch.linalg.vector_norm(difference, dim=-1).mean()
        total = term if total is None else total + term
    if total is None:
        total = new_maps[0].sum() * 0.0
    return total / len(old_maps)
