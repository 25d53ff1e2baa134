"""Joint: the upper bound, trained with the labels of every class seen so far on the images of
every step so far.

The papers' Joint is one offline training on all classes. Here Joint continues from the shared
step-0 model and, at step t, trains on the union of the training images of steps 0..t with old
classes kept (future classes are still background): after the last step it has seen every
training image with full labels, like the offline model, and it shares step 0 with the other
methods so that the comparison isolates what happens after step 0.
"""
from __future__ import annotations

from dataclasses import dataclass

from lightning_modules.losses import cross_entropy
from lightning_modules.methods.base import Method


@dataclass
class Joint(Method):
    name = "joint"
    training_images = "cumulative"
    old_labels = "kept"

    def incremental_training_loss(self, module, batch):
        loss = cross_entropy(module.network(batch["image"])["logits"], batch["label"])
        return loss, {"ce": loss}


METHOD = Joint
