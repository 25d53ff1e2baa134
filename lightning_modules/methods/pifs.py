"""PIFS (Cermelli et al., BMVC 2021, "Prototype-based Incremental Few-Shot Semantic Segmentation"),
as its official code runs `--method PIFS` (fcdl94/FSS `argparser.py`: WI + `--norm_act iabr`
+ `--loss_kd 10` + `--dist_warm_start`; `methods/trainer.py`):

  step 0      WI's: the official `COS` base step (cosine classifier, CE), the same cached model.
  steps >= 1  1. the new classes' weights imprinted from their shots' prototypes (WI's pass);
              2. the teacher is the model the step starts from, after imprinting (warm start):
                 the old model with the new prototypes, so that old *and* new scores are distilled;
              3. every batch norm becomes batch renormalisation with frozen running statistics
                 (network.BatchRenorm2d, the official InPlaceABR), for batches of a few
                 non-i.i.d. images;
              4. fine-tuning on CE + kd_weight x prototype_distillation, where a batch whose
                 weighted distillation exceeds kd_clip keeps its CE only (the official trainer's
                 CLIP = 10, "rloss spikes").
The official network uses leaky ReLU (0.01) in its in-place ABN layers; this suite's keeps ReLU
(lightning_modules/network.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_modules.losses import cross_entropy, prototype_distillation
from lightning_modules.methods.wi import WeightImprinting
from lightning_modules.network import use_batch_renormalisation


@dataclass
class PIFS(WeightImprinting):
    name = "pifs"
    uses_old_model = True
    train_steps: bool = True
    kd_weight: float = 10.0        # `loss_kd` under --method PIFS
    kd_clip: float = 10.0          # the official trainer's CLIP on the weighted distillation (inf: never drop it)
    batch_renorm: bool = True      # `norm_act iabr` at the incremental steps (false: plain batch norm)

    def init_new_classifier(self, network, old_network) -> None:
        # Step >= 1 only (step 0 is the COS base step with batch norm); the saved state keeps the
        # batch norms' keys, so the next step loads it into either kind.
        if self.batch_renorm:
            use_batch_renormalisation(network)

    def after_training_pass(self, module, totals) -> torch.Tensor:
        prototypes = super().after_training_pass(module, totals)
        # The warm-start teacher: the old model grows the imprinted head, so it is the network as the
        # step began (also after a resume, when the network itself is already trained further).
        teacher = module.old_network
        if teacher.num_classes < module.num_classes:
            teacher.add_classes(prototypes.shape[0])
        teacher.classifier.imprint_newest(prototypes)
        teacher.eval().requires_grad_(False)
        return prototypes

    def incremental_training_loss(self, module, batch):
        images = batch["image"]
        logits = module.network(images)["logits"]
        with torch.no_grad():
            teacher_logits = module.old_network(images)["logits"]
        ce = cross_entropy(logits, batch["label"])
        kd = prototype_distillation(logits, teacher_logits)
        weighted = self.kd_weight * kd
        if weighted.detach() > self.kd_clip:
            weighted = weighted * 0.0
        return ce + weighted, {"ce": ce, "kd": kd}


METHOD = PIFS
