"""RECALL's replay pool: images of the old classes from outside the dataset, one directory per class.

    <pool>/<class name>/*.jpg|*.png      (class names as the dataset names them: "dining table",
                                          "potted plant", ...; datamodules.datasets.class_names)

Built offline. For the real datasets the user supplies it: the RECALL authors' released pool
(their data.zip, tfrecords converted to images), images they crawled (RECALL's web variant: Flickr
by class name, up to 1,000 per class), or images from a class-conditional generator they run
(RECALL's GAN variant: BigGAN-deep-512, 500 per class of the matching ImageNet class). For the
embedded dataset the suite renders it (`build_synthetic_pool`: each class alone on a cluttered
background, the stand-in for a class-conditional generator); the renderer's masks are never kept,
as replay labels come from the models.
"""
from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
POOL_VERSION = 2   # 2: objects at the scenes' scale


class ReplayPoolMissing(FileNotFoundError):
    """The replay pool (or a class's directory in it) is not there; the message is one line."""


def class_directory(pool: Path, name: str) -> Path:
    return Path(pool) / name.replace("/", "_")


def pool_images(pool, class_names: dict[int, str], classes) -> dict[int, list[Path]]:
    """The pool's images of each class in `classes` (dataset ids), sorted by file name. A missing
    pool, or a class without images, is one line saying where they are expected and how to make them."""
    pool = Path(pool)
    how = ("lay it out as <pool>/<class name>/*.jpg|png (README, RECALL: the authors' released pool, crawled "
           "or generated images; the embedded dataset's is rendered by the suite)")
    if not pool.is_dir():
        raise ReplayPoolMissing(f"RECALL's replay pool is not at {pool}: {how}")
    images = {}
    for cls in classes:
        directory = class_directory(pool, class_names[cls])
        found = sorted(p for p in directory.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if directory.is_dir() else []
        if not found:
            raise ReplayPoolMissing(f"RECALL's replay pool {pool} has no images of class {cls} "
                                    f"({class_names[cls]!r}) in {directory}: {how}")
        images[cls] = found
    return images


def build_synthetic_pool(pool, per_class: int, size: int, dataset_seed: int = 0, seed: int = 0,
                         progress: bool = True) -> Path:
    """The embedded dataset's pool: `per_class` images of each of its 20 classes, rendered alone on
    cluttered backgrounds with the generator of the dataset (seed `dataset_seed`: the same classes),
    from its own random stream (`seed`). Written once (a `COMPLETE` marker with the parameters is
    written last; another set of parameters renders it again); processes that arrive together wait
    for the one that renders."""
    from rich.progress import track

    from datamodules.datasets import class_names
    from datamodules.datasets.synthetic import NUM_CLASSES, class_attributes, generate_class_image

    pool = Path(pool)
    params = {"version": POOL_VERSION, "per_class": per_class, "size": size, "dataset_seed": dataset_seed, "seed": seed}
    marker = pool / "COMPLETE"

    def complete() -> bool:
        return marker.exists() and json.loads(marker.read_text()) == params

    if complete():
        return pool
    pool.parent.mkdir(parents=True, exist_ok=True)
    with open(pool.parent / f".{pool.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if complete():
            return pool
        if pool.exists():
            shutil.rmtree(pool)
        names, attributes = class_names("synthetic"), class_attributes(dataset_seed)
        rng = np.random.default_rng(seed + 15485863)
        for cls in track(range(1, NUM_CLASSES + 1), description="rendering the replay pool", disable=not progress):
            directory = class_directory(pool, names[cls])
            directory.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                Image.fromarray(generate_class_image(rng, size, attributes, cls)).save(directory / f"{k:04d}.png")
        marker.write_text(json.dumps(params))
    return pool
