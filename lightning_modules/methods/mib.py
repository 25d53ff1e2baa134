"""MiB (Cermelli et al., CVPR 2020, "Modeling the Background"), as the official code computes it
(shared/docs/METHODS_wilson_mib.md §2.2): unbiased cross-entropy + kd_weight x unbiased knowledge
distillation (kd_weight 10, alpha 1) + the background-based initialisation of new classifiers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_modules.losses import unbiased_cross_entropy, unbiased_knowledge_distillation
from lightning_modules.methods.base import Method


@dataclass
class MiB(Method):
    name = "mib"
    uses_old_model = True
    kd_weight: float = 10.0
    kd_alpha: float = 1.0
    init_balanced: bool = True

    def init_new_classifier(self, network, old_network) -> None:
        if self.init_balanced:  # new classes start from the background classifier (MiB's init_balanced)
            network.init_new_classes_from_background()

    def incremental_training_loss(self, module, batch):
        images = batch["image"]
        logits = module.network(images)["logits"]
        with torch.no_grad():
            old_logits = module.old_network(images)["logits"]
        unce = unbiased_cross_entropy(logits, batch["label"], n_old=old_logits.shape[1])
        unkd = unbiased_knowledge_distillation(logits, old_logits, alpha=self.kd_alpha)
        return unce + self.kd_weight * unkd, {"unce": unce, "unkd": unkd}


METHOD = MiB
