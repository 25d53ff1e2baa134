"""EPS (Lee et al., CVPR 2021, "Railroad is not a Train: Saliency as Pseudo-pixel Supervision"), as
its repository computes it (halbielee/EPS: `network/resnet38_eps.py`, `eps.py`, `infer.py`,
`script/voc12_eps.sh`; shared/docs/METHODS_others.md §5), on the pipeline of
lightning_modules/methods/weak_baseline.py.

Classifier: encoder -> 1x1 conv without bias (Xavier init) to K + 1 channels (the last one is
the background); scores = global average pool of those maps. Loss (`get_eps_loss`, `train_eps`):
    L = soft-margin(scores of the K classes, labels) + MSE(sal_pred, S)
with S the saliency map in [0, 1] resized (nearest) to the map size, p = softmax over the K + 1
channels, and for each labelled class c the overlap
    o_c = sum(round(p_c) round(S)) / (sum round(p_c) + 1e-4)     (p detached),
a class with o_c > tau counts as foreground, the others of the label as background:
    fg = sum of p_c over labelled classes with o_c > tau,
    bg = p_bg + sum of p_c over labelled classes with o_c <= tau,
    sal_pred = lambda fg + (1 - lambda) (1 - bg);       lambda 0.5, tau 0.4 (the VOC script's).
Inference (`infer.py`, network type eps): softmax over the K + 1 channels at scales 0.5, 1, 1.5,
2 and flips, the foreground channels masked by the image label and summed; each class divided
by its maximum (+1e-5); background score 0.20; argmax. No CRF.

The saliency maps are an input from outside the labels. Pascal VOC (and COCO): read from
`SALImages/<id>.png` beside the images' folder, as the WILSON and EPS loaders do (the EPS authors
distribute PFAN maps; docs/datasets.md says how to get them). The embedded dataset has none: `saliency:
spectral_residual` computes them from the image alone with Hou & Zhang's spectral-residual method
(CVPR 2007), never from a mask. Deviations: the pipeline's (weak_baseline.py); the repository's
colour jitter and random long-side resize are replaced by the suite's training transform; its
scaled inference images are resized with PIL bicubic, here bilinear on the normalised tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from datamodules.datasets.voc import load_image
from lightning_modules.methods.base import MethodUnavailable
from lightning_modules.methods.weak_baseline import (WeakBaseline, build_classifier_encoder, max_normalised,
                                                     multiscale_maps, threshold_background, write_per_image)


class EPSClassifier(nn.Module):
    """encoder -> 1x1 conv (no bias) to K + 1 maps (background last); forward: (GAP scores, maps)."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.fc = nn.Conv2d(encoder.out_channels[-1], num_classes + 1, 1, bias=False)
        nn.init.xavier_uniform_(self.fc.weight)

    def cams(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(images)[-1])

    def forward(self, images: torch.Tensor):
        cams = self.cams(images)
        return cams.mean(dim=(2, 3)), cams


def eps_saliency_loss(cams: torch.Tensor, saliency: torch.Tensor, labels: torch.Tensor, tau: float = 0.4,
                      lam: float = 0.5) -> torch.Tensor:
    """EPS's saliency loss (module docstring). cams (B, K+1, h, w) with the background last;
    saliency (B, 1, H, W) in [0, 1] (resized to (h, w), nearest); labels (B, K) multi-hot."""
    cams = cams.float()
    batch, channels, height, width = cams.shape
    saliency = F.interpolate(saliency.float(), size=(height, width), mode="nearest")
    probabilities = torch.softmax(cams, dim=1)
    foreground = probabilities[:, :-1]
    rounded = torch.round(foreground.detach())
    overlap = (rounded * torch.round(saliency)).flatten(2).sum(-1) / (rounded + 1e-4).flatten(2).sum(-1)
    present = labels.bool()
    salient = present & (overlap > tau)
    not_salient = present & ~(overlap > tau)
    fg = (foreground * salient[:, :, None, None]).sum(dim=1, keepdim=True)
    bg = probabilities[:, -1:] + (foreground * not_salient[:, :, None, None]).sum(dim=1, keepdim=True)
    predicted = lam * fg + (1.0 - lam) * (1.0 - bg)
    return F.mse_loss(predicted, saliency)


