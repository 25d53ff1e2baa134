"""SS: Single-Stage semantic segmentation from image labels (Araslanov & Roth, CVPR 2020), as its
repository computes it with a ResNet backbone (visinf/1-stage-wseg: `models/stage_net.py`
SoftMaxAE, `models/mods/{aspp,gci,sg,pamr}.py`, `train.py`, `infer_val.py`,
`utils/inference_tools.py` MergeMultiScale, `configs/voc_resnet50.yaml` over `core/config.py`;
shared/docs/METHODS_others.md §5), on the pipeline of lightning_modules/methods/weak_baseline.py.

Network (the config's MODEL "ae"): backbone -> ASPP (256 channels, dilations 1, 12, 24, 36: the
code passes output stride 8 although its ResNet is at stride 16; BN, ReLU, image-pool branch,
1x1 conv, BN, ReLU, dropout 0.5). Shallow features s = the stride-4 stage (`conv3` = layer1):
    d  = fc8_x([ASPP upsampled to s (bilinear, align_corners), fc8_skip(s) (1x1 to 48, BN, ReLU)])
         (3x3 to 256, BN, ReLU)
    g  = GCI(s, d): AdaIN of s (1x1 to 256, BN without affine) with (gamma, beta) = max over
         positions of fc_deep(d) (1x1 to 512, BN, ReLU), x (gamma + 1) + beta, ReLU, 1x1, BN, ReLU
    x  = SG(d, g) with psi = 0.3: train: m ~ Bernoulli(1 - psi) per element,
         x = m (d - psi g) / (1 - psi) + (1 - m) g   (E[x] = d);  eval: x = (1 - psi) d + psi g
    z  = last_conv(x): 3x3, BN, ReLU, dropout 0.5, 3x3, BN, ReLU, dropout 0.1, 1x1 to K (bias),
         then a constant 1 prepended as the background logit: K + 1 channels at stride 4.
Masks m = softmax over the K + 1 channels; class scores (nGWP + focal penalty, gamma 3, lambda
0.01), the background's dropped:
    s_c = sum_i m_ic z_ic / (1 + sum_i m_ic) + (1 - mean_i m_ic)^3 log(0.01 + mean_i m_ic).
Backbone conv1/bn1 are frozen and every backbone BN is frozen (parameters and statistics); the
ASPP's BNs keep their initial statistics (eval mode) but learn their affine parameters
(BaseNet._fix_running_stats / _fix_params). Every Conv/BN outside the backbone is Kaiming-normal /
(1, 0) initialised and trained at 10x lr; biases without weight decay (BaseNet.parameter_groups
with ResNet's _lr_mult 1, 1, 10, 10). SGD, momentum 0.9, weight decay 5e-4, lr 5e-4 CONSTANT:
train.py sets no schedule (stage_poly_power = 0 turns the pipeline's poly decay off).

Loss (train.py DecTrainer.step, stage_net.py):
    L = soft-margin(s, labels) + [epoch >= 5] * 1.0 * L_self          (TRAIN.PRETRAIN, NET.MASK_LOSS_BCE)
L_self from the same train-mode forward (stochastic gate and dropouts active), the masks detached:
the image un-normalised to [0, 1] and resized to the mask size (bilinear, align_corners=True);
PAMR(10 iterations, dilations 1, 2, 4, 8, 12, 24) of the masks; upsampled to the image
(align_corners=True); the foreground channels of absent classes zeroed; `pseudo_gtmask`
(> 0.7 max for the background, > 0.6 max for a class, at least 0.2; ambiguous pixels dropped);
`balanced_mask_loss_ce` on the logits upsampled to the image (align_corners=True), mean over the
batch. The shared functions (losses/weak_supervision.py ngwp_focal_scores, pamr,
pseudo_label_masks, balanced_self_training_loss) compute exactly the code's formulas for this use
(checked against stage_net.py and pamr.py); the only difference is that the CE's bilinear
upsampling of the logits, inside balanced_mask_loss_ce in the code, is done here before the call.

Inference (infer_val.py, MergeMultiScale, ResNet configs): the image at scales 1, 0.75, 1.25, 1.5
and their flips, each view zero-padded (in normalised space, centred) to 768 x 768, all views in
one eval-mode batch; the softmax masks upsampled to the padded size (align_corners=True), cut to
the view, resized to the image (align_corners=False), flipped back; the foreground channels of
the classes not present zeroed; the mean over views; the background channel raised to the power
3 (TEST.BG_POW); argmax (the first channel wins ties). SS never abstains (no 255). Present
classes: the ResNet configs set TEST.USE_GT_LABELS: True, so the image labels alone decide and the
score cut (FP_CUT_SCORE 0.3) is unused; with use_gt_labels False the labels are replaced, as in
infer_val.py, by max over views of sigmoid(s_c) > fp_cut_score. infer_val never uses both. No
PAMR at inference (the code has none there); the code's dense-CRF variant (written beside the plain
prediction) is not computed: the plain argmax is its primary output.

Where the code differs from the paper: the nGWP denominator is 1 (the paper's "small
constant"); the pseudo-masks' 0.2 floor is in the code only (as losses/weak_supervision.py notes).
Settings: the ResNet configs (followed here) use scales 1/0.75/1.25/1.5, cut 0.3 and the image
labels, where core/config.py's defaults and the ResNet-38 config use 1/0.5/1.5/2, 0.1 and predicted
labels; voc_resnet101.yaml differs from voc_resnet50.yaml only by NET.LR 0.001 (set stage_lr).

Deviations from the official code:
- Backbone: an smp/timm encoder (`classifier_encoder`, resnet50 by default: smp's "imagenet"
  weights are the torchvision ones the config loads) with output stride 16 and its last stage
  undilated (stride removed, dilation 1), as resnets.py builds ResNet-50/101. For encoders with
  another stride-4 width (the tests' tu-resnet10t) fc8_skip and GCI's first conv take that width
  (the code fixes 256, the ResNet-50/101 value). The frozen stem is the encoder's conv1/bn1.
- Data (the pipeline's): the suite's random resized crop (area 0.9-1.0 as DATASET.SCALE_FROM/TO,
  448, PIL bilinear where the code uses bicubic) and flip, without the code's colour jitter (p = 1:
  brightness, contrast, saturation 0.3, hue 0.1); the step's images only.
- Epochs: the code's loop runs epochs 0..20 but its last possible snapshot is the one validated
  before epoch 20's training, and it keeps the snapshot with the best validation proxy
  (1 - loss, every 2 epochs from epoch 5); here the network after 20 epochs, no selection.
- Inference: the scaled views are resized with torch's antialiased bicubic (PIL's a = -0.5 kernel)
  on the normalised image, where the code resizes the uint8 image with PIL bicubic (they differ by
  PIL's uint8 rounding and clipping between its passes); where a scaled image exceeds the pad size
  the padding grows to fit (the code asserts).
- The stochastic gate draws its Bernoulli mask as the code does (dropout of ones) for every call;
  the code caches the ones-tensor of the first batch's shape.
- The focal penalty's p = 3 and lambda = 0.01 (NET.FOCAL_P / FOCAL_LAMBDA, not overridden by the
  ResNet configs) are fixed in the shared ngwp_focal_scores.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.transforms import unnormalize  # the code's `denorm`
from lightning_modules.losses.weak_supervision import (balanced_self_training_loss, ngwp_focal_scores, pamr,
                                                       pseudo_label_masks)
from lightning_modules.methods.weak_baseline import WeakBaseline, build_classifier_encoder

ASPP_DILATIONS = (12, 24, 36)   # stage_net.py: ASPP(fan_out, 8, ...) -> 1, 12, 24, 36


def _rescale(x: torch.Tensor, size) -> torch.Tensor:
    """stage_net.rescale_as: bilinear, align_corners=True."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def _conv(in_channels: int, out_channels: int, kernel_size: int, **kwargs) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, **kwargs)
    nn.init.kaiming_normal_(conv.weight)
    return conv


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> nn.Sequential:
    """conv (no bias, Kaiming normal, 'same' padding) -> BN (1, 0) -> ReLU."""
    conv = _conv(in_channels, out_channels, kernel_size, padding=kernel_size // 2 * dilation, dilation=dilation,
                 bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU())


