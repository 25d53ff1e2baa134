"""The segmentation network: an smp encoder/decoder and the incremental classifier.

The papers use DeepLabV3 with ResNet-101 at output stride 16 and ASPP rates 6/12/18
(`paper_deeplab()`); smp's own DeepLabV3 defaults are output stride 8 with rates 12/24/36.
Deviations from MiB's network, by design of this suite: plain BatchNorm + ReLU instead of
in-place ABN with leaky ReLU, and smp's DeepLabV3 decoder, which adds a 3x3 conv + BN + ReLU
after the ASPP projection and adds the image-pooling branch by concatenation.
"""
from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = {"deeplabv3": smp.DeepLabV3, "deeplabv3plus": smp.DeepLabV3Plus}


class PretrainedWeightsUnavailable(RuntimeError):
    """The configured encoder weights cannot be loaded (no network and no cached copy)."""


class IncrementalClassifier(nn.Module):
    """One 1x1 conv per step; logits in channel order [bg, step-0 classes, step-1 classes, ...]."""

    def __init__(self, in_channels: int, classes_per_step: list[int]):
        super().__init__()
        self.in_channels = in_channels
        self.heads = nn.ModuleList(nn.Conv2d(in_channels, n, kernel_size=1) for n in classes_per_step)

    def add_step(self, num_classes: int) -> nn.Conv2d:
        head = nn.Conv2d(self.in_channels, num_classes, kernel_size=1).to(self.heads[0].weight.device)
        self.heads.append(head)
        return head

    @property
    def classes_per_step(self) -> list[int]:
        return [h.out_channels for h in self.heads]

    @property
    def num_classes(self) -> int:
        return sum(self.classes_per_step)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(features) for head in self.heads], dim=1)


class SegmentationNetwork(nn.Module):
    """encoder -> decoder -> incremental classifier, with access to every stage.

    `forward(x)` returns a dict: "encoder" (the last encoder feature map), "decoder" (the
    decoder's features), "logits_lowres" (at decoder resolution) and "logits" (bilinearly
    upsampled to the input size, align_corners=False, as MiB does before its losses).
    """

    def __init__(self, classes_per_step: list[int], arch: str = "deeplabv3", encoder: str = "resnet101",
                 encoder_depth: int = 5, output_stride: int = 16, atrous_rates=(6, 12, 18),
                 decoder_channels: int = 256, aspp_dropout: float = 0.0, encoder_weights: str | None = None):
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}; available: {', '.join(ARCHITECTURES)}")
        try:
            model = ARCHITECTURES[arch](
                encoder_name=encoder, encoder_depth=encoder_depth, encoder_weights=encoder_weights,
                encoder_output_stride=output_stride, decoder_channels=decoder_channels,
                decoder_atrous_rates=tuple(atrous_rates), decoder_aspp_dropout=aspp_dropout, classes=1)
        except (OSError, ConnectionError) as error:  # huggingface_hub / urllib errors are OSErrors
            if encoder_weights is None:
                raise
            raise PretrainedWeightsUnavailable(
                f"the {encoder_weights!r} weights of encoder {encoder!r} are neither cached nor downloadable "
                f"here ({type(error).__name__}). Run once with network access to cache them (smp stores them "
                "in the Hugging Face / torch hub cache), or set network.encoder_weights=null to train from "
                "scratch on purpose") from None
        self.encoder, self.decoder = model.encoder, model.decoder
        self.output_stride = output_stride
        self.classifier = IncrementalClassifier(model.segmentation_head[0].in_channels, classes_per_step)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.encoder(images)
        decoded = self.decoder(features)
        logits_lowres = self.classifier(decoded)
        logits = F.interpolate(logits_lowres, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return {"encoder": features[-1], "decoder": decoded, "logits_lowres": logits_lowres, "logits": logits}
