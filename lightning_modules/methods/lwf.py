"""LwF (Li & Hoiem, 2016) for segmentation, as MiB's code runs it with `--method LWF`
(fcdl94/MiB `argparser.py` + `train.py`; shared/docs/METHODS_wilson_mib.md §2.2): plain softmax
cross-entropy (not MiB's unbiased CE) + kd_weight x knowledge distillation on the old channels
(`loss_kd` = 100, `alpha` 1, `KnowledgeDistillationLoss`, not the unbiased KD). New classifiers keep
PyTorch's default initialisation (the preset does not set `init_balanced`). Step 0 is plain CE,
the same step-0 model as MiB's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_modules.losses import cross_entropy, knowledge_distillation
from lightning_modules.methods.base import Method


@dataclass
class LwF(Method):
    name = "lwf"
    uses_old_model = True
    kd_weight: float = 100.0   # MiB's `loss_kd` under `--method LWF`
    kd_alpha: float = 1.0      # MiB's `alpha` (multiplies the old logits)

    def incremental_training_loss(self, module, batch):
        images = batch["image"]
        logits = module.network(images)["logits"]
        with torch.no_grad():
            old_logits = module.old_network(images)["logits"]
        ce = cross_entropy(logits, batch["label"])
        kd = knowledge_distillation(logits, old_logits, alpha=self.kd_alpha)
        return ce + self.kd_weight * kd, {"ce": ce, "kd": kd}


METHOD = LwF
