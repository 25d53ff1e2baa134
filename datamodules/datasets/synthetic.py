"""The embedded synthetic dataset: procedurally generated scenes in the Pascal VOC layout.

20 foreground classes + background, so every VOC task applies unchanged. A class is a
(shape, appearance) pair: 5 shapes x 4 appearances (colour scheme + texture), assigned to class
ids by a fixed permutation, so neither shape nor appearance alone tells classes apart, and
the classes of a later step mix shapes and appearances already seen at step 0. Each image has
1-4 objects; a class tends to co-occur with a few "friend" classes (like person/horse in VOC),
so disjoint and overlap splits differ. Backgrounds are smooth colour noise with clutter
(strokes and specks in the object colours). Masks are palette PNGs with a 1-pixel void (255)
border on the inside of every object boundary, as VOC's annotation has.

Deterministic from the seed; written once under <data_root>/synthetic and reused; regenerated
when incomplete or generated with other parameters (the `COMPLETE` marker is written last).
"""
from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from rich.progress import track

from datamodules.datasets.voc import save_mask

GENERATOR_VERSION = 2
NUM_CLASSES = 20
SHAPES = ("disk", "square", "triangle", "cross", "ring")
# Appearance = a pair of colours and a texture drawn with them.
APPEARANCES = (
    ((220, 40, 40), (250, 170, 60), "solid"),
    ((40, 170, 60), (230, 230, 230), "stripes"),
    ((40, 70, 220), (240, 220, 40), "checker"),
    ((180, 50, 200), (40, 210, 210), "dots"),
)
CLUTTER_COLOURS = np.array([c for a in APPEARANCES for c in a[:2]], dtype=np.float32)


def class_attributes(seed: int = 0) -> list[tuple[str, int]]:
    """(shape, appearance index) of classes 1..20, index 0 of the list = class 1."""
    pairs = [(s, a) for s in range(len(SHAPES)) for a in range(len(APPEARANCES))]
    order = np.random.default_rng(seed + 7919).permutation(len(pairs))
    return [(SHAPES[pairs[i][0]], pairs[i][1]) for i in order]


def class_friends(seed: int = 0, friends: int = 2) -> list[list[int]]:
    """For each class 1..20, the classes it tends to co-occur with (ids 1..20)."""
    rng = np.random.default_rng(seed + 104729)
    return [sorted(int(f) + 1 for f in rng.choice([k for k in range(NUM_CLASSES) if k != c], friends, replace=False))
            for c in range(NUM_CLASSES)]


