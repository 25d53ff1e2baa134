"""The embedded dataset: deterministic, in the VOC layout, reused, regenerated when incomplete."""
import hashlib

import numpy as np
from PIL import Image

from datamodules.datasets import synthetic
from datamodules.datasets.voc import read_split
from datamodules.presence import compute_presence
from datamodules.splits import select_images
from datamodules.tasks import task_classes


def _digest(root):
    return hashlib.sha1(b"".join(p.read_bytes() for p in sorted((root / "SegmentationClass").glob("*.png")))).hexdigest()


def test_same_seed_same_data_and_the_voc_layout(tmp_path):
    a = synthetic.ensure_generated(tmp_path / "a", train=12, val=4, size=32)
    b = synthetic.ensure_generated(tmp_path / "b", train=12, val=4, size=32)
    assert _digest(a) == _digest(b)
    split = read_split(a, "train.txt")
    assert len(split) == 12 and all(p.is_file() for p in split.images + split.masks)
    mask = Image.open(split.masks[0])
    assert mask.mode == "P" and mask.size == (32, 32)  # palette PNG like VOC
    values = np.unique(np.concatenate([np.asarray(Image.open(p)).ravel() for p in split.masks]))
    assert 0 in values and 255 in values and set(values) <= set(range(21)) | {255}


def test_void_is_a_thin_border_along_object_boundaries():
    rng = np.random.default_rng(0)
    attributes, friends = synthetic.class_attributes(), synthetic.class_friends()
    for _ in range(20):
        image, mask = synthetic.generate_sample(rng, 80, attributes, friends)
        void = mask == 255
        assert void.any() and image.shape == (80, 80, 3)
        # a border, not a region: almost every void pixel has a labelled pixel among its 8 neighbours
        padded = np.pad(mask, 1, constant_values=0)
        near_label = [any(padded[y + dy, x + dx] != 255 for dy in range(3) for dx in range(3))
                      for y, x in zip(*np.nonzero(void))]
        assert np.mean(near_label) > 0.95
        # and thin: objects keep most of their pixels
        assert void.sum() < 0.35 * (mask > 0).sum()


def test_reused_when_complete_regenerated_when_incomplete_or_changed(tmp_path):
    root = synthetic.ensure_generated(tmp_path, train=6, val=2, size=32)
    marker_time = (root / "COMPLETE").stat().st_mtime_ns
    assert synthetic.ensure_generated(tmp_path, train=6, val=2, size=32) == root
    assert (root / "COMPLETE").stat().st_mtime_ns == marker_time  # reused, not rewritten
    (root / "COMPLETE").unlink()                                   # an interrupted generation
    (root / "JPEGImages" / "train_00003.jpg").unlink()
    synthetic.ensure_generated(tmp_path, train=6, val=2, size=32)
    assert (root / "JPEGImages" / "train_00003.jpg").is_file()
    synthetic.ensure_generated(tmp_path, train=8, val=2, size=32)  # other parameters
    assert len(read_split(root, "train.txt")) == 8


def test_classes_are_shape_appearance_pairs_and_disjoint_differs_from_overlap(tmp_path):
    attributes = synthetic.class_attributes()
    assert len(set(attributes)) == 20
    assert len({s for s, _ in attributes}) == 5 and len({a for _, a in attributes}) == 4
    root = synthetic.ensure_generated(tmp_path, train=200, val=2, size=32)
    presence = compute_presence(read_split(root, "train.txt").masks, 20)
    steps = task_classes("synthetic", "15-5")
    disjoint, overlap = select_images(presence, steps, 0, "disjoint"), select_images(presence, steps, 0, "overlap")
    assert 0 < len(disjoint) < len(overlap)  # old classes co-occur with future ones
    assert presence.sum(axis=1).max() >= 2 and presence.any(axis=0).all()


def test_a_smaller_dataset_is_the_prefix_of_a_larger_one_and_is_read_from_it(tmp_path):
    """Each split's images come one after the other from the split's own generator, so the first n
    of a larger dataset are the smaller dataset (make table's 1000 images inside the default 2000):
    a smaller request is served from the larger copy without regenerating it."""
    from datamodules.datasets import locate

    small = synthetic.ensure_generated(tmp_path / "small", train=5, val=2, size=32)
    large = synthetic.ensure_generated(tmp_path / "large", train=9, val=3, size=32)
    for index in range(5):
        name = f"train_{index:05d}"
        assert (small / "JPEGImages" / f"{name}.jpg").read_bytes() == (large / "JPEGImages" / f"{name}.jpg").read_bytes()
        assert (small / "SegmentationClass" / f"{name}.png").read_bytes() == (large / "SegmentationClass" / f"{name}.png").read_bytes()
    marker_time = (large / "COMPLETE").stat().st_mtime_ns
    located = locate("synthetic", tmp_path / "large", {"synthetic": {"train": 5, "val": 2, "size": 32}})
    assert located.train.ids == [f"train_{i:05d}" for i in range(5)] and located.test.ids == ["val_00000", "val_00001"]
    assert (large / "COMPLETE").stat().st_mtime_ns == marker_time   # served from the larger copy
    # another size or seed is another dataset: regenerated
    assert not synthetic.covers({"version": synthetic.GENERATOR_VERSION, "train": 9, "val": 3, "size": 32, "seed": 0},
                                {"version": synthetic.GENERATOR_VERSION, "train": 5, "val": 2, "size": 40, "seed": 0})
