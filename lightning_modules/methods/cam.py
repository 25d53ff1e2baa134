"""CAM (Zhou et al., CVPR 2016) as WILSON ran it: the baseline classifier of the EPS repository
(halbielee/EPS, `network/resnet38_cls.py`, `infer.py`; shared/docs/METHODS_others.md §5), on the
pipeline of lightning_modules/methods/weak_baseline.py.

Classifier: encoder -> Dropout2d(0.5) -> global average pooling -> 1x1 conv without bias
(Xavier-uniform init) to the K classes; multi-label soft-margin loss on the K scores. Its CAMs are
the same 1x1 conv applied at every position, then ReLU. Inference: the image at scales 0.5, 1,
1.5, 2 and their flips, each CAM upsampled to the image and masked by the image label, summed;
each class map divided by its maximum (+1e-5); a constant background score of 0.20; argmax (the
background wins ties). CAM never abstains.

Deviations (the pipeline's, see weak_baseline.py): a ResNet from smp/timm instead of ResNet-38;
the repository resizes the scaled images with PIL bicubic, here bilinear on the normalised tensor;
20k iterations of batch 8 become `stage_epochs` (the experiment files say how many).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.methods.weak_baseline import (WeakBaseline, build_classifier_encoder, max_normalised,
                                                     multiscale_maps, threshold_background)


class CAMClassifier(nn.Module):
    """encoder -> dropout -> GAP -> 1x1 conv (no bias); `cams(x)`: ReLU(1x1 conv of the features)."""

    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float = 0.5):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout2d(dropout)
        self.fc = nn.Conv2d(encoder.out_channels[-1], num_classes, 1, bias=False)
        nn.init.xavier_uniform_(self.fc.weight)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(self.dropout(self.features(images)), 1)
        return self.fc(pooled).flatten(1)

    def cams(self, images: torch.Tensor) -> torch.Tensor:
        return torch.relu(F.conv2d(self.features(images), self.fc.weight))


def cam_pseudo_mask(cams: torch.Tensor, labels: torch.Tensor, background: float = 0.20) -> torch.Tensor:
    """The EPS repository's CAM mask: summed CAMs (K, H, W) masked by the image label, each class
    divided by its max + 1e-5, argmax over [background score, classes present] -> (H, W) in 0..K."""
    cams = cams * (labels.to(cams.dtype) > 0)[:, None, None]
    return threshold_background(max_normalised(cams), labels, background)


@dataclass
class CAM(WeakBaseline):
    name = "cam"

    background_score: float = 0.20      # infer.py --thr
    dropout: float = 0.5                 # dropout7

    def build_classifier(self, num_classes: int) -> nn.Module:
        encoder = build_classifier_encoder(self.classifier_encoder, self.classifier_encoder_depth,
                                           self.classifier_output_stride, self.classifier_encoder_weights)
        return CAMClassifier(encoder, num_classes, self.dropout)

    def classifier_loss(self, classifier, batch, progress):
        scores = classifier(batch["image"]).float()
        loss = F.multilabel_soft_margin_loss(scores, batch["labels"].float())
        return loss, {"cls": loss}

    def infer(self, classifier, image, labels):
        cams = multiscale_maps(classifier.cams, image, self.inference_scales, self.inference_flip)
        return cam_pseudo_mask(cams, labels, self.background_score)


METHOD = CAM
