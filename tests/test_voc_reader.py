"""The VOC reader on a tiny generated directory in the real VOC(+SBD) layout, and check_voc."""
import numpy as np
import pytest

from datamodules import datasets
from datamodules.datasets.voc import check_voc, load_image, load_mask, prepare_voc_aug, read_split
from datamodules.incremental import IncrementalSegmentationDataModule
from datamodules.presence import cached_presence
from tests.conftest import write_voc_tree
from tests.fake_datasets import make_voc_sbd_tree

# The tiny tree's split sizes: the locator checks them as it checks the real 10,582 / 1,449.
TINY_COUNTS = {"expected_counts": {"train_aug": 4, "val": 2}}


def _mask(*classes, size=32):
    """A mask with one 8x8 square per class and a void border line, like VOC's."""
    mask = np.zeros((size, size), np.uint8)
    for k, c in enumerate(classes):
        mask[2 + 9 * k: 10 + 9 * k, 4:12] = c
        mask[2 + 9 * k, 4:12] = 255
    return mask


def _image(seed, size=32):
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


@pytest.fixture
def voc_root(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    train = {"2007_000001": (_image(1), _mask(1, 16)), "2007_000002": (_image(2), _mask(17)),
             "2008_000003": (_image(3), _mask(3)), "2008_000004": (_image(4), _mask(15, 2, 20))}
    val = {"2007_000010": (_image(10), _mask(5)), "2007_000011": (_image(11), _mask(18))}
    write_voc_tree(root, train, {}, mask_dir="SegmentationClassAug")
    write_voc_tree(root, val, {"val.txt": list(val)}, mask_dir="SegmentationClass")
    # train_aug.txt in the DeepLab/SBD two-path form for two lines, plain ids for the others
    lines = ["/JPEGImages/2007_000001.jpg /SegmentationClassAug/2007_000001.png", "2007_000002",
             "/JPEGImages/2008_000003.jpg /SegmentationClassAug/2008_000003.png", "2008_000004"]
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("\n".join(lines) + "\n")
    return tmp_path, root, train, val


def test_reader_finds_files_in_list_order_and_masks_round_trip(voc_root):
    data_root, root, train, val = voc_root
    located = datasets.locate("voc", data_root, TINY_COUNTS)
    assert located.root == root
    assert located.train.ids == list(train) and located.test.ids == list(val)
    assert located.train.masks[1] == root / "SegmentationClassAug" / "2007_000002.png"
    for path, (image, mask) in zip(located.train.masks, train.values()):
        np.testing.assert_array_equal(load_mask(path), mask)  # palette PNG keeps ids and 255
    assert load_image(located.train.images[0]).shape == (32, 32, 3)


def test_presence_table_from_the_masks_and_its_cache(voc_root, tmp_path):
    data_root, root, train, _ = voc_root
    located = datasets.locate("voc", data_root, TINY_COUNTS)
    presence = cached_presence(tmp_path / "cache" / "train.npz", located.train.masks, 20)
    expected = np.zeros((4, 20), bool)
    for row, classes in enumerate([(1, 16), (17,), (3,), (15, 2, 20)]):
        expected[row, [c - 1 for c in classes]] = True
    np.testing.assert_array_equal(presence, expected)
    # A changed file list invalidates the cache.
    fewer = cached_presence(tmp_path / "cache" / "train.npz", located.train.masks[:2], 20)
    np.testing.assert_array_equal(fewer, expected[:2])


def test_missing_voc_names_the_place_and_the_missing_pieces(tmp_path):
    with pytest.raises(datasets.DatasetMissing, match=r"VOCdevkit/VOC2012.*SegmentationClassAug"):
        datasets.locate("voc", tmp_path)


def test_a_malformed_list_line_is_reported_with_its_line_number(tmp_path):
    write_voc_tree(tmp_path, {}, {"train.txt": ["a b c"]})
    with pytest.raises(ValueError, match=r"train.txt:1"):
        read_split(tmp_path, "train.txt")


def test_voc_datamodule_15_5_disjoint_on_the_tiny_tree(voc_root):
    data_root, *_ = voc_root
    dm = IncrementalSegmentationDataModule(dataset="voc", data_root=data_root, task="15-5", mode="disjoint",
                                           step=1, batch_size=2, crop_size=32, num_workers=0,
                                           dataset_options=TINY_COUNTS)
    dm.setup("fit")
    # step 1 (16-20) disjoint: images with 16..20 and nothing unseen -> rows 0, 1, 3
    assert dm.train_indices.tolist() == [0, 1, 3]
    # test after step 1: every val image with a seen class (5 and 18 both seen)
    assert dm.test_indices.tolist() == [0, 1]
    sample = dm.train_set[0]  # row 0 holds classes 1 (old -> 0) and 16 (channel 16)
    assert set(np.unique(sample["label"].numpy())) <= {0, 16}


# --- check_voc: one line naming the missing piece ----------------------------------------------
@pytest.fixture
def prepared(tmp_path):
    fake = make_voc_sbd_tree(tmp_path / "data", seed=1)
    counts = prepare_voc_aug(fake.voc_root, fake.sbd_root, progress=False)
    return fake, {"train_aug": counts["train_aug"], "val": len(fake.voc_val)}


def _error(root, expected_counts):
    with pytest.raises(datasets.DatasetMissing) as raised:
        check_voc(root, expected_counts)
    message = str(raised.value)
    assert "\n" not in message and str(root) in message
    return message


def test_check_voc_passes_a_complete_tree_and_returns_the_counts(prepared):
    fake, counts = prepared
    assert check_voc(fake.voc_root, counts) == counts
    assert check_voc(fake.voc_root, None) == counts  # no count check


def test_check_voc_names_a_missing_directory(prepared, tmp_path):
    fake, counts = prepared
    assert "the directory does not exist" in _error(tmp_path / "VOC2012", counts)
    (fake.voc_root / "SegmentationClassAug").rename(fake.voc_root / "elsewhere")
    assert "missing SegmentationClassAug/." in _error(fake.voc_root, counts)


def test_check_voc_names_a_missing_list_file(prepared):
    fake, counts = prepared
    (fake.voc_root / "ImageSets" / "Segmentation" / "train_aug.txt").unlink()
    assert "missing ImageSets/Segmentation/train_aug.txt." in _error(fake.voc_root, counts)


def test_check_voc_counts_missing_masks_and_images_and_shows_the_first_ids(prepared):
    fake, counts = prepared
    train_aug = read_split(fake.voc_root, "train_aug.txt", "SegmentationClassAug").ids
    for image_id in train_aug[3:6]:
        (fake.voc_root / "SegmentationClassAug" / f"{image_id}.png").unlink()
    (fake.voc_root / "JPEGImages" / f"{fake.voc_val[2]}.jpg").unlink()
    message = _error(fake.voc_root, counts)
    n = counts["train_aug"]
    assert f"3 of {n} train_aug masks missing in SegmentationClassAug/ ({', '.join(train_aug[3:6])})" in message
    assert f"1 of {counts['val']} val images missing in JPEGImages/ ({fake.voc_val[2]})" in message
    for image_id in train_aug[6:12]:  # more than five: the list is cut
        (fake.voc_root / "SegmentationClassAug" / f"{image_id}.png").unlink()
    assert f"9 of {n} train_aug masks missing in SegmentationClassAug/ ({', '.join(train_aug[3:8])}, ...)" \
        in _error(fake.voc_root, counts)


def test_check_voc_names_the_list_whose_count_differs(prepared):
    fake, counts = prepared
    message = _error(fake.voc_root, {**counts, "train_aug": 10582})
    assert f"ImageSets/Segmentation/train_aug.txt lists {counts['train_aug']} images, expected 10,582" in message
    assert "val.txt" not in message


def test_voc_locator_checks_the_real_counts_unless_told_otherwise(prepared):
    fake, counts = prepared
    with pytest.raises(datasets.DatasetMissing, match=r"train_aug.txt lists \d+ images, expected 10,582; "
                                                      r".*val.txt lists 8 images, expected 1,449"):
        datasets.locate("voc", fake.data_root)
    assert len(datasets.locate("voc", fake.data_root, {"check_counts": False}).train) == counts["train_aug"]
    assert len(datasets.locate("voc", fake.data_root, {"expected_counts": counts}).test) == counts["val"]
