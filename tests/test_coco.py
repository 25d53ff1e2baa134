"""COCO-to-VOC (WILSON): id conversion, preparation, locating and the images of each step.

Expectations are computed independently of datamodules.datasets.coco: per-pixel formulas and the
VOC -> COCO map written out from PROTOCOL.md §1, and the generator's own record of each image.
"""
import numpy as np
import pytest
from PIL import Image

from datamodules.datasets import DatasetMissing
from datamodules.datasets.coco import (COCO_CLASS_NAMES, coco_stuff_to_coco_ids, locate_coco_voc,
                                       prepare_coco_voc, voc_to_coco_ids, wilson_step_rows)
from datamodules.datasets.voc import load_mask
from datamodules.presence import compute_presence
from datamodules.splits import select_images
from datamodules.tasks import task_classes
from tests.fake_coco import VOC_THING_VALUES, make_coco_voc_tree

# PROTOCOL.md §1, written out by hand
VOC_TO_COCO_BY_HAND = {0: 0, 1: 5, 2: 2, 3: 16, 4: 9, 5: 44, 6: 6, 7: 3, 8: 17, 9: 62, 10: 21, 11: 67, 12: 18,
                       13: 19, 14: 4, 15: 1, 16: 64, 17: 20, 18: 63, 19: 7, 20: 72, 255: 255}
COCO_UNUSED = [12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91]
SMALL_COUNTS = {"coco_train": 12, "coco_val": 4, "voc_train": 6, "voc_val": 3}


def coco_value_by_formula(v: int) -> int:
    if 0 <= v <= 90:
        return v + 1      # thing k (0-based) -> k + 1
    if 91 <= v <= 181:
        return 0          # stuff -> background
    if v == 255:
        return 255
    raise AssertionError(v)


def per_pixel(array, formula):
    return np.array([[formula(int(v)) for v in row] for row in array], dtype=np.uint8)


def _all_values_array(values, shape, seed):
    """A random array of `shape` that holds every one of `values` at least once."""
    rng = np.random.default_rng(seed)
    flat = np.concatenate([values, rng.choice(values, size=int(np.prod(shape)) - len(values))])
    return rng.permutation(flat).reshape(shape)


# --- lookups -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64])
def test_coco_stuff_conversion_matches_the_formula(dtype):
    values = np.array(list(range(182)) + [255])
    pixelmap = _all_values_array(values, (23, 17), seed=1).astype(dtype)
    converted = coco_stuff_to_coco_ids(pixelmap)
    assert converted.dtype == np.uint8 and converted.shape == pixelmap.shape
    np.testing.assert_array_equal(converted, per_pixel(pixelmap, coco_value_by_formula))
    # spot checks of the formula itself: person, toothbrush, the last thing, first/last stuff, void
    assert coco_stuff_to_coco_ids(np.array([0, 89, 90, 91, 181, 255], np.uint8)).tolist() == [1, 90, 91, 0, 0, 255]


def test_coco_stuff_conversion_rejects_other_values():
    for bad in list(range(182, 255)):
        pixelmap = np.array([[0, 91], [bad, 255]], dtype=np.uint8)
        with pytest.raises(ValueError, match=rf"\b{bad}\b"):
            coco_stuff_to_coco_ids(pixelmap)
    for bad in (-1, 256, 1000):
        with pytest.raises(ValueError, match=str(bad)):
            coco_stuff_to_coco_ids(np.array([3, bad], dtype=np.int32))
    with pytest.raises(ValueError):
        coco_stuff_to_coco_ids(np.array([0.0, 1.0]))


def test_voc_relabel_matches_the_protocol_map():
    values = np.array(list(range(21)) + [255])
    mask = _all_values_array(values, (19, 13), seed=2)
    converted = voc_to_coco_ids(mask)
    np.testing.assert_array_equal(converted, per_pixel(mask, VOC_TO_COCO_BY_HAND.__getitem__))
    for bad in range(21, 255):
        with pytest.raises(ValueError, match=rf"\b{bad}\b"):
            voc_to_coco_ids(np.array([[1, bad]], dtype=np.uint8))


