"""The incremental few-shot protocol (iFSS) of PIFS (Cermelli et al., BMVC 2021; official code
fcdl94/FSS, `task.py` and `dataset/dataset.py`), as pure functions of arrays.

Tasks: VOC folds `fss-5-<i>` (fold i's five novel classes 5i+1..5i+5, the other fifteen the base
classes) and COCO folds `fss-20-<i>` (every fourth of COCO's 80 category ids from the i-th); one
incremental step, or with the suffix `m` one step per novel class on VOC and four steps of five on
COCO, as the official task table. The class ids of a step keep the official order (base classes
ascending, then the novel ones), behind background 0.

Images (the official `FSSDataset`):
  base step     every training image without a novel (or any other non-base) foreground class;
                unlike MiB's disjoint rule, an image holding background alone is kept
                (`base_step_rows`)
  novel step    per novel class, images `ishot*20 ... ishot*20 + nshot - 1` of that class's image
                list (`shot_rows`; 20 = the largest shot count, a rule the official code takes
                from SPNet), so each of ishot = 0, 1, 2 is another draw of n = 1, 2 or 5 shots
  test          every test image; classes not yet seen are ignored (255)

A class's image list (data.fewshot.class_lists): "file_order", the images containing the class in
the order of the training list (`class_image_lists`: the embedded dataset, and VOC / COCO by
default), or "official", the official lists of VOC or COCO (fcdl94/FSS `inverse_dict_train*.pkl`,
indices into the official training list, whose order is not the suite's: `official_class_lists`
maps them onto the suite's file list), which `make data DATASET=voc|coco` fetches, so that the
draws are the official images.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

MAX_SHOTS = 20   # the official code's stride between the draws of one class (from SPNet)
VOC_FOLDS = 4
COCO_FOLDS = 4
# COCO's 80 category ids (1..90 without the 10 unused ones), the id space of the official COCO tasks.
COCO_CATEGORY_IDS = tuple(c for c in range(1, 91) if c not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))


def voc_fold(fold: int, multi_step: bool = False) -> list[list[int]]:
    """The classes of each step of VOC fold `fold` (0-3): base step [0, base ascending], then the
    fold's five novel classes 5*fold+1 .. 5*fold+5 in one step, or one per step (`m`)."""
    if fold not in range(VOC_FOLDS):
        raise ValueError(f"VOC has folds 0-{VOC_FOLDS - 1}, not {fold}")
    novel = list(range(5 * fold + 1, 5 * fold + 6))
    base = [c for c in range(1, 21) if c not in novel]
    return [[0] + base] + ([[c] for c in novel] if multi_step else [novel])


def coco_fold(fold: int, multi_step: bool = False) -> list[list[int]]:
    """COCO fold `fold` (0-3): the novel classes are every fourth category id from the fold-th
    (1, 5, 9, 14, ... for fold 0); one step of 20, or four steps of five (`m`)."""
    if fold not in range(COCO_FOLDS):
        raise ValueError(f"COCO has folds 0-{COCO_FOLDS - 1}, not {fold}")
    novel = list(COCO_CATEGORY_IDS[fold::4])
    base = [c for c in COCO_CATEGORY_IDS if c not in novel]
    steps = [novel[i:i + 5] for i in range(0, len(novel), 5)] if multi_step else [novel]
    return [[0] + base] + steps


def fewshot_tasks(dataset: str) -> dict[str, list[list[int]]]:
    """The registered names of the iFSS tasks of `dataset` ("fss-5-0", "fss-5-0m", ...)."""
    if dataset in ("voc", "synthetic"):
        return {f"fss-5-{fold}{'m' if multi else ''}": voc_fold(fold, multi)
                for fold in range(VOC_FOLDS) for multi in (False, True)}
    if dataset == "coco":
        return {f"fss-20-{fold}{'m' if multi else ''}": coco_fold(fold, multi)
                for fold in range(COCO_FOLDS) for multi in (False, True)}
    return {}


def class_image_lists(presence: np.ndarray) -> dict[int, list[int]]:
    """Class id -> the rows (in file order) of the images whose mask holds it, from the presence
    table (N, K) of datamodules.presence (column c-1 = class c)."""
    return {c + 1: np.flatnonzero(presence[:, c]).tolist() for c in range(presence.shape[1])}


def official_class_lists(official: dict, official_ids, file_ids) -> dict[int, list[int]]:
    """The official per-class lists (`inverse_dict_train.pkl`: class -> indices into the official
    `train_ids.npy`, in the official order) as rows of the suite's file list `file_ids`. Every
    official image must be in the file list (else ValueError naming how many are missing)."""
    row_of = {image_id: row for row, image_id in enumerate(file_ids)}
    missing = [str(i) for i in official_ids if str(i) not in row_of]
    if missing:
        raise ValueError(f"{len(missing)} images of the official train_ids.npy are not in the training list "
                         f"(e.g. {missing[0]}): the official few-shot draws need VOC's train_aug images")
    rows = [row_of[str(i)] for i in official_ids]
    return {int(c): [rows[int(i)] for i in indices] for c, indices in official.items() if int(c) != 0}