def spectral_residual_saliency(image: np.ndarray, width: int = 64, average: int = 3, blur_sigma: float = 2.5) -> np.ndarray:
    """Hou & Zhang (CVPR 2007): on the grey image resized to `width` columns,
        A = log |FFT|,  R = A - (A * h_n) (n x n mean filter),  S = |IFFT(exp(R + i phase))|^2,
    smoothed with a Gaussian (sigma in pixels of the small image), resized back to the image and
    scaled to 0..255 (uint8, (H, W)). Uses the image only."""
    from scipy import ndimage

    grey = np.asarray(Image.fromarray(image).convert("L"), dtype=np.float64)
    height = max(1, int(round(grey.shape[0] * width / grey.shape[1])))
    small = np.asarray(Image.fromarray(grey.astype(np.uint8)).resize((width, height), Image.Resampling.BILINEAR),
                       dtype=np.float64)
    spectrum = np.fft.fft2(small)
    log_amplitude = np.log(np.abs(spectrum) + 1e-8)
    residual = log_amplitude - ndimage.uniform_filter(log_amplitude, size=average, mode="nearest")
    saliency = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spectrum)))) ** 2
    saliency = ndimage.gaussian_filter(saliency, blur_sigma)
    saliency = (saliency - saliency.min()) / (saliency.max() - saliency.min() + 1e-12)
    full = Image.fromarray(np.round(saliency * 255).astype(np.uint8)).resize(
        (image.shape[1], image.shape[0]), Image.Resampling.BILINEAR)
    return np.asarray(full, dtype=np.uint8)


def saliency_file(image_path) -> Path:
    """Where the WILSON and EPS loaders read an image's saliency: JPEGImages/<id>.jpg ->
    SALImages/<id>.png (the folder beside the images')."""
    path = Path(image_path)
    return path.parent.parent / "SALImages" / (path.stem + ".png")


@dataclass
class EPS(WeakBaseline):
    name = "eps"

    tau: float = 0.4                    # script/voc12_eps.sh --tau (main.py's default is 0.5)
    lam: float = 0.5                    # --lam
    background_score: float = 0.20      # infer.py --thr
    saliency: Literal["files", "spectral_residual"] = "files"   # SALImages/ (PFAN) or computed (embedded)

    def build_classifier(self, num_classes: int) -> nn.Module:
        encoder = build_classifier_encoder(self.classifier_encoder, self.classifier_encoder_depth,
                                           self.classifier_output_stride, self.classifier_encoder_weights)
        return EPSClassifier(encoder, num_classes)

    def stage_requirements(self, context) -> None:
        """The SALImages/ maps of every training image of the step (saliency: files)."""
        if self.saliency != "files":
            return
        dm = context.datamodule
        paths = [saliency_file(dm.located.train.images[int(r)]) for r in dm.train_indices]
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise MethodUnavailable(
                f"EPS needs saliency maps: {len(missing)} of the step's {len(paths)} images have none, e.g. "
                f"{missing[0]} (expected in {missing[0].parent}/: the PFAN maps the EPS authors distribute, docs/datasets.md "
                "'EPS saliency'), or set methods.eps.saliency=spectral_residual")

    def stage_maps(self, context) -> dict[str, list[Path]]:
        """One saliency map per train row: SALImages/ files, or spectral-residual maps written into
        the stage directory (computed from the images, for the step's rows; others never read)."""
        dm = context.datamodule
        files = dm.located.train
        if self.saliency == "files":
            self.stage_requirements(context)
            return {"saliency": [saliency_file(p) for p in files.images]}
        directory = Path(context.stage_directory) / "saliency"
        paths = [directory / f"{str(i).replace('/', '__')}.png" for i in files.ids]
        write_per_image(dm.train_indices, lambda row: paths[row], lambda row, temporary: Image.fromarray(
            spectral_residual_saliency(load_image(files.images[row]))).save(temporary),
            f"{self.name} step {context.step}: spectral-residual saliency", context.config.trainer.progress)
        return {"saliency": paths}

    def classifier_loss(self, classifier, batch, progress):
        scores, cams = classifier(batch["image"])
        labels = batch["labels"].float()
        loss_cls = F.multilabel_soft_margin_loss(scores[:, :-1].float(), labels)
        saliency = batch["saliency"].float()[:, None] / 255.0
        loss_sal = eps_saliency_loss(cams, saliency, labels, self.tau, self.lam)
        return loss_cls + loss_sal, {"cls": loss_cls, "saliency": loss_sal}

    def infer(self, classifier, image, labels):
        def foreground(view):
            return torch.softmax(classifier.cams(view).float(), dim=1)[:, :-1]

        maps = multiscale_maps(foreground, image, self.inference_scales, self.inference_flip)
        maps = maps * (labels.to(maps.dtype) > 0)[:, None, None]
        return threshold_background(max_normalised(maps), labels, self.background_score)


METHOD = EPS