def test_class_names_follow_coco_ids():
    assert len(COCO_CLASS_NAMES) == 92 and COCO_CLASS_NAMES[0] == "background"
    assert [COCO_CLASS_NAMES[i] for i in (1, 2, 3, 5, 9, 44, 62, 72, 80, 90)] == [
        "person", "bicycle", "car", "airplane", "boat", "bottle", "chair", "tv", "toaster", "toothbrush"]
    assert [i for i, name in enumerate(COCO_CLASS_NAMES) if name.startswith("unused-")] == COCO_UNUSED
    assert all(COCO_CLASS_NAMES[i] == f"unused-{i}" for i in COCO_UNUSED)
    # the VOC -> COCO map pairs classes of the same meaning
    voc = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
           "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
    coco = ["airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dining table",
            "dog", "horse", "motorcycle", "person", "potted plant", "sheep", "couch", "train", "tv"]
    assert [COCO_CLASS_NAMES[VOC_TO_COCO_BY_HAND[i]] for i in range(1, 21)] == coco, voc


# --- prepare -------------------------------------------------------------------------------------

@pytest.fixture
def tree(tmp_path):
    truth = make_coco_voc_tree(tmp_path, seed=0)
    return tmp_path, truth


def _check_prepared(root, truth):
    coco = root / "coco"
    for key, split in (("coco_train", "train2017"), ("coco_val", "val2017")):
        for image_id, record in truth[key].items():
            path = coco / "annotations_coco_voc" / split / f"{image_id}.png"
            with Image.open(path) as image:
                assert image.mode == "P"
            np.testing.assert_array_equal(load_mask(path), per_pixel(record["map"], coco_value_by_formula))
    voc = root / "VOCdevkit" / "VOC2012"
    for key, folder in (("voc_train", "SegmentationClassAugCOCO"), ("voc_val", "SegmentationClassCOCO")):
        for image_id, record in truth[key].items():
            np.testing.assert_array_equal(load_mask(voc / folder / f"{image_id}.png"),
                                          per_pixel(record["mask"], VOC_TO_COCO_BY_HAND.__getitem__))


def test_prepare_converts_every_mask_and_writes_lists(tree):
    root, truth = tree
    counts = prepare_coco_voc(root, progress=False)
    assert counts == {**SMALL_COUNTS, "written": 25, "skipped": 0}
    _check_prepared(root, truth)
    lines = (root / "coco" / "ImageSets" / "Segmentation" / "train2017.txt").read_text().splitlines()
    ids = sorted(truth["coco_train"])
    assert lines == [f"/images/train2017/{i}.jpg /annotations_coco_voc/train2017/{i}.png" for i in ids]
    voc_lines = (root / "VOCdevkit/VOC2012/ImageSets/Segmentation/val_coco.txt").read_text().splitlines()
    assert voc_lines == [f"/JPEGImages/{i}.jpg /SegmentationClassCOCO/{i}.png" for i in truth["voc_val"]]


def test_prepare_is_idempotent(tree):
    root, truth = tree
    prepare_coco_voc(root, progress=False)
    outputs = sorted((root / "coco" / "annotations_coco_voc").rglob("*.png"))
    stamps = [p.stat().st_mtime_ns for p in outputs]
    assert prepare_coco_voc(root, progress=False) == {**SMALL_COUNTS, "written": 0, "skipped": 25}
    assert [p.stat().st_mtime_ns for p in outputs] == stamps
    # a lost output is written again, and only it
    lost = root / "VOCdevkit/VOC2012/SegmentationClassAugCOCO" / f"{next(iter(truth['voc_train']))}.png"
    lost.unlink()
    assert prepare_coco_voc(root, progress=False) == {**SMALL_COUNTS, "written": 1, "skipped": 24}
    _check_prepared(root, truth)
    assert not list(root.rglob("*.partial*"))