OFFICIAL_LISTS = {"voc": ("fss_voc_train_ids", "fss_voc_class_lists"),
                  "coco": ("fss_coco_train_ids", "fss_coco_class_lists")}


def official_directory(dataset: str, data_root) -> Path:
    """Where `make data DATASET=voc|coco` puts the official few-shot split files of `dataset`."""
    return Path(data_root) / "fss" / dataset


def fetch_official_lists(dataset: str, data_root, files=None, progress: bool = False) -> list[Path]:
    """Download (unless a verified copy is there) the official split files of `dataset`."""
    from datamodules.download import OFFICIAL_FILES, fetch_file

    files = OFFICIAL_FILES if files is None else files
    return [fetch_file(files[key], official_directory(dataset, data_root), progress=progress)
            for key in OFFICIAL_LISTS[dataset]]


def load_official_class_lists(dataset: str, data_root, file_ids) -> dict[int, list[int]]:
    """The official per-class lists of `dataset` ("voc": train_ids.npy + inverse_dict_train.pkl;
    "coco": train.txt + inverse_dict_train_coco.pkl) as rows of `file_ids` (official_class_lists),
    from the files `make data` fetched, checked against their pinned sha256 before they are
    unpickled; one-line errors when they are missing or differ."""
    from datamodules.datasets.errors import DatasetMissing
    from datamodules.download import OFFICIAL_FILES, verify

    if dataset not in OFFICIAL_LISTS:
        raise ValueError(f"the official few-shot lists are {' and '.join(OFFICIAL_LISTS)}'s, not {dataset}'s")
    ids_key, lists_key = OFFICIAL_LISTS[dataset]
    directory = official_directory(dataset, data_root)
    paths = {key: directory / OFFICIAL_FILES[key].name for key in (ids_key, lists_key)}
    missing = [str(path) for path in paths.values() if not path.exists()]
    if missing:
        raise DatasetMissing(f"data.fewshot.class_lists=official needs PIFS's official split files ({missing[0]} is "
                             f"missing): make data DATASET={dataset} fetches them")
    for key, path in paths.items():
        verify(path, OFFICIAL_FILES[key])
    ids_path = paths[ids_key]
    official_ids = (np.load(ids_path, allow_pickle=False) if ids_path.suffix == ".npy"
                    else ids_path.read_text().split())
    with open(paths[lists_key], "rb") as handle:
        official = pickle.load(handle)   # verified above: the pinned official file
    return official_class_lists(official, official_ids, list(file_ids))


def shot_rows(class_lists: dict[int, list[int]], novel_classes: list[int], nshot: int, ishot: int) -> dict[int, list[int]]:
    """The few-shot images of each novel class: rows ishot*20 .. ishot*20 + nshot - 1 of its
    list, as the official code draws them. nshot in 1..20; a class with fewer images than the
    draw needs is an error (the official code would silently take fewer)."""
    if not 1 <= nshot <= MAX_SHOTS:
        raise ValueError(f"nshot must be 1-{MAX_SHOTS} (the draws of a class are {MAX_SHOTS} images apart), not {nshot}")
    if ishot < 0:
        raise ValueError(f"ishot must be >= 0, not {ishot}")
    start = ishot * MAX_SHOTS
    chosen = {}
    for cls in novel_classes:
        images = class_lists.get(cls, [])
        if len(images) < start + nshot:
            raise ValueError(f"class {cls} has {len(images)} training images: draw ishot={ishot} of {nshot} "
                             f"shot(s) needs images {start}-{start + nshot - 1}")
        chosen[cls] = list(images[start:start + nshot])
    return chosen


def base_step_rows(presence: np.ndarray, base_classes: list[int]) -> np.ndarray:
    """The official base step's training rows: every image whose mask holds no foreground class
    outside `base_classes` (background alone included)."""
    base = np.zeros(presence.shape[1], dtype=bool)
    base[[c - 1 for c in base_classes if c != 0]] = True
    return np.flatnonzero(~(presence & ~base).any(axis=1))


def shot_lookup(channels: np.ndarray, old_classes: list[int], shot_class: int) -> np.ndarray:
    """A shot image's label lookup (256 entries), as the official novel step remaps its mask:
    background, the old classes and the shot's own class through `channels` (dataset id -> label),
    every other class and void to 255 (ignored), so a shot never teaches that another novel class
    is background."""
    kept = [0, *old_classes, shot_class]
    lookup = np.full(256, 255, dtype=np.uint8)
    lookup[kept] = channels[kept]
    return lookup
