"""FT: fine-tuning on the current step's labels only, the forgetting baseline.

Old and future classes in the step's images are labelled background, as in MiB's code."""
from __future__ import annotations

from dataclasses import dataclass

from lightning_modules.losses import cross_entropy
from lightning_modules.methods.base import Method


@dataclass
class FineTuning(Method):
    name = "ft"

    def incremental_training_loss(self, module, batch):
        loss = cross_entropy(module.network(batch["image"])["logits"], batch["label"])
        return loss, {"ce": loss}


METHOD = FineTuning
