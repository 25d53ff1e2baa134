"""PLOP (Douillard et al., CVPR 2021, "Pseudo-label and Local POD"), as its official code's `--method
PLOP` preset computes it (arthurdouillard/CVPR2021_PLOP; shared/docs/METHODS_others.md §1):

- before each step t >= 1, one pass over the step's training images (train transform) with the old
  model: class-wise histograms of PLOP's entropy of the background pixels, and from them the
  thresholds tau_c = max(median_c, 0.001) with the code's median walk (`legacy_median`; the true
  median is the switch). The official code computes them per process on its own shard; here the
  integer histograms are summed over the processes, so 1 and N processes get the same thresholds;
- background pixels (label < n_old) take the old argmax where the entropy is under its class's
  threshold, else 255; CE on these labels, weighted per image by the accepted share nu of its
  background pixels, averaged over all pixels (ignored ones count 0);
- Local POD on every ResNet stage (before its last activation), the decoder output and the
  pre-upsampling logits (new classes folded into the background), weights 0.01 / 0.0005 on VOC
  (0.001 / 0.00001 on ADE20K, set in those files), x sqrt(K / K_new);
- MiB's initialisation of the new classifier.

PLOP's dataset keeps void as 255 in training (MiB and WILSON train it as background), so PLOP's
step 0 is its own model (`settings`); the code trains under apex O1 mixed precision, which the GPU
files give as `trainer.precision: 16-mixed`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lightning_modules.losses import local_pod, plop_entropy_histograms, plop_pseudo_labels, plop_thresholds
from lightning_modules.methods.base import Method


@dataclass
class PLOP(Method):
    name = "plop"
    uses_old_model = True
    uses_training_pass = True
    settings = {"data": {"void_as_background": False}}  # PLOP's dataset maps void to 255, also in training

    pod_feature_weight: float = 0.01         # `pod_factor` (stages and decoder); ADE20K: 0.001
    pod_logits_weight: float = 0.0005        # the "after" factor of `pod_options` (logits); ADE20K: 0.00001
    pod_scales: list = field(default_factory=lambda: [1, 2, 4])  # `spp_scales`
    base_threshold: float = 0.001            # `threshold`
    legacy_median: bool = True               # the code's median walk; false: the true median
    adaptive_factor: bool = True             # `classif_adaptive_factor` (nu)
    init_balanced: bool = True               # MiB's init of the new classifier
    bins: int = 100                          # `pseudo_nb_bins` for the entropy mode

    def init_new_classifier(self, network, old_network) -> None:
        if self.init_balanced:
            network.init_new_classes_from_background()

    # --- the thresholds, from one pass before training ---------------------------------------
    def training_pass(self, module, batch):
        old_logits = module.old_network(batch["image"])["logits"]
        return {"histograms": plop_entropy_histograms(old_logits, batch["label"], module.num_classes, self.bins)}

    def after_training_pass(self, module, totals):
        # Kept with the carried state (saved with the step) so that a run's thresholds can be read back.
        self.carried["thresholds"] = plop_thresholds(totals["histograms"], self.base_threshold, self.legacy_median)
        self.carried["histograms"] = totals["histograms"].clone()

    # --- the loss ---------------------------------------------------------------------------------
    def incremental_training_loss(self, module, batch):
        images, labels = batch["image"], batch["label"]
        with torch.no_grad():
            old = module.old_network(images, taps=("stages",))
        new = module.network(images, taps=("stages",))
        pseudo, factor = plop_pseudo_labels(old["logits"], labels, self.carried["thresholds"], module.num_classes)
        if not self.adaptive_factor:
            factor = torch.ones_like(factor)
        per_pixel = F.cross_entropy(new["logits"].float(), pseudo, ignore_index=255, reduction="none")
        ce = (factor[:, None, None] * per_pixel).mean()
        old_maps = [*old["stages"], old["decoder"], old["logits_lowres"]]
        new_maps = [*new["stages"], new["decoder"], new["logits_lowres"]]
        weights = [self.pod_feature_weight] * (len(old_maps) - 1) + [self.pod_logits_weight]
        pod = local_pod(old_maps, new_maps, weights, module.num_classes, module.num_classes - module.n_old,
                        scales=self.pod_scales)
        return ce + pod, {"ce": ce, "pod": pod, "accepted": factor.mean()}


METHOD = PLOP
