"""Output and feature distillation from the old model: MiB's unbiased KD, and the baselines of
MiB's code (fcdl94/MiB, `utils/loss.py` + `train.py`): LwF's KD, ILT's feature distillation, LwF-MC."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_modules.losses.common import _float32_at_least

__all__ = ["unbiased_knowledge_distillation", "knowledge_distillation", "feature_distillation", "lwf_mc_terms",
           "lwf_mc_loss"]


def _check_old_logits(logits: torch.Tensor, old_logits: torch.Tensor) -> int:
    """n_old = old_logits.shape[1], after checking that the old logits fit the new ones."""
    if logits.dim() != 4 or old_logits.dim() != 4:
        raise ValueError(f"logits {tuple(logits.shape)} and old_logits {tuple(old_logits.shape)} must both be "
                         "(B, C, H, W)")
    if old_logits.shape[0] != logits.shape[0] or old_logits.shape[2:] != logits.shape[2:]:
        raise ValueError(f"old_logits {tuple(old_logits.shape)} must share batch and spatial size with logits "
                         f"{tuple(logits.shape)}")
    n_old = old_logits.shape[1]
    if not 0 < n_old <= logits.shape[1]:
        raise ValueError(f"old_logits has {n_old} channels; it needs 1 to {logits.shape[1]} (the new model's)")
    return n_old


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


def knowledge_distillation(logits: torch.Tensor, old_logits: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """LwF's knowledge distillation as MiB's code computes it (`KnowledgeDistillationLoss`, `--loss_kd`).

    With n_old = old_logits.shape[1] (bg included), the new model's log-softmax over its first
    n_old channels only, log p_c = z_c - LSE_{k < n_old} z_k, and q = softmax(alpha * old_logits):
        L = - mean over all pixels i of  (1 / n_old) sum_{c < n_old} q_ic log p_ic,
    i.e. a mean over the old channels (the code's `.mean(dim=1)`), then over pixels. alpha
    multiplies the old logits only (an inverse temperature). Every pixel counts: no masking.
    """
    n_old = _check_old_logits(logits, old_logits)
    logits, old_logits = _float32_at_least(logits), _float32_at_least(old_logits)
    log_p = torch.log_softmax(logits[:, :n_old], dim=1)
    q = torch.softmax(alpha * old_logits, dim=1)
    return -(q * log_p).mean(dim=1).mean()


def feature_distillation(features: torch.Tensor, old_features: torch.Tensor) -> torch.Tensor:
    """ILT's distillation on the encoder output as MiB's code computes it (`--loss_de`, an
    `nn.MSELoss()` on `features['body']`, the backbone's last feature map after its activation):
        L = mean over all B*K*h*w elements of (F - F_old)^2."""
    if features.shape != old_features.shape:
        raise ValueError(f"features {tuple(features.shape)} and old_features {tuple(old_features.shape)} "
                         "must have the same shape")
    features, old_features = _float32_at_least(features), _float32_at_least(old_features)
    return F.mse_loss(features, old_features.to(features.dtype))


def lwf_mc_terms(logits: torch.Tensor, labels: torch.Tensor, old_logits: torch.Tensor,
                 ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of LwF-MC (`lwf_mc_loss`), unweighted: (classification, distillation).

    With N = B*H*W (every pixel), C = logits.shape[1], n_old = old_logits.shape[1]:
        classification = (1/N) sum_i [y_i != 255] sum_{c < C} BCE(z_ic, [y_i = c])
        distillation   = (1/N) sum_i sum_{c < n_old} BCE(z_ic, sigmoid(zhat_ic))
                       = n_old * (mean over the B*n_old*H*W elements of BCE(z_ic, sigmoid(zhat_ic)))
    where BCE(z, t) = -t log sigmoid(z) - (1 - t) log(1 - sigmoid(z)). Ignored pixels give 0 to
    the classification term but stay in its denominator (MiB's `BCEWithLogitsLossWithIgnoreIndex`
    with reduction 'none', then `.mean()`); the distillation term uses every pixel.
    """
    n_old = _check_old_logits(logits, old_logits)
    if labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"labels {tuple(labels.shape)} must be (B, H, W) = "
                         f"{(logits.shape[0], *logits.shape[2:])} for logits {tuple(logits.shape)}")
    logits, old_logits = _float32_at_least(logits), _float32_at_least(old_logits)
    valid = labels != ignore_index
    # sum_c BCE(z_c, [y = c]) = sum_c softplus(z_c) - z_y: no (B, C, H, W) one-hot (151 channels on ADE)
    label_logit = logits.gather(1, labels.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
    per_pixel = F.softplus(logits).sum(dim=1) - label_logit
    classification = (per_pixel * valid.to(per_pixel.dtype)).mean()
    targets = torch.sigmoid(old_logits).to(logits.dtype)
    distillation = n_old * F.binary_cross_entropy_with_logits(logits[:, :n_old], targets, reduction="mean")
    return classification, distillation


def lwf_mc_loss(logits: torch.Tensor, labels: torch.Tensor, old_logits: torch.Tensor,
                importance: float = 10.0) -> torch.Tensor:
    """LwF-MC (iCaRL's loss without exemplars) as MiB's code computes it for `--method LWF-MC`
    (`--icarl` with `icarl_importance` 10, the default "combined" variant: `criterion` =
    `BCEWithLogitsLossWithIgnoreIndex`, plus `icarl * n_cl_old * nn.BCEWithLogitsLoss()` on the
    new model's old channels). With N = B*H*W (every pixel, 255 included), C = logits.shape[1],
    n_old = old_logits.shape[1] (bg included):
        L = (1/N) sum_i [y_i != 255] sum_{c < C} BCE(z_ic, [y_i = c])
            + importance * n_old * (1 / (N n_old)) sum_i sum_{c < n_old} BCE(z_ic, sigmoid(zhat_ic))
    The one-hot term covers ALL C channels, old ones included (their target is 0 except the bg
    channel on bg pixels: old classes are labelled background by the data); the old channels get
    the sigmoid target in the second term on top of it, not instead of it. The factor n_old turns
    the mean over old channels into a sum. Labels are used as given (no remapping here).
    """
    classification, distillation = lwf_mc_terms(logits, labels, old_logits)
    return classification + importance * distillation
