"""Between steps: freeze a copy of the model as the old model, then grow the classifier."""
from __future__ import annotations

import copy

import pytorch_lightning as pl


class TeacherCallback(pl.Callback):
    """At the start of a step t >= 1 (Lightning's `setup("fit")`, before the optimizer exists):

    1. if the method uses it, a deep copy of the network as it left step t-1 becomes the old
       model: eval mode, no gradients, not a submodule (so not in the optimizer or the
       checkpoint), moved to the module's device when training starts;
    2. the classifier gets a new 1x1 head for the step's classes;
    3. the method initialises it (e.g. MiB's background-based init);
    4. the method's extra modules of the step (WILSON's localizer) are created and registered
       on the LightningModule, outside the network.

    Every DDP rank runs this from identical weights, so the old model is identical everywhere.
    """

    def __init__(self, num_new_classes: int):
        self.num_new_classes = num_new_classes
        self.done = False

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        if stage != "fit" or pl_module.step == 0 or self.done:
            return
        network = pl_module.network
        if pl_module.method.uses_old_model:
            old = copy.deepcopy(network)
            old.eval()
            old.requires_grad_(False)
            pl_module.set_old_network(old)
        n_old = network.classifier.num_classes
        network.classifier.add_step(self.num_new_classes)
        pl_module.method.init_new_classifier(network, pl_module.old_network, n_old)
        pl_module.step_modules.update(pl_module.method.step_modules(network, n_old))
        self.done = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        if pl_module.old_network is not None:
            pl_module.old_network.to(pl_module.device).eval()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module) -> None:
        if pl_module.old_network is not None:
            pl_module.old_network.eval()  # nothing may switch it back to train mode
