"""Shared fixtures: no network, no wandb server, tiny generated data in the real layouts."""
import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from PIL import Image

from datamodules.datasets.voc import save_mask
from experiments.config import apply_overrides, load_experiment, resolve

TINY_OVERRIDES = [
    "data.crop_size=32", "data.batch_size=4", "data.test_batch_size=8", "data.num_workers=0",
    "data.options.synthetic={train: 48, val: 16, size: 40, seed: 0}",
    "network.decoder_channels=16", "schedule.step0={epochs: 1, lr: 0.01}",
    "schedule.incremental={epochs: 1, lr: 0.001}", "logger.wandb=disabled",
]


def tiny_weak_baseline(cls, crop_size: int = 32) -> dict:
    """Hyper-parameters that shrink an image-label baseline's stage to seconds (a tiny classifier
    from scratch, one epoch, one inference scale), for the fields the method has. EPS's saliency
    is computed (the generated trees have no SALImages/)."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(cls)}
    tiny = {"classifier_encoder": "tu-resnet10t", "classifier_encoder_depth": 3, "classifier_encoder_weights": None,
            "stage_epochs": 1, "stage_crop_size": crop_size, "stage_batch_size": 4, "inference_scales": [1.0],
            "affinity_epochs": 1, "affinity_batch_size": 4, "inference_pad_size": [2 * crop_size, 2 * crop_size],
            "decoder_channels": 16, "saliency": "spectral_residual"}
    return {k: v for k, v in tiny.items() if k in fields}


# A Segmenter that builds and runs in milliseconds (network.kind: segmenter): MBS's network in tests.
TINY_SEGMENTER = {"kind": "segmenter", "encoder": "vit_tiny_patch16_224", "encoder_weights": None, "image_size": 32,
                  "patch_size": 8, "vit_width": 32, "vit_depth": 2, "vit_heads": 2, "decoder_layers": 2,
                  "decoder_drop_path": 0.0}


@pytest.fixture
def tiny_config(tmp_path):
    """The default experiment shrunk to seconds: tiny synthetic data, tiny network, 1 epoch."""
    overrides = TINY_OVERRIDES + [f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'runs'}",
                                  f"cache_dir={tmp_path / 'runs' / 'cache'}"]
    return resolve(apply_overrides(load_experiment("synthetic_15_5_disjoint"), overrides))


def start_step(network, method, num_new_classes: int):
    """What the step loop does at the start of a step t >= 1 (experiments.run.learn_task): the old
    model (a frozen copy, when the method uses one), then the new classifier, initialised by the
    method. Returns the old model (or None)."""
    old = network.frozen_copy() if method.uses_old_model else None
    network.add_classes(num_new_classes)
    method.init_new_classifier(network, old)
    return old


def write_voc_tree(root, samples: dict[str, tuple[np.ndarray, np.ndarray]], lists: dict[str, list[str]],
                   mask_dir="SegmentationClass"):
    """A directory in the Pascal VOC layout from (image, mask) arrays."""
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / mask_dir).mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    for image_id, (image, mask) in samples.items():
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        save_mask(root / mask_dir / f"{image_id}.png", mask)
    for name, ids in lists.items():
        (root / "ImageSets" / "Segmentation" / name).write_text("\n".join(ids) + "\n")
    return root
