"""MiB (Cermelli et al., CVPR 2020, "Modeling the Background"), as the official code computes it
(shared/docs/METHODS_wilson_mib.md §2.2): unbiased cross-entropy + kd_weight x unbiased knowledge
distillation (kd_weight 10, alpha 1) + the background-based initialisation of new classifiers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lightning_modules.losses import unbiased_cross_entropy, unbiased_knowledge_distillation
from lightning_modules.methods.base import Method


def init_from_background(classifier, n_new: int) -> None:
    """MiB's `init_balanced`: every new class starts as a copy of the background classifier,
    and the background and new biases are shifted by -log(n_new + 1):
        W_c = W_bg,  b_c = b_bg - log(n_new + 1)  for each new class c;  b_bg <- b_bg - log(n_new + 1).
    Then exp(z_bg') + sum_c exp(z_c) = exp(z_bg): p(bg) + sum p(new) under the new model equals
    p(bg) under the old one, and old-class probabilities are unchanged."""
    background_head, new_head = classifier.heads[0], classifier.heads[-1]
    with torch.no_grad():
        shifted_bias = background_head.bias[0] - math.log(n_new + 1)
        new_head.weight.copy_(background_head.weight[0:1].expand_as(new_head.weight))
        new_head.bias.fill_(float(shifted_bias))
        background_head.bias[0] = shifted_bias


@dataclass
class MiB(Method):
    name = "mib"
    uses_old_model = True
    kd_weight: float = 10.0
    kd_alpha: float = 1.0
    init_balanced: bool = True

    def init_new_classifier(self, network, old_network, n_old: int) -> None:
        if self.init_balanced:
            init_from_background(network.classifier, network.classifier.heads[-1].out_channels)

    def incremental_training_loss(self, module, batch):
        images = batch["image"]
        logits = module.network(images)["logits"]
        with torch.no_grad():
            old_logits = module.old_network(images)["logits"]
        unce = unbiased_cross_entropy(logits, batch["label"], n_old=old_logits.shape[1])
        unkd = unbiased_knowledge_distillation(logits, old_logits, alpha=self.kd_alpha)
        return unce + self.kd_weight * unkd, {"unce": unce, "unkd": unkd}


METHOD = MiB
