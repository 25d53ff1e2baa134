"""albumentations pipelines of the protocol (PROTOCOL.md §5-6)."""
from __future__ import annotations

import albumentations as A
import cv2
import torch
from albumentations.pytorch import ToTensorV2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_MODES = ("center_crop", "full")


class RandomResizedCropTorchvision(A.RandomResizedCrop):
    """RandomResizedCrop whose area `scale` may exceed 1, as in torchvision (MiB/WILSON use
    scale (0.5, 2.0)). Areas above the image cannot fit, are rejected, and after 10 failed draws
    the crop falls back to the whole image: crops cover 50-100 % of the image, with a
    noticeable share of whole-image crops. albumentations runs the same 10-draw algorithm but its
    argument check caps scale at 1, so the range is set after construction."""

    def __init__(self, size: tuple[int, int], scale=(0.5, 2.0), ratio=(3 / 4, 4 / 3), **kwargs):
        super().__init__(size=size, scale=(min(scale[0], 1.0), min(scale[1], 1.0)), ratio=ratio, **kwargs)
        self.scale = tuple(scale)


def train_transform(crop_size: int, scale=(0.5, 2.0)) -> A.Compose:
    """Random resized crop (area 0.5-2.0, aspect 3/4-4/3), horizontal flip, ImageNet normalisation."""
    return A.Compose([
        RandomResizedCropTorchvision(size=(crop_size, crop_size), scale=scale),
        A.HorizontalFlip(p=0.5),
        A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ToTensorV2(),
    ])


def eval_transform(crop_size: int, mode: str = "center_crop", size_divisor: int = 16) -> A.Compose:
    """Test transform. "center_crop" (MiB and WILSON): resize the short side to `crop_size`, then
    center-crop crop_size x crop_size. "full": the whole image, padded (mask with void 255) to a
    multiple of the network's output stride; gives lower numbers than the papers' crops."""
    if mode == "center_crop":
        geometry = [A.SmallestMaxSize(max_size=crop_size, interpolation=cv2.INTER_LINEAR,
                                      mask_interpolation=cv2.INTER_NEAREST),
                    A.CenterCrop(height=crop_size, width=crop_size)]
    elif mode == "full":
        geometry = [A.PadIfNeeded(min_height=None, min_width=None, pad_height_divisor=size_divisor,
                                  pad_width_divisor=size_divisor, position="top_left",
                                  border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=255)]
    else:
        raise ValueError(f"unknown eval mode {mode!r}; expected one of {EVAL_MODES}")
    return A.Compose(geometry + [A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), ToTensorV2()])


def unnormalize(images: torch.Tensor) -> torch.Tensor:
    """The RGB images in [0, 1] from ImageNet-normalised inputs (B, 3, H, W): what PAMR compares
    and what figures show."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, -1, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, -1, 1, 1)
    return images * std + mean
