"""albumentations pipelines of the protocol (PROTOCOL.md §5-6), resampled with PIL as MiB/WILSON do.

The official MiB/WILSON code (fcdl94/MiB and fcdl94/WILSON, ``dataset/transform.py``) applies
torchvision-style transforms to PIL images:

- train: ``RandomResizedCrop(crop, scale=(0.5, 2.0))`` (torchvision's 10-draw crop algorithm, then
  ``img.crop(box).resize(size, BILINEAR)`` for the image and ``NEAREST`` for the label), a random
  horizontal flip, ToTensor, ImageNet Normalize;
- test: ``Resize(crop)`` (short side to ``crop``, long side ``int(crop * long / short)``: 512x682
  for a 375x500 image), ``CenterCrop(crop)`` (offsets ``int(round((h - crop) / 2))``), ToTensor,
  Normalize.

The geometry here is the same: the crop parameters follow torchvision's
``RandomResizedCrop.get_params`` arithmetic (drawn from albumentations' random state, so that
``seed_augmentation`` keeps seeding every draw), and every resize is done by PIL itself
(``Image.fromarray(...).resize((w, h), BILINEAR / NEAREST)``), so the pixels and the label ids equal
the official PIL pipeline's exactly (tests/test_transforms.py compares them with torchvision's
functional transforms on PIL images, pixel for pixel; the flip and the crops copy pixels). Only
the float normalisation (albumentations' Normalize instead of ToTensor + Normalize) may differ from
the official tensors, by float rounding (below 1e-6).

The previous pipeline (PIPELINE_VERSION 1) resized with cv2 through albumentations. Measured
against this one (matplotlib's grace_hopper.jpg cut to 375x500, and a blocky mask of 25x25-pixel
blocks of ids 0-20; cv2 4.14, Pillow 13):
- test (Resize + CenterCrop 512): cv2 made the long side 683 where torchvision gives 682; after the
  512x512 crop, 78.6 % of the image values (max difference 101 grey levels) and 4.2 % of the mask
  pixels differed from the official result;
- at the same output size (375x500 -> 512x682) cv2 INTER_NEAREST differed from PIL NEAREST on
  2.8 % of the mask pixels (2.55 % at 512x683: cv2 is not half-pixel-centred; INTER_NEAREST_EXACT
  is closer, 0.14 % at 512x683, but still not always equal), and cv2 INTER_LINEAR from PIL
  BILINEAR on 21 % of the image values, by 1 grey level;
- downsizing, where PIL's bilinear filter antialiases and cv2's does not: 375x500 -> 64x64 (a
  whole-image train crop) 93.5 % of the values differ, by up to 174 grey levels; 512x682 ->
  256x341: 67 %, up to 41;
- train crops with the same crop parameters: 375x500 images to 512 (always upsizing) 21 % of the
  values by 1 and 2.55 % of the mask pixels; the embedded 80x80 images to 64 (up- and downsizing)
  47 % of the values, up to 44, and 4.3 % of the mask pixels.
Speed (one thread, timeit, whole train transform incl. flip, Normalize, ToTensorV2): 80x80 image
and mask to a 64x64 crop 63 us with cv2, 122 us with PIL (1.95x); 375x500 to 512: 1.3 ms -> 2.9 ms;
test transform 375x500: 1.3 ms -> 3.5 ms. PIL's bilinear resampling (a separable filter with its
support and coefficient tables computed per call, without SIMD) is 4-6x slower than cv2's, and
converting arrays to and from PIL images (PIL keeps RGB pixels in 4 bytes) adds ~20 us per 80x80
image and mask. The official pipeline, on PIL images, pays the same resampling cost.
"""
from __future__ import annotations

import math

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_MODES = ("center_crop", "full")
VOID = 255

# Changes whenever the training or the test pixels change: a cached step-0 model trained (or a
# result computed) on other pixels must not be reused. 1: cv2 resizing through albumentations;
# 2: PIL resizing with torchvision's crop and resize arithmetic, as the official MiB/WILSON code.
PIPELINE_VERSION = 2


