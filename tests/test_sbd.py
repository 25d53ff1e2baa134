"""VOC + SBD -> SegmentationClassAug and train_aug.txt, on a miniature VOC 2012 + SBD tree."""
import os

import numpy as np
import pytest
from PIL import Image

from datamodules import splits
from datamodules.datasets import DatasetMissing
from datamodules.datasets.voc import (load_mask, prepare_voc_aug, read_id_list, read_sbd_mask,
                                      sbd_dataset_dir, voc_palette)
from datamodules.incremental import IncrementalSegmentationDataModule
from datamodules.tasks import task_classes
from tests.fake_datasets import make_voc_sbd_tree


@pytest.fixture
def fake(tmp_path):
    return make_voc_sbd_tree(tmp_path / "data", seed=3)


def _expected_train_aug(fake):
    """(SBD train ∪ SBD val ∪ VOC train) − VOC val, only ids with a VOC JPEG, sorted."""
    union = set(fake.sbd_train) | set(fake.sbd_val) | set(fake.voc_train)
    return sorted(i for i in union - set(fake.voc_val) if i not in fake.without_voc_image)


def test_the_fake_tree_holds_every_case_the_conversion_must_handle(fake):
    sbd = set(fake.sbd_train) | set(fake.sbd_val)
    assert set(fake.voc_train) & sbd and set(fake.voc_val) & set(fake.sbd_train)  # overlaps both ways
    assert fake.without_voc_image <= sbd and fake.unlisted_images
    assert fake.voc_train != sorted(fake.voc_train)  # lists not pre-sorted


def test_train_aug_list_is_the_set_formula_sorted_and_counts_are_returned(fake):
    counts = prepare_voc_aug(fake.voc_root, fake.sbd_root, progress=False)
    expected = _expected_train_aug(fake)
    list_file = fake.voc_root / "ImageSets" / "Segmentation" / "train_aug.txt"
    assert list_file.read_text() == "".join(f"{i}\n" for i in expected)
    assert read_id_list(list_file) == expected
    with_masks = set(expected) | set(fake.voc_val)
    from_voc = with_masks & set(fake.voc_masks)
    assert counts == {"train_aug": len(expected), "masks": len(with_masks), "from_voc": len(from_voc),
                      "from_sbd": len(with_masks - from_voc), "existing": 0,
                      "without_image": len(fake.without_voc_image)}


def test_masks_equal_the_mat_segmentation_and_voc_masks_win(fake):
    prepare_voc_aug(fake.voc_root, fake.sbd_root, progress=False)
    aug = fake.voc_root / "SegmentationClassAug"
    written = set(_expected_train_aug(fake)) | set(fake.voc_val)
    assert {p.stem for p in aug.glob("*.png")} == written  # nothing else, no temporary files left
    assert not list(aug.glob(".*"))
    both = [i for i in written if i in fake.voc_masks and i in fake.sbd_masks]
    assert both
    for image_id in written:
        png = aug / f"{image_id}.png"
        if image_id in fake.voc_masks:
            # VOC's own mask, byte for byte, 255 borders included, even where SBD has one too.
            assert png.read_bytes() == (fake.voc_root / "SegmentationClass" / f"{image_id}.png").read_bytes()
            np.testing.assert_array_equal(load_mask(png), fake.voc_masks[image_id])
            assert (load_mask(png) == 255).any()
        else:
            mat = read_sbd_mask(sbd_dataset_dir(fake.sbd_root) / "cls" / f"{image_id}.mat")
            np.testing.assert_array_equal(mat, fake.sbd_masks[image_id])  # the .mat round trip
            np.testing.assert_array_equal(load_mask(png), mat)
            with Image.open(png) as image:
                assert image.mode == "P" and image.getpalette()[:60] == voc_palette()[:60]
    for image_id in both:  # SBD's version has no border: the PNG is not it
        assert not np.array_equal(load_mask(aug / f"{image_id}.png"), fake.sbd_masks[image_id])


def test_conversion_is_idempotent_and_redoes_only_what_is_missing(fake):
    first = prepare_voc_aug(fake.voc_root, fake.sbd_root, progress=False)
    aug = fake.voc_root / "SegmentationClassAug"
    stamps = {p.name: p.stat().st_mtime_ns for p in aug.glob("*.png")}
    again = prepare_voc_aug(fake.voc_root, fake.sbd_root, progress=False)
    assert again == {**first, "from_voc": 0, "from_sbd": 0, "existing": first["masks"]}
    assert {p.name: p.stat().st_mtime_ns for p in aug.glob("*.png")} == stamps
    sbd_only = next(i for i in _expected_train_aug(fake) if i not in fake.voc_masks)
    (aug / f"{sbd_only}.png").unlink()
    redo = prepare_voc_aug(fake.voc_root, fake.sbd_root, progress=False)
    assert (redo["from_sbd"], redo["from_voc"], redo["existing"]) == (1, 0, first["masks"] - 1)
    np.testing.assert_array_equal(load_mask(aug / f"{sbd_only}.png"), fake.sbd_masks[sbd_only])


