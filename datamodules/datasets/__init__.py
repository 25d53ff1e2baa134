"""Where each dataset lives on disk and how to check or create it.

A dataset spec answers: the train and test splits as file lists, and whether class 0 is a real
background or ADE-style "unlabeled". Readers know nothing about tasks or methods.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datamodules.datasets import synthetic
from datamodules.datasets.voc import SplitFiles, read_split


class DatasetMissing(RuntimeError):
    """The dataset is not where the suite expects it; the message says where and how to get it."""


@dataclass(frozen=True)
class DatasetSplits:
    root: Path
    train: SplitFiles
    test: SplitFiles
    background_is_unlabeled: bool = False


def _voc(data_root: Path, options: dict) -> DatasetSplits:
    root = Path(options.get("root") or data_root / "VOCdevkit" / "VOC2012")
    needed = ["JPEGImages", "SegmentationClassAug", "SegmentationClass",
              "ImageSets/Segmentation/train_aug.txt", "ImageSets/Segmentation/val.txt"]
    missing = [n for n in needed if not (root / n).exists()]
    if missing:
        raise DatasetMissing(
            f"Pascal VOC 2012 (+SBD) not found at {root} (missing: {', '.join(missing)}). Put "
            "VOCtrainval_11-May-2012 there with the SBD-augmented masks (SegmentationClassAug/ and "
            "ImageSets/Segmentation/train_aug.txt, 10,582 images), or set DATA_ROOT (or data.root=...) "
            "to a directory that holds VOCdevkit/VOC2012. The default experiment needs no download: "
            "make run EXP=synthetic_15_5_disjoint")
    return DatasetSplits(root, read_split(root, "train_aug.txt", "SegmentationClassAug"),
                         read_split(root, "val.txt", "SegmentationClass"))


def _synthetic(data_root: Path, options: dict) -> DatasetSplits:
    root = synthetic.ensure_generated(data_root, **options.get("synthetic", {}))
    return DatasetSplits(root, read_split(root, "train.txt"), read_split(root, "val.txt"))


_LOCATORS = {"voc": _voc, "synthetic": _synthetic}


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
    if dataset == "synthetic":
        seed = (options or {}).get("synthetic", {}).get("seed", 0)
        names = {0: "background"}
        for cls, (shape, appearance) in enumerate(synthetic.class_attributes(seed), start=1):
            names[cls] = f"{shape}-{synthetic.APPEARANCES[appearance][2]}"
        return names
    return {0: "background"}
