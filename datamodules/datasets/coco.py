"""COCO-to-VOC (WILSON): COCO 2017 trains step 0, Pascal VOC relabelled to COCO ids trains step 1.

Raw inputs under `<data_root>` (as extracted from the official archives):

    coco/images/{train2017,val2017}/<id>.jpg      train2017.zip / val2017.zip (or coco/{train2017,val2017}/)
    coco/stuffthingmaps_trainval2017/{train2017,val2017}/<id>.png
                                                   COCO-Stuff pixel maps (stuffthingmaps_trainval2017.zip)
    VOCdevkit/VOC2012/                             the prepared VOC tree (JPEGImages, SegmentationClassAug,
                                                   SegmentationClass, ImageSets/Segmentation/{train_aug,val}.txt)

`prepare_coco_voc` writes (once; existing outputs are kept):

    coco/annotations_coco_voc/{train2017,val2017}/<id>.png   COCO ids (91-id space), VOC palette PNG
    coco/ImageSets/Segmentation/{train2017,val2017}.txt       "/images/train2017/<id>.jpg /annotations_coco_voc/..."
    VOCdevkit/VOC2012/SegmentationClassAugCOCO/<id>.png       VOC train_aug masks relabelled to COCO ids
    VOCdevkit/VOC2012/SegmentationClassCOCO/<id>.png          VOC val masks relabelled to COCO ids
    VOCdevkit/VOC2012/ImageSets/Segmentation/{train_aug_coco,val_coco}.txt

The list files use the two-path form of the VOC reader (`voc.read_split`) and are written last, so
their presence means the conversion finished. `locate_coco_voc` reads them back.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from datamodules.datasets.errors import DatasetMissing
from datamodules.datasets.voc import SplitFiles, load_mask, read_split, save_mask
from datamodules.parallel import map_chunks
from datamodules.tasks import COCO_UNUSED_IDS, COCO_VOC_CLASS_IDS, VOC_TO_COCO

COCO_SPLITS = ("train2017", "val2017")
NUM_COCO_THINGS = 91          # COCO-Stuff thing ids 0..90 (0-based; 11 of them never occur)
LAST_COCO_STUFF_ID = 181      # COCO-Stuff stuff ids 91..181 (0-based)
VOID = 255

# Full COCO 2017 / VOC 2012 sizes; `locate_coco_voc` checks the list files against them.
EXPECTED_COUNTS = {"coco_train": 118_287, "coco_val": 5_000, "voc_train": 10_582, "voc_val": 1_449}

# Names of the 91 COCO thing ids (index = id; 0 = background, i.e. every stuff class and
# unlabelled thing-free area). Source: COCO-Stuff's labels.txt (github.com/nightrome/cocostuff,
# ids 1..91), the same list as WILSON's data/coco/labels.txt. The 11 ids with no annotations in
# COCO 2017 (street sign, hat, shoe, eye glasses, plate, mirror, window, desk, door, blender,
# hair brush) are named "unused-<id>" so that a table column can never suggest they were scored.
_COCO_THING_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird",
    "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "hat", "backpack",
    "umbrella", "shoe", "eye glasses", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "plate", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk",
    "toilet", "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave",
    "oven", "toaster", "sink", "refrigerator", "blender", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush", "hair brush",
)
COCO_CLASS_NAMES: tuple[str, ...] = ("background",) + tuple(
    f"unused-{cid}" if cid in COCO_UNUSED_IDS else name
    for cid, name in enumerate(_COCO_THING_NAMES, start=1))


# ---------------------------------------------------------------------------------------------
# Id conversion: 256-entry lookup tables (an id outside the table's domain is an error, not 0).

def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _coco_stuff_tables() -> tuple[np.ndarray, np.ndarray]:
    lookup = np.zeros(256, dtype=np.uint8)               # stuff ids 91..181 -> 0 (background)
    lookup[:NUM_COCO_THINGS] = np.arange(1, NUM_COCO_THINGS + 1)  # thing k -> k + 1
    lookup[VOID] = VOID
    valid = np.zeros(256, dtype=bool)
    valid[: LAST_COCO_STUFF_ID + 1] = True
    valid[VOID] = True
    return _read_only(lookup), _read_only(valid)


def _voc_tables() -> tuple[np.ndarray, np.ndarray]:
    lookup = np.zeros(256, dtype=np.uint8)
    valid = np.zeros(256, dtype=bool)
    for voc_id, coco_id in {0: 0, **VOC_TO_COCO, VOID: VOID}.items():
        lookup[voc_id] = coco_id
        valid[voc_id] = True
    return _read_only(lookup), _read_only(valid)


COCO_STUFF_LOOKUP, _COCO_STUFF_VALID = _coco_stuff_tables()
VOC_TO_COCO_LOOKUP, _VOC_VALID = _voc_tables()


def _apply_lookup(values: np.ndarray, lookup: np.ndarray, valid: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind not in "ui":
        raise ValueError(f"{what} must hold integer ids, not {array.dtype}")
    if array.dtype != np.uint8:
        outside = (array < 0) | (array > 255)
        if outside.any():
            raise ValueError(f"{what} holds ids outside 0..255: {np.unique(array[outside])[:10].tolist()}")
        array = array.astype(np.uint8)
    invalid = ~valid[array]
    if invalid.any():
        raise ValueError(f"{what} holds unexpected ids {np.unique(array[invalid])[:10].tolist()}")
    return lookup[array]


def coco_stuff_to_coco_ids(pixelmap: np.ndarray) -> np.ndarray:
    """COCO-Stuff pixel map -> COCO-91 ids (WILSON's data/coco/make_annotation.py).

        v in 0..90   (thing, 0-based: 0 person ... 90 hair brush) -> v + 1
        v in 91..181 (any stuff class)                            -> 0 (background)
        v == 255     (unlabelled)                                 -> 255 (void)
        any other v                                               -> ValueError naming it

    Returns uint8 of the same shape. (The 11 unused thing ids map like any other thing.)
    """
    return _apply_lookup(pixelmap, COCO_STUFF_LOOKUP, _COCO_STUFF_VALID, "a COCO-Stuff pixel map")


def voc_to_coco_ids(mask: np.ndarray) -> np.ndarray:
    """VOC mask -> COCO-91 ids (WILSON's data/make_cocovoc.py).

        0 -> 0, v in 1..20 -> VOC_TO_COCO[v] (e.g. 15 person -> 1, 1 aeroplane -> 5), 255 -> 255,
        any other v -> ValueError naming it.
    """
    return _apply_lookup(mask, VOC_TO_COCO_LOOKUP, _VOC_VALID, "a VOC mask")


# ---------------------------------------------------------------------------------------------
# Preparation

_CONVERTERS = {"coco": coco_stuff_to_coco_ids, "voc": voc_to_coco_ids}
CHUNK_SIZE = 64  # masks per message to a worker process


def _coco_image_dir(coco_root: Path, split: str) -> Path | None:
    for candidate in (coco_root / "images" / split, coco_root / split):
        if candidate.is_dir():
            return candidate
    return None


def _stuffthingmap_dir(coco_root: Path, split: str) -> Path | None:
    # stuffthingmaps_trainval2017.zip holds train2017/ and val2017/ at its top level: unzipped into
    # its own folder (the documented layout) or, as WILSON's download script does, into annotations/.
    for candidate in (coco_root / "stuffthingmaps_trainval2017" / split, coco_root / "annotations" / split):
        if candidate.is_dir() and any(candidate.glob("*.png")):
            return candidate
    return None


def _convert_one(job: tuple[str, str, str]) -> bool:
    """Convert one mask file; False when the output already existed."""
    kind, source, target = job
    target_path = Path(target)
    if target_path.exists():
        return False
    try:
        converted = _CONVERTERS[kind](load_mask(Path(source)))
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None
    partial = target_path.with_name(f".{target_path.stem}.{os.getpid()}.partial.png")
    try:
        save_mask(partial, converted)
        partial.replace(target_path)  # atomic: an interrupted run never leaves a truncated mask behind
    finally:
        partial.unlink(missing_ok=True)
    return True


def _convert_chunk(jobs) -> list[bool]:
    """Worker (module level, so that worker processes can unpickle it): convert a chunk of jobs."""
    return [_convert_one(job) for job in jobs]


def _write_list(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(line + "\n" for line in lines))
    partial.replace(path)


def prepare_coco_voc(data_root: Path, progress: bool = True, *, workers: int | None = None) -> dict:
    """Convert COCO-Stuff maps and VOC masks to COCO ids and write the list files (see the module
    docstring for the layout). Idempotent: masks already written are kept, not recomputed.

    `workers`: processes for the conversion (datamodules.parallel.map_chunks); None = min(4, CPUs)
    for large groups of files, serial for small ones; 1 = serial.
    Returns {"coco_train", "coco_val", "voc_train", "voc_val": rows of each list, "written": masks
    written by this call, "skipped": masks that already existed}.
    Raises DatasetMissing (one line) when an input is missing or incomplete.
    """
    data_root = Path(data_root)
    coco_root = data_root / "coco"
    voc_root = data_root / "VOCdevkit" / "VOC2012"

    # Inputs first, all of them, so that one message names everything that is missing.
    missing = []
    image_dirs, map_dirs = {}, {}
    for split in COCO_SPLITS:
        image_dirs[split] = _coco_image_dir(coco_root, split)
        if image_dirs[split] is None:
            missing.append(f"{coco_root / 'images' / split} (from {split}.zip)")
        map_dirs[split] = _stuffthingmap_dir(coco_root, split)
        if map_dirs[split] is None:
            missing.append(f"{coco_root / 'stuffthingmaps_trainval2017' / split} "
                           "(PNG maps from stuffthingmaps_trainval2017.zip)")
    voc_needed = ["JPEGImages", "SegmentationClassAug", "SegmentationClass",
                  "ImageSets/Segmentation/train_aug.txt", "ImageSets/Segmentation/val.txt"]
    missing += [str(voc_root / name) for name in voc_needed if not (voc_root / name).exists()]
    if missing:
        raise DatasetMissing(f"COCO-to-VOC inputs missing: {'; '.join(missing)}. "
                             "Run `make data DATASET=coco` (needs the VOC tree prepared first)")

    jobs: dict[str, list[tuple[str, str, str]]] = {}
    lists: dict[Path, list[str]] = {}
    counts = {}
    for split, key in zip(COCO_SPLITS, ("coco_train", "coco_val")):
        images = {p.stem: p for p in image_dirs[split].glob("*.jpg")}
        maps = {p.stem: p for p in map_dirs[split].glob("*.png")}
        if images.keys() != maps.keys():
            no_map, no_image = sorted(images.keys() - maps.keys()), sorted(maps.keys() - images.keys())
            raise DatasetMissing(
                f"COCO {split}: {len(no_map)} images without a stuffthingmap (e.g. {no_map[:3]}) and "
                f"{len(no_image)} stuffthingmaps without an image (e.g. {no_image[:3]}) in "
                f"{image_dirs[split]} / {map_dirs[split]}; re-extract the archives (`make data DATASET=coco`)")
        out_dir = coco_root / "annotations_coco_voc" / split
        out_dir.mkdir(parents=True, exist_ok=True)
        ids = sorted(images)
        jobs[f"COCO {split}"] = [("coco", str(maps[i]), str(out_dir / f"{i}.png")) for i in ids]
        image_rel = image_dirs[split].relative_to(coco_root).as_posix()
        lists[coco_root / "ImageSets" / "Segmentation" / f"{split}.txt"] = [
            f"/{image_rel}/{i}.jpg /annotations_coco_voc/{split}/{i}.png" for i in ids]
        counts[key] = len(ids)

    for list_name, mask_dir, out_name, out_list, key in (
            ("train_aug.txt", "SegmentationClassAug", "SegmentationClassAugCOCO", "train_aug_coco.txt", "voc_train"),
            ("val.txt", "SegmentationClass", "SegmentationClassCOCO", "val_coco.txt", "voc_val")):
        split = read_split(voc_root, list_name, mask_dir)
        absent = [str(p) for p in split.images + split.masks if not p.is_file()]
        if absent:
            raise DatasetMissing(f"VOC {list_name}: {len(absent)} of its {len(split)} images and masks are missing "
                                 f"(e.g. {absent[0]}); prepare the VOC tree first (`make data DATASET=voc`)")
        out_dir = voc_root / out_name
        out_dir.mkdir(parents=True, exist_ok=True)
        targets = [out_dir / f"{mask.stem}.png" for mask in split.masks]
        jobs[f"VOC {list_name[:-4]} -> COCO ids"] = [
            ("voc", str(mask), str(target)) for mask, target in zip(split.masks, targets)]
        lists[voc_root / "ImageSets" / "Segmentation" / out_list] = [
            f"/{image.relative_to(voc_root).as_posix()} /{out_name}/{target.name}"
            for image, target in zip(split.images, targets)]
        counts[key] = len(split)

    total = sum(len(group) for group in jobs.values())
    written = 0
    for description, group in jobs.items():
        pending = [job for job in group if not Path(job[2]).exists()]
        if pending:
            written += sum(map_chunks(_convert_chunk, pending, workers=workers, chunk_size=CHUNK_SIZE,
                                      description=description, progress=progress))
    for path, lines in lists.items():
        _write_list(path, lines)
    return {**counts, "written": written, "skipped": total - written}


# ---------------------------------------------------------------------------------------------
# Locating the prepared dataset

def _check_splits(splits: dict, options: dict, data_root: Path, what: str) -> None:
    """Every split of the expected size (unless check_counts is false) and every file present, else
    one DatasetMissing line naming what is wrong."""
    problems, wrong_counts = [], False
    if options.get("check_counts", True):
        unknown = set(options.get("expected_counts") or {}) - set(EXPECTED_COUNTS)
        if unknown:
            raise ValueError(f"expected_counts has unknown keys {sorted(unknown)}; known: {', '.join(EXPECTED_COUNTS)}")
        expected = {**EXPECTED_COUNTS, **(options.get("expected_counts") or {})}
        problems += [f"{key} has {len(split):,} images (expected {expected[key]:,})"
                     for key, split in splits.items() if len(split) != expected[key]]
        wrong_counts = bool(problems)
    for key, split in splits.items():
        for kind, paths in (("images", split.images), ("masks", split.masks)):
            absent = [path for path in paths if not path.is_file()]
            if absent:
                problems.append(f"{len(absent):,} of {len(paths):,} {key} {kind} missing (e.g. {absent[0]})")
    if problems:
        hint = " (or set data.options.check_counts=false to use a subset on purpose)" if wrong_counts else ""
        raise DatasetMissing(f"{what} under {data_root} is incomplete: {'; '.join(problems)}. "
                             f"Run `make data DATASET=coco` again{hint}")


def locate_coco(data_root: Path, options: dict | None = None):
    """COCO 2017 with its 80 thing categories as classes (COCO ids, 0 = background: every stuff
    class), the tree `make data DATASET=coco` prepares (`prepare_coco_voc`'s COCO half): train
    train2017, test val2017, as PIFS's COCO-20i folds use them (fcdl94/FSS `dataset/coco.py`, masks from
    COCO-Stuff's pixel maps, thing k -> k + 1). options: "expected_counts" (coco_train, coco_val),
    "check_counts". Raises DatasetMissing (one line) naming what is missing or of the wrong size."""
    from datamodules.datasets import DatasetSplits  # lazy: that package imports this module

    options = dict(options or {})
    data_root = Path(data_root)
    coco_root = data_root / "coco"
    needed = [coco_root / "annotations_coco_voc" / split for split in COCO_SPLITS]
    needed += [coco_root / "ImageSets" / "Segmentation" / f"{split}.txt" for split in COCO_SPLITS]
    missing = [str(path) for path in needed if not path.exists()]
    if missing:
        raise DatasetMissing(f"COCO is not prepared under {data_root} (missing: {', '.join(missing)}). "
                             "Run `make data DATASET=coco`")
    splits = {"coco_train": read_split(coco_root, "train2017.txt"), "coco_val": read_split(coco_root, "val2017.txt")}
    counts = {k: v for k, v in (options.get("expected_counts") or {}).items() if k in splits}
    _check_splits(splits, {**options, "expected_counts": counts}, data_root, "COCO")
    return DatasetSplits(coco_root, splits["coco_train"], splits["coco_val"])


def locate_coco_voc(data_root: Path, options: dict | None = None):
    """The COCO-to-VOC splits of a prepared tree (`prepare_coco_voc`), as DatasetSplits.

    train: the COCO train2017 rows (sorted by id) then the VOC train_aug rows (masks relabelled to
        COCO ids); `train_source[i]` is "coco" or "voc"; `step_sources == ("coco", "voc")`: step 0
        draws from COCO images only, step 1 from VOC images only (PROTOCOL.md §3).
    test: COCO val2017 (default, WILSON's COCO columns) or, with options["test_set"] == "voc", the
        relabelled VOC val (WILSON's VOC column).
    options: "test_set" ("coco" | "voc"), "expected_counts" (overrides of EXPECTED_COUNTS:
        coco_train, coco_val, voc_train, voc_val), "check_counts" (default true).
    Raises DatasetMissing (one line) naming what is missing or of the wrong size.
    """
    from datamodules.datasets import DatasetSplits  # lazy: that package imports this module

    options = dict(options or {})
    data_root = Path(data_root)
    coco_root = data_root / "coco"
    voc_root = data_root / "VOCdevkit" / "VOC2012"
    test_set = options.get("test_set", "coco")
    if test_set not in ("coco", "voc"):
        raise ValueError(f"test_set must be 'coco' (COCO val2017) or 'voc' (VOC val as COCO ids), not {test_set!r}")

    needed = [coco_root / "annotations_coco_voc" / split for split in COCO_SPLITS]
    needed += [coco_root / "ImageSets" / "Segmentation" / f"{split}.txt" for split in COCO_SPLITS]
    needed += [voc_root / name for name in ("JPEGImages", "SegmentationClassAugCOCO", "SegmentationClassCOCO",
                                            "ImageSets/Segmentation/train_aug_coco.txt",
                                            "ImageSets/Segmentation/val_coco.txt")]
    missing = [str(path) for path in needed if not path.exists()]
    if missing:
        raise DatasetMissing(f"COCO-to-VOC is not prepared under {data_root} (missing: {', '.join(missing)}). "
                             "Run `make data DATASET=coco`")

    splits = {"coco_train": read_split(coco_root, "train2017.txt"), "coco_val": read_split(coco_root, "val2017.txt"),
              "voc_train": read_split(voc_root, "train_aug_coco.txt"), "voc_val": read_split(voc_root, "val_coco.txt")}
    _check_splits(splits, options, data_root, "COCO-to-VOC")
    coco_train, voc_train = splits["coco_train"], splits["voc_train"]
    train = SplitFiles(coco_train.ids + voc_train.ids, coco_train.images + voc_train.images,
                       coco_train.masks + voc_train.masks)
    source = ("coco",) * len(coco_train) + ("voc",) * len(voc_train)
    return DatasetSplits(coco_root, train, splits["coco_val" if test_set == "coco" else "voc_val"],
                         train_source=source, step_sources=("coco", "voc"))


# ---------------------------------------------------------------------------------------------
# WILSON's image sets (PROTOCOL.md §3)

def wilson_step_rows(presence: np.ndarray, train_source, step: int) -> np.ndarray:
    """Sorted train rows of COCO-to-VOC step `step` exactly as WILSON's split files give them.

    step 0: the "coco" rows with no pixel of any VOC class (COCO_VOC_CLASS_IDS), *including* the
        images with no thing class at all (1,021 of the 23,274 in COCO train2017);
    step 1: every "voc" row (all 10,582 VOC train_aug images; image-level labels only).
    The generic disjoint rule (`splits.select_images` on the "coco" rows) gives step 0 without
    the thing-free images, since it requires a step-0 class in the image.
    `presence` is the (rows x 91) class-presence table of the train masks (column = id - 1).
    """
    presence = np.asarray(presence, dtype=bool)
    source = np.asarray(train_source)
    if presence.shape[0] != source.shape[0]:
        raise ValueError(f"presence has {presence.shape[0]} rows but train_source has {source.shape[0]}")
    if step == 0:
        has_voc = presence[:, [c - 1 for c in COCO_VOC_CLASS_IDS]].any(axis=1)
        return np.flatnonzero((source == "coco") & ~has_voc)
    if step == 1:
        return np.flatnonzero(source == "voc")
    raise ValueError(f"COCO-to-VOC has steps 0 and 1, not {step}")
