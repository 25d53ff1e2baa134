"""What a method is: its data needs, its losses, its parameter groups and its step-start hook."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from torch import nn

from lightning_modules.losses import bce_one_hot, cross_entropy
from lightning_modules.schedules import poly_factor


@dataclass
class Method:
    """Base of every method. Subclasses are dataclasses whose fields are their hyper-parameters.

    Class attributes say what the method needs from the data and the step loop:
      step0_loss         "ce" (softmax CE, MiB and most) or "bce" (WILSON); part of the step-0 cache key
      supervision        "pixel" or "image" at steps >= 1
      training_images    "step" (this step's images) or "cumulative" (all steps so far, Joint)
      old_labels         "background" (old classes labelled 0) or "kept"
      uses_old_model     whether the frozen previous model is needed at steps >= 1
    """

    name = "base"
    step0_loss = "ce"
    supervision = "pixel"
    training_images = "step"
    old_labels = "background"
    uses_old_model = False

    @classmethod
    def from_hparams(cls, hparams: dict) -> "Method":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(hparams) - known)
        if unknown:
            raise ValueError(f"method {cls.name!r} has no hyper-parameter {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(sorted(known)) or 'none'}")
        return cls(**hparams)

    def hparams(self) -> dict:
        return dataclasses.asdict(self)

    # --- hooks -------------------------------------------------------------------------------
    def init_new_classifier(self, network, old_network, n_old: int) -> None:
        """Called once the classifier has its new head, before the optimizer is built. The
        default keeps PyTorch's default initialisation of the new 1x1 conv."""

    def step_modules(self, network, n_old: int) -> dict[str, nn.Module]:
        """Extra trainable modules for a step t >= 1 (e.g. WILSON's localizer), created after the
        new head is added and registered on the LightningModule (`module.step_modules[name]`),
        so Lightning moves, trains and checkpoints them; they are not part of the network, so
        the next step's old model does not contain them."""
        return {}

    def parameter_groups(self, module, lr: float) -> list[dict]:
        """Optimizer groups over the network and the step modules; by default one group at `lr`."""
        params = [*module.network.parameters(), *module.step_modules.parameters()]
        return [{"params": [p for p in params if p.requires_grad], "lr": lr}]

    def learning_rate_factor(self, module, iteration: int, total_iterations: int, iterations_per_epoch: int,
                             power: float) -> float:
        """Multiplier of every group's lr at `iteration`; by default the poly decay."""
        return poly_factor(iteration, total_iterations, power)

    def pseudo_labels(self, module, images: torch.Tensor, new_labels: torch.Tensor) -> torch.Tensor | None:
        """What the method trains the network on at a step t >= 1 when it makes its own labels
        (WILSON's localizer), as hard labels: (B, H, W) channel ids at the images' resolution, for
        the qualitative figure. new_labels (B, new classes): the images' multi-hot labels. None
        for methods trained on the ground truth."""
        return None

    def step0_training_loss(self, module, batch) -> tuple[torch.Tensor, dict]:
        """Step 0 is fully supervised: softmax cross-entropy (step0_loss "ce") or per-class BCE
        on one-hot targets (step0_loss "bce", WILSON), on the upsampled logits."""
        logits = module.network(batch["image"])["logits"]
        if self.step0_loss == "bce":
            loss = bce_one_hot(logits, batch["label"])
            return loss, {"bce": loss}
        loss = cross_entropy(logits, batch["label"])
        return loss, {"ce": loss}

    def incremental_training_loss(self, module, batch) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def training_loss(self, module, batch) -> tuple[torch.Tensor, dict]:
        if module.step == 0:
            return self.step0_training_loss(module, batch)
        return self.incremental_training_loss(module, batch)
