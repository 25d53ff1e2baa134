"""ILT (Michieli & Zanuttigh, ICCVW 2019, "Incremental Learning Techniques for Semantic
Segmentation"), as MiB's code runs it with `--method ILT` (fcdl94/MiB `argparser.py` + `train.py`;
shared/docs/METHODS_wilson_mib.md §2.2): LwF (plain CE + `loss_kd` = 100 x KD on the old channels,
alpha 1) + `loss_de` = 100 x MSE between the current and old encoder outputs (MiB's
`features['body']`: the backbone's last feature map, after its activation; here the network's
"encoder" output). The encoder is not frozen (the preset does not set `--freeze`); new classifiers
keep PyTorch's default initialisation. Step 0 is plain CE, the same step-0 model as MiB's.

`distilled_features: decoder` is ILT as PIFS's code (fcdl94/FSS `methods/trainer.py`) runs it in
the few-shot benchmark: its `loss_de` compares the head's output (`feat`, the features the
classifier sees), not the backbone's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lightning_modules.losses import cross_entropy, feature_distillation, knowledge_distillation
from lightning_modules.methods.base import Method


@dataclass
class ILT(Method):
    name = "ilt"
    uses_old_model = True
    later_defaults = {"distilled_features": "encoder"}
    kd_weight: float = 100.0        # MiB's `loss_kd` under `--method ILT`
    kd_alpha: float = 1.0           # MiB's `alpha`
    feature_weight: float = 100.0   # MiB's `loss_de` under `--method ILT`
    distilled_features: Literal["encoder", "decoder"] = "encoder"   # MiB's code: the body; PIFS's code: the head

    def incremental_training_loss(self, module, batch):
        images = batch["image"]
        current = module.network(images)
        with torch.no_grad():
            old = module.old_network(images)
        ce = cross_entropy(current["logits"], batch["label"])
        kd = knowledge_distillation(current["logits"], old["logits"], alpha=self.kd_alpha)
        feature = feature_distillation(current[self.distilled_features], old[self.distilled_features])
        loss = ce + self.kd_weight * kd + self.feature_weight * feature
        return loss, {"ce": ce, "kd": kd, "feature": feature}


METHOD = ILT
