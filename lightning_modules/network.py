"""The segmentation network: an smp encoder/decoder and the incremental classifier, as an interface.

A method never reaches into the network. What it may ask for:
  forward(images, taps=())   a dict: "encoder" (the last encoder map, after its activation: MiB's
                             body output), "decoder" (the decoder's features), "logits_lowres" (at
                             decoder resolution), "logits" (bilinearly upsampled to the input,
                             align_corners=False, as MiB does before its losses), and on request
                             "stages": every ResNet stage's output taken before its last block's
                             activation (the residual sum: what PLOP distils), shallow to deep.
                             Taps are returned, not recorded by module hooks: hooks would be copied
                             into the teacher and do not mix with torch.compile.
  add_classes(n)             a new 1x1 classifier head for the next step's n classes
  init_new_classes_from_background()   MiB's initialisation of the newest head
  parameter_groups()         {"encoder", "decoder", "classifier"}: lists of parameters
  feature_channels           channels of the "encoder" output; output_stride
  frozen_copy()              the old model of the next step: a detached, frozen, eval-mode copy
  state()                    the saved form (classes per step + state dict; a method's
                             `load_network` rebuilds it with the method's own builder)

The papers use DeepLabV3 with ResNet-101 at output stride 16 and ASPP rates 6/12/18; smp's own
DeepLabV3 defaults are output stride 8 with rates 12/24/36. Deviations from MiB's network, by
design of this suite: plain BatchNorm + ReLU instead of in-place ABN with leaky ReLU (only
WILSON's localizer uses leaky ReLU), torchvision-style ImageNet weights (smp's) instead of
inplace-abn's release, and smp's DeepLabV3 decoder, which adds a 3x3 conv + BN + ReLU after the
ASPP projection and adds the image-pooling branch by concatenation.
"""
from __future__ import annotations

import copy
import math

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = {"deeplabv3": smp.DeepLabV3, "deeplabv3plus": smp.DeepLabV3Plus}
TAPS = ("stages",)


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

    @torch.no_grad()
    def init_newest_from_background(self) -> None:
        """MiB's `init_balanced` of the newest head: every new class starts as a copy of the
        background classifier (row 0 of the step-0 head), and the background and new biases are
        shifted by -log(n_new + 1):
            W_c = W_bg,  b_c = b_bg - log(n_new + 1)  for each new class c;  b_bg <- b_bg - log(n_new + 1).
        Then exp(z_bg') + sum_c exp(z_c) = exp(z_bg): p(bg) + sum p(new) under the new model equals
        p(bg) under the old one, and old-class probabilities are unchanged."""
        if len(self.heads) < 2:
            raise ValueError("initialising new classes from the background needs a new head (add_step first)")
        background, new = self.heads[0], self.heads[-1]
        shifted_bias = background.bias[0] - math.log(new.out_channels + 1)
        new.weight.copy_(background.weight[0:1].expand_as(new.weight))
        new.bias.fill_(float(shifted_bias))
        background.bias[0] = shifted_bias


# --- stage taps: a ResNet block's output before its last activation -----------------------------
def _activated(activation: nn.Module, pre: torch.Tensor) -> torch.Tensor:
    # The block's own activation module, on a copy when it works in place (the tap must survive).
    return activation(pre.clone() if getattr(activation, "inplace", False) else pre)


def _torchvision_block(block, x):
    """torchvision's BasicBlock/Bottleneck (smp's resnet* encoders), with the residual sum kept."""
    identity = block.downsample(x) if block.downsample is not None else x
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    if hasattr(block, "conv3"):
        out = block.bn3(block.conv3(block.relu(out)))
    pre = out + identity
    return pre, _activated(block.relu, pre)


def _timm_block(block, x):
    """timm's BasicBlock/Bottleneck (smp's tu-resnet* encoders), with the residual sum kept."""
    shortcut = block.downsample(x) if block.downsample is not None else x
    if hasattr(block, "conv3"):  # Bottleneck
        out = block.act1(block.bn1(block.conv1(x)))
        out = block.aa(block.act2(block.drop_block(block.bn2(block.conv2(out)))))
        out, final = block.bn3(block.conv3(out)), block.act3
    else:  # BasicBlock
        out = block.aa(block.act1(block.drop_block(block.bn1(block.conv1(x)))))
        out, final = block.bn2(block.conv2(out)), block.act2
    if block.se is not None:
        out = block.se(out)
    if block.drop_path is not None:
        out = block.drop_path(out)
    pre = out + shortcut
    return pre, _activated(final, pre)


