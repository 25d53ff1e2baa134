"""MBS (Park et al., ECCV 2024, "Mitigating Background Shift in Class-Incremental Semantic
Segmentation"), as its official code computes it (RoadoneP/ECCV2024_MBS `main.py`, `utils/loss.py`,
`utils/utils.py`, `core/Segmenter/*`, `configs/{voc,ade20k}.yaml`; shared/docs/METHODS_others.md §4).

Its network is a Segmenter (lightning_modules/segmenter.py: a ViT-B/16 + the incremental mask
transformer), `network.kind: segmenter` in `settings`, so MBS's step 0 is its own model: softmax CE
with void kept as 255 (ignored, unlike MiB's loader), SGD Nesterov 0.9, weight decay 1e-5 on every
parameter (norms and class embeddings too), a constant lr (the code builds a PolyLR but never steps
it: `optimizer.poly_power: 0` here), fp16 autocast on GPUs (`opts.amp`). The lrs, epochs and batch
of each dataset are in the experiment files (VOC 1e-3, x0.1 at steps >= 1, 32 epochs, batch 16;
ADE 1e-3, x0.5, 64 epochs, batch 8).

At every step t >= 1, with the frozen old model's outputs (no gradients):
  y'   = selective_pseudo_labels(old logits, y, tau)             confident old objects labelled,
                                                                  background that is "some object" ignored
  CE   = cross_entropy(logits, y')
  AFD  = adaptive_feature_distillation(P, P_old, w)  with w = afd_patch_weights(old patch masks,
         y' nearest-downsampled to the patch grid, K_old)          + MSE(Q[:, :K_old], Q_old)
  LGKD = label_guided_distillation(logits, old logits, y)         y the original labels
  ORTH = orthogonal_loss(E, K_old)
  L    = CE + AFD_patch + AFD_class + lambda LGKD + (K_new / K) ORTH      (lambda 25 VOC, 50 ADE)
and the new classes start from the background token (`bg_token_transfer`).

Checkpoint selection: the code keeps the checkpoint of the best validation mIoU, where its
validation images are VOC `val`, the test images. Here the last epoch is handed on (the suite's
rule for every method); `data.validation_fraction` reports the held-out training images beside
the test set. Neither selects on the test set.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lightning_modules.losses import (adaptive_feature_distillation, afd_patch_weights, cross_entropy,
                                      label_guided_distillation, orthogonal_loss, selective_pseudo_labels)
from lightning_modules.methods.base import Method

IGNORE = 255


def labels_on_patch_grid(labels: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Labels (B, H, W) nearest-downsampled to the (h, w) patch grid, as the code does
    (F.interpolate mode "nearest" on the float labels); an image that is not a multiple of the patch
    is first padded with 255 at the bottom and right, as the network pads the image with zeros."""
    height, width = grid[0] * patch_size, grid[1] * patch_size
    padded = F.pad(labels, (0, width - labels.shape[-1], 0, height - labels.shape[-2]), value=IGNORE)
    return F.interpolate(padded[:, None].float(), size=grid, mode="nearest")[:, 0].long()


@dataclass
class MBS(Method):
    name = "mbs"
    uses_old_model = True
    # MBS's own network (the ViT-B/16 Segmenter of its code; the embedded experiment sets a small ViT)
    # and optimisation (configs/voc.yaml: SGD Nesterov, wd 1e-5, no scheduler step; AMP).
    settings = {
        "data": {"void_as_background": False},
        "network": {"kind": "segmenter", "encoder": "vit_base_patch16_384", "encoder_weights": "augreg_in21k_ft_in1k",
                    "image_size": 512, "patch_size": 16, "decoder_layers": 2, "decoder_drop_path": 0.1},
        "optimizer": {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-5, "poly_power": 0.0},
        "trainer": {"precision": "16-mixed"},
    }

    pseudo_threshold: float = 0.7        # `pseudo_thresh` (tau)
    distillation_weight: float = 25.0    # `distill_args` (lambda of LGKD): 25 on VOC, 50 on ADE20K
    patch_distillation_weight: float = 1.0   # the code's AFD `alpha` (1) on patches
    class_distillation_weight: float = 1.0   # and on the class features
    orthogonal_weight: float = 1.0       # times K_new / K (the code's weight)
    bg_token_transfer: bool = True       # new class embeddings start as the background's

    def init_new_classifier(self, network, old_network) -> None:
        if self.bg_token_transfer:
            network.init_new_classes_from_background()

    def selective_labels(self, old_logits: torch.Tensor, labels: torch.Tensor, n_old: int) -> torch.Tensor:
        """The step's labels with the old model's confident objects and ignored "some object"
        background. Old-class ground truth is never read: any label below n_old other than 255 is
        background first (the step's training labels already are; the qualitative figure's test
        labels are not)."""
        labels = torch.where((labels < n_old) & (labels != IGNORE), torch.zeros_like(labels), labels)
        return selective_pseudo_labels(old_logits, labels, self.pseudo_threshold)

    def incremental_training_loss(self, module, batch):
        images, labels = batch["image"], batch["label"]
        n_old, num_classes = module.n_old, module.num_classes
        with torch.no_grad():
            old = module.old_network(images)
        new = module.network(images)
        pseudo = self.selective_labels(old["logits"], labels, n_old)
        ce = cross_entropy(new["logits"], pseudo)
        grid = tuple(old["logits_lowres"].shape[-2:])
        weights = afd_patch_weights(old["logits_lowres"], labels_on_patch_grid(pseudo, grid, module.network.patch_size),
                                    n_old)
        afd_patches = adaptive_feature_distillation(new["patches"], old["patches"], weights.flatten(1))
        afd_classes = F.mse_loss(new["class_features"][:, :n_old].float(), old["class_features"].float())
        lgkd = label_guided_distillation(new["logits"], old["logits"], labels)
        ortho = orthogonal_loss(new["class_embeddings"], n_old)
        total = (ce + self.patch_distillation_weight * afd_patches + self.class_distillation_weight * afd_classes
                 + self.distillation_weight * lgkd + self.orthogonal_weight * (num_classes - n_old) / num_classes * ortho)
        return total, {"ce": ce, "afd_patches": afd_patches, "afd_classes": afd_classes, "lgkd": lgkd, "ortho": ortho,
                       "ignored": (pseudo == IGNORE).float().mean()}

    # --- reporting: what it trains on, for the qualitative figure ---------------------------------
    @torch.no_grad()
    def pseudo_labels(self, module, images, new_labels, labels=None):
        if labels is None:
            return None
        old_logits = module.old_network(images)["logits"]
        return self.selective_labels(old_logits, labels, module.n_old)


METHOD = MBS
