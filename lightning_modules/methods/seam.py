"""SEAM (Wang et al., CVPR 2020, "Self-supervised Equivariant Attention Mechanism for Weakly
Supervised Semantic Segmentation") as its repository's defaults compute it (YudeWang/SEAM:
`network/resnet38_SEAM.py`, `train_SEAM.py`, `infer_SEAM.py`, then the AffinityNet of
`network/resnet38_aff.py`, `train_aff.py`, `infer_aff.py`, `voc12/data.py`, `tool/imutils.py`;
shared/docs/METHODS_others.md §5), on the pipeline of lightning_modules/methods/weak_baseline.py.
A stage has four phases (`run_stage`): the classifier, its CAMs and dense-CRF labels of every
training image, the AffinityNet trained on those labels, and the random-walk masks.

Classifier (`SEAMClassifier`, resnet38_SEAM.Net): encoder -> Dropout2d(0.5) -> 1x1 conv without
bias (`fc8`, Xavier) to K + 1 maps, channel 0 the background's. Like the repository's, the
background channel of fc8 never receives a gradient (the losses overwrite it or drop it) and
inference never reads it. PCM (pixel correlation module), on the detached CAM normalised as
    c = ReLU(cam - 1e-5) / (max_hw ReLU(cam) + 1e-5),  c_0 = 1 - max_k>=1 c_k,
    c_k = 0 where c_k < max_k'>=1 c_k' (k >= 1: only the top foreground class is kept),
and on f = f9([image resized to the map grid (bilinear, align_corners), ReLU(f8_3(tap 1)),
ReLU(f8_4(tap 2))]) (taps detached; 1x1 convs without bias to 64, 128 and 192 channels; Kaiming,
Kaiming, Xavier gain 4), f_i normalised by |f_i| + 1e-5:
    a_ij = ReLU(f_i . f_j),   cam_rv_j = sum_i c_i a_ij / (sum_i a_ij + 1e-5).
Both maps are upsampled (bilinear, align_corners) to the input size: forward -> (cam, cam_rv).

Training loss (train_SEAM.py): image 1 is the stage's crop, image 2 its copy resized by 0.3
(bilinear, align_corners); L = (cls_1 + cls_2)/2 + (min_1 + min_2)/2 + ER + ECR_1 + ECR_2 with
  cls_s   multi-label soft-margin on the global average of the K raw foreground maps of image s;
  min_s   the adaptive min-pooling term: on the PCM maps masked by the label, per pixel the max
          over the foreground channels; the mean of ReLU of the h*w//4 smallest values;
  ER      mean |cam_1 - cam_2| over the foreground channels, cam_1 max-normed then resized by 0.3,
          cam_2 max-normed (max_norm: ReLU(p - min - 1e-5) / (max - min + 1e-5) per map after
          ReLU), both masked by the label [1, labels];
  ECR_1   with the background channel of the (normalised, masked) cam_2 set to 1 - max of its
          foreground channels and only its top foreground class kept (max_onehot, detached):
          |that - cam_rv_1|, the mean of its int((K + 1) h w 0.2) largest values per image
          (cam_rv_1 max-normed, resized, masked like cam_1); ECR_2 the same with 1 and 2 swapped.
Inference (infer_SEAM.py): the PCM maps cam_rv of the image at scales 0.5, 1, 1.5, 2 and their
flips, the foreground channels upsampled to the image (bilinear), masked by the label, summed;
ReLU; per class values below min + 1e-5 set to 0, then (s - min - 1e-5) / (max - min + 1e-5) (as
the code computes it, so a class's minimum pixels get -(min + 1e-5) / (max - min + 1e-5), negative).
Dense CRF (imutils.crf_inference: 10 iterations, Gaussian sxy 3 compat 3, bilateral sxy 80 srgb
13 compat 10, unary -log(clip(p, 1e-5))) on [(1 - max_k cam_k)^alpha, cams of the present classes],
at alpha 4 ("la") and 24 ("ha").

AffinityNet (resnet38_aff.Net, train_aff.py, voc12/data.py): a second encoder (initialised like
the classifier's, as the repository starts it from the ImageNet weights), features ELU(f8_3(tap
1)) 64, ELU(f8_4(tap 2)) 128, ELU(f8_5(last)) 256, concatenated, ELU(f9(.)) 448 (1x1, no bias;
Kaiming, Xavier gain 4); affinity of pixels i, j of the feature grid a_ij = exp(-mean_c |f_i -
f_j|), for the pairs within radius 5 (offsets (0, 1..r-1) and (dy in 1..r-1, |dx| < r, dx^2 + dy^2
< r^2), from every pixel of rows [0, h - r + 1), columns [r - 1, w - r + 1)). Its data: the image
and the two CRF score maps, one random crop (`affinity_crop_size`, by default `stage_crop_size`:
the repository has one --crop_size; zero padding where the image is smaller: black image, no
score) and a horizontal flip, the scores averaged over 8 x 8 blocks (the output stride); per cell
label = argmax of la, 255 where la's argmax is the background, 0 where ha's is, 255 where no score;
pair labels (ExtractAffinityLabelInRadius): bg-pos (both 0), fg-pos (equal, foreground, both <
255), neg (different, both < 255). Loss: bg/4 + fg/4 + neg/2 with bg = sum -log(a + 1e-5) over
bg-pos pairs / (their number + 1e-5), fg likewise, neg = sum -log(1 + 1e-5 - a) / (number +
1e-5). 8 epochs, batch 8, lr 0.01 (new layers x10), wd 5e-4, poly.
Random walk (infer_aff.py): the image zero-padded to a multiple of 8; the normalised CAMs of the
present classes (others 0) with background (1 - max(0, max_k cam_k))^6 (the 0: VOC's absent
classes), zero-padded and averaged over 8 x 8 blocks; the dense affinity of the padded image
(pairs both ways, 1 on the diagonal) to the power beta = 8, normalised per column to T,
T^(2^logt) by logt = 6 squarings; scores = cams T, upsampled (bilinear) to the padded size,
argmax, cropped: 0 background, k the k-th stage class. SEAM never abstains in its final masks.

Deviations from the official code, precisely:
- the pipeline's (weak_baseline.py): an smp/timm ResNet instead of ResNet-38, trained with its
  BatchNorm (ResNet-38's is frozen, and so are its first blocks); the stage's training transform
  (random resized crop + flip) instead of RandomResizeLong(448, 768) + colour jitter + crop; the
  scaled inference images resized bilinearly on the normalised tensor (PIL bicubic there); the
  repository's lr groups 1x/2x/10x/20x (biases; ResNet-38 convs have none, nor have the new
  layers) are 1x for the encoder and 10x for the new layers; epochs, batch and lr are the
  repository's (`stage_epochs` 8 etc.).
- the feature taps: ResNet-38's conv4 (b5's input, 512 ch, stride 8) and conv5 (b6's input, 1024
  ch, stride 8 dilated) are the encoder's third- and second-last stages (a ResNet-50 at depth 5,
  output stride 8: layer2, 512 ch, and layer3, 1024 ch, both at stride 8), its conv6 (4096 ch) the
  last stage (layer4, 2048 ch). With a shallower encoder (depth 3, the tests) the taps are at a
  finer stride and are resized (bilinear) to the last stage's grid. The taps are post-activation
  ResNet outputs, ResNet-38's are pre-activation BN-ReLU outputs.
- the AffinityNet's training crops are not colour-jittered (the pipeline's); the CRF scores it
  learns from are kept between the phases as uint8 (steps of 1/255) in `crf/` of the stage
  directory (removed once the AffinityNet is trained), not as float .npy dictionaries.
- the ECR's top-k counts K + 1 channels (the stage's classes and the background) where the
  repository counts VOC's 21 (20 classes + background): 20 % of (K + 1) h w values per image.
- the radius of the pairs on a feature grid other than the training crop's: the repository's rule
  (radius (min edge - 1) // 2 when the min edge is below 2 r + 1), and on a grid so small that this
  gives no pair (below 5 cells), the largest radius that does (min(r, (w + 1) // 2, h)); the
  training labels use the same radius as the network (the repository's crop is always 56 cells).
- `infer` (the qualitative figure's pseudo-masks of test images) gives the random-walk mask with
  the stage's AffinityNet (affinity.pt of the stage directory); without that file, the CRF labels
  the AffinityNet learns from (la foreground, ha background, 255 between).
- the PCM and the random walk are computed in float32 also under bf16 autocast.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from datamodules.datasets.voc import load_image
from datamodules.incremental import DECODED
from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD, unnormalize
from lightning_modules.methods.base import MethodUnavailable
from lightning_modules.methods.weak_baseline import (WeakBaseline, build_classifier_encoder, full_image, multiscale_maps,
                                                     write_per_image)

AFFINITY = "affinity.pt"
AFFINITY_TRAINING = "affinity-training.pt"   # WeakBaseline.trained_network's "<name>-training.pt" for "affinity"
CRF_SCORES = "crf"

# tool/imutils.py crf_inference
CRF_GAUSSIAN = {"sxy": 3, "compat": 3}
CRF_BILATERAL = {"sxy": 80, "srgb": 13, "compat": 10}
PYDENSECRF_MISSING = ("SEAM needs the dense CRF of pydensecrf: install it with `.venv/bin/python -m pip install "
                      "pydensecrf2==1.1` (it builds from source: needs g++ and the Python headers)")


# --- the classifier ------------------------------------------------------------------------------------
def _to_grid(features: torch.Tensor, size) -> torch.Tensor:
    if tuple(features.shape[-2:]) == tuple(size):
        return features
    return F.interpolate(features, size=size, mode="bilinear", align_corners=False)


def pcm_input(cam: torch.Tensor) -> torch.Tensor:
    """The detached CAM the PCM refines (resnet38_SEAM.Net.forward): (N, K+1, h, w) raw maps ->
    per map ReLU(cam - 1e-5) / (max ReLU(cam) + 1e-5); channel 0 = 1 - max of the foreground
    ones; a foreground value below the foreground maximum of its pixel set to 0."""
    with torch.no_grad():
        relu = torch.relu(cam.detach())
        peak = relu.flatten(2).amax(dim=-1)[:, :, None, None] + 1e-5
        norm = torch.relu(relu - 1e-5) / peak
        foreground = norm[:, 1:]
        top = foreground.amax(dim=1, keepdim=True)
        foreground = torch.where(foreground < top, torch.zeros_like(foreground), foreground)
        return torch.cat([1.0 - top, foreground], dim=1)


def pixel_correlation(cam: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """PCM's refinement: cam (N, C, h, w), features (N, D, h, w) (after f9) ->
    cam_rv_j = sum_i cam_i a_ij / (sum_i a_ij + 1e-5), a_ij = ReLU(f_i . f_j / ((|f_i| + 1e-5)(|f_j| + 1e-5)))."""
    n, d, h, w = features.shape
    f = features.reshape(n, d, h * w)
    f = f / (torch.norm(f, dim=1, keepdim=True) + 1e-5)
    affinity = torch.relu(torch.matmul(f.transpose(1, 2), f))
    affinity = affinity / (affinity.sum(dim=1, keepdim=True) + 1e-5)
    return torch.matmul(cam.reshape(n, -1, h * w), affinity).reshape(n, -1, h, w)


class SEAMClassifier(nn.Module):
    """encoder -> dropout -> fc8 (K + 1 maps, background first) and the PCM (module docstring).
    forward(images) -> (cam, cam_rv), both (N, K + 1, H, W) at the input size."""

    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float = 0.5):
        super().__init__()
        channels = list(encoder.out_channels)
        if len(channels) < 4:
            raise ValueError("SEAM's classifier needs an encoder of depth >= 3 (two taps before the last stage)")
        self.encoder = encoder
        self.dropout = nn.Dropout2d(dropout)
        self.fc8 = nn.Conv2d(channels[-1], num_classes + 1, 1, bias=False)
        self.f8_3 = nn.Conv2d(channels[-3], 64, 1, bias=False)
        self.f8_4 = nn.Conv2d(channels[-2], 128, 1, bias=False)
        self.f9 = nn.Conv2d(192 + 3, 192, 1, bias=False)
        nn.init.xavier_uniform_(self.fc8.weight)
        nn.init.kaiming_normal_(self.f8_3.weight)
        nn.init.kaiming_normal_(self.f8_4.weight)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)

    def pcm(self, cam: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """cam (N, K+1, ., .) resized (bilinear, align_corners) to the grid of `features` (N, 195, h, w), f9, PCM."""
        cam = F.interpolate(cam, size=features.shape[-2:], mode="bilinear", align_corners=True)
        return pixel_correlation(cam, self.f9(features))

    def forward(self, images: torch.Tensor):
        height, width = images.shape[-2:]
        stages = self.encoder(images)
        cam = self.fc8(self.dropout(stages[-1]))
        grid = cam.shape[-2:]
        with torch.autocast(device_type=images.device.type, enabled=False):
            normalised = pcm_input(cam.float())
            tap3 = torch.relu(self.f8_3(_to_grid(stages[-3].detach().float(), grid)))
            tap4 = torch.relu(self.f8_4(_to_grid(stages[-2].detach().float(), grid)))
            small = F.interpolate(images.float(), size=grid, mode="bilinear", align_corners=True)
            cam_rv = self.pcm(normalised, torch.cat([small, tap3, tap4], dim=1))
        cam_rv = F.interpolate(cam_rv, size=(height, width), mode="bilinear", align_corners=True)
        cam = F.interpolate(cam, size=(height, width), mode="bilinear", align_corners=True)
        return cam, cam_rv


# --- the training losses (train_SEAM.py) ------------------------------------------------------------------
def max_norm(p: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """tool/visualization.max_norm (torch, 4-D): ReLU, then per map ReLU(p - min - eps) / (max - min + eps)."""
    p = torch.relu(p)
    flat = p.flatten(2)
    high = flat.amax(dim=-1)[:, :, None, None]
    low = flat.amin(dim=-1)[:, :, None, None]
    return torch.relu(p - low - eps) / (high - low + eps)


def max_onehot(x: torch.Tensor) -> torch.Tensor:
    """A copy of x (N, K+1, h, w) with each foreground value that is not its pixel's foreground
    maximum set to 0 (the background channel 0 kept)."""
    foreground = x[:, 1:]
    top = foreground.amax(dim=1, keepdim=True)
    return torch.cat([x[:, :1], torch.where(foreground != top, torch.zeros_like(foreground), foreground)], dim=1)


def with_background(cam: torch.Tensor) -> torch.Tensor:
    """cam with channel 0 replaced by 1 - max of the foreground channels."""
    return torch.cat([1.0 - cam[:, 1:].amax(dim=1, keepdim=True), cam[:, 1:]], dim=1)


def adaptive_min_pooling_loss(x: torch.Tensor) -> torch.Tensor:
    """x (N, K, h, w): per pixel the max over the channels; the sum of ReLU of the h*w//4
    smallest of them, over (h*w//4) N."""
    n, _, h, w = x.shape
    k = h * w // 4
    smallest = torch.topk(x.amax(dim=1).reshape(n, -1), k=k, dim=-1, largest=False)[0]
    return torch.relu(smallest).sum() / (k * n)


def equivariance_loss(cam_a: torch.Tensor, cam_b: torch.Tensor) -> torch.Tensor:
    """ER: mean |cam_a - cam_b| over the foreground channels (1:)."""
    return torch.mean(torch.abs(cam_a[:, 1:] - cam_b[:, 1:]))


def ecr_loss(target: torch.Tensor, refined: torch.Tensor, fraction: float = 0.2) -> torch.Tensor:
    """ECR: |max_onehot(target, detached) - refined| (N, C, h, w), the mean over the batch of the
    int(C h w fraction) largest values of each image."""
    n, c, h, w = refined.shape
    difference = torch.abs(max_onehot(target.detach()) - refined)
    k = int(c * h * w * fraction)
    return torch.mean(torch.topk(difference.reshape(n, -1), k=k, dim=-1)[0])


# --- inference: CAMs and the dense CRF (infer_SEAM.py) ---------------------------------------------------
def normalise_cams(summed: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """infer_SEAM's norm_cam of the summed maps (K, H, W) for the present classes (others 0):
    ReLU; values below min + 1e-5 set to 0; (s - min - 1e-5) / (max - min + 1e-5)."""
    s = torch.relu(summed)
    high = s.flatten(1).amax(dim=1)[:, None, None]
    low = s.flatten(1).amin(dim=1)[:, None, None]
    s = torch.where(s < low + 1e-5, torch.zeros_like(s), s)
    norm = (s - low - 1e-5) / (high - low + 1e-5)
    return norm * present.to(norm.dtype)[:, None, None]


def require_pydensecrf():
    """(pydensecrf.densecrf, pydensecrf.utils.unary_from_softmax), or one RuntimeError saying how to install it."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError:
        raise MethodUnavailable(PYDENSECRF_MISSING) from None
    return dcrf, unary_from_softmax


def crf_inference(image: np.ndarray, probabilities: np.ndarray, iterations: int = 10) -> np.ndarray:
    """tool/imutils.crf_inference: image (H, W, 3) uint8 RGB, probabilities (n, H, W) -> the
    mean-field marginals (n, H, W) float32 after `iterations`."""
    dcrf, unary_from_softmax = require_pydensecrf()
    n, height, width = probabilities.shape
    crf = dcrf.DenseCRF2D(width, height, n)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probabilities.astype(np.float32))))
    crf.addPairwiseGaussian(**CRF_GAUSSIAN)
    crf.addPairwiseBilateral(rgbim=np.array(image, dtype=np.uint8, order="C", copy=True), **CRF_BILATERAL)
    return np.array(crf.inference(iterations), dtype=np.float32).reshape(n, height, width)


def crf_scores(image: np.ndarray, cams: np.ndarray, alpha: float, iterations: int = 10) -> np.ndarray:
    """infer_SEAM's _crf_with_alpha: cams (n, H, W) of the present classes -> CRF marginals
    (n + 1, H, W) of [background (1 - max cams)^alpha, the classes]."""
    if len(cams) == 0:
        return np.ones((1, *image.shape[:2]), np.float32)
    background = np.power(1.0 - np.max(cams, axis=0, keepdims=True), alpha)
    return crf_inference(image, np.concatenate([background, cams], axis=0), iterations)


def confident_labels(low: np.ndarray, high: np.ndarray, no_score: np.ndarray | None = None) -> np.ndarray:
    """voc12/data.py VOC12AffDataset: low / high (n + 1, ...) scores at alpha la / ha -> argmax of
    low (the position among [background, present classes]), 255 where low's argmax is the
    background, 0 where high's is, 255 where `no_score`. uint8."""
    low_arg, high_arg = low.argmax(axis=0), high.argmax(axis=0)
    label = low_arg.astype(np.uint8)
    label[low_arg == 0] = 255
    label[high_arg == 0] = 0
    if no_score is not None:
        label[no_score] = 255
    return label


def to_uint8_image(image: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) ImageNet-normalised -> (H, W, 3) uint8 (the pixels it was made from)."""
    pixels = (unnormalize(image.float())[0] * 255.0).round().clamp(0, 255)
    return pixels.permute(1, 2, 0).to(torch.uint8).cpu().numpy()


# --- the AffinityNet and the random walk (resnet38_aff.py, infer_aff.py) ----------------------------------
def search_offsets(radius: int) -> list[tuple[int, int]]:
    """The (dy, dx) of the pairs within `radius` (ExtractAffinityLabelInRadius / get_indices_of_pairs)."""
    offsets = [(0, dx) for dx in range(1, radius)]
    for dy in range(1, radius):
        offsets += [(dy, dx) for dx in range(-radius + 1, radius) if dx * dx + dy * dy < radius * radius]
    return offsets


def pair_radius(height: int, width: int, radius: int) -> int:
    """The radius used on a (height, width) grid (module docstring)."""
    edge = min(height, width)
    r = (edge - 1) // 2 if edge < 2 * radius + 1 else radius
    if r < 2:
        r = min(radius, (width + 1) // 2, height)
    if r < 2:
        raise ValueError(f"a {height}x{width} feature grid has no pixel pairs for the AffinityNet")
    return r


def _pair_views(grid: torch.Tensor, radius: int):
    """grid (..., h, w) -> (from (..., M), to (..., P, M)) of the pairs within radius."""
    h, w = grid.shape[-2:]
    r = radius - 1
    rows, cols = h - r, w - 2 * r
    source = grid[..., :rows, r:r + cols].flatten(-2)
    targets = [grid[..., dy:dy + rows, r + dx:r + dx + cols].flatten(-2) for dy, dx in search_offsets(radius)]
    return source, torch.stack(targets, dim=-2)


def pair_indices(height: int, width: int, radius: int):
    """get_indices_of_pairs: flat indices (M,) of the source pixels and (P, M) of their partners."""
    return _pair_views(torch.arange(height * width).reshape(height, width), radius)


def pair_affinities(features: torch.Tensor, radius: int) -> torch.Tensor:
    """features (N, C, h, w) -> a (N, P, M) = exp(-mean_c |f_to - f_from|) for the pairs within radius."""
    source, targets = _pair_views(features, radius)
    return torch.exp(-torch.mean(torch.abs(targets - source[:, :, None, :]), dim=1))


def affinity_labels(label: torch.Tensor, radius: int):
    """ExtractAffinityLabelInRadius on (N, h, w) labels (255 ignored) -> bg-pos, fg-pos, neg (N, P, M) float."""
    source, targets = _pair_views(label.long(), radius)
    source = source[:, None, :]
    valid = (targets < 255) & (source < 255)
    equal = targets == source
    background = equal & (source == 0)
    foreground = equal & (source != 0) & valid
    negative = ~equal & valid
    return background.float(), foreground.float(), negative.float()


def affinity_loss(affinity: torch.Tensor, background: torch.Tensor, foreground: torch.Tensor, negative: torch.Tensor):
    """train_aff.py: bg/4 + fg/4 + neg/2 (module docstring) -> (loss, terms)."""
    bg = torch.sum(-background * torch.log(affinity + 1e-5)) / (background.sum() + 1e-5)
    fg = torch.sum(-foreground * torch.log(affinity + 1e-5)) / (foreground.sum() + 1e-5)
    neg = torch.sum(-negative * torch.log(1.0 + 1e-5 - affinity)) / (negative.sum() + 1e-5)
    return bg / 4 + fg / 4 + neg / 2, {"bg": bg, "fg": fg, "neg": neg}


def dense_affinity(features: torch.Tensor, radius: int) -> torch.Tensor:
    """features (C, h, w) of one image -> the (h w, h w) affinity matrix: the pair affinities
    both ways, 1 on the diagonal, 0 beyond the radius (resnet38_aff.Net.forward(to_dense=True))."""
    h, w = features.shape[-2:]
    values = pair_affinities(features[None], radius)[0]
    source, targets = pair_indices(h, w, radius)
    source = source.to(features.device).expand_as(targets)
    targets = targets.to(features.device)
    matrix = torch.eye(h * w, device=features.device, dtype=values.dtype)
    matrix[source.reshape(-1), targets.reshape(-1)] = values.reshape(-1)
    matrix[targets.reshape(-1), source.reshape(-1)] = values.reshape(-1)
    return matrix


def random_walk(cams: torch.Tensor, affinity: torch.Tensor, beta: float, logt: int) -> torch.Tensor:
    """infer_aff.py: cams (C, n) -> cams T^(2^logt), T = affinity^beta normalised per column."""
    transition = torch.pow(affinity, beta)
    transition = transition / transition.sum(dim=0, keepdim=True)
    for _ in range(logt):
        transition = torch.matmul(transition, transition)
    return torch.matmul(cams, transition)


class AffinityNet(nn.Module):
    """encoder -> ELU(f8_3(tap 1)), ELU(f8_4(tap 2)), ELU(f8_5(last)) -> ELU(f9): (N, 448, h, w)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        channels = list(encoder.out_channels)
        if len(channels) < 4:
            raise ValueError("SEAM's AffinityNet needs an encoder of depth >= 3 (two taps before the last stage)")
        self.encoder = encoder
        self.f8_3 = nn.Conv2d(channels[-3], 64, 1, bias=False)
        self.f8_4 = nn.Conv2d(channels[-2], 128, 1, bias=False)
        self.f8_5 = nn.Conv2d(channels[-1], 256, 1, bias=False)
        self.f9 = nn.Conv2d(448, 448, 1, bias=False)
        for layer in (self.f8_3, self.f8_4, self.f8_5):
            nn.init.kaiming_normal_(layer.weight)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        stages = self.encoder(images)
        grid = stages[-1].shape[-2:]
        f3 = _to_grid(F.elu(self.f8_3(stages[-3])), grid)
        f4 = _to_grid(F.elu(self.f8_4(stages[-2])), grid)
        f5 = F.elu(self.f8_5(stages[-1]))
        return F.elu(self.f9(torch.cat([f3, f4, f5], dim=1)))


def block_mean(array: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) -> (ceil(H/size), ceil(W/size), C) means of size x size blocks, zero-padded at the
    end (skimage.measure.block_reduce(np.mean), imutils.AvgPool2d)."""
    height, width, channels = array.shape
    padded = np.zeros((math.ceil(height / size) * size, math.ceil(width / size) * size, channels), array.dtype)
    padded[:height, :width] = array
    h, w = padded.shape[0] // size, padded.shape[1] // size
    return padded.reshape(h, size, w, size, channels).mean(axis=(1, 3))


def random_crop(array: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """imutils.RandomCrop: a size x size window of (H, W, C), placed at a random offset in a zero
    container where the array is smaller."""
    height, width = array.shape[:2]
    out = np.zeros((size, size, array.shape[2]), np.float32)
    ch, cw = min(size, height), min(size, width)
    if width > size:
        out_left, left = 0, int(rng.integers(width - size + 1))
    else:
        out_left, left = int(rng.integers(size - width + 1)), 0
    if height > size:
        out_top, top = 0, int(rng.integers(height - size + 1))
    else:
        out_top, top = int(rng.integers(size - height + 1)), 0
    out[out_top:out_top + ch, out_left:out_left + cw] = array[top:top + ch, left:left + cw]
    return out


def _npz_path(directory: Path, image_id) -> Path:
    return Path(directory) / CRF_SCORES / (str(image_id).replace("/", "__") + ".npz")


class AffinityImages(Dataset):
    """The AffinityNet's data (train_aff.py, VOC12AffDataset): the image and its la/ha CRF scores,
    cropped and flipped together (seeded by (seed, epoch, row)), the image normalised, the scores
    averaged over `stride` blocks into the cell labels. Item: {"image", "label" (h, w), "index"}."""

    def __init__(self, files, rows, directory: Path, crop_size: int, stride: int, seed: int = 0,
                 cache_decoded: bool = False):
        self.files, self.rows, self.directory = files, np.asarray(rows), Path(directory)
        self.crop_size, self.stride, self.seed, self.cache_decoded = crop_size, stride, seed, cache_decoded

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        row = int(self.rows[i])
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, row]))
        path = self.files.images[row]
        image = DECODED.get(load_image, path) if self.cache_decoded else load_image(path)
        with np.load(_npz_path(self.directory, self.files.ids[row])) as stored:
            low, high = stored["low"], stored["high"]
        scores = np.concatenate([low, high], axis=0).transpose(1, 2, 0).astype(np.float32) / 255.0
        joint = random_crop(np.concatenate([image.astype(np.float32), scores], axis=-1), self.crop_size, rng)
        if rng.integers(2):
            joint = joint[:, ::-1]
        pixels = (joint[..., :3] / 255.0 - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
        pooled = block_mean(np.ascontiguousarray(joint[..., 3:]), self.stride)
        no_score = pooled.max(axis=-1) < 1e-5
        n = low.shape[0]
        label = confident_labels(pooled[..., :n].transpose(2, 0, 1), pooled[..., n:].transpose(2, 0, 1), no_score)
        return {"image": torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))),
                "label": torch.from_numpy(label), "index": row}


# --- the method ------------------------------------------------------------------------------------------
@dataclass
class SEAM(WeakBaseline):
    name = "seam"

    dropout: float = 0.5                 # resnet38_SEAM dropout7
    downscale_factor: float = 0.3        # train_SEAM.py scale_factor (the second image of a pair)
    ecr_top_fraction: float = 0.2        # train_SEAM.py: the top 20 % of the ECR differences
    crf_alpha_low: float = 4.0           # infer_SEAM.py crf_alpha[0] ("la")
    crf_alpha_high: float = 24.0         # infer_SEAM.py crf_alpha[1] ("ha")
    crf_iterations: int = 10             # imutils.crf_inference t
    affinity_radius: int = 5             # train_aff.py radius (VOC12AffDataset), resnet38_aff.Net.radius
    affinity_epochs: int = 8             # train_aff.py --max_epoches
    affinity_lr: float = 0.01            # train_aff.py --lr (new layers x10: from_scratch_layers)
    affinity_batch_size: int = 8         # train_aff.py --batch_size
    affinity_weight_decay: float = 5e-4  # train_aff.py --wt_dec
    affinity_crop_size: int | None = None   # train_aff.py --crop_size (448); None: stage_crop_size
    random_walk_alpha: float = 6.0       # infer_aff.py --alpha (background (1 - max)^alpha)
    random_walk_beta: float = 8.0        # infer_aff.py --beta
    random_walk_logt: int = 6            # infer_aff.py --logt (T^(2^logt))

    def __post_init__(self):
        super().__post_init__()
        self._affinity: nn.Module | None = None

    def stage_requirements(self, context) -> None:
        require_pydensecrf()

    # --- the classifier ---------------------------------------------------------------------------
    def _encoder(self):
        return build_classifier_encoder(self.classifier_encoder, self.classifier_encoder_depth,
                                        self.classifier_output_stride, self.classifier_encoder_weights)

    def build_classifier(self, num_classes: int) -> nn.Module:
        return SEAMClassifier(self._encoder(), num_classes, self.dropout)

    def build_affinity_net(self) -> nn.Module:
        return AffinityNet(self._encoder())

    def classifier_loss(self, classifier, batch, progress):
        image = batch["image"]
        labels = batch["labels"].float()
        mask = torch.cat([torch.ones_like(labels[:, :1]), labels], dim=1)[:, :, None, None]
        small = F.interpolate(image, scale_factor=self.downscale_factor, mode="bilinear", align_corners=True)

        def resized(x):
            return F.interpolate(x, scale_factor=self.downscale_factor, mode="bilinear", align_corners=True)

        cam1, rv1 = (x.float() for x in classifier(image))
        cls1 = F.multilabel_soft_margin_loss(cam1.mean(dim=(2, 3))[:, 1:], labels)
        min1 = adaptive_min_pooling_loss((rv1 * mask)[:, 1:])
        cam1, rv1 = resized(max_norm(cam1)) * mask, resized(max_norm(rv1)) * mask

        cam2, rv2 = (x.float() for x in classifier(small))
        cls2 = F.multilabel_soft_margin_loss(cam2.mean(dim=(2, 3))[:, 1:], labels)
        min2 = adaptive_min_pooling_loss((rv2 * mask)[:, 1:])
        cam2, rv2 = max_norm(cam2) * mask, max_norm(rv2) * mask

        er = equivariance_loss(cam1, cam2)
        ecr = (ecr_loss(with_background(cam2), rv1, self.ecr_top_fraction)
               + ecr_loss(with_background(cam1), rv2, self.ecr_top_fraction))
        cls = (cls1 + cls2) / 2 + (min1 + min2) / 2
        return cls + er + ecr, {"cls": cls, "er": er, "ecr": ecr}

    # --- inference ----------------------------------------------------------------------------------
    def cams(self, classifier, image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """infer_SEAM's normalised CAMs (K, H, W) of the image's present classes (others 0)."""
        present = labels.to(image.device) > 1e-5
        summed = multiscale_maps(lambda view: classifier(view)[1][:, 1:], image, self.inference_scales,
                                 self.inference_flip)
        summed = summed * present.to(summed.dtype)[:, None, None]
        return normalise_cams(summed.float(), present)

    def crf_pair(self, image: np.ndarray, cams: torch.Tensor, present: torch.Tensor):
        """The la and ha CRF scores (n + 1, H, W) over [background, present classes]."""
        values = cams[present.to(cams.device)].cpu().numpy().astype(np.float32)
        return (crf_scores(image, values, self.crf_alpha_low, self.crf_iterations),
                crf_scores(image, values, self.crf_alpha_high, self.crf_iterations))

    def random_walk_mask(self, affinity_net, image: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
        """infer_aff.py: (1, 3, H, W) image, (K, H, W) normalised CAMs -> (H, W) ids in 0..K."""
        stride = self.classifier_output_stride
        height, width = image.shape[-2:]
        padded_h, padded_w = math.ceil(height / stride) * stride, math.ceil(width / stride) * stride
        grid = (padded_h // stride, padded_w // stride)
        with torch.no_grad(), torch.autocast(device_type=image.device.type, enabled=False):
            # the max over VOC's 20 channels includes absent classes (0): the background is at most 1
            top = cams.float().amax(dim=0, keepdim=True).clamp(min=0.0)
            scores = torch.cat([(1.0 - top) ** self.random_walk_alpha, cams.float()])
            scores = F.pad(scores, (0, padded_w - width, 0, padded_h - height))
            scores = F.avg_pool2d(scores[None], stride, stride)[0]
            padded = F.pad(image.float(), (0, padded_w - width, 0, padded_h - height))
            features = _to_grid(affinity_net(padded).float(), grid)[0]
            affinity = dense_affinity(features, pair_radius(*grid, self.affinity_radius))
            walked = random_walk(scores.reshape(scores.shape[0], -1), affinity, self.random_walk_beta,
                                 self.random_walk_logt)
            walked = F.interpolate(walked.reshape(1, -1, *grid), size=(padded_h, padded_w), mode="bilinear",
                                   align_corners=False)
        return walked[0].argmax(dim=0)[:height, :width]

    def crf_mask(self, image: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The CRF labels of the AffinityNet's training, as channel ids 0..K (255 between la and ha)."""
        present = (labels.to(cams.device) > 1e-5)
        low, high = self.crf_pair(to_uint8_image(image), cams, present)
        positions = confident_labels(low, high).astype(np.int64)
        ids = np.full(256, 255, np.int64)
        ids[:1 + int(present.sum())] = [0, *(torch.nonzero(present).flatten().cpu().numpy() + 1)]
        return torch.from_numpy(ids[positions]).to(image.device)

    def infer(self, classifier, image, labels):
        """The stage's mask with the stage directory's AffinityNet, else the CRF labels (docstring)."""
        cams = self.cams(classifier, image, labels)
        affinity = self.stage_affinity_net(image.device)
        if affinity is None:
            return self.crf_mask(image, cams, labels)
        return self.random_walk_mask(affinity, image, cams)

    def stage_affinity_net(self, device) -> nn.Module | None:
        if self.stage_dir is None or not (Path(self.stage_dir) / AFFINITY).exists():
            return None
        if self._affinity is None:
            network = self.without_pretrained_weights().build_affinity_net()
            network.load_state_dict(torch.load(Path(self.stage_dir) / AFFINITY, map_location="cpu", weights_only=True))
            self._affinity = network.eval()
        return self._affinity.to(device)

    def training_data(self, context, default):
        self._affinity = None
        return super().training_data(context, default)

    # --- the stage ----------------------------------------------------------------------------------
    def write_crf_scores(self, context, directory: Path, classifier) -> None:
        """Phase 2: the la/ha CRF scores of every training image, crf/<id>.npz (uint8), atomically."""
        dm = context.datamodule
        files = dm.located.train
        labels = dict(zip((int(r) for r in dm.train_indices), self.stage_labels(context)))
        device = self.stage_device(context.config)
        autocast = self.stage_autocast(context.config)

        def write(row: int, temporary: Path) -> None:
            present = torch.from_numpy(labels[row]) > 1e-5
            with torch.no_grad(), torch.autocast(device_type=device, dtype=autocast, enabled=autocast is not None):
                cams = self.cams(classifier, full_image(files, row).to(device), present.float().to(device))
            low, high = self.crf_pair(load_image(files.images[row]), cams, present)
            with open(temporary, "wb") as handle:
                # The CAMs too (float16), read again for the random walk as infer_aff.py reads the
                # CAMs infer_SEAM.py saved, instead of computing them a second time.
                np.savez_compressed(handle, low=np.round(low * 255).astype(np.uint8),
                                    high=np.round(high * 255).astype(np.uint8),
                                    cams=cams[present.to(cams.device)].float().cpu().numpy().astype(np.float16))

        write_per_image(dm.train_indices, lambda row: _npz_path(directory, files.ids[row]), write,
                        f"{self.name} step {context.step}: CAMs and CRF", context.config.trainer.progress)

    def affinity_stage_loss(self, network, batch, progress):
        features = network(batch["image"]).float()
        label = batch["label"].long()
        if tuple(label.shape[-2:]) != tuple(features.shape[-2:]):
            raise ValueError(f"the AffinityNet's {features.shape[-2]}x{features.shape[-1]} grid differs from its "
                             f"labels' {label.shape[-2]}x{label.shape[-1]} (crop {self.affinity_crop}, "
                             f"stride {self.classifier_output_stride})")
        radius = pair_radius(*features.shape[-2:], self.affinity_radius)
        return affinity_loss(pair_affinities(features, radius), *affinity_labels(label, radius))

    @property
    def affinity_crop(self) -> int:
        return self.affinity_crop_size or self.stage_crop_size

    def train_affinity_net(self, context, directory: Path) -> nn.Module:
        """Phase 3: the AffinityNet on the CRF labels; affinity.pt, resumable (affinity-training.pt).
        Initialisation and random state as the classifier's (WeakBaseline.trained_network): seeded
        with (seed + step), so its encoder starts where the classifier's did (the repository starts
        both from the same ImageNet weights)."""
        dm = context.datamodule

        def dataset():
            return AffinityImages(dm.located.train, dm.train_indices, directory, self.affinity_crop,
                                  self.classifier_output_stride, seed=context.config.seed + context.step,
                                  cache_decoded=context.config.data.cache_decoded)

        def groups(network):
            encoder = list(network.encoder.parameters())
            ids = {id(p) for p in encoder}
            return [{"params": encoder, "lr": self.affinity_lr},
                    {"params": [p for p in network.parameters() if id(p) not in ids],
                     "lr": self.affinity_lr * self.stage_new_layer_lr_factor}]

        return self.trained_network(
            context, directory, "affinity", lambda method: method.build_affinity_net(), self.affinity_stage_loss,
            dataset, groups, epochs=self.affinity_epochs, batch_size=self.affinity_batch_size,
            weight_decay=self.affinity_weight_decay, final=AFFINITY)

    def run_stage(self, context, directory) -> None:
        """Classifier, CAMs + CRF scores of every training image, AffinityNet, random-walk masks."""
        directory = Path(directory)
        if not (directory / AFFINITY).exists():
            require_pydensecrf()    # before hours of training, not after
        classifier = self.train_classifier(context, directory)
        if not (directory / AFFINITY).exists():
            self.write_crf_scores(context, directory, classifier)
        affinity = self.train_affinity_net(context, directory)
        files = context.datamodule.located.train

        def mask(image, labels, row):
            stored = self.stored_cams(directory, files.ids[row], labels)
            cams = stored.to(image.device) if stored is not None else self.cams(classifier, image, labels)
            return self.random_walk_mask(affinity, image, cams)

        self.write_pseudo_masks(context, directory, mask)
        shutil.rmtree(directory / CRF_SCORES, ignore_errors=True)

    def stored_cams(self, directory: Path, image_id: str, labels: torch.Tensor) -> torch.Tensor | None:
        """The CAMs phase 2 saved for an image, (K, H, W) with 0 for absent classes, or None."""
        path = _npz_path(directory, image_id)
        if not path.exists():
            return None
        with np.load(path) as saved:
            values = torch.from_numpy(saved["cams"].astype(np.float32))
        present = labels.cpu() > 1e-5
        cams = torch.zeros(len(present), *values.shape[1:])
        cams[present] = values
        return cams


METHOD = SEAM
