"""LwF-MC (iCaRL's loss without exemplars, Rebuffi et al. 2017) for segmentation, as MiB's code runs
it with `--method LWF-MC` (fcdl94/MiB `argparser.py` + `train.py`: `--icarl`, `icarl_importance`
10, the "combined" variant since `icarl_disjoint` is off; shared/docs/METHODS_wilson_mib.md §2.2):
    L = BCE on one-hot labels over every channel (summed over classes, mean over all pixels)
        + importance * n_old * mean BCE(new model's old channels, sigmoid(old logits)).
`--icarl` makes the criterion BCE at every step, step 0 included, so step 0 is trained with
per-class BCE (step0_loss "bce", the same step-0 model as WILSON's when everything else agrees).
No KD, no feature distillation, no MiB classifier init.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_modules.losses import lwf_mc_terms
from lightning_modules.methods.base import Method


@dataclass
class LwFMC(Method):
    name = "lwf_mc"
    step0_loss = "bce"
    uses_old_model = True
    importance: float = 10.0   # MiB's `icarl_importance` under `--method LWF-MC`

    def incremental_training_loss(self, module, batch):
        images = batch["image"]
        logits = module.network(images)["logits"]
        with torch.no_grad():
            old_logits = module.old_network(images)["logits"]
        bce, distillation = lwf_mc_terms(logits, batch["label"], old_logits)
        return bce + self.importance * distillation, {"bce": bce, "distillation": distillation}


METHOD = LwFMC
