"""Between steps: the frozen copy of the previous model is swapped in as the old model."""
from __future__ import annotations

import pytorch_lightning as pl


class TeacherCallback(pl.Callback):
    """Hands the old model of a step t >= 1 to the LightningModule and keeps it frozen.

    The step loop makes the old model before the network grows its new classifier
    (`network.frozen_copy()`: a deep copy, eval mode, no gradients). This callback, at
    `setup("fit")` (before the optimizer exists), sets it on the module as a plain attribute (not a
    submodule, so not in the optimizer, the checkpoint or Lightning's train/eval switching), moves
    it to the module's device when training starts, and puts it back in eval mode at every epoch,
    so that nothing can switch it to training. Every DDP rank builds it from identical weights, so
    the old model is identical everywhere. With `old_network=None` (a method that needs none) it
    does nothing.
    """

    def __init__(self, old_network):
        self.old_network = old_network

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        if self.old_network is None or pl_module.old_network is self.old_network:
            return
        self.old_network.eval()
        self.old_network.requires_grad_(False)
        pl_module.set_old_network(self.old_network)

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        if pl_module.old_network is not None:
            pl_module.old_network.to(pl_module.device).eval()

    def on_test_start(self, trainer: pl.Trainer, pl_module) -> None:
        self.on_fit_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module) -> None:
        if pl_module.old_network is not None:
            pl_module.old_network.eval()  # nothing may switch it back to train mode
