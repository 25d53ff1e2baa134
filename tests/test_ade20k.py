"""The ADE20K reader and the ADE rules of the datamodule, on a miniature ADEChallengeData2016."""
import numpy as np
import pytest

from datamodules import datasets
from datamodules.datasets.ade20k import ADE_CLASS_NAMES, check_ade
from datamodules.datasets.voc import load_mask
from datamodules.incremental import IncrementalSegmentationDataModule
from datamodules.presence import compute_presence
from datamodules.tasks import channel_order, task_classes
from datamodules.transforms import eval_transform
from tests.fake_datasets import expected_presence, make_ade_tree

N_TRAIN, N_VAL = 24, 8
TINY = {"expected_counts": {"train": N_TRAIN, "val": N_VAL}}


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_ade_tree(tmp_path_factory.mktemp("data"), N_TRAIN, N_VAL, seed=0)


@pytest.fixture
def fresh(tmp_path):
    """A tree a test may damage."""
    return make_ade_tree(tmp_path / "data", N_TRAIN, N_VAL, seed=1)


def test_locate_ade_lists_every_image_sorted_by_id_with_its_annotation(fake):
    located = datasets.locate("ade", fake.data_root, TINY)
    assert located.root == fake.root and located.background_is_unlabeled
    assert located.train.ids == list(fake.train) == sorted(fake.train)
    assert located.test.ids == list(fake.val)
    assert len(located.train) == N_TRAIN and len(located.test) == N_VAL
    first = located.train.ids[0]
    assert located.train.images[0] == fake.root / "images" / "training" / f"{first}.jpg"
    assert located.train.masks[0] == fake.root / "annotations" / "training" / f"{first}.png"
    assert located.test.masks[0].parent == fake.root / "annotations" / "validation"


def test_root_option_points_at_the_ade_directory_itself(fake, tmp_path):
    located = datasets.locate("ade", tmp_path / "elsewhere", {"root": str(fake.root), **TINY})
    assert located.root == fake.root and len(located.train) == N_TRAIN


def test_real_counts_are_checked_by_default_and_can_be_switched_off(fake):
    with pytest.raises(datasets.DatasetMissing,
                       match=r"images/training/ holds 24 images, expected 20,210; images/validation/ holds 8 images, "
                             r"expected 2,000"):
        datasets.locate("ade", fake.data_root)
    assert len(datasets.locate("ade", fake.data_root, {"check_counts": False}).train) == N_TRAIN
    with pytest.raises(datasets.DatasetMissing, match=r"images/validation/ holds 8 images, expected 9\."):
        datasets.locate("ade", fake.data_root, {"expected_counts": {"train": N_TRAIN, "val": 9}})


def _error(root, counts=TINY["expected_counts"]):
    with pytest.raises(datasets.DatasetMissing) as raised:
        check_ade(root, counts)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"ADE20K not usable at {root}: ")
    return message


def test_errors_name_the_missing_directory(fresh, tmp_path):
    assert "the directory does not exist" in _error(tmp_path / "ADEChallengeData2016")
    (fresh.root / "annotations" / "validation").rename(fresh.root / "annotations" / "old")
    assert ": missing annotations/validation/." in _error(fresh.root)
    with pytest.raises(datasets.DatasetMissing, match=r"ADEChallengeData2016: missing annotations/validation/"):
        datasets.locate("ade", fresh.data_root, TINY)


def test_errors_name_missing_annotations_and_an_empty_image_directory(fresh):
    ids = list(fresh.train)
    for image_id in ids[1:3]:
        (fresh.root / "annotations" / "training" / f"{image_id}.png").unlink()
    message = _error(fresh.root)
    assert f"2 of {N_TRAIN} training annotations missing in annotations/training/ ({ids[1]}, {ids[2]})" in message
    for image in (fresh.root / "images" / "validation").glob("*.jpg"):
        image.unlink()
    message = _error(fresh.root)
    assert "no ADE_*.jpg in images/validation/" in message and "expected 8" not in message


def test_class_names_are_the_150_scene_parsing_classes_with_0_unlabeled():
    names = datasets.class_names("ade")
    assert len(names) == 151 and len(set(names.values())) == 151
    assert (names[0], names[1], names[13], names[90], names[150]) == (
        "unlabeled", "wall", "person", "television receiver", "flag")
    assert list(names.values())[1:] == list(ADE_CLASS_NAMES)