def _shape_mask(shape: str, size: int, cy: float, cx: float, radius: float, angle: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dy, dx = y - cy, x - cx
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # rotated coordinates
    r = np.hypot(dx, dy)
    if shape == "disk":
        return r <= radius
    if shape == "ring":
        return (r <= radius) & (r >= 0.55 * radius)
    if shape == "square":
        half = radius * 0.8
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if shape == "cross":
        arm = radius * 0.33
        return ((np.abs(u) <= arm) & (np.abs(v) <= radius)) | ((np.abs(v) <= arm) & (np.abs(u) <= radius))
    if shape == "triangle":
        inside = np.ones_like(r, dtype=bool)
        for k in range(3):  # three half-planes of an equilateral triangle inscribed in the circle
            theta = angle + np.pi / 2 + k * 2 * np.pi / 3
            inside &= dx * np.cos(theta) + dy * np.sin(theta) <= radius * 0.5
        return inside
    raise ValueError(shape)


def _texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Weight of the second colour in [0, 1] per pixel, for a texture of random phase/orientation."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    u = np.cos(angle) * x + np.sin(angle) * y
    v = -np.sin(angle) * x + np.cos(angle) * y
    period = rng.uniform(6.0, 9.0)
    phase_u, phase_v = rng.uniform(0, period, 2)
    if kind == "solid":
        return np.full((size, size), 0.15, dtype=np.float32) + 0.1 * (y / size)
    if kind == "stripes":
        return (((u + phase_u) // (period / 2)) % 2).astype(np.float32)
    if kind == "checker":
        return ((((u + phase_u) // (period / 2)) + ((v + phase_v) // (period / 2))) % 2).astype(np.float32)
    if kind == "dots":
        du = (u + phase_u) % period - period / 2
        dv = (v + phase_v) % period - period / 2
        return (np.hypot(du, dv) < period * 0.28).astype(np.float32)
    raise ValueError(kind)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour noise plus clutter strokes and specks in the objects' colours."""
    coarse = rng.uniform(60, 200, (4, 4, 3)).astype(np.float32)
    image = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.BICUBIC), dtype=np.float32)
    image += rng.normal(0, 10, (size, size, 3))
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(rng.integers(2, 6)):  # strokes
        colour = CLUTTER_COLOURS[rng.integers(len(CLUTTER_COLOURS))] * rng.uniform(0.7, 1.0)
        x0, y0, angle = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0, np.pi)
        distance = np.abs(np.cos(angle) * (y - y0) - np.sin(angle) * (x - x0))
        along = np.abs(np.sin(angle) * (y - y0) + np.cos(angle) * (x - x0))
        stroke = (distance < rng.uniform(0.6, 1.8)) & (along < rng.uniform(size * 0.1, size * 0.5))
        image[stroke] = colour
    for _ in range(rng.integers(3, 10)):  # specks
        colour = CLUTTER_COLOURS[rng.integers(len(CLUTTER_COLOURS))]
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(1.0, 2.5)
        image[np.hypot(y - cy, x - cx) < r] = colour
    return image


def _void_border(labels: np.ndarray) -> np.ndarray:
    """Object pixels with a 4-neighbour of another label (the inner side of every boundary)."""
    padded = np.pad(labels, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    differs = np.zeros_like(labels, dtype=bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        differs |= padded[dy:dy + labels.shape[0], dx:dx + labels.shape[1]] != centre
    return differs & (labels != 0)


def generate_sample(rng: np.random.Generator, size: int, attributes, friends) -> tuple[np.ndarray, np.ndarray]:
    """One (RGB uint8 image, uint8 mask) pair."""
    image = _background(size, rng)
    labels = np.zeros((size, size), dtype=np.uint8)
    count = rng.choice([1, 2, 3, 4], p=[0.35, 0.35, 0.2, 0.1])
    classes = [int(rng.integers(1, NUM_CLASSES + 1))]
    while len(classes) < count:
        pool = friends[classes[0] - 1] if rng.random() < 0.7 else range(1, NUM_CLASSES + 1)
        classes.append(int(rng.choice(list(pool))))
    for cls in classes:
        _draw_object(image, labels, rng, size, cls, attributes)
    mask = labels.copy()
    mask[_void_border(labels)] = 255
    return np.clip(image, 0, 255).astype(np.uint8), mask


def _draw_object(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, size: int, cls: int,
                 attributes, radius_range=(0.14, 0.24)) -> None:
    """One object of class `cls` drawn into image (float) and labels, in place."""
    shape, appearance = attributes[cls - 1]
    first, second, texture = APPEARANCES[appearance]
    for _attempt in range(10):  # keep objects mostly unoccluded
        radius = rng.uniform(*radius_range) * size
        cy, cx = rng.uniform(radius, size - radius, 2)
        region = _shape_mask(shape, size, cy, cx, radius, rng.uniform(0, 2 * np.pi))
        if (labels[region] != 0).mean() < 0.3:
            break
    weight = _texture(texture, size, rng)[..., None]
    jitter = rng.uniform(0.8, 1.15)
    colour = ((1 - weight) * np.array(first) + weight * np.array(second)) * jitter
    colour += rng.normal(0, 8, colour.shape)
    image[region] = colour[region]
    labels[region] = cls


def generate_class_image(rng: np.random.Generator, size: int, attributes, cls: int) -> np.ndarray:
    """An image of class `cls` alone (one or two instances, at the scenes' scale) on a cluttered
    background: the embedded stand-in for a class-conditional generator's image (RECALL's replay
    pool). Its mask is not returned: replay labels come from the models. (At the scenes' scale the
    default step-0 model labels half as many of their pixels with a wrong class as on objects 1.4x
    larger: 5.7 % against 11.7 % of the image.)"""
    image = _background(size, rng)
    labels = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.choice([1, 2], p=[0.7, 0.3]))):
        _draw_object(image, labels, rng, size, cls, attributes)
    return np.clip(image, 0, 255).astype(np.uint8)


def covers(generated: dict, wanted: dict) -> bool:
    """Whether a dataset generated with `generated` holds the one of `wanted`: the same generator,
    size and seed, and at least as many images of each split. Each split's images are drawn one after
    the other from the split's own generator, so its first n images are the same whatever the
    split's length: a smaller dataset is the prefix of a larger one (`make table`'s 1000 training
    images are the first 1000 of the default experiment's 2000)."""
    same = all(generated.get(k) == wanted[k] for k in ("version", "size", "seed"))
    return same and all(generated.get(k, -1) >= wanted[k] for k in ("train", "val"))


DEFAULTS = {"train": 2000, "val": 500, "size": 80, "seed": 0}   # data.options.synthetic


def ensure_generated(data_root: Path, train: int = DEFAULTS["train"], val: int = DEFAULTS["val"],
                     size: int = DEFAULTS["size"], seed: int = DEFAULTS["seed"]) -> Path:
    """Generate the dataset under <data_root>/synthetic unless a complete copy that covers these
    parameters (`covers`) is there already. Returns the dataset root; its split files may list more
    images than asked for: the first `train` / `val` are the dataset (datamodules.datasets.locate
    reads those)."""
    root = Path(data_root) / "synthetic"
    params = {"version": GENERATOR_VERSION, "train": train, "val": val, "size": size, "seed": seed}
    marker = root / "COMPLETE"
    if marker.exists() and covers(json.loads(marker.read_text()), params):
        return root
    # Several processes (DDP ranks under torchrun) may get here at once: one generates, the
    # others wait for it and then find the marker.
    Path(data_root).mkdir(parents=True, exist_ok=True)
    with open(Path(data_root) / ".synthetic.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and covers(json.loads(marker.read_text()), params):
            return root
        _generate(root, params, train, val, size, seed)
    return root


def _generate(root: Path, params: dict, train: int, val: int, size: int, seed: int) -> None:
    marker = root / "COMPLETE"
    if root.exists():
        shutil.rmtree(root)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    attributes, friends = class_attributes(seed), class_friends(seed)
    for split, count, split_seed in (("train", train, seed), ("val", val, seed + 1)):
        rng = np.random.default_rng(split_seed)
        ids = [f"{split}_{i:05d}" for i in range(count)]
        for image_id in track(ids, description=f"generating synthetic {split} images"):
            image, mask = generate_sample(rng, size, attributes, friends)
            Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
            save_mask(root / "SegmentationClass" / f"{image_id}.png", mask)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "README.txt").write_text(
        "Embedded synthetic dataset of the CISS suite, Pascal VOC layout. Classes (shape, appearance):\n"
        + "\n".join(f"{c + 1}: {s} / {APPEARANCES[a][2]}" for c, (s, a) in enumerate(attributes)) + "\n")
    marker.write_text(json.dumps(params))