def undilate(encoder: nn.Module) -> nn.Module:
    """Every dilated conv of the encoder back to dilation 1 (padding k // 2): smp/timm reach an
    output stride below 32 by removing the stride and dilating; resnets.py removes the stride of
    ResNet-50/101's layer4 and keeps dilation 1."""
    for module in encoder.modules():
        if isinstance(module, nn.Conv2d) and module.dilation != (1, 1):
            module.dilation = (1, 1)
            module.padding = tuple(k // 2 for k in module.kernel_size)
    return encoder


class ASPP(nn.Module):
    """models/mods/aspp.py: 1x1 and three dilated 3x3 branches and an image-pool branch (256 each,
    BN, ReLU), concatenated, 1x1 to 256, BN, ReLU, dropout 0.5."""

    def __init__(self, in_channels: int, dilations=ASPP_DILATIONS, channels: int = 256):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(in_channels, channels, 1)] +
                                      [_conv_bn_relu(in_channels, channels, 3, dilation=d) for d in dilations])
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), _conv_bn_relu(in_channels, channels, 1))
        self.project = nn.Sequential(_conv_bn_relu(channels * (len(dilations) + 2), channels, 1), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [branch(x) for branch in self.branches]
        outputs.append(_rescale(self.image_pool(x), x.shape[-2:]))
        return self.project(torch.cat(outputs, dim=1))


class GlobalCueInjection(nn.Module):
    """models/mods/gci.py: the shallow features, normalised (BN without affine), modulated
    AdaIN-style by the maximum over positions of the deep features' 512-channel projection."""

    def __init__(self, shallow_channels: int, deep_channels: int = 256, channels: int = 256):
        super().__init__()
        self.fc_deep = _conv_bn_relu(deep_channels, 2 * channels, 1)
        self.fc_skip = nn.Sequential(_conv(shallow_channels, channels, 1, bias=False),
                                     nn.BatchNorm2d(channels, affine=False))
        self.fc_cls = _conv_bn_relu(channels, channels, 1)
        self.channels = channels

    def forward(self, shallow: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        attributes = self.fc_deep(deep).flatten(2).amax(dim=-1)
        gamma, beta = attributes[:, : self.channels, None, None], attributes[:, self.channels:, None, None]
        x = torch.relu(self.fc_skip(shallow) * (gamma + 1) + beta)
        return self.fc_cls(x)


class StochasticGate(nn.Module):
    """models/mods/sg.py. train: m = (1 - psi) dropout_psi(1) in {0, 1} per element,
    x = m (deep - psi shallow) / max(1e-8, 1 - psi) + (1 - m) shallow; eval: (1 - psi) deep + psi shallow."""

    def __init__(self, psi: float = 0.3):
        super().__init__()
        self.psi = psi

    def forward(self, deep: torch.Tensor, shallow: torch.Tensor) -> torch.Tensor:
        psi = self.psi
        if not self.training:
            return (1 - psi) * deep + psi * shallow
        keep = (1 - psi) * F.dropout(torch.ones_like(deep), psi, training=True)
        return keep * (deep - psi * shallow) / max(1e-8, 1 - psi) + (1 - keep) * shallow


class SingleStageNet(nn.Module):
    """stage_net.py SoftMaxAE on an smp/timm encoder; forward(images) -> (B, K + 1, H/4, W/4)
    logits, channel 0 the constant background logit 1."""

    def __init__(self, encoder: nn.Module, num_classes: int, psi: float = 0.3, frozen_backbone: bool = True,
                 channels: int = 256):
        super().__init__()
        if len(encoder.out_channels) < 4:
            raise ValueError("SS needs an encoder of depth >= 3 (a stride-4 stage and a deeper one)")
        self.encoder = encoder
        shallow, deep = encoder.out_channels[2], encoder.out_channels[-1]
        self.aspp = ASPP(deep, channels=channels)
        self.fc8_skip = _conv_bn_relu(shallow, 48, 1)
        self.fc8_x = _conv_bn_relu(channels + 48, channels, 3)
        self.gci = GlobalCueInjection(shallow, channels, channels)
        self.sg = StochasticGate(psi)
        self.last_conv = nn.Sequential(_conv_bn_relu(channels, channels, 3), nn.Dropout(0.5),
                                       _conv_bn_relu(channels, channels, 3), nn.Dropout(0.1),
                                       _conv(channels, num_classes, 1))
        self._fixed_norms: list[nn.Module] = []
        if frozen_backbone:
            root = getattr(encoder, "model", encoder)   # timm encoders inside smp keep the network in .model
            stem = [getattr(root, name) for name in ("conv1", "bn1")
                    if isinstance(getattr(root, name, None), nn.Module)]
            norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            for module in stem + norms:
                for p in module.parameters():
                    p.requires_grad_(False)
            self._fixed_norms = norms + [m for m in self.aspp.modules() if isinstance(m, nn.BatchNorm2d)]

    def train(self, mode: bool = True):
        super().train(mode)
        for norm in self._fixed_norms:   # BaseNet.train: frozen statistics
            norm.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.encoder(images)
        shallow = features[2]
        x = self.aspp(features[-1])
        skip = self.fc8_skip(shallow)
        x = self.fc8_x(torch.cat([_rescale(x, skip.shape[-2:]), skip], dim=1))
        x = self.sg(x, self.gci(shallow, x))
        x = self.last_conv(x)
        return torch.cat([torch.ones_like(x[:, :1]), x], dim=1)


def ss_class_scores(logits: torch.Tensor) -> torch.Tensor:
    """(B, K + 1, h, w) logits with the background first -> (B, K) nGWP + focal scores of the
    classes (softmax over all K + 1 channels, the background's score dropped)."""
    return ngwp_focal_scores(logits.float())[:, 1:]


def merge_views(masks: torch.Tensor, present: torch.Tensor, background_power: float) -> torch.Tensor:
    """MergeMultiScale: masks (V, K + 1, H, W) of the views on the image grid, present (K,) 0/1 ->
    (H, W) argmax of [mean bg ** background_power, mean class maps of the present classes]."""
    merged = (masks[:, 1:] * present.to(masks)[None, :, None, None]).mean(dim=0)
    background = masks[:, :1].mean(dim=0) ** background_power
    return torch.cat([background, merged], dim=0).argmax(dim=0)


@dataclass
class SingleStage(WeakBaseline):
    name = "ss"

    # The backbone: resnets.py's ResNet-50/101 (layer4 stride 1, not dilated -> stride 16).
    classifier_output_stride: int = 16
    classifier_dilate_last_stage: bool = False
    frozen_backbone: bool = True                # conv1/bn1 and the backbone BNs fixed, ASPP BN statistics fixed
    decoder_channels: int = 256                 # ASPP, decoder, GCI and last_conv width (the code's 256)
    # configs/voc_resnet50.yaml (voc_resnet101.yaml: the same but NET.LR 0.001)
    stage_epochs: int = 20                      # TRAIN.NUM_EPOCHS
    stage_batch_size: int = 16                  # TRAIN.BATCH_SIZE
    stage_crop_size: int = 448                  # DATASET.CROP_SIZE
    stage_scale: list = field(default_factory=lambda: [0.9, 1.0])   # DATASET.SCALE_FROM, SCALE_TO
    stage_lr: float = 0.0005                    # NET.LR
    stage_weight_decay: float = 0.0005          # NET.WEIGHT_DECAY (NET.MOMENTUM 0.9, OPT SGD)
    stage_new_layer_lr_factor: float = 10.0     # ResNet._lr_mult: 1, 1, 10, 10
    stage_poly_power: float = 0.0               # constant lr: train.py has no schedule (the base's poly with power 0)
    pretrain_epochs: int = 5                    # TRAIN.PRETRAIN
    mask_loss_weight: float = 1.0               # NET.MASK_LOSS_BCE
    sg_psi: float = 0.3                         # NET.SG_PSI
    pamr_iterations: int = 10                   # NET.PAMR_ITER
    pamr_dilations: list = field(default_factory=lambda: [1, 2, 4, 8, 12, 24])   # NET.PAMR_KERNEL
    background_cutoff: float = 0.7              # pseudo_gtmask: mask_max[:, :1] *= 0.7
    foreground_cutoff: float = 0.6              # pseudo_gtmask cutoff_top
    cutoff_floor: float = 0.2                   # pseudo_gtmask cutoff_low
    inference_scales: list = field(default_factory=lambda: [1.0, 0.75, 1.25, 1.5])   # TEST.SCALES
    inference_flip: bool = True                 # TEST.FLIP
    inference_pad_size: list = field(default_factory=lambda: [768, 768])   # TEST.PAD_SIZE (H, W)
    background_power: float = 3.0               # TEST.BG_POW
    use_gt_labels: bool = True                  # TEST.USE_GT_LABELS
    fp_cut_score: float = 0.3                   # TEST.FP_CUT_SCORE (only without use_gt_labels)

    def build_classifier(self, num_classes: int) -> nn.Module:
        encoder = build_classifier_encoder(self.classifier_encoder, self.classifier_encoder_depth,
                                           self.classifier_output_stride, self.classifier_encoder_weights)
        if not self.classifier_dilate_last_stage:
            undilate(encoder)
        return SingleStageNet(encoder, num_classes, self.sg_psi, self.frozen_backbone, self.decoder_channels)

    def classifier_parameter_groups(self, classifier: nn.Module, lr: float) -> list[dict]:
        """BaseNet.parameter_groups: backbone weights (lr, weight decay), backbone biases (lr, no
        decay), new weights (x10, decay), new biases (x10, no decay); frozen parameters left out."""
        backbone = {id(p) for p in classifier.encoder.parameters()}
        groups = [[], [], [], []]
        for module in classifier.modules():
            for name, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    groups[2 * (id(p) not in backbone) + (name == "bias")].append(p)
        factor, decay = self.stage_new_layer_lr_factor, self.stage_weight_decay
        settings = [(lr, decay), (lr, 0.0), (lr * factor, decay), (lr * factor, 0.0)]
        return [{"params": params, "lr": rate, "weight_decay": wd}
                for params, (rate, wd) in zip(groups, settings) if params]

    # --- the loss ------------------------------------------------------------------------------
    def self_training_loss(self, images: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor):
        """L_self on PAMR-refined pseudo-masks of the (detached) softmax of `logits`; returns
        (loss, pseudo-masks (B, K + 1, H, W))."""
        logits = logits.float()
        masks = torch.softmax(logits, dim=1).detach()
        raw = _rescale(unnormalize(images.float()), masks.shape[-2:])
        refined = _rescale(pamr(raw, masks, self.pamr_iterations, tuple(self.pamr_dilations)), images.shape[-2:])
        present = torch.cat([labels.new_ones(labels.shape[0], 1), labels], dim=1).to(refined)
        refined = refined * present[:, :, None, None]
        pseudo = pseudo_label_masks(refined, self.background_cutoff, self.foreground_cutoff, self.cutoff_floor).detach()
        loss = balanced_self_training_loss(_rescale(logits, images.shape[-2:]), pseudo, labels)
        return loss, pseudo

    def classifier_loss(self, classifier, batch, progress):
        images, labels = batch["image"], batch["labels"].float()
        logits = classifier(images)
        cls = F.multilabel_soft_margin_loss(ss_class_scores(logits), labels)
        self_training, _ = self.self_training_loss(images, logits, labels)
        loss = cls + self.mask_loss_weight * self_training if progress.epoch >= self.pretrain_epochs else cls
        return loss, {"cls": cls.detach(), "self_training": self_training.detach()}

    # --- inference -----------------------------------------------------------------------------
    def view_masks(self, classifier, image: torch.Tensor):
        """The views of infer_val.py: (V, K + 1, H, W) softmax masks on the image grid and (V, K)
        class scores, V = scales x flips."""
        height, width = image.shape[-2:]
        sizes = [(max(1, int(round(height * s))), max(1, int(round(width * s)))) for s in self.inference_scales]
        pad_h = max([int(self.inference_pad_size[0])] + [h for h, _ in sizes])
        pad_w = max([int(self.inference_pad_size[1])] + [w for _, w in sizes])
        views, boxes = [], []
        for h, w in sizes:
            resized = image if (h, w) == (height, width) else F.interpolate(
                image, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
            for flip in ([False, True] if self.inference_flip else [False]):
                top, left = (pad_h - h) // 2, (pad_w - w) // 2
                view = resized.flip(-1) if flip else resized
                views.append(F.pad(view, [left, pad_w - w - left, top, pad_h - h - top]))
                boxes.append((top, left, h, w, flip))
        logits = classifier(torch.cat(views)).float()
        masks = _rescale(torch.softmax(logits, dim=1), (pad_h, pad_w))
        out = []
        for v, (top, left, h, w, flip) in enumerate(boxes):
            mask = F.interpolate(masks[v: v + 1, :, top: top + h, left: left + w], size=(height, width),
                                 mode="bilinear", align_corners=False)
            out.append(mask.flip(-1) if flip else mask)
        return torch.cat(out), ss_class_scores(logits)

    def present_classes(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """infer_val.py: the image labels (USE_GT_LABELS), else max over views of sigmoid(score) > cut."""
        if self.use_gt_labels:
            return (labels > 0).float()
        return (torch.sigmoid(scores).amax(dim=0) > self.fp_cut_score).float()

    @torch.no_grad()
    def infer(self, classifier, image, labels):
        was_training = classifier.training
        classifier.eval()
        masks, scores = self.view_masks(classifier, image)
        classifier.train(was_training)
        return merge_views(masks, self.present_classes(scores, labels.to(scores.device)), self.background_power)


METHOD = SingleStage
