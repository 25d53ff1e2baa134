"""WILSON (Cermelli et al., CVPR 2022, "Incremental Learning in Semantic Segmentation from
Image Labels"), as the official code (fcdl94/WILSON) computes it; shared/docs/METHODS_wilson_mib.md §3.

At steps t >= 1 the new classes come with image-level labels only. A localizer on the current
encoder features is trained from the image labels (L_CLS) and from the old model's output
(L_LOC); its eval-mode output, masked by the image labels, becomes the soft pseudo-supervision
of the segmentation network together with sigmoid(old logits) (L_SEG); the localizer also
trains on its own PAMR-refined masks (L_SSS); an L2 term keeps the shared encoder close to the
old one (L_ENC). Every term is computed at feature resolution (encoder output stride), never on
upsampled logits.

Where the official code differs from the paper, this file follows the code (it produced the
paper's numbers) and says so: step 0 trained with BCE; nGWP with eps = 1; pseudo-label argmax
effectively over {bg} ∪ present new classes, soft part not renormalised; localizer BN in eval
mode for pseudo-labels; 0.2 floor on the L_SSS thresholds; the lr jump when the warm-up ends.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.transforms import unnormalize
from lightning_modules.losses import (balanced_self_training_loss, feature_distillation, masked_localizer_probabilities,
                                      ngwp_focal_scores, pamr, pseudo_label_masks, soft_segmentation_bce,
                                      wilson_targets)
from lightning_modules.methods.base import Method
from lightning_modules.schedules import warmup_poly_factor


def build_localizer(in_channels: int, num_classes: int, channels: int = 256) -> nn.Sequential:
    """conv3x3 (no bias) -> BN -> leaky-ReLU(0.01) -> conv3x3 (no bias) -> BN -> leaky-ReLU ->
    conv1x1 (bias) to every current class (bg + old + new). WILSON's iABN is BN + leaky ReLU;
    PyTorch's default initialisation, as the official code."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.LeakyReLU(0.01),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.LeakyReLU(0.01),
        nn.Conv2d(channels, num_classes, 1))


