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
  use_cosine_classifier()    PIFS's cosine classifier in place of the linear one (imprint_newest)
  freeze_image_pooling_statistics()   the official --no_pooling, for batches of one image
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

    def head_and_row(self, channel: int) -> tuple[nn.Conv2d, int]:
        """The head holding `channel` (in the logits' order) and the channel's row in it."""
        for head in self.heads:
            if channel < head.out_channels:
                return head, channel
            channel -= head.out_channels
        raise ValueError(f"channel {channel} is beyond the classifier's {self.num_classes} channels")

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


class CosineClassifier(IncrementalClassifier):
    """PIFS's cosine classifier (fcdl94/FSS `modules/classifier.py: CosineClassifier`, the `COS`
    base step, WI and PIFS): one bias-free 1x1 head per step, and for every class c
        z_c = scale * <x / |x|, w_c / |w_c|>     (scale 10, fixed in the official code),
    the features and each class's weight normalised over channels. A new class's weight can be
    imprinted (set to a prototype); its length does not matter."""

    def __init__(self, in_channels: int, classes_per_step: list[int], scale: float = 10.0):
        nn.Module.__init__(self)
        self.in_channels, self.scale = in_channels, scale
        self.heads = nn.ModuleList(nn.Conv2d(in_channels, n, kernel_size=1, bias=False) for n in classes_per_step)

    def add_step(self, num_classes: int) -> nn.Conv2d:
        head = nn.Conv2d(self.in_channels, num_classes, kernel_size=1, bias=False).to(self.heads[0].weight.device)
        self.heads.append(head)
        return head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(features, dim=1)
        return torch.cat([self.scale * F.conv2d(unit, F.normalize(head.weight, dim=1)) for head in self.heads], dim=1)

    def init_newest_from_background(self) -> None:
        raise ValueError("MiB's background initialisation needs biases; the cosine classifier has none "
                         "(its new classes are imprinted: imprint_newest)")

    @torch.no_grad()
    def imprint_newest(self, weights: torch.Tensor) -> None:
        """The newest head's weights := `weights` (new classes x channels), e.g. prototypes."""
        head = self.heads[-1]
        if weights.shape != head.weight.shape[:2]:
            raise ValueError(f"imprinting {tuple(weights.shape)} weights into a head of "
                             f"{tuple(head.weight.shape[:2])} (classes x channels)")
        head.weight.copy_(weights.view_as(head.weight).to(head.weight))


# --- batch renormalisation (PIFS) -----------------------------------------------------------------
def batch_renormalisation(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                          running_var: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Batch renormalisation (Ioffe 2017) in training mode as PIFS's code computes it (fcdl94/FSS
    `modules/custom_bn.py: ABR`, no clipping of r and d, running statistics left as they are):
    with the batch's per-channel mean mu_B and variance over (N, H, W),
        r = sqrt(var_B' + eps) / sqrt(var_run + eps),  d = (mu_B - mu_run) / sqrt(var_run + eps)
    (var_B' the unbiased variance, as the code's `var()`; r and d carry no gradient), and
        y = gamma * r * (x - mu_B) / sqrt(var_B + eps) + beta + gamma * d
    (var_B the biased variance of batch norm's normalisation). The forward value is the eval-mode
    batch norm's (up to the n / (n - 1) of the two variances); the gradient still flows through
    the batch statistics. PIFS uses it so that a step trained on a few non-i.i.d. images does
    not drag the network towards its batches' statistics."""
    with torch.no_grad():
        flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1).float()
        running_std = (running_var.float() + eps).sqrt()
        r = (flat.var(dim=1) + eps).sqrt() / running_std
        d = (flat.mean(dim=1) - running_mean.float()) / running_std
    return F.batch_norm(x, None, None, weight * r.to(weight), bias + weight * d.to(weight), True, 0.0, eps)


class _NormWithState(nn.Module):
    """A batch norm's parameters and buffers (the same objects, the same state-dict keys) under a
    forward of its own."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        if getattr(norm, "affine", True) is False or getattr(norm, "running_mean", None) is None:
            raise ValueError("this normalisation needs an affine batch norm with running statistics")
        self.num_features, self.eps = norm.num_features, norm.eps
        self.weight, self.bias = norm.weight, norm.bias
        self.register_buffer("running_mean", norm.running_mean)
        self.register_buffer("running_var", norm.running_var)
        self.register_buffer("num_batches_tracked", norm.num_batches_tracked)

    def _eval_norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class BatchRenorm2d(_NormWithState):
    """A BatchNorm2d normalised by `batch_renormalisation` in training mode and by the running
    statistics in eval mode. The running statistics never change (the official ABR's momentum 0).
    Deliberately not a torch _BatchNorm: Lightning's SyncBatchNorm conversion would replace it;
    PIFS's statistics are each process's own batch's, as in the official code."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self._eval_norm(x)
        return batch_renormalisation(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, running statistics frozen"


class RunningStatisticsNorm(_NormWithState):
    """A batch norm (or BatchRenorm2d) that normalises by its running statistics in training too,
    its affine parameters still trained: what the official `--no_pooling` does to DeepLab's
    image-pooling branch (`global_pooling_bn.eval()`), whose 1x1 map holds one value per channel
    and image, so that a batch of one image has no batch statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._eval_norm(x)


def use_batch_renormalisation(module: nn.Module) -> int:
    """Every BatchNorm2d under `module` becomes a BatchRenorm2d holding the same parameters and
    buffers (so saved states load either way); returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            setattr(module, name, BatchRenorm2d(child))
            count += 1
        else:
            count += use_batch_renormalisation(child)
    return count


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

    def use_cosine_classifier(self, scale: float = 10.0) -> None:
        """PIFS's network: the classifier becomes a CosineClassifier of the same steps (new weights),
        and the decoder's last ReLU goes, so that the features it classifies are signed like the
        official head's (fcdl94/FSS DeeplabV3 with last_relu False ends with a 1x1 conv; smp's
        DeepLabV3 decoder ends with conv + BN + ReLU, of which the BN stays)."""
        if self.settings["arch"] != "deeplabv3":
            raise ValueError(f"the cosine classifier is built on DeepLabV3 (PIFS's head), not {self.settings['arch']!r}")
        self.decoder.relu = nn.Identity()
        self.classifier = CosineClassifier(self.classifier.in_channels, self.classes_per_step, scale)

    def freeze_image_pooling_statistics(self) -> bool:
        """The image-pooling branch's norm layer normalises by its running statistics from now on
        (RunningStatisticsNorm; the official --no_pooling), for steps trained on batches of one
        image. False when the decoder has no such branch."""
        from segmentation_models_pytorch.decoders.deeplabv3.decoder import ASPPPooling

        for branch in self.decoder.modules():
            if isinstance(branch, ASPPPooling):
                for index, layer in enumerate(branch):
                    if isinstance(layer, (nn.BatchNorm2d, BatchRenorm2d)):
                        branch[index] = RunningStatisticsNorm(layer)
                        return True
        return False

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
