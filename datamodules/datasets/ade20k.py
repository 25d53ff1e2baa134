"""Reader for ADE20K in the SceneParsing challenge layout (ADEChallengeData2016.zip):

    <root>/images/training/ADE_train_<n>.jpg         20,210 images
    <root>/images/validation/ADE_val_<n>.jpg          2,000 images
    <root>/annotations/{training,validation}/<id>.png greyscale class ids: 0 = unlabeled, 1..150

There are no list files: a split is every ADE_*.jpg of its directory, sorted by id, so that row
indices (and a user's saved per-step index files) mean the same images on every machine.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from datamodules.datasets.errors import DatasetMissing
from datamodules.datasets.voc import SplitFiles

ADE_DIRNAME = "ADEChallengeData2016"
# Sizes of the real splits (PROTOCOL.md §1); check_ade compares against them by default.
ADE_EXPECTED_COUNTS = {"train": 20210, "val": 2000}
# Split name in this suite -> directory name in the ADE layout.
ADE_SPLIT_DIRS = {"train": "training", "val": "validation"}
ADE_HOW_TO_GET = ("Unzip ADEChallengeData2016.zip (MIT SceneParsing, http://sceneparsing.csail.mit.edu/) so that "
                  "<data_root>/ADEChallengeData2016/images and annotations exist, or set DATA_ROOT (data.root=...)")
_SHOWN_IDS = 5

# The 150 SceneParsing classes, ids 1..150 (CSAILVision/sceneparsing objectInfo150.txt; the first
# synonym of each entry, except 90 "television receiver", the name MiB and mmsegmentation print).
ADE_CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair",
    "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
assert len(ADE_CLASS_NAMES) == 150 and len(set(ADE_CLASS_NAMES)) == 150


def read_ade_split(root: Path, split: str) -> SplitFiles:
    """Every images/<dir>/ADE_*.jpg of `split` ("train" or "val"), sorted by id, with the path of
    its annotation (which may not exist; check_ade says so)."""
    root, directory = Path(root), ADE_SPLIT_DIRS[split]
    images = sorted((root / "images" / directory).glob("ADE_*.jpg"), key=lambda p: p.stem)
    ids = [p.stem for p in images]
    masks = [root / "annotations" / directory / f"{image_id}.png" for image_id in ids]
    return SplitFiles(ids, images, masks)


def check_ade(root: Path, expected_counts: Mapping[str, int] | None = ADE_EXPECTED_COUNTS) -> dict[str, SplitFiles]:
    """Check an ADEChallengeData2016 directory: the four directories, an annotation for every
    image, and (unless `expected_counts` is None) the number of images of each split given.
    Raises DatasetMissing with one line naming what is missing or which count differs;
    returns the splits {"train": SplitFiles, "val": SplitFiles}."""
    root = Path(root)

    def failure(problem: str) -> DatasetMissing:
        return DatasetMissing(f"ADE20K not usable at {root}: {problem}. {ADE_HOW_TO_GET}")

    if not root.is_dir():
        raise failure("the directory does not exist")
    pieces = [f"{kind}/{d}/" for kind in ("images", "annotations") for d in ADE_SPLIT_DIRS.values()]
    missing = [p for p in pieces if not (root / p).is_dir()]
    if missing:
        raise failure(f"missing {', '.join(missing)}")
    splits = {name: read_ade_split(root, name) for name in ADE_SPLIT_DIRS}
    problems = []
    for name, split in splits.items():
        directory = ADE_SPLIT_DIRS[name]
        if not split.ids:
            problems.append(f"no ADE_*.jpg in images/{directory}/")
            continue
        unannotated = [i for i, m in zip(split.ids, split.masks) if not m.is_file()]
        if unannotated:
            shown = ", ".join(unannotated[:_SHOWN_IDS]) + (", ..." if len(unannotated) > _SHOWN_IDS else "")
            problems.append(f"{len(unannotated)} of {len(split.ids)} {directory} annotations missing in "
                            f"annotations/{directory}/ ({shown})")
    for name, expected in (expected_counts or {}).items():
        if name not in splits:
            raise ValueError(f"unknown ADE20K split {name!r} in expected_counts; known: {', '.join(splits)}")
        if splits[name].ids and len(splits[name]) != expected:
            problems.append(f"images/{ADE_SPLIT_DIRS[name]}/ holds {len(splits[name]):,} images, expected {expected:,}")
    if problems:
        raise failure("; ".join(problems))
    return splits


def ade_root(data_root: Path, options: Mapping) -> Path:
    """options["root"] (the ADEChallengeData2016 directory itself) or <data_root>/ADEChallengeData2016."""
    return Path(options.get("root") or Path(data_root) / ADE_DIRNAME)

