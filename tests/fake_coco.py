"""A tiny COCO-to-VOC input tree in the real layout, with the ground truth of every image.

    <data_root>/coco/images/{train2017,val2017}/<12-digit id>.jpg     (or coco/{train2017,val2017}/)
    <data_root>/coco/stuffthingmaps_trainval2017/{train2017,val2017}/<id>.png   greyscale, COCO-Stuff values
    <data_root>/VOCdevkit/VOC2012/{JPEGImages,SegmentationClassAug,SegmentationClass}/
    <data_root>/VOCdevkit/VOC2012/ImageSets/Segmentation/{train_aug,val}.txt

Masks are grids of 8x8 cells, one value per cell, so the generator knows exactly which values
each image holds without reading them back. The ground truth is written in the generator's own
terms (raw COCO-Stuff values, raw VOC ids) and never uses datamodules code, so tests can derive
their expectations independently.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

HEIGHT, WIDTH, CELL = 32, 40, 8
# COCO-Stuff thing values (0-based) of the 20 VOC classes and of the 60 other used thing classes,
# written out from COCO's category list (person = 0 ... toothbrush = 89; hair brush = 90 unused).
VOC_THING_VALUES = [0, 1, 2, 3, 4, 5, 6, 8, 15, 16, 17, 18, 19, 20, 43, 61, 62, 63, 66, 71]
UNUSED_THING_VALUES = [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]
OTHER_THING_VALUES = [v for v in range(91) if v not in VOC_THING_VALUES and v not in UNUSED_THING_VALUES]
STUFF_VALUES = list(range(91, 182))
# COCO image kinds, cycled so every kind appears even in tiny trees.
COCO_KINDS = ("other_things", "with_voc", "no_thing", "voc_only", "other_things", "with_voc")


def _grid(rng: np.random.Generator, must: list[int], fill: list[int]) -> np.ndarray:
    """A HEIGHT x WIDTH map whose cells hold every value of `must` once, the rest drawn from `fill`."""
    cells = (HEIGHT // CELL) * (WIDTH // CELL)
    assert len(must) <= cells
    values = list(must) + [int(rng.choice(fill)) for _ in range(cells - len(must))]
    values = np.array(values, dtype=np.uint8)[rng.permutation(cells)]
    grid = values.reshape(HEIGHT // CELL, WIDTH // CELL)
    return np.kron(grid, np.ones((CELL, CELL), dtype=np.uint8))


def _coco_map(rng: np.random.Generator, kind: str) -> np.ndarray:
    others = [int(v) for v in rng.choice(OTHER_THING_VALUES, size=rng.integers(1, 4), replace=False)]
    vocs = [int(v) for v in rng.choice(VOC_THING_VALUES, size=rng.integers(1, 3), replace=False)]
    stuff = [int(v) for v in rng.choice(STUFF_VALUES, size=3, replace=False)]
    things = {"other_things": others, "with_voc": others + vocs, "no_thing": [], "voc_only": vocs}[kind]
    # every image also has stuff and unlabelled (255) cells
    return _grid(rng, things + stuff + [255], stuff + [255])


def _voc_mask(rng: np.random.Generator) -> np.ndarray:
    classes = [int(v) for v in rng.choice(np.arange(1, 21), size=rng.integers(1, 4), replace=False)]
    mask = _grid(rng, classes + [0], [0, 0, 255] + classes)
    mask[0, :] = 255  # a void border line, like VOC's object outlines
    return mask


def _image(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


def _save_palette(path: Path, mask: np.ndarray) -> None:
    image = Image.fromarray(mask, mode="P")
    image.putpalette([c for i in range(256) for c in (i, 255 - i, (7 * i) % 256)])
    image.save(path)


def make_coco_voc_tree(data_root: Path, n_coco_train: int = 12, n_coco_val: int = 4, n_voc_train: int = 6,
                       n_voc_val: int = 3, seed: int = 0, images_in_subfolder: bool = True,
                       voc_two_path_lists: bool = False) -> dict:
    """Write the tree; return {"coco_train"|"coco_val": {id: {"map", "things", "kind"}},
    "voc_train"|"voc_val": {id: {"mask", "classes"}}} where "map" is the raw COCO-Stuff map,
    "things" the set of 0-based thing values in it, "mask" the raw VOC mask and "classes" its VOC
    ids 1..20. Ids are listed in the order the list files give (VOC) or in file order (COCO).

    `images_in_subfolder=False` puts COCO images in coco/{split}/ instead of coco/images/{split}/;
    `voc_two_path_lists=True` writes train_aug.txt in the DeepLab "/JPEGImages/x.jpg /Seg.../x.png" form.
    """
    rng = np.random.default_rng(seed)
    data_root = Path(data_root)
    coco = data_root / "coco"
    truth: dict = {}
    used_ids = rng.choice(np.arange(1, 600_000), size=n_coco_train + n_coco_val, replace=False)
    for split, key, ids in (("train2017", "coco_train", used_ids[:n_coco_train]),
                            ("val2017", "coco_val", used_ids[n_coco_train:])):
        image_dir = coco / "images" / split if images_in_subfolder else coco / split
        map_dir = coco / "stuffthingmaps_trainval2017" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        map_dir.mkdir(parents=True, exist_ok=True)
        truth[key] = {}
        for n, number in enumerate(ids):
            image_id = f"{int(number):012d}"
            kind = COCO_KINDS[n % len(COCO_KINDS)]
            pixelmap = _coco_map(rng, kind)
            Image.fromarray(_image(rng)).save(image_dir / f"{image_id}.jpg", quality=90)
            Image.fromarray(pixelmap, mode="L").save(map_dir / f"{image_id}.png")  # COCO-Stuff maps are greyscale
            things = {int(v) for v in np.unique(pixelmap) if v <= 90}
            truth[key][image_id] = {"map": pixelmap, "things": things, "kind": kind}

    voc = data_root / "VOCdevkit" / "VOC2012"
    lists = voc / "ImageSets" / "Segmentation"
    for folder in ("JPEGImages", "SegmentationClassAug", "SegmentationClass"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    lists.mkdir(parents=True, exist_ok=True)
    for key, list_name, mask_dir, count, year in (("voc_train", "train_aug.txt", "SegmentationClassAug", n_voc_train, 2008),
                                                  ("voc_val", "val.txt", "SegmentationClass", n_voc_val, 2007)):
        truth[key] = {}
        lines = []
        # not in sorted order: the VOC rows must keep the list file's order
        for n in rng.permutation(count):
            image_id = f"{year}_{int(n) + 1:06d}"
            mask = _voc_mask(rng)
            Image.fromarray(_image(rng)).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=90)
            _save_palette(voc / mask_dir / f"{image_id}.png", mask)
            truth[key][image_id] = {"mask": mask, "classes": {int(v) for v in np.unique(mask) if 1 <= v <= 20}}
            two_path = voc_two_path_lists and key == "voc_train"
            lines.append(f"/JPEGImages/{image_id}.jpg /{mask_dir}/{image_id}.png" if two_path else image_id)
        (lists / list_name).write_text("\n".join(lines) + "\n")
    return truth