def test_prepare_in_worker_processes_other_layout_and_progress_bar(tmp_path, monkeypatch):
    import datamodules.datasets.coco as coco
    monkeypatch.setattr(coco, "CHUNK_SIZE", 2)  # several chunks, so that the worker processes really run
    truth = make_coco_voc_tree(tmp_path, seed=3, images_in_subfolder=False, voc_two_path_lists=True)
    counts = prepare_coco_voc(tmp_path, progress=True, workers=2)
    assert counts["written"] == 25
    _check_prepared(tmp_path, truth)
    first = (tmp_path / "coco/ImageSets/Segmentation/val2017.txt").read_text().splitlines()[0]
    assert first.startswith("/val2017/") and first.endswith(".png")
    located = locate_coco_voc(tmp_path, {"expected_counts": SMALL_COUNTS})
    assert all(p.is_file() for p in located.train.images + located.train.masks + located.test.images)


def test_prepare_names_missing_inputs(tree):
    root, _ = tree
    import shutil
    shutil.rmtree(root / "coco" / "stuffthingmaps_trainval2017" / "val2017")
    (root / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(DatasetMissing) as error:
        prepare_coco_voc(root, progress=False)
    message = str(error.value)
    assert "\n" not in message and "make data DATASET=coco" in message
    assert "stuffthingmaps_trainval2017/val2017" in message and "val.txt" in message
    assert "train2017" not in message.replace("stuffthingmaps_trainval2017", "")


@pytest.mark.parametrize("workers", [None, 2])
def test_prepare_rejects_unpaired_files_and_bad_values(tree, workers, monkeypatch):
    import datamodules.datasets.coco as coco
    monkeypatch.setattr(coco, "CHUNK_SIZE", 2)
    root, truth = tree
    image_id = sorted(truth["coco_val"])[0]
    (root / "coco/images/val2017" / f"{image_id}.jpg").unlink()
    with pytest.raises(DatasetMissing, match=image_id):
        prepare_coco_voc(root, progress=False)
    (root / "coco/stuffthingmaps_trainval2017/val2017" / f"{image_id}.png").unlink()
    bad_id = sorted(truth["coco_train"])[1]
    bad = truth["coco_train"][bad_id]["map"].copy()
    bad[0, 0] = 200
    Image.fromarray(bad, mode="L").save(root / "coco/stuffthingmaps_trainval2017/train2017" / f"{bad_id}.png")
    with pytest.raises(ValueError, match=rf"{bad_id}.*200"):
        prepare_coco_voc(root, progress=False, workers=workers)
    assert not (root / "coco/ImageSets/Segmentation/train2017.txt").exists()  # lists only after success


# --- locate --------------------------------------------------------------------------------------

@pytest.fixture
def prepared(tree):
    root, truth = tree
    prepare_coco_voc(root, progress=False)
    return root, truth


def test_locate_rows_sources_and_test_sets(prepared):
    root, truth = prepared
    located = locate_coco_voc(root, {"expected_counts": SMALL_COUNTS})
    coco_ids, voc_ids = sorted(truth["coco_train"]), list(truth["voc_train"])
    assert located.train.ids == coco_ids + voc_ids
    assert located.train_source == ("coco",) * 12 + ("voc",) * 6
    assert located.step_sources == ("coco", "voc")
    assert located.root == root / "coco"
    assert located.train.images[0] == root / "coco/images/train2017" / f"{coco_ids[0]}.jpg"
    assert located.train.masks[0] == root / "coco/annotations_coco_voc/train2017" / f"{coco_ids[0]}.png"
    voc = root / "VOCdevkit/VOC2012"
    assert located.train.images[12] == voc / "JPEGImages" / f"{voc_ids[0]}.jpg"
    assert located.train.masks[12] == voc / "SegmentationClassAugCOCO" / f"{voc_ids[0]}.png"
    assert located.test.ids == sorted(truth["coco_val"])
    assert all(m.parent.name == "val2017" for m in located.test.masks)

    on_voc = locate_coco_voc(root, {"expected_counts": SMALL_COUNTS, "test_set": "voc"})
    assert on_voc.test.ids == list(truth["voc_val"])
    assert on_voc.test.masks == [voc / "SegmentationClassCOCO" / f"{i}.png" for i in truth["voc_val"]]
    assert on_voc.train == located.train
    with pytest.raises(ValueError, match="test_set"):
        locate_coco_voc(root, {"check_counts": False, "test_set": "ade"})


def test_locate_checks_counts(prepared):
    root, _ = prepared
    with pytest.raises(DatasetMissing) as error:
        locate_coco_voc(root, {})
    message = str(error.value)
    assert "\n" not in message and "make data DATASET=coco" in message
    assert "coco_train has 12 images (expected 118,287)" in message and "voc_val has 3 images (expected 1,449)" in message
    assert "check_counts=false" in message
    with pytest.raises(DatasetMissing, match=r"voc_train has 6 images \(expected 7\)") as error:
        locate_coco_voc(root, {"expected_counts": {**SMALL_COUNTS, "voc_train": 7}})
    assert "coco_train" not in str(error.value)
    assert len(locate_coco_voc(root, {"check_counts": False}).train) == 18
    with pytest.raises(ValueError, match="voc_trian"):
        locate_coco_voc(root, {"expected_counts": {"voc_trian": 6}})


@pytest.mark.parametrize("piece", ["coco/annotations_coco_voc/val2017", "coco/ImageSets/Segmentation/train2017.txt",
                                   "VOCdevkit/VOC2012/SegmentationClassAugCOCO",
                                   "VOCdevkit/VOC2012/ImageSets/Segmentation/val_coco.txt"])
def test_locate_names_the_missing_piece(prepared, piece):
    import shutil
    root, _ = prepared
    path = root / piece
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(DatasetMissing) as error:
        locate_coco_voc(root, {"check_counts": False})
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "make data DATASET=coco" in message
    assert message.count(str(root)) == 2  # the data root once, the one missing piece once


def test_locate_names_missing_listed_files(prepared):
    root, truth = prepared
    image = root / "coco/images/train2017" / f"{sorted(truth['coco_train'])[3]}.jpg"
    mask = root / "VOCdevkit/VOC2012/SegmentationClassCOCO" / f"{list(truth['voc_val'])[0]}.png"
    image.unlink()
    mask.unlink()
    with pytest.raises(DatasetMissing) as error:
        locate_coco_voc(root, {"expected_counts": SMALL_COUNTS})
    message = str(error.value)
    assert "\n" not in message and "make data DATASET=coco" in message and "check_counts" not in message
    assert f"1 of 12 coco_train images missing (e.g. {image})" in message
    assert f"1 of 3 voc_val masks missing (e.g. {mask})" in message


def test_locate_before_prepare(tree):
    root, _ = tree
    with pytest.raises(DatasetMissing, match="make data DATASET=coco"):
        locate_coco_voc(root, {"check_counts": False})


# --- which images train each step ------------------------------------------------------------------

def test_step_images_from_the_converted_masks(prepared):
    root, truth = prepared
    located = locate_coco_voc(root, {"expected_counts": SMALL_COUNTS})
    presence = compute_presence(located.train.masks, 91)
    steps = task_classes("coco-voc", "voc")
    source = np.asarray(located.train_source)
    chosen = []
    for step, wanted in enumerate(located.step_sources):
        rows = np.flatnonzero(source == wanted)
        chosen.append([located.train.ids[r] for r in rows[select_images(presence[rows], steps, step, "disjoint")]])

    # independent expectation from the generator's record (0-based COCO-Stuff thing values)
    coco = truth["coco_train"]
    voc_free = [i for i in sorted(coco) if not coco[i]["things"] & set(VOC_THING_VALUES)]
    expected_step0 = [i for i in voc_free if coco[i]["things"]]  # ... and at least one step-0 class
    assert chosen[0] == expected_step0
    assert chosen[1] == list(truth["voc_train"])  # every VOC image
    # the tiny tree exercises every case: excluded VOC images, thing-free images, kept images
    kinds = {coco[i]["kind"] for i in coco}
    assert kinds == {"other_things", "with_voc", "no_thing", "voc_only"}
    assert 0 < len(expected_step0) < len(voc_free) < len(coco)

    # WILSON's split files also keep the thing-free COCO images in step 0
    wilson = [[located.train.ids[r] for r in wilson_step_rows(presence, located.train_source, step)]
              for step in (0, 1)]
    assert wilson[0] == voc_free
    assert wilson[1] == list(truth["voc_train"])
    with pytest.raises(ValueError):
        wilson_step_rows(presence, located.train_source, 2)
