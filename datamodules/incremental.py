"""The LightningDataModule of one incremental step: dataset + task + mode + step + supervision."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules import datasets, splits
from datamodules.datasets.voc import SplitFiles, load_image, load_mask
from datamodules.labels import label_lookup, new_class_labels, remap
from datamodules.presence import dataset_presence
from datamodules.tasks import NUM_FOREGROUND, task_classes
from datamodules.transforms import eval_transform, train_transform

SUPERVISIONS = ("pixel", "image")


class PixelLabelled(Dataset):
    """Images with their masks remapped by a label lookup: {"image", "label", "index"}."""

    def __init__(self, files: SplitFiles, indices: np.ndarray, lookup: np.ndarray, transform):
        self.files, self.indices, self.lookup, self.transform = files, indices, lookup, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        row = int(self.indices[i])
        image = load_image(self.files.images[row])
        # Remap before the geometry so that padding (fill_mask=255) stays void in every phase.
        mask = remap(load_mask(self.files.masks[row]), self.lookup)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"{self.files.masks[row]}: mask is {mask.shape}, image is {image.shape[:2]}")
        out = self.transform(image=image, mask=mask)
        return {"image": out["image"], "label": out["mask"].long(), "index": row}


class ImageLabelled(Dataset):
    """Images with the multi-hot label of the step's new classes, and no mask at all:
    {"image", "new_class_labels", "index"}. The masks are never opened here."""

    def __init__(self, files: SplitFiles, indices: np.ndarray, labels: np.ndarray, transform):
        self.files, self.indices, self.labels, self.transform = files, indices, labels, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        row = int(self.indices[i])
        out = self.transform(image=load_image(self.files.images[row]))
        return {"image": out["image"], "new_class_labels": torch.from_numpy(self.labels[i]), "index": row}


def validation_rows(num_rows: int, fraction: float, seed: int = 0) -> np.ndarray:
    """The train rows held out for validation (hyper-parameter selection, never the test set:
    PROTOCOL.md §5): a fixed random `fraction` of the whole train split, the same at every step
    and for every method, so no step ever trains on them. Sorted; empty for fraction 0."""
    count = int(round(fraction * num_rows))
    return np.sort(np.random.default_rng(seed).permutation(num_rows)[:count]).astype(np.int64)


class IncrementalSegmentationDataModule(pl.LightningDataModule):
    """Data of step `step` of `task` on `dataset`.

    training_images: "step" (the images of this step under `mode`, PROTOCOL.md §3) or
        "cumulative" (the union over steps 0..step, what Joint trains on).
    old_labels: "background" (old classes labelled 0, as MiB) or "kept" (Joint).
    supervision: "pixel" (masks) or "image" (at steps >= 1 only the multi-hot label of the step's
        new classes present, no mask; at step 0 supervision is always pixel).
    """

    def __init__(self, dataset: str = "synthetic", data_root: str | Path = "data", task="15-5",
                 mode: str = "disjoint", step: int = 0, supervision: str = "pixel",
                 training_images: str = "step", old_labels: str = "background",
                 batch_size: int = 24, test_batch_size: int | None = None, crop_size: int = 512,
                 train_scale=(0.5, 2.0), eval_mode: str = "center_crop", test_images: str = "seen",
                 void_as_background: bool = True, future_classes_in_test: str = "ignore",
                 size_divisor: int = 16, num_workers: int = 2, dataset_options: dict | None = None,
                 validation_fraction: float = 0.0, eval_crop_size: int | None = None):
        super().__init__()
        if supervision not in SUPERVISIONS:
            raise ValueError(f"unknown supervision {supervision!r}; expected one of {SUPERVISIONS}")
        if training_images not in ("step", "cumulative"):
            raise ValueError(f"training_images must be 'step' or 'cumulative', not {training_images!r}")
        self.steps = task_classes(dataset, task)
        if not 0 <= step < len(self.steps):
            raise ValueError(f"task {task} has steps 0..{len(self.steps) - 1}, not {step}")
        self.dataset, self.data_root, self.mode, self.step = dataset, Path(data_root), mode, step
        self.supervision = supervision if step > 0 else "pixel"
        self.training_images, self.old_labels = training_images, old_labels
        self.batch_size, self.test_batch_size = batch_size, test_batch_size or batch_size
        self.crop_size, self.train_scale, self.eval_mode = crop_size, tuple(train_scale), eval_mode
        # The test crop, when it differs from the training crop (WILSON's COCO script: 448 / 512).
        self.eval_crop_size = eval_crop_size or crop_size
        self.test_images, self.void_as_background = test_images, void_as_background
        self.future_classes_in_test, self.size_divisor = future_classes_in_test, size_divisor
        self.num_workers, self.dataset_options = num_workers, dataset_options or {}
        if not 0.0 <= validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), not {validation_fraction}")
        self.validation_fraction = validation_fraction
        self.train_set = self.test_set = self.val_set = None

    def prepare_data(self) -> None:
        datasets.locate(self.dataset, self.data_root, self.dataset_options)  # generate or fail early

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        located = datasets.locate(self.dataset, self.data_root, self.dataset_options)
        num_fg = NUM_FOREGROUND[self.dataset]
        self.train_presence, self.test_presence = dataset_presence(located, num_fg)
        self.train_indices = self._train_rows(located)
        held_out = validation_rows(len(located.train), self.validation_fraction)
        self.train_indices = np.setdiff1d(self.train_indices, held_out)
        self.test_indices = splits.select_test_images(self.test_presence, self.steps, self.step, self.test_images)
        unlabeled = located.background_is_unlabeled
        train_tf = train_transform(self.crop_size, self.train_scale)
        if self.supervision == "image":
            labels = np.stack([new_class_labels(self.train_presence[i], self.steps, self.step)
                               for i in self.train_indices]) if len(self.train_indices) else np.zeros((0, 0), np.float32)
            self.train_set = ImageLabelled(located.train, self.train_indices, labels, train_tf)
        else:
            lookup = label_lookup(self.steps, self.step, "train", void_as_background=self.void_as_background,
                                  old_classes=self.old_labels, background_is_unlabeled=unlabeled)
            self.train_set = PixelLabelled(located.train, self.train_indices, lookup, train_tf)
        test_lookup = label_lookup(self.steps, self.step, "test", future_classes=self.future_classes_in_test,
                                   background_is_unlabeled=unlabeled)
        eval_tf = eval_transform(self.eval_crop_size, self.eval_mode, self.size_divisor)
        self.test_set = PixelLabelled(located.test, self.test_indices, test_lookup, eval_tf)
        if len(held_out):
            # Scored like the test set (every seen class kept), on training images no step trains on.
            seen = splits.select_test_images(self.train_presence[held_out], self.steps, self.step, "seen")
            self.val_indices = held_out[seen]
            self.val_set = PixelLabelled(located.train, self.val_indices, test_lookup, eval_tf)
        if len(self.train_set) < 2:
            raise ValueError(f"step {self.step} of {self.dataset} {self.mode} has {len(self.train_set)} training "
                             "images; at least 2 are needed (batch norm)")

    def _train_rows(self, located) -> np.ndarray:
        """The rows that train this step: the dataset's own rule when it has one (COCO-to-VOC's
        split files, a user-supplied ADE partition), else PROTOCOL.md §3's rule for `mode`;
        Joint ("cumulative") takes the union over steps 0..step."""
        select = located.train_rows or splits.select_images
        if self.training_images == "step":
            return np.asarray(select(self.train_presence, self.steps, self.step, self.mode), dtype=np.int64)
        return splits.select_cumulative_images(self.train_presence, self.steps, self.step, self.mode, select=select)

    def train_dataloader(self) -> DataLoader:
        # drop_last: a last batch of one image breaks batch norm in DeepLab's pooling branch.
        return DataLoader(self.train_set, batch_size=min(self.batch_size, len(self.train_set)), shuffle=True,
                          drop_last=True, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def validation_dataloader(self) -> DataLoader:
        # Not Lightning's `val_dataloader`: the held-out images are scored once after each step
        # (experiments.run), not during fit.
        if self.val_set is None:
            raise ValueError("no validation images: set data.validation_fraction > 0")
        return self._evaluation_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_loader(self.test_set)

    def _evaluation_loader(self, dataset) -> DataLoader:
        # Full-resolution images differ in size: one per batch.
        batch = 1 if self.eval_mode == "full" else self.test_batch_size
        return DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available())