def test_annotations_keep_0_as_unlabeled_and_presence_ignores_it(fake):
    located = datasets.locate("ade", fake.data_root, TINY)
    masks = [load_mask(p) for p in located.train.masks]
    assert all((m == 0).any() for m in masks)  # unlabeled pixels around every object
    assert all(set(np.unique(m)) - {0} == fake.train[i] for m, i in zip(masks, located.train.ids))
    presence = compute_presence(located.train.masks, 150)
    np.testing.assert_array_equal(presence, expected_presence(list(fake.train.values()), 150))
    empty = [r for r, classes in enumerate(fake.train.values()) if not classes]
    assert empty and not presence[empty].any()


# --- the datamodule on ADE: image selection (PROTOCOL §3) and label rules (§4) -----------------
def _predicted_rows(class_sets, steps, step, mode):
    current = set(steps[step]) - {0}
    seen = {c for s in steps[: step + 1] for c in s} - {0}
    return [r for r, classes in enumerate(class_sets) if classes & current and (mode == "overlap" or classes <= seen)]


def _module(fake, task, step, mode="overlap"):
    dm = IncrementalSegmentationDataModule(dataset="ade", data_root=fake.data_root, task=task, mode=mode, step=step,
                                           batch_size=2, crop_size=32, eval_mode="full", size_divisor=8,
                                           num_workers=0, dataset_options=TINY)
    dm.setup("fit")
    return dm


def _custom_order():
    """A MiB-style random class order (like 100-50b): 100 classes at step 0, then 50."""
    order = np.random.default_rng(7).permutation(np.arange(1, 151)).tolist()
    return [[0] + order[:100], order[100:]]


@pytest.mark.parametrize("task", ["100-50", "custom"])
@pytest.mark.parametrize("step", [0, 1])
def test_ade_datamodule_selects_the_predicted_images(fake, task, step):
    steps = _custom_order() if task == "custom" else task_classes("ade", task)
    dm = _module(fake, steps, step)
    train, val = list(fake.train.values()), list(fake.val.values())
    assert dm.train_indices.tolist() == _predicted_rows(train, steps, step, "overlap")
    seen = {c for s in steps[: step + 1] for c in s} - {0}
    assert dm.test_indices.tolist() == [r for r, classes in enumerate(val) if classes & seen]
    assert len(dm.train_indices) >= 2


@pytest.mark.parametrize("task", ["100-50", "custom"])
def test_ade_labels_unlabeled_is_trained_as_0_and_never_scored(fake, task):
    steps = _custom_order() if task == "custom" else task_classes("ade", task)
    step = 1
    dm = _module(fake, steps, step)
    channel = {c: i for i, c in enumerate(channel_order(steps, step))}
    current, old = set(steps[step]), set(steps[0]) - {0}
    located = datasets.locate("ade", fake.data_root, TINY)

    # Test after step 1: 0 (unlabeled) -> 255, old and current classes -> their channel.
    for i, row in enumerate(dm.test_indices):
        mask = load_mask(located.test.masks[row])
        expected = np.vectorize(lambda v: 255 if v == 0 else channel[v])(mask)
        np.testing.assert_array_equal(dm.test_set[i]["label"].numpy(), expected)

    # Training: 0 -> 0, current classes -> channel, old classes -> 0 (checked without the random crop).
    dm.train_set.transform = eval_transform(32, "full", 8)
    some_old = False
    for i, row in enumerate(dm.train_indices):
        mask = load_mask(located.train.masks[row])
        expected = np.vectorize(lambda v: channel[v] if v in current else 0)(mask)
        np.testing.assert_array_equal(dm.train_set[i]["label"].numpy(), expected)
        some_old |= bool(set(np.unique(mask)) & old)
    assert some_old  # the check above met old classes


def test_ade_future_classes_are_not_scored_at_step_0(fake):
    steps = task_classes("ade", "100-50")
    dm = _module(fake, "100-50", 0)
    located = datasets.locate("ade", fake.data_root, TINY)
    met_future = False
    for i, row in enumerate(dm.test_indices):
        mask = load_mask(located.test.masks[row])
        label = dm.test_set[i]["label"].numpy()
        future = mask > 100
        met_future |= bool(future.any())
        assert (label[future] == 255).all() and (label[mask == 0] == 255).all()
        np.testing.assert_array_equal(label[(mask > 0) & ~future], mask[(mask > 0) & ~future])  # ids 1..100 = channels
    assert met_future and steps[0] == list(range(101))
