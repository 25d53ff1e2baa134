"""The class-presence table: scanned on the miniature datasets, in worker processes, and cached."""
import os

import numpy as np
import pytest
from PIL import Image

from datamodules import parallel, presence
from datamodules.datasets import locate
from datamodules.datasets.voc import prepare_voc_aug, read_split, save_mask
from datamodules.presence import cached_presence, compute_presence, masks_key
from tests.fake_datasets import expected_presence, make_ade_tree, make_voc_sbd_tree


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    fake = make_ade_tree(tmp_path_factory.mktemp("ade"), 40, 8, seed=2)
    return fake, locate("ade", fake.data_root, {"expected_counts": {"train": 40, "val": 8}})


def test_presence_of_the_ade_masks_is_the_generators_ground_truth(ade):
    fake, located = ade
    table = compute_presence(located.train.masks, 150)
    assert table.shape == (40, 150) and table.dtype == bool
    np.testing.assert_array_equal(table, expected_presence(list(fake.train.values()), 150))


def test_presence_of_the_converted_voc_masks_is_the_generators_ground_truth(tmp_path):
    fake = make_voc_sbd_tree(tmp_path, seed=4)
    prepare_voc_aug(fake.voc_root, fake.sbd_root, progress=False)
    train = read_split(fake.voc_root, "train_aug.txt", "SegmentationClassAug")
    table = compute_presence(train.masks, 20)  # void borders (255) of the VOC masks are not classes
    np.testing.assert_array_equal(table, expected_presence([fake.classes[i] for i in train.ids], 20))


def test_worker_processes_give_the_serial_table(ade):
    _, located = ade
    serial = compute_presence(located.train.masks, 150, workers=1)
    parallel_table = compute_presence(located.train.masks, 150, workers=2, chunk_size=3, progress=True)
    np.testing.assert_array_equal(parallel_table, serial)


def _pid_of_each(items):
    return [os.getpid() for _ in items]


def test_map_chunks_uses_worker_processes_and_keeps_the_order():
    pids = parallel.map_chunks(_pid_of_each, list(range(20)), workers=2, chunk_size=3, progress=False)
    assert len(pids) == 20 and os.getpid() not in pids  # ran in workers
    assert parallel.map_chunks(_pid_of_each, list(range(20)), workers=1, progress=False) == [os.getpid()] * 20
    assert parallel.map_chunks(_pid_of_each, [], workers=2, progress=False) == []
    # order: a chunk function returning its items
    assert parallel.map_chunks(list, list(range(50)), workers=2, chunk_size=7, progress=False) == list(range(50))


def test_small_inputs_stay_serial_and_large_ones_use_at_most_four_workers():
    assert parallel.default_workers(parallel.SERIAL_BELOW - 1) == 1
    assert parallel.default_workers(parallel.SERIAL_BELOW) == max(1, min(4, parallel.available_cpus()))


def test_cache_is_reused_while_the_masks_are_unchanged(ade, tmp_path, monkeypatch):
    _, located = ade
    cache = tmp_path / "cache" / "train.npz"
    first = cached_presence(cache, located.train.masks, 150)
    assert cache.exists() and not list(cache.parent.glob("*.tmp.npz"))

    def rescan(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(presence, "compute_presence", rescan)
    np.testing.assert_array_equal(cached_presence(cache, located.train.masks, 150), first)


def test_cache_is_recomputed_when_a_mask_is_rewritten(tmp_path):
    fake = make_voc_sbd_tree(tmp_path / "data", seed=6)
    prepare_voc_aug(fake.voc_root, fake.sbd_root, progress=False)
    train = read_split(fake.voc_root, "train_aug.txt", "SegmentationClassAug")
    cache = tmp_path / "cache" / "train.npz"
    before = cached_presence(cache, train.masks, 20)
    key = masks_key(train.masks)

    # Re-convert one mask with other classes (same path, same list): the key and the row change.
    mask = train.masks[2]
    old_classes = set(np.flatnonzero(before[2]) + 1)
    new_class = next(c for c in range(1, 21) if c not in old_classes)
    relabelled = np.zeros((32, 40), np.uint8)
    relabelled[5:20, 5:30] = new_class
    stat = mask.stat()
    save_mask(mask, relabelled)
    os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # coarse-clock file systems
    assert masks_key(train.masks) != key
    after = cached_presence(cache, train.masks, 20)
    assert set(np.flatnonzero(after[2]) + 1) == {new_class}
    np.testing.assert_array_equal(np.delete(after, 2, axis=0), np.delete(before, 2, axis=0))

    # Another file list (fewer masks, another order) is another table.
    np.testing.assert_array_equal(cached_presence(cache, train.masks[:3], 20), after[:3])
    np.testing.assert_array_equal(cached_presence(cache, train.masks[::-1], 20), after[::-1])


def test_same_size_rewrite_with_a_new_mtime_invalidates_the_key(tmp_path):
    path = tmp_path / "m.png"
    save_mask(path, np.ones((4, 4), np.uint8))
    key = masks_key([path])
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert masks_key([path]) != key


def test_missing_masks_and_colour_masks_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"1 of 1 masks are missing, e.g. .*gone.png"):
        masks_key([tmp_path / "gone.png"])
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"rgb.png: a mask must be a palette or greyscale PNG"):
        compute_presence([tmp_path / "rgb.png"], 20)