def _pil_resize(array: np.ndarray, height: int, width: int, resample: Image.Resampling) -> np.ndarray:
    """`array` (uint8 HxW or HxWxC image, or an integer mask) resized by PIL to height x width."""
    if array.shape[:2] == (height, width):
        return array.copy()  # PIL (and torchvision) return the image unchanged
    if array.dtype == np.uint8:
        squeeze = array.ndim == 3 and array.shape[2] == 1
        pil = Image.fromarray(array[..., 0] if squeeze else array)
        out = np.array(pil.resize((width, height), resample))
        return out[..., None] if squeeze else out
    if resample == Image.Resampling.NEAREST and np.issubdtype(array.dtype, np.integer) and array.ndim == 2:
        # masks of wider integers: PIL's 32-bit integer mode (nearest copies the values)
        wide = array.astype(np.int32)
        if not np.array_equal(wide, array):
            raise ValueError(f"mask values outside int32 cannot be resized by PIL ({array.dtype})")
        return np.array(Image.fromarray(wide).resize((width, height), resample)).astype(array.dtype)
    raise TypeError(f"PIL resizing needs uint8 images (or integer masks), got {array.dtype} {array.shape}")


def random_resized_crop_params(height: int, width: int, scale, ratio, rng) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of torchvision's ``RandomResizedCrop.get_params`` (as
    MiB's copy of it), with the draws from `rng` (a ``random.Random``) in torchvision's order:
    area fraction uniform in `scale` (it may exceed 1: such crops do not fit and are redrawn),
    log-uniform aspect ratio (width / height), then the top and the left offset; after 10 failed
    draws, the whole image with its aspect ratio clamped to `ratio`, centred."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return top, left, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:  # whole image
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_short_side(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after torchvision's ``Resize(size)``: the short side becomes `size`, the
    long one ``int(size * long / short)`` (truncated: 375x500 -> 512x682)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return new_h, new_w


class RandomResizedCropTorchvision(A.DualTransform):
    """torchvision's RandomResizedCrop on PIL images, as MiB/WILSON (scale (0.5, 2.0)): the crop
    parameters follow ``random_resized_crop_params`` (area scale above 1 allowed: such draws do not
    fit and are rejected, so crops cover 50-100 % of the image, with a share of whole-image
    fallbacks), drawn from albumentations' ``self.py_random``; the crop is resized by PIL, bilinear
    for the image and nearest for the mask. The crop lies inside the image: no pixel is invented."""

    def __init__(self, size: tuple[int, int], scale=(0.5, 2.0), ratio=(3 / 4, 4 / 3), p: float = 1.0):
        super().__init__(p=p)
        self.size = tuple(size)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)

    def get_params_dependent_on_data(self, params, data):
        height, width = params["shape"][:2]
        top, left, h, w = random_resized_crop_params(height, width, self.scale, self.ratio, self.py_random)
        return {"crop_coords": (left, top, left + w, top + h)}  # albumentations' (x_min, y_min, x_max, y_max)

    def _crop_resize(self, array, crop_coords, resample):
        x_min, y_min, x_max, y_max = crop_coords
        return _pil_resize(array[y_min:y_max, x_min:x_max], self.size[0], self.size[1], resample)

    def apply(self, img, crop_coords, **params):
        return self._crop_resize(img, crop_coords, Image.Resampling.BILINEAR)

    def apply_to_mask(self, mask, crop_coords, **params):
        return self._crop_resize(mask, crop_coords, Image.Resampling.NEAREST)

    def get_transform_init_args_names(self):
        return ("size", "scale", "ratio")


class ResizeShortSidePIL(A.DualTransform):
    """torchvision's ``Resize(size)`` on PIL images: short side to `size` (``resized_short_side``),
    PIL bilinear for the image (antialiased when it downsizes), nearest for the mask."""

    def __init__(self, size: int, p: float = 1.0):
        super().__init__(p=p)
        self.size = int(size)

    def get_params_dependent_on_data(self, params, data):
        return {"target_shape": resized_short_side(*params["shape"][:2], self.size)}

    def apply(self, img, target_shape, **params):
        return _pil_resize(img, *target_shape, Image.Resampling.BILINEAR)

    def apply_to_mask(self, mask, target_shape, **params):
        return _pil_resize(mask, *target_shape, Image.Resampling.NEAREST)

    def get_transform_init_args_names(self):
        return ("size",)


