"""SDR (Michieli & Zanuttigh, CVPR 2021), as its official code's `--method SDR` preset computes it
(LTTM/SDR `argparser.py`, `train.py`, `utils/loss.py`; shared/docs/METHODS_others.md §2):

    steps >= 1:  UNCE + 100 UNKD + 0.01 prototype matching + 0.001 attractive clustering
                 + 0.001 repulsive clustering + 0.001 sparsity
    step 0:      CE, while the prototypes accumulate (its scripts run step 0 with
                 `--loss_de_prototypes 1` only so that they do; the matching term is 0 there)

Prototypes: per-class running means of the encoder features (MiB's body), updated from every batch
after the forward pass and before the losses; "exclude background" drops the first class present
(in the overlap protocol at every step, in the disjoint one at steps >= 1); carried from step to
step (the method's carried state, also in every training checkpoint: a kill mid-step resumes them).
Under DDP each process's batch statistics are gathered and applied in rank order, so every process
holds the same prototypes (the official code updates each process's own copy from its own batch).
The official gathers are the default (`legacy: true`; see lightning_modules/losses/sdr.py).

No MiB initialisation by default (the preset does not set it); `init_balanced: true` is the
"SDR + MiB" variant. SDR's own schedule (its scripts): batch 8, 30 epochs on VOC, lr 1e-3 at step 0
and 1e-4 after (its README says 1e-2 / 1e-3 in one place; the scripts are followed); the VOC files
set them for SDR only, which makes its step 0 its own model in any case.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_modules.losses import (cross_entropy, sdr_apply_prototype_statistics, sdr_clustering_losses,
                                      sdr_downsample_labels, sdr_prototype_matching_loss, sdr_prototype_statistics,
                                      sdr_sparsity_loss, unbiased_cross_entropy, unbiased_knowledge_distillation)
from lightning_modules.methods.base import Method


@dataclass
class SDR(Method):
    name = "sdr"
    uses_old_model = True

    kd_weight: float = 100.0            # `loss_kd` (UNKD)
    kd_alpha: float = 1.0
    matching_weight: float = 0.01       # `loss_de_prototypes` (sumafter)
    attractive_weight: float = 0.001    # `loss_fc`
    repulsive_weight: float = 0.001     # `lfc_sep_clust`
    sparsity_weight: float = 0.001      # `loss_featspars`
    init_balanced: bool = False         # true: "SDR + MiB"
    legacy: bool = True                 # the official code's feature gathers

    def step0_key(self) -> dict:
        # Its step-0 training accumulates the prototypes: the model is SDR's own.
        return {"loss": "ce", "accumulates": "sdr_prototypes", "legacy": self.legacy}

    def init_new_classifier(self, network, old_network) -> None:
        if self.init_balanced:
            network.init_new_classes_from_background()

    # --- prototypes -----------------------------------------------------------------------------
    def _update_prototypes(self, module, features, labels) -> None:
        """The running means of this batch (of every process's batch, in rank order)."""
        num_classes = module.num_classes
        prototypes = self.carried.get("prototypes")
        counts = self.carried.get("prototype_counts")
        if prototypes is None:
            prototypes = features.new_zeros(num_classes, features.shape[1], dtype=torch.float32)
            counts = torch.zeros(num_classes, dtype=torch.long)
        if prototypes.shape[0] < num_classes:  # a new step: rows for its classes
            prototypes = torch.cat([prototypes, prototypes.new_zeros(num_classes - prototypes.shape[0],
                                                                     prototypes.shape[1])])
            counts = torch.cat([counts, counts.new_zeros(num_classes - counts.shape[0])])
        prototypes, counts = prototypes.to(features.device), counts.to(features.device)
        mode = module.trainer.datamodule.mode if module._trainer is not None else "disjoint"
        exclude = mode == "overlap" or module.step > 0
        labels_down = sdr_downsample_labels(labels, features.shape[-2:])
        sums, batch_counts = sdr_prototype_statistics(features, labels_down, num_classes, exclude, self.legacy)
        world = module.trainer.world_size if module._trainer is not None else 1
        if world > 1:
            all_sums, all_counts = module.all_gather(sums), module.all_gather(batch_counts)
            for rank in range(world):
                prototypes, counts = sdr_apply_prototype_statistics(prototypes, counts, all_sums[rank],
                                                                    all_counts[rank])
        else:
            prototypes, counts = sdr_apply_prototype_statistics(prototypes, counts, sums, batch_counts)
        self.carried["prototypes"], self.carried["prototype_counts"] = prototypes.detach(), counts

    # --- losses -------------------------------------------------------------------------------------
    def step0_training_loss(self, module, batch):
        out = module.network(batch["image"])
        self._update_prototypes(module, out["encoder"], batch["label"])
        loss = cross_entropy(out["logits"], batch["label"])
        return loss, {"ce": loss}

    def incremental_training_loss(self, module, batch):
        images, labels = batch["image"], batch["label"]
        with torch.no_grad():
            old = module.old_network(images)
        new = module.network(images)
        features, logits = new["encoder"], new["logits"]
        self._update_prototypes(module, features, labels)
        prototypes = self.carried["prototypes"]
        n_old = old["logits"].shape[1]
        unce = unbiased_cross_entropy(logits, labels, n_old=n_old)
        unkd = unbiased_knowledge_distillation(logits, old["logits"], alpha=self.kd_alpha)
        matching = sdr_prototype_matching_loss(features, old["logits"], labels, prototypes, n_old, self.legacy)
        attractive, repulsive = sdr_clustering_losses(features, labels, prototypes, self.legacy)
        sparsity = sdr_sparsity_loss(features, labels)
        loss = (unce + self.kd_weight * unkd + self.matching_weight * matching + self.attractive_weight * attractive
                + self.repulsive_weight * repulsive + self.sparsity_weight * sparsity)
        return loss, {"unce": unce, "unkd": unkd, "matching": matching, "attractive": attractive,
                      "repulsive": repulsive, "sparsity": sparsity}


METHOD = SDR