def _last_block_tap(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import timm.models.resnet as timm_resnet
    import torchvision.models.resnet as tv_resnet

    if isinstance(block, (timm_resnet.BasicBlock, timm_resnet.Bottleneck)):
        return _timm_block(block, x)
    if isinstance(block, (tv_resnet.BasicBlock, tv_resnet.Bottleneck)):
        return _torchvision_block(block, x)
    raise ValueError(f"stage taps need ResNet blocks; {type(block).__name__} is not one")


def _stage(stage: nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    for block in list(stage)[:-1]:
        x = block(x)
    return _last_block_tap(stage[-1], x)


class SegmentationNetwork(nn.Module):
    """encoder -> decoder -> incremental classifier (see the module docstring for the interface)."""

    def __init__(self, classes_per_step: list[int], arch: str = "deeplabv3", encoder: str = "resnet101",
                 encoder_depth: int = 5, output_stride: int = 16, atrous_rates=(6, 12, 18),
                 decoder_channels: int = 256, aspp_dropout: float = 0.0, encoder_weights: str | None = None):
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}; available: {', '.join(ARCHITECTURES)}")
        self.settings = dict(arch=arch, encoder=encoder, encoder_depth=encoder_depth, output_stride=output_stride,
                             atrous_rates=list(atrous_rates), decoder_channels=decoder_channels,
                             aspp_dropout=aspp_dropout, encoder_weights=encoder_weights)
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

    # --- forward ------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, taps=()) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        unknown = set(taps) - set(TAPS)
        if unknown:
            raise ValueError(f"unknown network taps {sorted(unknown)}; available: {', '.join(TAPS)}")
        out = {}
        if "stages" in taps:
            features, out["stages"] = self._encode_with_stage_taps(images)
        else:
            features = self.encoder(images)
        decoded = self.decoder(features)
        logits_lowres = self.classifier(decoded)
        logits = F.interpolate(logits_lowres, size=images.shape[-2:], mode="bilinear", align_corners=False)
        out.update(encoder=features[-1], decoder=decoded, logits_lowres=logits_lowres, logits=logits)
        return out

    def _encode_with_stage_taps(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The encoder's feature list (identical to `self.encoder(x)`) and the pre-activation output
        of each ResNet stage (layer1, layer2, ...; as many as the encoder depth keeps)."""
        encoder = self.encoder
        features, stages = [x], []
        if isinstance(encoder, smp.encoders.resnet.ResNetEncoder):
            depth = encoder._depth
            if depth >= 1:
                x = encoder.relu(encoder.bn1(encoder.conv1(x)))
                features.append(x)
            for level in range(2, depth + 1):
                if level == 2:
                    x = encoder.maxpool(x)
                pre, x = _stage(getattr(encoder, f"layer{level - 1}"), x)
                stages.append(pre)
                features.append(x)
            return features, stages
        model = getattr(encoder, "model", None)
        if model is None or not hasattr(model, "return_layers") or getattr(encoder, "_is_channel_last", False) \
                or getattr(encoder, "_is_transformer_style", False) or getattr(encoder, "_is_vgg_style", False):
            raise ValueError(f"stage taps need a ResNet encoder (smp 'resnet*' or timm 'tu-resnet*'), not "
                             f"{self.settings['encoder']!r}")
        for name, module in model.items():  # timm FeatureListNet: conv1, bn1, act1, maxpool, layer1, ...
            if name.startswith("layer"):
                pre, x = _stage(module, x)
                stages.append(pre)
            else:
                x = module(x)
            if name in model.return_layers:
                features.append(x)
        if not stages:
            raise ValueError(f"stage taps need a ResNet encoder (smp 'resnet*' or timm 'tu-resnet*'); "
                             f"{self.settings['encoder']!r} has no ResNet stages")
        return features, stages

    # --- the incremental classifier -------------------------------------------------------------
    @property
    def classes_per_step(self) -> list[int]:
        return self.classifier.classes_per_step

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    @property
    def feature_channels(self) -> int:
        return self.encoder.out_channels[-1]

    def add_classes(self, num_classes: int) -> None:
        """A new 1x1 head for the next step's classes (PyTorch's default initialisation)."""
        self.classifier.add_step(num_classes)

    def init_new_classes_from_background(self) -> None:
        """MiB's initialisation of the newest head (IncrementalClassifier.init_newest_from_background;
        MiB, PLOP)."""
        self.classifier.init_newest_from_background()

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"encoder": list(self.encoder.parameters()), "decoder": list(self.decoder.parameters()),
                "classifier": list(self.classifier.parameters())}

    # --- the old model and the saved form ---------------------------------------------------------
    def frozen_copy(self) -> "SegmentationNetwork":
        """A deep copy in eval mode with no gradients: the next step's old model. A compiled call
        is left out: it would still point at this (live) network."""
        compiled, self._compiled_call_impl = self._compiled_call_impl, None
        try:
            old = copy.deepcopy(self)
        finally:
            self._compiled_call_impl = compiled
        old.eval()
        old.requires_grad_(False)
        return old

    def state(self) -> dict:
        return {"state_dict": self.state_dict(), "classes_per_step": list(self.classes_per_step)}


def build_network(settings, classes_per_step: list[int], pretrained: bool = True) -> nn.Module:
    """The network of a run's network section (experiments.config.NetworkConfig, or its dict):
    kind "deeplab" a SegmentationNetwork, kind "segmenter" a lightning_modules.segmenter
    SegmenterNetwork, each given only its own keys. pretrained=False: no encoder weights are loaded
    (the network is about to receive a saved state)."""
    from experiments.config import DEEPLAB_KEYS, SEGMENTER_KEYS

    arguments = settings.model_dump() if hasattr(settings, "model_dump") else dict(settings)
    kind = arguments.pop("kind", "deeplab")
    if not pretrained:
        arguments["encoder_weights"] = None
    if kind == "segmenter":
        from lightning_modules.segmenter import SegmenterNetwork

        return SegmenterNetwork(classes_per_step, **{k: v for k, v in arguments.items() if k not in DEEPLAB_KEYS})
    if kind != "deeplab":
        raise ValueError(f"unknown network kind {kind!r}; available: deeplab, segmenter")
    return SegmentationNetwork(classes_per_step, **{k: v for k, v in arguments.items() if k not in SEGMENTER_KEYS})
