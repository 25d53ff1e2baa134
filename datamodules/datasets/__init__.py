"""Where each dataset lives on disk and how to check or create it.

A dataset spec answers: the train and test splits as file lists, and whether class 0 is a real
background or ADE-style "unlabeled". Readers know nothing about tasks or methods.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from datamodules.datasets import ade20k, coco, synthetic
from datamodules.datasets.errors import DatasetMissing
from datamodules.datasets.voc import VOC_EXPECTED_COUNTS, SplitFiles, check_voc, read_split


@dataclass(frozen=True)
class DatasetSplits:
    root: Path
    train: SplitFiles
    test: SplitFiles
    background_is_unlabeled: bool = False
    # Datasets assembled from several sources (COCO-to-VOC: COCO images train step 0, relabelled
    # VOC images step 1): the source of each train row, and the source each step draws from.
    train_source: tuple[str, ...] | None = None
    step_sources: tuple[str, ...] | None = None
    # The dataset's own rule for which train rows train a step, (presence, steps, step, mode) ->
    # rows, replacing PROTOCOL.md §3's rule: COCO-to-VOC's split files, a user-given partition.
    train_rows: Callable[[np.ndarray, list, int, str], np.ndarray] | None = None


def _expected_counts(options: dict, real: dict[str, int]) -> dict[str, int] | None:
    """The split sizes a locator enforces: the real ones, overridden per split by
    options["expected_counts"] (tests use tiny trees); None when options["check_counts"] is false."""
    if not options.get("check_counts", True):
        return None
    return {**real, **(options.get("expected_counts") or {})}


def _voc(data_root: Path, options: dict) -> DatasetSplits:
    root = Path(options.get("root") or data_root / "VOCdevkit" / "VOC2012")
    check_voc(root, _expected_counts(options, VOC_EXPECTED_COUNTS))
    return DatasetSplits(root, read_split(root, "train_aug.txt", "SegmentationClassAug"),
                         read_split(root, "val.txt", "SegmentationClass"))


def _ade(data_root: Path, options: dict) -> DatasetSplits:
    # Options: root (the ADEChallengeData2016 directory), expected_counts, check_counts.
    root = ade20k.ade_root(data_root, options)
    splits = ade20k.check_ade(root, _expected_counts(options, ade20k.ADE_EXPECTED_COUNTS))
    # ADE's 0 is "unlabeled", not background: trained as channel 0, never scored (PROTOCOL.md §4).
    located = DatasetSplits(root, splits["train"], splits["val"], background_is_unlabeled=True)
    if options.get("partition"):
        located = replace(located, train_rows=partition_rows(options["partition"], len(located.train)))
    return located


def partition_rows(files: list[str], num_rows: int) -> Callable:
    """A user-supplied partition (one .npy of train row indices per step, the form in which MiB's
    ADE20K partitions are published) as a `train_rows` rule. The files are checked now: one per
    step, integer rows inside the split, no row in two steps."""
    parts = []
    for file in files:
        if not Path(file).is_file():
            raise DatasetMissing(f"partition file {file} does not exist (data.options.partition lists one .npy per step)")
        rows = np.load(file).astype(np.int64).ravel()
        if rows.size and (rows.min() < 0 or rows.max() >= num_rows):
            raise ValueError(f"partition file {file} has rows outside 0..{num_rows - 1} of the train split")
        parts.append(np.unique(rows))
    all_rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if len(np.unique(all_rows)) != len(all_rows):
        raise ValueError("partition files share rows: a partition gives each image to one step")
    return partial(_partition_step_rows, tuple(parts))


def _partition_step_rows(parts: tuple, presence, steps, step: int, mode: str) -> np.ndarray:
    if len(parts) != len(steps):
        raise ValueError(f"the partition has {len(parts)} files but the task has {len(steps)} steps")
    return parts[step]


def _coco_step_rows(source: tuple, presence, steps, step: int, mode: str) -> np.ndarray:
    return coco.wilson_step_rows(presence, source, step)


def _synthetic(data_root: Path, options: dict) -> DatasetSplits:
    params = {**synthetic.DEFAULTS, **options.get("synthetic", {})}
    root = synthetic.ensure_generated(data_root, **params)
    # The first n of each split: a larger generated dataset holds the smaller one as its prefix.
    return DatasetSplits(root, read_split(root, "train.txt").head(params["train"]),
                         read_split(root, "val.txt").head(params["val"]))


def _coco_voc(data_root: Path, options: dict) -> DatasetSplits:
    # Options: test_set (coco | voc), expected_counts, check_counts. Step 0 and step 1 draw from
    # different sources, exactly as WILSON's split files (coco.wilson_step_rows).
    located = coco.locate_coco_voc(data_root, options)
    return replace(located, train_rows=partial(_coco_step_rows, located.train_source))


def _coco(data_root: Path, options: dict) -> DatasetSplits:
    # COCO's 80 categories on their own (PIFS's COCO-20i folds): the COCO half of the COCO-to-VOC tree.
    return coco.locate_coco(data_root, options)


_LOCATORS = {"voc": _voc, "ade": _ade, "coco-voc": _coco_voc, "coco": _coco, "synthetic": _synthetic}


def locate(dataset: str, data_root: str | Path, options: dict | None = None) -> DatasetSplits:
    """Find (or, for the synthetic dataset, generate) `dataset` under `data_root`."""
    if dataset not in _LOCATORS:
        raise ValueError(f"dataset {dataset!r} has no reader yet; available: {', '.join(_LOCATORS)}")
    return _LOCATORS[dataset](Path(data_root), options or {})


VOC_CLASS_NAMES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                   "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
                   "train", "tvmonitor"]


def class_names(dataset: str, options: dict | None = None) -> dict[int, str]:
    """Dataset id -> readable class name (ids without a name are shown as numbers)."""
    if dataset == "voc":
        return dict(enumerate(VOC_CLASS_NAMES))
    if dataset == "ade":
        return {0: "unlabeled", **dict(enumerate(ade20k.ADE_CLASS_NAMES, start=1))}
    if dataset in ("coco-voc", "coco"):
        return {i: name for i, name in enumerate(coco.COCO_CLASS_NAMES)}
    if dataset == "synthetic":
        seed = (options or {}).get("synthetic", {}).get("seed", 0)
        names = {0: "background"}
        for cls, (shape, appearance) in enumerate(synthetic.class_attributes(seed), start=1):
            names[cls] = f"{shape}-{synthetic.APPEARANCES[appearance][2]}"
        return names
    return {0: "background"}
