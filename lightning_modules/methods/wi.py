"""WI, weight imprinting made pixel-wise (Qi et al., CVPR 2018), the baseline of PIFS's benchmark,
as its official code runs it (fcdl94/FSS `methods/imprinting.py: WeightImprinting`, `--method WI`
in `run/voc-ss.sh`: `--iter 0` at the incremental steps):

  step 0      the official `COS` base step: the cosine classifier (z_c = 10 cos(x, w_c), no bias)
              on DeepLabV3's features, softmax CE. WI and PIFS share this step-0 model.
  steps >= 1  the new classes' weights imprinted from their shots: one pass over the step's images,
              whole and without augmentation (the official `train_dst_no_aug`), network in eval
              mode, w_k = n(sum over the shots of k of n(sum over k's pixels of n(f_p)))
              (lightning_modules.losses.imprinting_sums); then no training (`train_steps: true`
              fine-tunes with CE afterwards, a variant the official code allows with --iter > 0).

The features: the decoder's output without its last ReLU (network.use_cosine_classifier), signed
like the official head's, which ends with a 1x1 conv.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_modules.losses import cross_entropy, imprinted_weights, imprinting_sums
from lightning_modules.methods.base import Method


@dataclass
class WeightImprinting(Method):
    name = "wi"
    uses_training_pass = True
    training_pass_images = "full"
    cosine_scale: float = 10.0     # the official CosineClassifier's fixed `scaler`
    train_steps: bool = False      # the official scripts: --iter 0 (imprinting only)

    def build_network(self, settings, classes_per_step, pretrained=True):
        from experiments.config import ConfigError

        network = super().build_network(settings, classes_per_step, pretrained)
        if not hasattr(network, "use_cosine_classifier"):
            raise ConfigError(f"{self.name} needs a DeepLab network (network.kind=deeplab): its cosine classifier "
                              "classifies DeepLabV3's features")
        network.use_cosine_classifier(self.cosine_scale)
        return network

    def step0_key(self) -> dict:
        # The official COS base step: a cosine-classifier network of its own, shared by WI and PIFS.
        return {"loss": "ce", "classifier": "cosine", "scale": self.cosine_scale}

    def training_epochs(self, context, epochs: int, updates_per_epoch: int) -> int:
        return epochs if self.train_steps else 0

    # --- imprinting ------------------------------------------------------------------------------
    def new_channels(self, module) -> list[int]:
        return list(range(module.n_old, module.num_classes))

    def training_pass(self, module, batch):
        features = module.network(batch["image"])["decoder"]
        sums, images = imprinting_sums(features, batch["label"], self.new_channels(module))
        return {"prototype_sums": sums, "prototype_images": images}

    def prototypes(self, module, totals) -> torch.Tensor:
        """The imprinted weights (new classes x feature channels); a class without a shot pixel is
        a one-line error (the official code asserts it)."""
        missing = [c for c, n in zip(self.new_channels(module), totals["prototype_images"].tolist()) if n == 0]
        if missing:
            raise ValueError(f"step {module.step}: channel(s) {missing} have no pixel in their shot images, so "
                             "there is nothing to imprint (every shot's mask must show its class)")
        return imprinted_weights(totals["prototype_sums"]).float()

    def after_training_pass(self, module, totals) -> torch.Tensor:
        """Imprints the new head (unless the step resumed: its network is already past that) and
        returns the imprinted weights, for a subclass that uses them further (PIFS's teacher)."""
        prototypes = self.prototypes(module, totals)
        if not module.pass_restored:
            module.network.classifier.imprint_newest(prototypes)
        return prototypes

    def incremental_training_loss(self, module, batch):
        loss = cross_entropy(module.network(batch["image"])["logits"], batch["label"])
        return loss, {"ce": loss}


METHOD = WeightImprinting