def test_worker_processes_write_the_same_masks_as_the_serial_path(tmp_path):
    serial, parallel = (make_voc_sbd_tree(tmp_path / name, seed=5) for name in ("serial", "parallel"))
    assert prepare_voc_aug(serial.voc_root, serial.sbd_root, progress=False, workers=1) == \
        prepare_voc_aug(parallel.voc_root, parallel.sbd_root, progress=False, workers=2)
    for png in (serial.voc_root / "SegmentationClassAug").glob("*.png"):
        parallel_png = parallel.voc_root / "SegmentationClassAug" / png.name
        np.testing.assert_array_equal(load_mask(png), load_mask(parallel_png))


def test_sbd_root_may_be_the_parent_benchmark_release_or_dataset(fake):
    dataset = fake.sbd_root / "benchmark_RELEASE" / "dataset"
    for given in (fake.sbd_root, fake.sbd_root / "benchmark_RELEASE", dataset):
        assert sbd_dataset_dir(given) == dataset


def test_missing_sbd_and_missing_annotations_are_named(fake, tmp_path):
    with pytest.raises(DatasetMissing, match=r"SBD not found at .*: no benchmark_RELEASE/dataset/cls/"):
        prepare_voc_aug(fake.voc_root, tmp_path / "nowhere", progress=False)
    (fake.voc_root / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(DatasetMissing, match=r"Pascal VOC 2012 at .* incomplete \(missing: ImageSets/Segmentation/val.txt\)"):
        prepare_voc_aug(fake.voc_root, fake.sbd_root, progress=False)


def test_a_listed_id_without_any_mask_is_named(tmp_path):
    fake = make_voc_sbd_tree(tmp_path, seed=3)
    sbd_only = sorted(set(fake.sbd_masks) - set(fake.voc_masks) - fake.without_voc_image)[0]
    (sbd_dataset_dir(fake.sbd_root) / "cls" / f"{sbd_only}.mat").unlink()
    with pytest.raises(DatasetMissing, match=rf"1 of \d+ listed images have neither a VOC mask .* nor an SBD mask .*: {sbd_only}$"):
        prepare_voc_aug(fake.voc_root, fake.sbd_root, progress=False)


def _classes_in_order(fake, ids):
    return [fake.classes[i] for i in ids]


def _independent_selection(class_sets, steps, step, mode):
    """PROTOCOL.md §3 in plain sets: cls(x) ∩ S_t ≠ ∅, and for disjoint also cls(x) ⊆ Seen_t."""
    current = set(steps[step]) - {0}
    seen = {c for s in steps[: step + 1] for c in s} - {0}
    return [row for row, classes in enumerate(class_sets)
            if classes & current and (mode == "overlap" or classes <= seen)]


@pytest.mark.parametrize("mode,step", [("disjoint", 0), ("disjoint", 1), ("overlap", 0)])
def test_voc_datamodule_on_prepared_train_aug_selects_the_predicted_images(tmp_path, mode, step):
    fake = make_voc_sbd_tree(tmp_path / "data", voc_train=12, sbd_only=28, seed=11)
    prepare_voc_aug(fake.voc_root, fake.sbd_root, progress=False)
    train_aug = _expected_train_aug(fake)
    options = {"expected_counts": {"train_aug": len(train_aug), "val": len(fake.voc_val)}}
    dm = IncrementalSegmentationDataModule(dataset="voc", data_root=fake.data_root, task="15-5", mode=mode,
                                           step=step, batch_size=2, crop_size=32, num_workers=0,
                                           dataset_options=options)
    dm.setup("fit")
    steps = task_classes("voc", "15-5")
    expected = _independent_selection(_classes_in_order(fake, train_aug), steps, step, mode)
    assert dm.train_indices.tolist() == expected
    assert [dm.train_set.files.ids[i] for i in dm.train_indices] == [train_aug[i] for i in expected]
    seen = {c for s in steps[: step + 1] for c in s} - {0}
    val_ids = dm.test_set.files.ids
    assert val_ids == fake.voc_val  # val.txt order
    assert dm.test_indices.tolist() == [r for r, i in enumerate(val_ids) if fake.classes[i] & seen]
    if mode == "disjoint" and step == 0:  # the fixture must make disjoint and overlap differ
        overlap = _independent_selection(_classes_in_order(fake, train_aug), steps, 0, "overlap")
        assert len(expected) < len(overlap)
    assert splits.select_images(dm.train_presence, steps, step, mode).tolist() == expected
    assert os.path.samefile(dm.train_set.files.masks[0].parent, fake.voc_root / "SegmentationClassAug")