class CenterCropTorchvision(A.DualTransform):
    """torchvision's ``center_crop``: offsets ``int(round((h - crop_h) / 2))`` (albumentations
    floors them, which differs by one pixel on odd margins). An image smaller than the crop is
    first padded as torchvision pads it, with 0 for the image and void (255) for the mask."""

    def __init__(self, height: int, width: int, p: float = 1.0):
        super().__init__(p=p)
        self.height, self.width = int(height), int(width)

    def get_params_dependent_on_data(self, params, data):
        height, width = params["shape"][:2]
        pad_h, pad_w = max(self.height - height, 0), max(self.width - width, 0)
        padding = (pad_h // 2, (pad_h + 1) // 2, pad_w // 2, (pad_w + 1) // 2)  # top, bottom, left, right
        height, width = height + pad_h, width + pad_w
        top = int(round((height - self.height) / 2.0))
        left = int(round((width - self.width) / 2.0))
        return {"padding": padding, "crop_coords": (left, top, left + self.width, top + self.height)}

    def _pad_crop(self, array, padding, crop_coords, fill):
        if any(padding):
            widths = [(padding[0], padding[1]), (padding[2], padding[3])] + [(0, 0)] * (array.ndim - 2)
            array = np.pad(array, widths, mode="constant", constant_values=fill)
        x_min, y_min, x_max, y_max = crop_coords
        return np.ascontiguousarray(array[y_min:y_max, x_min:x_max])

    def apply(self, img, padding, crop_coords, **params):
        return self._pad_crop(img, padding, crop_coords, 0)

    def apply_to_mask(self, mask, padding, crop_coords, **params):
        return self._pad_crop(mask, padding, crop_coords, VOID)

    def get_transform_init_args_names(self):
        return ("height", "width")


def train_geometry(crop_size: int, scale=(0.5, 2.0)) -> list:
    """The geometric part of the training transform (uint8 in, uint8 out): random resized crop
    (area 0.5-2.0, aspect 3/4-4/3, PIL bilinear / nearest) and horizontal flip."""
    return [RandomResizedCropTorchvision(size=(crop_size, crop_size), scale=scale), A.HorizontalFlip(p=0.5)]


def eval_geometry(crop_size: int, mode: str = "center_crop", size_divisor: int = 16) -> list:
    """The geometric part of the test transform (uint8 in, uint8 out); see ``eval_transform``."""
    if mode == "center_crop":
        return [ResizeShortSidePIL(crop_size), CenterCropTorchvision(crop_size, crop_size)]
    if mode == "full":
        return [A.PadIfNeeded(min_height=None, min_width=None, pad_height_divisor=size_divisor,
                              pad_width_divisor=size_divisor, position="top_left",
                              border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=VOID)]
    raise ValueError(f"unknown eval mode {mode!r}; expected one of {EVAL_MODES}")


def _to_network() -> list:
    return [A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), ToTensorV2()]


def train_transform(crop_size: int, scale=(0.5, 2.0)) -> A.Compose:
    """Random resized crop (area 0.5-2.0, aspect 3/4-4/3), horizontal flip, ImageNet normalisation."""
    return A.Compose(train_geometry(crop_size, scale) + _to_network())


def eval_transform(crop_size: int, mode: str = "center_crop", size_divisor: int = 16) -> A.Compose:
    """Test transform. "center_crop" (MiB and WILSON): resize the short side to `crop_size`, then
    center-crop crop_size x crop_size. "full": the whole image, padded (mask with void 255) to a
    multiple of the network's output stride; gives lower numbers than the papers' crops."""
    return A.Compose(eval_geometry(crop_size, mode, size_divisor) + _to_network())


def unnormalize(images: torch.Tensor) -> torch.Tensor:
    """The RGB images in [0, 1] from ImageNet-normalised inputs (B, 3, H, W): what PAMR compares
    and what figures show."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, -1, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, -1, 1, 1)
    return images * std + mean
