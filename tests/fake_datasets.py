"""Miniature copies of the real datasets, in their real directory layouts, for tests.

Each generator writes a few dozen tiny images (default 32x40 px) deterministically from a seed
and returns, beside the paths, the ground truth the tests need: the set of foreground classes
drawn into each image's mask. Objects are axis-aligned rectangles in separate horizontal bands,
each at least 5x6 px, so every class drawn is visible in the mask (also inside VOC's 1-px void
border): a test can predict class presence and split membership without reading the masks.

Plain functions, no pytest fixtures, so any test module can call them. (A COCO generator lives
in its own module, written alongside the COCO reader.)
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.datasets.voc import save_mask

SIZE = (32, 40)  # (height, width); not square, so a transposed array would be noticed


# --- shared drawing ----------------------------------------------------------------------------
def draw_objects(rng: np.random.Generator, classes: Sequence[int], size=SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One rectangle per class, class k in the k-th of len(classes) horizontal bands.

    Returns (labels, void_border): labels = class ids on 0, no void (SBD/ADE-style);
    void_border = labels with the outermost pixel ring of every object set to 255 (VOC-style)."""
    height, width = size
    labels = np.zeros(size, np.uint8)
    void_border = np.zeros(size, np.uint8)
    if not classes:
        return labels, void_border
    band = height // len(classes)
    if band < 7:
        raise ValueError(f"{len(classes)} objects do not fit in {height} rows (each needs a 7-row band)")
    for k, c in enumerate(classes):
        h = int(rng.integers(5, band))  # leaves at least one background row per band
        w = int(rng.integers(6, width // 2 + 1))
        y0 = k * band + int(rng.integers(0, band - h))
        x0 = int(rng.integers(0, width - w + 1))
        labels[y0: y0 + h, x0: x0 + w] = c
        void_border[y0: y0 + h, x0: x0 + w] = 255
        void_border[y0 + 1: y0 + h - 1, x0 + 1: x0 + w - 1] = c
    return labels, void_border


def random_image(rng: np.random.Generator, size=SIZE) -> np.ndarray:
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def pick_classes(rng: np.random.Generator, pool: Sequence[int], max_objects: int) -> list[int]:
    """1..max_objects distinct classes from `pool`."""
    count = int(rng.integers(1, max_objects + 1))
    return [int(c) for c in rng.choice(pool, size=count, replace=False)]


def write_jpeg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=90)


def write_lines(path: Path, lines: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def expected_presence(class_sets: Sequence[Iterable[int]], num_foreground: int) -> np.ndarray:
    """The presence table (rows x K) that ground-truth class sets imply (column c-1 = class c)."""
    table = np.zeros((len(class_sets), num_foreground), bool)
    for row, classes in enumerate(class_sets):
        for c in classes:
            table[row, c - 1] = True
    return table


# --- Pascal VOC 2012 + SBD ---------------------------------------------------------------------
@dataclass
class FakeVocSbd:
    """A VOCdevkit/VOC2012 tree (no SegmentationClassAug, no train_aug.txt: prepare_voc_aug makes
    them) and an SBD benchmark_RELEASE tree, side by side under `data_root`."""
    data_root: Path
    voc_root: Path                   # <data_root>/VOCdevkit/VOC2012
    sbd_root: Path                   # <data_root> (holds benchmark_RELEASE/)
    voc_train: list[str]             # ImageSets/Segmentation/train.txt, in file order
    voc_val: list[str]
    sbd_train: list[str]             # benchmark_RELEASE/dataset/train.txt, in file order
    sbd_val: list[str]
    without_voc_image: set[str]      # SBD ids whose JPEG is only in SBD's img/, not in VOC
    unlisted_images: set[str]        # VOC JPEGs in no segmentation list (like VOC's detection-only images)
    voc_masks: dict[str, np.ndarray] = field(repr=False)  # SegmentationClass/<id>.png (255 borders)
    sbd_masks: dict[str, np.ndarray] = field(repr=False)  # cls/<id>.mat Segmentation (no 255)
    classes: dict[str, frozenset[int]] = field(repr=False)  # foreground classes of each annotated id


def _voc_ids(rng: np.random.Generator, count: int) -> list[str]:
    """Distinct VOC-style ids ("2008_000123"), in random (unsorted) order."""
    numbers = rng.choice(np.arange(1, 5000), size=count, replace=False)
    years = rng.integers(2007, 2012, size=count)
    return [f"{y}_{n:06d}" for y, n in zip(years, numbers)]


def make_voc_sbd_tree(root: Path, *, voc_train: int = 10, voc_val: int = 8, sbd_only: int = 20,
                      voc_train_in_sbd: int = 5, voc_val_in_sbd: int = 3, sbd_without_voc_image: int = 2,
                      unlisted_images: int = 3, class_pool: Sequence[int] = tuple(range(1, 21)),
                      max_objects: int = 3, size=SIZE, seed: int = 0) -> FakeVocSbd:
    """VOC 2012 + SBD in miniature, with every case the train_aug construction must handle:

    - `voc_train` / `voc_val` ids with VOC masks (255 borders); of them, `voc_train_in_sbd` and
      `voc_val_in_sbd` are also in SBD's lists with an SBD mask (same objects, no border), so the
      VOC mask must win, and the VOC val ids must leave train_aug although SBD lists them;
    - `sbd_only` ids annotated by SBD only (split at random between SBD train.txt and val.txt);
    - `sbd_without_voc_image` further SBD ids whose JPEG is missing from VOC's JPEGImages;
    - `unlisted_images` VOC JPEGs without any annotation.
    List files are written in random order (the real ones are sorted; the code must not rely on it).
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    voc_root, sbd_dataset = root / "VOCdevkit" / "VOC2012", root / "benchmark_RELEASE" / "dataset"
    ids = _voc_ids(rng, voc_train + voc_val + sbd_only + sbd_without_voc_image + unlisted_images)
    cuts = np.cumsum([voc_train, voc_val, sbd_only, sbd_without_voc_image])
    train_ids, val_ids, sbd_only_ids, no_image_ids, unlisted_ids = np.split(np.array(ids, dtype=object), cuts)
    train_ids, val_ids, sbd_only_ids = list(train_ids), list(val_ids), list(sbd_only_ids)
    no_image_ids, unlisted_ids = list(no_image_ids), list(unlisted_ids)

    voc_masks, sbd_masks, classes = {}, {}, {}
    for image_id in train_ids + val_ids + sbd_only_ids + no_image_ids:
        drawn = pick_classes(rng, class_pool, max_objects)
        labels, void_border = draw_objects(rng, drawn, size)
        classes[image_id] = frozenset(drawn)
        if image_id in train_ids or image_id in val_ids:
            voc_masks[image_id] = void_border
        sbd_masks[image_id] = labels
    in_sbd = set(train_ids[:voc_train_in_sbd]) | set(val_ids[:voc_val_in_sbd]) | set(sbd_only_ids) | set(no_image_ids)
    sbd_masks = {i: m for i, m in sbd_masks.items() if i in in_sbd}

    # SBD lists: each SBD id in train.txt or val.txt at random; VOC val ids in SBD go to SBD's
    # train list, as in the real data (which is why VOC val is subtracted from the union).
    sbd_train, sbd_val = [], []
    for image_id in rng.permutation([i for i in ids if i in in_sbd]).tolist():
        if image_id in val_ids or rng.random() < 0.6:
            sbd_train.append(image_id)
        else:
            sbd_val.append(image_id)

    for image_id in ids:
        image = random_image(rng, size)
        if image_id in in_sbd:
            write_jpeg(sbd_dataset / "img" / f"{image_id}.jpg", image)
        if image_id not in no_image_ids:
            write_jpeg(voc_root / "JPEGImages" / f"{image_id}.jpg", image)
    (voc_root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    for image_id, mask in voc_masks.items():
        save_mask(voc_root / "SegmentationClass" / f"{image_id}.png", mask)
    write_sbd_masks(sbd_dataset / "cls", sbd_masks)
    write_lines(voc_root / "ImageSets" / "Segmentation" / "train.txt", train_ids)
    write_lines(voc_root / "ImageSets" / "Segmentation" / "val.txt", val_ids)
    write_lines(sbd_dataset / "train.txt", sbd_train)
    write_lines(sbd_dataset / "val.txt", sbd_val)
    return FakeVocSbd(root, voc_root, root, train_ids, val_ids, sbd_train, sbd_val, set(no_image_ids),
                      set(unlisted_ids), voc_masks, sbd_masks, classes)


def write_sbd_masks(cls_dir: Path, masks: Mapping[str, np.ndarray]) -> None:
    """SBD's cls/<id>.mat: a MATLAB struct GTcls with Segmentation (uint8 class ids) and
    CategoriesPresent, as in benchmark_RELEASE (its Boundaries cell array is left out)."""
    from scipy.io import savemat

    cls_dir.mkdir(parents=True, exist_ok=True)
    for image_id, mask in masks.items():
        present = np.array(sorted(set(np.unique(mask).tolist()) - {0}), dtype=np.uint8)
        savemat(cls_dir / f"{image_id}.mat", {"GTcls": {"Segmentation": mask.astype(np.uint8),
                                                        "CategoriesPresent": present}})


# --- ADE20K ------------------------------------------------------------------------------------
@dataclass
class FakeAde:
    data_root: Path                        # holds ADEChallengeData2016/
    root: Path                             # <data_root>/ADEChallengeData2016
    train: dict[str, frozenset[int]]       # id -> foreground classes, sorted by id
    val: dict[str, frozenset[int]]


def make_ade_tree(root: Path, n_train: int = 24, n_val: int = 8, *, empty_train: int = 1,
                  class_pool: Sequence[int] = tuple(range(1, 151)), max_objects: int = 3, size=SIZE,
                  seed: int = 0) -> FakeAde:
    """ADEChallengeData2016 in miniature: greyscale annotation PNGs with 0 = unlabeled around the
    objects (and `empty_train` training images that are unlabeled everywhere). Ids are random
    ADE numbers (not 1..n) and files are written in random order, so sorting is exercised."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    ade = root / "ADEChallengeData2016"
    splits = {}
    for split, directory, count in (("train", "training", n_train), ("val", "validation", n_val)):
        numbers = rng.choice(np.arange(1, 20211 if split == "train" else 2001), size=count, replace=False)
        ids = [f"ADE_{split}_{n:08d}" for n in numbers]
        empty = set(ids[:empty_train]) if split == "train" else set()
        truth = {}
        for image_id in ids:
            drawn = [] if image_id in empty else pick_classes(rng, class_pool, max_objects)
            labels, _ = draw_objects(rng, drawn, size)
            write_jpeg(ade / "images" / directory / f"{image_id}.jpg", random_image(rng, size))
            mask_path = ade / "annotations" / directory / f"{image_id}.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(labels).save(mask_path)  # mode "L", as ADE's annotations
            truth[image_id] = frozenset(drawn)
        splits[split] = dict(sorted(truth.items()))
    return FakeAde(root, ade, splits["train"], splits["val"])
