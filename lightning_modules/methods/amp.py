"""AMP (Siam et al., ICCV 2019, "AMP: Adaptive Masked Proxies for Few-Shot Segmentation"), the
baseline of PIFS's benchmark, as its official code runs it (fcdl94/FSS `methods/imprinting.py: AMP`,
`--method AMP --iter 0` in `run/voc-ss.sh`, `--amp_alpha 0.25`):

  step 0      the official `FT` base step (linear classifier, CE): FT's, LwF's, ILT's and MiB's model.
  steps >= 1  one pass over the step's images, whole and without augmentation, network in eval mode:
              for every channel k the shots' labels show (background and old classes included), the
              proxy p_k = n(mean over the images of the mean feature of k's pixels)
              (lightning_modules.losses.mean_feature_sums); then each such class's weight becomes
                  w_k = p_k                         for the step's new classes,
                  w_k = alpha w_k + (1 - alpha) p_k  for the others (alpha 0.25),
              and its bias 0; no training (`train_steps: true` fine-tunes with CE afterwards).
The official pass repeats the same un-augmented images 5 times (AMP.EPOCHS), which changes no mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lightning_modules.losses import cross_entropy, mean_feature_sums
from lightning_modules.methods.base import Method


@dataclass
class AMP(Method):
    name = "amp"
    uses_training_pass = True
    training_pass_images = "full"
    alpha: float = 0.25           # `--amp_alpha`: how much of an existing class's weight is kept
    train_steps: bool = False     # the official scripts: --iter 0

    def training_epochs(self, context, epochs: int, updates_per_epoch: int) -> int:
        return epochs if self.train_steps else 0

    def training_pass(self, module, batch):
        features = module.network(batch["image"])["decoder"]
        sums, images = mean_feature_sums(features, batch["label"], module.num_classes)
        return {"proxy_sums": sums, "proxy_images": images}

    @torch.no_grad()
    def after_training_pass(self, module, totals) -> None:
        if module.pass_restored:   # a resumed step's network is already past its adaptation
            return
        classifier = module.network.classifier
        counts = totals["proxy_images"]
        for channel in torch.nonzero(counts).flatten().tolist():
            proxy = F.normalize(totals["proxy_sums"][channel] / counts[channel], dim=0)
            head, row = classifier.head_and_row(channel)
            keep = 0.0 if channel >= module.n_old else self.alpha
            head.weight[row] = (keep * head.weight[row] + (1 - keep) * proxy.view_as(head.weight[row]).to(head.weight))
            if head.bias is not None:
                head.bias[row] = 0.0

    def incremental_training_loss(self, module, batch):
        loss = cross_entropy(module.network(batch["image"])["logits"], batch["label"])
        return loss, {"ce": loss}


METHOD = AMP
