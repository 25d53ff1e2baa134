"""The LightningDataModule of one incremental step: dataset + task + mode + step + supervision."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, default_collate

from datamodules import datasets, fewshot, splits
from datamodules.datasets.voc import SplitFiles, load_image, load_mask
from datamodules.labels import label_lookup, new_class_labels, remap
from datamodules.presence import dataset_presence
from datamodules.sampling import (TRAINING_PASS_EPOCH, EpochTrainingSampler, InterleavedTrainingSampler, ShardedSampler,
                                  seed_augmentation)
from datamodules.tasks import NUM_FOREGROUND, task_classes
from datamodules.transforms import eval_transform, train_transform

SUPERVISIONS = ("pixel", "image")
ON_UNREADABLE = ("stop", "skip")


class UnreadableSample(RuntimeError):
    """An image or mask that cannot be read during training (the files were checked before the
    run, so it changed or broke since). One line, starting with the file's path."""


class DecodedCache:
    """Decoded images and masks kept in memory, for datasets small enough (the embedded one: 2,500
    images of 80x80, 64 MB), so that each file is decoded once per process instead of once per
    epoch and step. Process-wide: every step and method of a run shares it. Files stop being added
    beyond `max_bytes`. The files are checked before training and do not change during a run."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes, self.bytes, self.arrays = max_bytes, 0, {}

    def get(self, reader, path):
        key = (reader.__name__, str(path))
        array = self.arrays.get(key)
        if array is None:
            array = reader(path)
            if self.bytes + array.nbytes <= self.max_bytes:
                array.setflags(write=False)  # shared by every later read: never modified in place
                self.arrays[key] = array
                self.bytes += array.nbytes
        return array


DECODED = DecodedCache()


class _Samples(Dataset):
    """Shared by both kinds: rows of a split, a transform seeded per (epoch, image) when the
    sampler gives an epoch (datamodules.sampling), and what to do with an unreadable file:
    "stop" raises UnreadableSample, "skip" returns None, which `collate_skipping` drops and counts.
    With `cache_decoded`, decoded files are kept in the process-wide DECODED cache."""

    def __init__(self, files: SplitFiles, indices: np.ndarray, transform, seed: int = 0, on_unreadable: str = "stop",
                 cache_decoded: bool = False):
        self.files, self.indices, self.transform = files, indices, transform
        self.seed, self.on_unreadable, self.cache_decoded = seed, on_unreadable, cache_decoded

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (None, key)
        row = int(self.indices[i])
        if epoch is not None:
            seed_augmentation(self.transform, self.seed, epoch, row)
        try:
            return self._load(i, row)
        except UnreadableSample as error:
            if self.on_unreadable == "stop":
                raise
            return {"unreadable": str(error)}

    def _read(self, reader, path):
        try:
            return DECODED.get(reader, path) if self.cache_decoded else reader(path)
        except (OSError, ValueError, SyntaxError) as error:  # PIL: OSError (truncated, unidentified), SyntaxError
            raise UnreadableSample(f"{path}: cannot be read ({error})") from None


class PixelLabelled(_Samples):
    """Images with their masks remapped by a label lookup: {"image", "label", "index"}."""

    def __init__(self, files: SplitFiles, indices: np.ndarray, lookup: np.ndarray, transform, **kwargs):
        super().__init__(files, indices, transform, **kwargs)
        self.lookup = lookup

    def _load(self, i: int, row: int) -> dict:
        image = self._read(load_image, self.files.images[row])
        # Remap before the geometry so that padding (fill_mask=255) stays void in every phase.
        # A (n, 256) lookup is one per sample (the few-shot steps: each shot labelled for its class).
        lookup = self.lookup if self.lookup.ndim == 1 else self.lookup[i]
        mask = remap(self._read(load_mask, self.files.masks[row]), lookup)
        if mask.shape != image.shape[:2]:
            raise UnreadableSample(f"{self.files.masks[row]}: mask is {mask.shape[0]}x{mask.shape[1]}, its image "
                                   f"{self.files.images[row]} is {image.shape[0]}x{image.shape[1]}")
        out = self.transform(image=image, mask=mask)
        return {"image": out["image"], "label": out["mask"].long(), "index": row}


class ImageLabelled(_Samples):
    """Images with the multi-hot label of the step's new classes, and no mask at all:
    {"image", "new_class_labels", "index"}. The masks are never opened here."""

    def __init__(self, files: SplitFiles, indices: np.ndarray, labels: np.ndarray, transform, **kwargs):
        super().__init__(files, indices, transform, **kwargs)
        self.labels = labels

    def _load(self, i: int, row: int) -> dict:
        out = self.transform(image=self._read(load_image, self.files.images[row]))
        return {"image": out["image"], "new_class_labels": torch.from_numpy(self.labels[i]), "index": row}


class _EpochKeyed(Dataset):
    """A ConcatDataset indexed by (epoch, index) pairs, passing the epoch to its member."""

    def __init__(self, concat: ConcatDataset):
        self.concat = concat

    def __len__(self) -> int:
        return len(self.concat)

    def __getitem__(self, key):
        epoch, index = key
        source = int(np.searchsorted(self.concat.cumulative_sizes, index, side="right"))
        start = self.concat.cumulative_sizes[source - 1] if source else 0
        return self.concat.datasets[source][(epoch, index - start)]


def collate_skipping(samples: list[dict]) -> dict:
    """default_collate of the readable samples; "unreadable": the messages of the skipped ones,
    when there are any."""
    skipped = [s["unreadable"] for s in samples if "unreadable" in s]
    readable = [s for s in samples if "unreadable" not in s]
    if not readable:
        raise UnreadableSample(f"every image of a batch is unreadable: {skipped[0]}")
    batch = default_collate(readable)
    if skipped:
        batch["unreadable"] = skipped
    return batch


@dataclass
class TrainingSources:
    """What a step trains on: one dataset (the step's images with their labels), or several whose
    global batches alternate (source 0 first; an epoch is one pass over source 0: see
    datamodules.sampling.InterleavedTrainingSampler). A method changes them through its
    `training_data` hook; every source yields the same keys as source 0."""
    datasets: list[Dataset]

    def __post_init__(self):
        if not self.datasets:
            raise ValueError("a step needs at least one training source")


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
                 validation_fraction: float = 0.0, eval_crop_size: int | None = None, seed: int = 0,
                 on_unreadable: str = "stop", cache_decoded: bool = False, fewshot: dict | None = None):
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
        # seed: the training order and augmentation (datamodules.sampling); on_unreadable: "stop"
        # or "skip" an image that breaks during training.
        if on_unreadable not in ON_UNREADABLE:
            raise ValueError(f"data.on_unreadable must be one of {ON_UNREADABLE}, not {on_unreadable!r}")
        self.seed, self.on_unreadable, self.cache_decoded = seed, on_unreadable, cache_decoded
        self.evaluated_split = "test"  # what test_dataloader serves: "test" or "val"
        if not 0.0 <= validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), not {validation_fraction}")
        self.validation_fraction = validation_fraction
        self.train_set = self.test_set = self.val_set = None
        self.training_sources: TrainingSources | None = None
        # PIFS's incremental few-shot steps ({"nshot", "ishot"}, datamodules.fewshot); None: the usual ones
        self.fewshot = fewshot
        if fewshot and validation_fraction:
            raise ValueError("data.validation_fraction needs the usual steps: a few-shot step has no images to hold out")
        if fewshot and supervision != "pixel":
            raise ValueError("the few-shot steps are pixel-labelled (PIFS's protocol)")
        self.shot_classes = None   # few-shot steps >= 1: the novel class each training sample is a shot of

    def prepare_data(self) -> None:
        datasets.locate(self.dataset, self.data_root, self.dataset_options)  # generate or fail early

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        located = datasets.locate(self.dataset, self.data_root, self.dataset_options)
        num_fg = NUM_FOREGROUND[self.dataset]
        self.train_presence, self.test_presence = dataset_presence(located, num_fg)
        self.located = located
        self.train_indices = self._fewshot_rows() if self.fewshot else self._train_rows(located)
        held_out = validation_rows(len(located.train), self.validation_fraction)
        if len(held_out):
            self.train_indices = np.setdiff1d(self.train_indices, held_out)
        self.test_indices = splits.select_test_images(self.test_presence, self.steps, self.step, self.test_images)
        unlabeled = located.background_is_unlabeled
        self.train_set = (self.image_labelled_training_set() if self.supervision == "image"
                          else self.pixel_labelled_training_set())
        self.training_sources = TrainingSources([self.train_set])
        test_lookup = label_lookup(self.steps, self.step, "test", future_classes=self.future_classes_in_test,
                                   background_is_unlabeled=unlabeled)
        eval_tf = eval_transform(self.eval_crop_size, self.eval_mode, self.size_divisor)
        self.test_set = PixelLabelled(located.test, self.test_indices, test_lookup, eval_tf,
                                      cache_decoded=self.cache_decoded)
        if len(held_out):
            # Scored like the test set (every seen class kept), on training images no step trains on.
            seen = splits.select_test_images(self.train_presence[held_out], self.steps, self.step, "seen")
            self.val_indices = held_out[seen]
            self.val_set = PixelLabelled(located.train, self.val_indices, test_lookup, eval_tf,
                                         cache_decoded=self.cache_decoded)
        if len(self.train_set) < 2 and not (self.fewshot and len(self.train_set) == 1):
            raise ValueError(f"step {self.step} of {self.dataset} {self.mode} has {len(self.train_set)} training "
                             "images; at least 2 are needed (batch norm)")

    # --- training sets (builders a method's training_data hook may use) --------------------------
    def image_labelled_training_set(self) -> ImageLabelled:
        """The step's training images with the multi-hot label of the step's new classes, no mask."""
        labels = np.stack([new_class_labels(self.train_presence[i], self.steps, self.step)
                           for i in self.train_indices]) if len(self.train_indices) else np.zeros((0, 0), np.float32)
        return ImageLabelled(self.located.train, self.train_indices, labels, train_transform(self.crop_size, self.train_scale),
                             seed=self.seed, on_unreadable=self.on_unreadable, cache_decoded=self.cache_decoded)

    def pixel_labelled_training_set(self, masks: list[Path] | None = None, old_classes: str | None = None,
                                    files: SplitFiles | None = None) -> PixelLabelled:
        """The step's training images with pixel labels through the train lookup of PROTOCOL.md §4:
        their ground-truth masks, or `masks` (one file per train row of the split, in dataset ids,
        e.g. a weak baseline's pseudo-masks) in their place. old_classes: the lookup's treatment of
        old-class ids ("background" or "kept"; the method's by default), "kept" for masks whose old
        classes a model wrote (RECALL's inpainting). `files`: other images with their masks (every
        row of them: RECALL's replay pool), augmented the same way."""
        rows, own_images = self.train_indices, files is None
        if files is not None:
            rows = np.arange(len(files), dtype=np.int64)
        else:
            files = self.located.train
            if masks is not None:
                if len(masks) != len(files):
                    raise ValueError(f"{len(masks)} mask files for a train split of {len(files)} images")
                files = SplitFiles(files.ids, files.images, [Path(m) for m in masks])
        lookup = label_lookup(self.steps, self.step, "train", void_as_background=self.void_as_background,
                              old_classes=old_classes or self.old_labels,
                              background_is_unlabeled=self.located.background_is_unlabeled)
        if self.shot_classes is not None and own_images:   # each few-shot sample labelled for its own class
            lookup = self._shot_lookups()
        return PixelLabelled(files, rows, lookup, train_transform(self.crop_size, self.train_scale),
                             seed=self.seed, on_unreadable=self.on_unreadable, cache_decoded=self.cache_decoded)

    def set_training_sources(self, sources: TrainingSources) -> None:
        self.training_sources = sources
        self.train_set = sources.datasets[0]

    def _train_rows(self, located) -> np.ndarray:
        """The rows that train this step: the dataset's own rule when it has one (COCO-to-VOC's
        split files, a user-supplied ADE partition), else PROTOCOL.md §3's rule for `mode`;
        Joint ("cumulative") takes the union over steps 0..step."""
        select = located.train_rows or splits.select_images
        if self.training_images == "step":
            return np.asarray(select(self.train_presence, self.steps, self.step, self.mode), dtype=np.int64)
        return splits.select_cumulative_images(self.train_presence, self.steps, self.step, self.mode, select=select)

    def _fewshot_rows(self) -> np.ndarray:
        """PIFS's rows (datamodules.fewshot): at step 0 every image without a non-base class; at a
        step t >= 1 the nshot images of draw ishot for each of the step's classes, class after class
        (an image drawn for two classes is two samples, each labelled for its own class)."""
        if self.step == 0:
            return fewshot.base_step_rows(self.train_presence, self.steps[0])
        if self.fewshot.get("class_lists", "file_order") == "official":
            lists = fewshot.load_official_class_lists(self.dataset, self.data_root, self.located.train.ids)
        else:
            lists = fewshot.class_image_lists(self.train_presence)
        chosen = fewshot.shot_rows(lists, self.steps[self.step], self.fewshot["nshot"], self.fewshot["ishot"])
        self.shot_classes = np.array([c for c in self.steps[self.step] for _ in chosen[c]], dtype=np.int64)
        return np.array([row for c in self.steps[self.step] for row in chosen[c]], dtype=np.int64)

    def _shot_lookups(self) -> np.ndarray:
        """One train lookup per shot sample (n, 256), fewshot.shot_lookup's rule."""
        channels = label_lookup(self.steps, self.step, "test", future_classes="ignore")   # seen classes -> channel
        old = [c for s in self.steps[:self.step] for c in s if c != 0]
        return np.stack([fewshot.shot_lookup(channels, old, int(c)) for c in self.shot_classes])

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _accumulation(self) -> int:
        return int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1) if self.trainer is not None else 1

    def _training_sampler(self, rank: int, world: int, accumulation: int):
        """(per-process batch, sampler) of the step's training sources: whole global batches only
        (the sampler drops the rest: a last batch of one image breaks batch norm in DeepLab's
        pooling branch); with several sources their global batches alternate."""
        sources = self.training_sources.datasets
        batch = min(self.batch_size, len(sources[0]) // (world * accumulation))
        if batch < 1:
            raise ValueError(f"step {self.step} has {len(sources[0])} training images, fewer than one per "
                             f"process and accumulated batch ({world} x {accumulation})")
        if len(sources) == 1:
            # A few-shot step's epoch is 20 // nshot passes over its shots, as PIFS's run.py loops
            passes = fewshot.MAX_SHOTS // self.fewshot["nshot"] if self.fewshot and self.step > 0 else 1
            return batch, EpochTrainingSampler(len(sources[0]), batch, self.seed, rank, world, accumulation=accumulation,
                                               passes=passes)
        return batch, InterleavedTrainingSampler([len(d) for d in sources], batch, self.seed, rank, world,
                                                 accumulation=accumulation)

    def per_process_batch(self, world: int, accumulation: int = 1) -> int:
        """Training images per process and batch (fewer than batch_size when the step has fewer)."""
        return self._training_sampler(0, world, accumulation)[0]

    def updates_per_epoch(self, world: int, accumulation: int = 1) -> int:
        """Optimizer updates in one training epoch with `world` processes (the same on every rank)."""
        return self._training_sampler(0, world, accumulation)[1].num_batches // accumulation

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        batch, sampler = self._training_sampler(rank, world, self._accumulation())
        sources = self.training_sources.datasets
        dataset = sources[0] if len(sources) == 1 else _EpochKeyed(ConcatDataset(sources))
        return DataLoader(dataset, batch_size=batch, sampler=sampler,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available(), collate_fn=collate_skipping)

    def training_pass_dataloader(self, images: str = "train") -> DataLoader:
        """One pass over the step's own training images (source 0) before training: this rank's
        shard (every image once over all ranks). images "train": the train transform seeded with an
        epoch of its own (sampling.TRAINING_PASS_EPOCH), in training batches; "full": the images
        and labels whole, without augmentation (evaluation's "full" transform), one per batch."""
        rank, world = self._rank_and_world()
        if images == "full":
            if not isinstance(self.train_set, PixelLabelled):
                raise ValueError("a pass over whole training images needs pixel labels")
            whole = PixelLabelled(self.train_set.files, self.train_set.indices, self.train_set.lookup,
                                  eval_transform(self.eval_crop_size, "full", self.size_divisor),
                                  on_unreadable=self.on_unreadable, cache_decoded=self.cache_decoded)
            return DataLoader(whole, batch_size=1, sampler=ShardedSampler(len(whole), rank, world),
                              num_workers=self.num_workers, collate_fn=collate_skipping)
        if images != "train":
            raise ValueError(f"training pass images must be 'train' or 'full', not {images!r}")
        return DataLoader(self.train_set, batch_size=self.batch_size,
                          sampler=ShardedSampler(len(self.train_set), rank, world, epoch=TRAINING_PASS_EPOCH),
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                          collate_fn=collate_skipping)

    def val_dataloader(self) -> DataLoader:
        """The held-out training images during fit, for checkpoint.select=best_validation only
        (the trainer validates nothing otherwise)."""
        if self.val_set is None:
            raise ValueError("no validation images: set data.validation_fraction > 0")
        return self._evaluation_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        """The test set, or the held-out training images when `evaluated_split` is "val" (scored
        once after each step by experiments.run; during fit only through val_dataloader, to select
        the handed-on epoch).
        Served through trainer.test(datamodule=...), so that the loader is built once the
        processes exist and knows its rank."""
        if self.evaluated_split == "val":
            if self.val_set is None:
                raise ValueError("no validation images: set data.validation_fraction > 0")
            return self._evaluation_loader(self.val_set)
        return self._evaluation_loader(self.test_set)

    def _evaluation_loader(self, dataset) -> DataLoader:
        # Full-resolution images differ in size: one per batch.
        batch = 1 if self.eval_mode == "full" else self.test_batch_size
        rank, world = self._rank_and_world()
        return DataLoader(dataset, batch_size=batch, sampler=ShardedSampler(len(dataset), rank, world),
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available())