@dataclass
class WILSON(Method):
    name = "wilson"
    step0_loss = "bce"
    supervision = "image"
    uses_old_model = True
    full_loss_hparams = {"pseudo_label_epoch": 0}

    alpha: float = 0.5                  # pseudo-label smoothing: alpha * argmax + (1 - alpha) * soft (COCO scripts: 0.9)
    pseudo_label_epoch: int = 5         # `pseudo_ep`: L_SEG and L_SSS from this epoch on
    warmup_epochs: int = 5              # constant lr for these epochs, then poly counted from the start
    head_lr_factor: float = 10.0        # `lr_head`: decoder (ASPP) and classifier at 10x the backbone lr
    localizer_lr: float = 0.01          # `lr_pseudo`: absolute lr of the localizer
    localizer_channels: int = 256
    seg_weight: float = 1.0             # L_SEG (`l_seg`)
    cls_weight: float = 1.0             # L_CLS
    loc_weight: float = 1.0             # L_LOC
    sss_weight: float = 1.0             # L_SSS
    enc_weight: float = 1.0             # L_ENC (`loss_de`)
    pamr: bool = True                   # refine the L_SSS masks with PAMR (`--affinity`)
    pamr_iterations: int = 10
    pamr_dilations: list = field(default_factory=lambda: [1, 2, 4, 8, 12])
    background_cutoff: float = 0.7      # L_SSS thresholds: kappa_bg, kappa_fg, floor
    foreground_cutoff: float = 0.6
    cutoff_floor: float = 0.2

    # --- the step's modules and optimisation ------------------------------------------------
    def step_modules(self, network, n_old: int) -> dict[str, nn.Module]:
        return {"localizer": build_localizer(network.feature_channels, network.num_classes, self.localizer_channels)}

    def parameter_groups(self, module, lr: float) -> list[dict]:
        """Step 0: one lr for everything (WILSON's step 0). Steps >= 1: backbone at lr, decoder
        and classifier at head_lr_factor x lr, localizer at localizer_lr (absolute in WILSON's code,
        for its batch of 24; scaled with the effective batch like every other lr, by the module)."""
        if module.step == 0:
            return super().parameter_groups(module, lr)
        groups = module.network.parameter_groups()
        return [{"params": groups["encoder"], "lr": lr, "name": "encoder"},
                {"params": groups["decoder"], "lr": lr * self.head_lr_factor, "name": "decoder"},
                {"params": groups["classifier"], "lr": lr * self.head_lr_factor, "name": "classifier"},
                {"params": list(module.step_modules["localizer"].parameters()), "lr": self.localizer_lr,
                 "name": "localizer"}]

    def learning_rate_factor(self, module, iteration, total_iterations, iterations_per_epoch, power):
        if module.step == 0:
            return super().learning_rate_factor(module, iteration, total_iterations, iterations_per_epoch, power)
        return warmup_poly_factor(iteration, total_iterations, self.warmup_epochs * iterations_per_epoch, power)

    # --- the loss of a step t >= 1 -----------------------------------------------------------
    def incremental_training_loss(self, module, batch):
        images, new_labels = batch["image"], batch["new_class_labels"].float()
        with torch.no_grad():
            old = module.old_network(images)
        current = module.network(images)
        features, logits = current["encoder"], current["logits_lowres"]
        old_logits, n_old = old["logits_lowres"], old["logits_lowres"].shape[1]
        if logits.shape[-2:] != features.shape[-2:]:
            raise ValueError(f"WILSON computes its losses at the encoder's resolution: the decoder output "
                             f"{tuple(logits.shape[-2:])} differs from the encoder's {tuple(features.shape[-2:])} "
                             "(use arch deeplabv3)")

        localizer = module.step_modules["localizer"]
        localizer.eval()  # pseudo-labels come from the localizer with BN in eval mode (official code)
        with torch.no_grad():
            localizer_eval = localizer(features)
        localizer.train(module.training)
        localizer_logits = localizer(features)  # gradients flow into the shared encoder

        loss_cls = F.binary_cross_entropy_with_logits(ngwp_focal_scores(localizer_logits)[:, n_old:], new_labels)
        loss_loc = F.binary_cross_entropy_with_logits(localizer_logits[:, :n_old].float(),
                                                      torch.sigmoid(old_logits.float()))
        loss_enc = feature_distillation(features, old["encoder"])  # mean of squares over every element
        terms = {"cls": loss_cls, "loc": loss_loc, "enc": loss_enc}
        loss = self.cls_weight * loss_cls + self.loc_weight * loss_loc + self.enc_weight * loss_enc

        if module.current_epoch >= self.pseudo_label_epoch:
            targets = wilson_targets(old_logits, localizer_eval, new_labels, self.alpha)
            # An image counts iff "pseudo-label mass > 0" agrees with its label for every new class
            # (always, with alpha < 1); the official code computes it, so it is kept.
            has_mass = targets[:, n_old:].flatten(2).sum(dim=-1) > 0
            image_weights = (has_mass == new_labels.bool()).all(dim=1).to(targets.dtype)
            loss_seg = soft_segmentation_bce(logits, targets, image_weights)

            masked = masked_localizer_probabilities(localizer_eval, n_old, new_labels)
            if self.pamr:
                small = F.interpolate(unnormalize(images), size=masked.shape[-2:], mode="bilinear", align_corners=True)
                masked = pamr(small, masked, self.pamr_iterations, self.pamr_dilations)
            masks = pseudo_label_masks(masked, self.background_cutoff, self.foreground_cutoff, self.cutoff_floor)
            loss_sss = balanced_self_training_loss(localizer_logits, masks, new_labels)
            terms.update(seg=loss_seg, sss=loss_sss)
            loss = loss + self.seg_weight * loss_seg + self.sss_weight * loss_sss
        else:
            # Warm-up: the segmentation head gets a zero term so that DDP sees a gradient for every
            # parameter, as the official code does (weight decay and momentum still apply).
            loss = loss + 0.0 * logits.sum()
        return loss, terms


    @torch.no_grad()
    def pseudo_labels(self, module, images, new_labels, labels=None):
        """argmax of the soft targets of L_SEG (sigmoid(old) for old classes, the masked
        localizer for bg/new), upsampled bilinearly to the image: what the network learns from."""
        if module.step == 0 or module.old_network is None:
            return None
        old_logits = module.old_network(images)["logits_lowres"]
        features = module.network(images)["encoder"]
        localizer = module.step_modules["localizer"]
        was_training = localizer.training
        localizer.eval()
        targets = wilson_targets(old_logits, localizer(features), new_labels.float(), self.alpha)
        localizer.train(was_training)
        targets = F.interpolate(targets.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return targets.argmax(dim=1)


METHOD = WILSON
