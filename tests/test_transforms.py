"""The pipelines equal the official MiB/WILSON ones, which run torchvision transforms on PIL images:
pixels and label ids compared for exact equality with torchvision's functional transforms."""
import math
import random

import albumentations as A
import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from datamodules import transforms
from datamodules.sampling import seed_augmentation
from datamodules.transforms import (CenterCropTorchvision, RandomResizedCropTorchvision, ResizeShortSidePIL,
                                    eval_geometry, eval_transform, train_geometry, train_transform, unnormalize)

BILINEAR, NEAREST = TF.InterpolationMode.BILINEAR, TF.InterpolationMode.NEAREST
SCALE, RATIO = (0.5, 2.0), (3 / 4, 4 / 3)


def _image(height, width, seed=0):
    """Noise over a gradient: every pixel matters to the resampling, and downsizing has to filter."""
    rng = np.random.default_rng(seed)
    gradient = np.add.outer(np.linspace(0, 120, height), np.linspace(0, 100, width))[..., None]
    return np.clip(gradient + rng.integers(0, 136, (height, width, 3)), 0, 255).astype(np.uint8)


def _blocky_mask(height, width, block=25, seed=0):
    """Blocks of class ids 0-20, about a third of them void (255)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 21, (-(-height // block), -(-width // block)))
    ids[rng.random(ids.shape) < 0.3] = 255
    return np.kron(ids, np.ones((block, block), int))[:height, :width].astype(np.uint8)


def _pil(array):
    return Image.fromarray(array)


def _geometry(steps, **data):
    return A.Compose(steps)(**data)


# (a) evaluation: torchvision Resize(512) + CenterCrop(512) on PIL images ----------------------

@pytest.mark.parametrize("shape", [(375, 500), (500, 375), (281, 500), (366, 500), (512, 512), (40, 30)])
def test_eval_center_crop_equals_torchvision_resize_and_center_crop_on_pil(shape):
    # (281, 500) and (366, 500) have odd margins (911 - 512, 699 - 512): torchvision rounds the
    # offset where albumentations floors it. (40, 30) is upsized.
    image, mask = _image(*shape), _blocky_mask(*shape)
    out = _geometry(eval_geometry(512), image=image, mask=mask)
    expected_image = TF.center_crop(TF.resize(_pil(image), 512, BILINEAR), 512)
    expected_mask = TF.center_crop(TF.resize(_pil(mask), 512, NEAREST), 512)
    assert out["image"].dtype == np.uint8 and out["image"].shape == (512, 512, 3)
    assert np.array_equal(out["image"], np.asarray(expected_image))
    assert np.array_equal(out["mask"], np.asarray(expected_mask))


@pytest.mark.parametrize("shape, resized", [((375, 500), (512, 682)), ((500, 375), (682, 512))])
def test_eval_resize_truncates_the_long_side_as_torchvision(shape, resized):
    # torchvision: int(512 * 500 / 375) = 682 (cv2 / albumentations SmallestMaxSize round to 683)
    image, mask = _image(*shape), _blocky_mask(*shape)
    out = _geometry([ResizeShortSidePIL(512)], image=image, mask=mask)
    assert out["image"].shape[:2] == resized and out["mask"].shape == resized
    assert TF.resize(_pil(image), 512).size == resized[::-1]
    assert np.array_equal(out["image"], np.asarray(TF.resize(_pil(image), 512, BILINEAR)))
    assert np.array_equal(out["mask"], np.asarray(TF.resize(_pil(mask), 512, NEAREST)))


def test_eval_transform_normalises_the_torchvision_pixels():
    image, mask = _image(375, 500), _blocky_mask(375, 500)
    out = eval_transform(512)(image=image, mask=mask)
    expected = np.array(TF.center_crop(TF.resize(_pil(image), 512, BILINEAR), 512))
    assert out["image"].dtype == torch.float32 and tuple(out["image"].shape) == (3, 512, 512)
    back = (unnormalize(out["image"][None])[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(back, expected)
    official = TF.normalize(TF.to_tensor(expected), transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)
    assert torch.allclose(out["image"], official, atol=1e-6)  # ToTensor + Normalize, up to float rounding
    assert out["mask"].dtype == torch.uint8
    assert np.array_equal(out["mask"].numpy(), np.asarray(TF.center_crop(TF.resize(_pil(mask), 512, NEAREST), 512)))


def test_center_crop_rounds_the_offsets_and_pads_masks_with_void():
    image, mask = _image(40, 51), _blocky_mask(40, 51, block=5)
    out = _geometry([CenterCropTorchvision(32, 32)], image=image, mask=mask)  # margins 8 and 19
    assert np.array_equal(out["image"], np.asarray(TF.center_crop(_pil(image), 32)))
    assert np.array_equal(out["mask"], np.asarray(TF.center_crop(_pil(mask), 32)))
    # smaller than the crop: torchvision pads (1, 2) left/right and (3, 4) top/bottom with 0;
    # the image matches, the mask gets void where torchvision would invent class 0
    image, mask = _image(25, 29), np.ones((25, 29), np.uint8)
    out = _geometry([CenterCropTorchvision(32, 32)], image=image, mask=mask)
    assert np.array_equal(out["image"], np.asarray(TF.center_crop(_pil(image), 32)))
    padded = np.asarray(TF.center_crop(_pil(mask), 32))
    assert np.array_equal(out["mask"] == 1, padded == 1)
    assert (out["mask"][padded == 0] == 255).all() and (out["mask"] == 255).sum() == 32 * 32 - 25 * 29


# (b) training crop: torchvision resized_crop on PIL images ------------------------------------

@pytest.mark.parametrize("params, size", [
    ((0, 0, 375, 500), 64),     # whole image, downsized (PIL antialiases)
    ((0, 0, 375, 500), 512),
    ((10, 20, 300, 250), 512),  # upsized
    ((100, 37, 141, 188), 512),
    ((7, 300, 64, 64), 64),     # same size: a plain copy
    ((200, 1, 175, 499), 96),
])
def test_train_crop_equals_torchvision_resized_crop(params, size):
    image, mask = _image(375, 500), _blocky_mask(375, 500)
    top, left, h, w = params
    crop = RandomResizedCropTorchvision(size=(size, size))
    coords = (left, top, left + w, top + h)
    assert np.array_equal(crop.apply(image, crop_coords=coords),
                          np.asarray(TF.resized_crop(_pil(image), top, left, h, w, [size, size], BILINEAR)))
    assert np.array_equal(crop.apply_to_mask(mask, crop_coords=coords),
                          np.asarray(TF.resized_crop(_pil(mask), top, left, h, w, [size, size], NEAREST)))


def test_seeded_train_geometry_equals_torchvision_with_the_drawn_parameters():
    image, mask = _image(375, 500), _blocky_mask(375, 500)
    geometry = A.Compose(train_geometry(128))
    crop, flip = geometry.transforms
    flips = 0
    for index in range(8):
        seed_augmentation(geometry, 0, 0, index)
        out = geometry(image=image, mask=mask)
        x0, y0, x1, y1 = crop.get_applied_params()["crop_coords"]
        expected_image = TF.resized_crop(_pil(image), y0, x0, y1 - y0, x1 - x0, [128, 128], BILINEAR)
        expected_mask = TF.resized_crop(_pil(mask), y0, x0, y1 - y0, x1 - x0, [128, 128], NEAREST)
        if flip.get_applied_params():
            flips += 1
            expected_image, expected_mask = TF.hflip(expected_image), TF.hflip(expected_mask)
        assert np.array_equal(out["image"], np.asarray(expected_image))
        assert np.array_equal(out["mask"], np.asarray(expected_mask))
    assert 0 < flips < 8


# (c) the crop-parameter draw is torchvision's algorithm -----------------------------------------

def _reference_get_params(width, height, scale, ratio, rng):
    """A slow transcription of torchvision's RandomResizedCrop.get_params (PIL's (width, height)
    order, as MiB writes it), drawing from `rng`: returns (i, j, h, w)."""
    for attempt in range(10):
        target_area = width * height * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    if width / height < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif width / height > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _drawn(crop, height, width):
    x0, y0, x1, y1 = crop.get_params_dependent_on_data({"shape": (height, width)}, {})["crop_coords"]
    return y0, x0, y1 - y0, x1 - x0


@pytest.mark.parametrize("height, width", [(375, 500), (500, 375), (80, 80), (100, 400), (400, 100)])
def test_crop_parameters_follow_the_reference_with_the_same_random_numbers(height, width):
    crop = RandomResizedCropTorchvision(size=(64, 64), scale=SCALE)
    for seed in range(300):
        crop.set_random_state(np.random.default_rng(seed), random.Random(seed))
        assert _drawn(crop, height, width) == _reference_get_params(width, height, SCALE, RATIO, random.Random(seed))


class _TorchDraws:
    """random.Random's uniform and randint answered from torch's generator, as torchvision draws."""

    def uniform(self, a, b):
        return torch.empty(1).uniform_(a, b).item()

    def randint(self, a, b):
        return torch.randint(a, b + 1, size=(1,)).item()


def test_crop_parameters_equal_torchvision_get_params_on_torch_random_numbers():
    # torchvision computes the log-ratio bounds and the exp in float32, the transform in float64:
    # an integer size could only differ when a sqrt falls within ~1e-5 of a .5 (none in these draws).
    crop = RandomResizedCropTorchvision(size=(64, 64), scale=SCALE)
    crop.py_random = _TorchDraws()
    for height, width in [(375, 500), (500, 375), (80, 80), (100, 400), (400, 100)]:
        pil = Image.new("RGB", (width, height))
        for seed in range(300):
            torch.manual_seed(seed)
            expected = T.RandomResizedCrop.get_params(pil, list(SCALE), list(RATIO))
            torch.manual_seed(seed)
            assert _drawn(crop, height, width) == expected


def test_crop_parameters_statistics_on_a_500x375_image():
    height, width, n = 375, 500, 4000
    crop = RandomResizedCropTorchvision(size=(64, 64), scale=SCALE)
    crop.set_random_state(np.random.default_rng(0), random.Random(0))
    draws = np.array([_drawn(crop, height, width) for _ in range(n)])
    top, left, h, w = draws.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area = h * w / (height * width)
    whole = area == 1.0
    assert area.min() >= 0.49 and area.max() <= 1.0  # scale 0.5-2.0: above the image's area is rejected
    # P(a draw fits) = E_r[(min(4/(3r), 3r/4) - 0.5) / 1.5] = 0.1736 for log-uniform r in [3/4, 4/3];
    # all 10 rejected: 0.826^10 = 14.9 % of whole-image fallbacks (rounding lets a few more fit)
    assert abs(whole.mean() - 0.149) < 0.03
    ratio = w[~whole] / h[~whole]
    assert ratio.min() >= 3 / 4 - 0.01 and ratio.max() <= 4 / 3 + 0.01
    assert ratio.min() < 0.8 and ratio.max() > 1.25  # the whole range is used
    assert np.median(area[~whole]) < 0.8  # accepted areas spread over [0.5, 1]


# (d) seeding, (e) void, (f) image-only -------------------------------------------------------

def test_the_same_seed_gives_the_same_output_and_other_seeds_other_crops():
    image, mask = _image(375, 500), _blocky_mask(375, 500)
    transform = train_transform(64)
    outputs = []
    for _ in range(2):
        seed_augmentation(transform, 3, 1, 7)
        outputs.append(transform(image=image, mask=mask))
        transform(image=image, mask=mask)  # an unseeded call in between changes nothing
    assert torch.equal(outputs[0]["image"], outputs[1]["image"]) and torch.equal(outputs[0]["mask"], outputs[1]["mask"])
    crops = set()
    for seed, epoch, index in [(3, 1, 7), (4, 1, 7), (3, 2, 7)] + [(3, 1, i) for i in range(20)]:
        seed_augmentation(transform, seed, epoch, index)
        transform(image=image, mask=mask)
        crops.add(transform.transforms[0].get_applied_params()["crop_coords"])
    assert len(crops) >= 20


def test_void_and_class_ids_survive_the_train_crop():
    image, mask = _image(375, 500), _blocky_mask(375, 500)
    transform = train_transform(64)
    for index in range(10):
        seed_augmentation(transform, 0, 0, index)
        out = transform(image=image, mask=mask)
        assert out["mask"].dtype == torch.uint8 and tuple(out["mask"].shape) == (64, 64)
        values = set(torch.unique(out["mask"]).tolist())
        assert 255 in values and values <= set(np.unique(mask).tolist())  # nearest: no invented ids


def test_image_only_calls_draw_the_same_crops():
    image, mask = _image(80, 80), _blocky_mask(80, 80, block=8)
    for transform in (train_transform(64), eval_transform(64), eval_transform(64, mode="full")):
        seed_augmentation(transform, 0, 0, 5)
        alone = transform(image=image)
        seed_augmentation(transform, 0, 0, 5)
        with_mask = transform(image=image, mask=mask)
        assert set(alone) == {"image"} and alone["image"].dtype == torch.float32
        assert torch.equal(alone["image"], with_mask["image"])


def test_pipeline_version():
    assert isinstance(transforms.PIPELINE_VERSION, int) and transforms.PIPELINE_VERSION == 2
