"""Independent checks of the split rules (PROTOCOL.md §3, METHODS_wilson_mib.md §1.3) and the
task registry (PROTOCOL.md §2). Every expected list is written out by hand."""
from __future__ import annotations

import numpy as np
import pytest

from datamodules.splits import select_cumulative_images, select_images, select_test_images
from datamodules.tasks import task_classes

K = 6
STEPS = [[0, 1, 2, 3], [4, 5], [6]]
# a non-identity class order over the same 6 classes
STEPS_PERMUTED = [[0, 5, 2], [1, 4], [3, 6]]

# foreground classes present in each image (row)
IMAGE_CLASSES = [
    {1},                 # 0
    {2, 3},              # 1
    {1, 4},              # 2
    {4},                 # 3
    {5, 6},              # 4
    set(),               # 5  no foreground at all (only background / void)
    {6},                 # 6
    {3, 5},              # 7
    {1, 6},              # 8
    {2, 4, 6},           # 9
    {5},                 # 10
    {1, 2, 3, 4, 5, 6},  # 11
]


def _presence():
    table = np.zeros((len(IMAGE_CLASSES), K), dtype=bool)
    for row, classes in enumerate(IMAGE_CLASSES):
        for c in classes:
            table[row, c - 1] = True
    # spot-check the encoding itself (column c-1 = class c)
    assert table[2].tolist() == [True, False, False, True, False, False]
    return table


def _as_list(indices):
    out = [int(i) for i in np.asarray(indices).ravel()]
    assert out == sorted(out) and len(set(out)) == len(out)
    return out


# --------------------------------------------------------------------------- select_images
@pytest.mark.parametrize("step, mode, expected", [
    (0, "disjoint", [0, 1]),
    (0, "overlap", [0, 1, 2, 7, 8, 9, 11]),
    (1, "disjoint", [2, 3, 7, 10]),
    (1, "overlap", [2, 3, 4, 7, 9, 10, 11]),
    (2, "disjoint", [4, 6, 8, 9, 11]),
    (2, "overlap", [4, 6, 8, 9, 11]),
])
def test_select_images_by_hand(step, mode, expected):
    assert _as_list(select_images(_presence(), STEPS, step, mode)) == expected


@pytest.mark.parametrize("step, mode, expected", [
    (0, "disjoint", [10]),
    (0, "overlap", [1, 4, 7, 9, 10, 11]),
    (1, "disjoint", [0, 2, 3]),
    (1, "overlap", [0, 2, 3, 8, 9, 11]),
    (2, "disjoint", [1, 4, 6, 7, 8, 9, 11]),
    (2, "overlap", [1, 4, 6, 7, 8, 9, 11]),
])
def test_select_images_non_identity_order_by_hand(step, mode, expected):
    assert _as_list(select_images(_presence(), STEPS_PERMUTED, step, mode)) == expected


def test_last_step_disjoint_equals_overlap():
    p = _presence()
    for steps in (STEPS, STEPS_PERMUTED):
        last = len(steps) - 1
        assert _as_list(select_images(p, steps, last, "disjoint")) == _as_list(select_images(p, steps, last, "overlap"))


def test_image_without_foreground_is_never_a_training_image():
    p = _presence()
    for steps in (STEPS, STEPS_PERMUTED):
        for step in range(len(steps)):
            for mode in ("disjoint", "overlap"):
                assert 5 not in _as_list(select_images(p, steps, step, mode))
                assert 5 not in _as_list(select_cumulative_images(p, steps, step, mode))


def test_disjoint_allows_old_classes_but_not_future_ones():
    p = _presence()
    # image 2 = {1 (old), 4 (current)} is in step 1 disjoint; image 9 = {2, 4, 6 (future)} is not
    chosen = _as_list(select_images(p, STEPS, 1, "disjoint"))
    assert 2 in chosen and 9 not in chosen
    # image 0 = {1} only old classes at step 1: not a step-1 image in either mode
    assert 0 not in chosen and 0 not in _as_list(select_images(p, STEPS, 1, "overlap"))


@pytest.mark.parametrize("mode", ["Disjoint", "overlapped", "", "partition"])
def test_bad_mode_raises(mode):
    with pytest.raises(ValueError):
        select_images(_presence(), STEPS, 0, mode)


# --------------------------------------------------------------------------- cumulative
@pytest.mark.parametrize("step, mode, expected", [
    (0, "disjoint", [0, 1]),
    (1, "disjoint", [0, 1, 2, 3, 7, 10]),
    (2, "disjoint", [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]),
    (0, "overlap", [0, 1, 2, 7, 8, 9, 11]),
    (1, "overlap", [0, 1, 2, 3, 4, 7, 8, 9, 10, 11]),
    (2, "overlap", [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]),
])
def test_select_cumulative_images_by_hand(step, mode, expected):
    assert _as_list(select_cumulative_images(_presence(), STEPS, step, mode)) == expected


# --------------------------------------------------------------------------- test images
@pytest.mark.parametrize("step, expected", [
    (0, [0, 1, 2, 7, 8, 9, 11]),
    (1, [0, 1, 2, 3, 4, 7, 8, 9, 10, 11]),
    (2, [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]),
])
def test_select_test_images_seen_by_hand(step, expected):
    p = _presence()
    assert _as_list(select_test_images(p, STEPS, step, images="seen")) == expected
    assert _as_list(select_test_images(p, STEPS, step)) == expected  # "seen" is the default (MiB)


@pytest.mark.parametrize("step, expected", [
    (0, [1, 4, 7, 9, 10, 11]),
    (1, [0, 1, 2, 3, 4, 7, 8, 9, 10, 11]),
    (2, [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]),
])
def test_select_test_images_seen_non_identity_order(step, expected):
    assert _as_list(select_test_images(_presence(), STEPS_PERMUTED, step, images="seen")) == expected


@pytest.mark.parametrize("step", [0, 1, 2])
def test_select_test_images_all(step):
    assert _as_list(select_test_images(_presence(), STEPS, step, images="all")) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]


# --------------------------------------------------------------------------- task registry
def test_voc_15_5():
    assert task_classes("voc", "15-5") == [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
        [16, 17, 18, 19, 20],
    ]


def test_voc_15_1_six_steps():
    assert task_classes("voc", "15-1") == [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
        [16], [17], [18], [19], [20],
    ]


def test_voc_10_5():
    assert task_classes("voc", "10-5") == [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        [11, 12, 13, 14, 15],
        [16, 17, 18, 19, 20],
    ]


def test_voc_19_1():
    assert task_classes("voc", "19-1") == [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19],
        [20],
    ]


def test_voc_2_2_ten_steps():
    assert task_classes("voc", "2-2") == [
        [0, 1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [13, 14], [15, 16], [17, 18], [19, 20],
    ]


def test_mib_aliases():
    assert task_classes("voc", "15-5s") == task_classes("voc", "15-1")
    assert task_classes("voc", "10-5-5") == task_classes("voc", "10-5")


def test_ade_100_10():
    steps = task_classes("ade", "100-10")
    assert len(steps) == 6
    assert steps[0] == [0] + list(range(1, 101))
    assert steps[1] == [101, 102, 103, 104, 105, 106, 107, 108, 109, 110]
    assert steps[2] == [111, 112, 113, 114, 115, 116, 117, 118, 119, 120]
    assert steps[5] == [141, 142, 143, 144, 145, 146, 147, 148, 149, 150]


def test_ade_50_50():
    steps = task_classes("ade", "50-50")
    assert len(steps) == 3
    assert steps[0] == list(range(0, 51))
    assert steps[1] == list(range(51, 101))
    assert steps[2] == list(range(101, 151))
    assert steps[0][:3] == [0, 1, 2] and steps[0][-1] == 50 and steps[2][0] == 101 and steps[2][-1] == 150


COCO_VOC_IDS = [1, 2, 3, 4, 5, 6, 7, 9, 16, 17, 18, 19, 20, 21, 44, 62, 63, 64, 67, 72]
COCO_UNUSED = [12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91]
# written out by hand: 1..91 minus the 11 unused ids minus the 20 VOC ids
COCO_NON_VOC = [8, 10, 11, 13, 14, 15, 22, 23, 24, 25, 27, 28,
                31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43,
                46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61,
                65, 70, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82,
                84, 85, 86, 87, 88, 89, 90]


def test_coco_voc():
    assert len(COCO_NON_VOC) == 60  # sanity of the hand-written list
    steps = task_classes("coco-voc", "voc")
    assert len(steps) == 2
    assert steps[1] == COCO_VOC_IDS
    assert steps[0] == [0] + COCO_NON_VOC
    assert not set(steps[0]) & set(COCO_UNUSED)
    assert not set(steps[0]) & set(COCO_VOC_IDS)


def test_user_class_order_as_list_and_string():
    assert task_classes("voc", [[0, 1, 2], [3, 4]]) == [[0, 1, 2], [3, 4]]
    assert task_classes("voc", "[[0,1,2],[3,4]]") == [[0, 1, 2], [3, 4]]
    assert task_classes("voc", "[[0, 1, 2], [3, 4]]") == [[0, 1, 2], [3, 4]]
    # the given order is the channel order: it must not be sorted
    assert task_classes("voc", [[0, 5, 2], [1, 4], [3]]) == [[0, 5, 2], [1, 4], [3]]
    assert task_classes("ade", "[[0,150,3],[7,1]]") == [[0, 150, 3], [7, 1]]


@pytest.mark.parametrize("dataset, task", [
    ("cityscapes", "15-5"),
    ("voc", "15-6"),
    ("voc", "100-50"),
    ("ade", "15-5"),
    ("voc", "nonsense"),
])
def test_unknown_dataset_or_task_raises(dataset, task):
    with pytest.raises(ValueError):
        task_classes(dataset, task)


@pytest.mark.parametrize("order", [
    [[1, 2], [3, 4]],         # step 0 does not start with background 0
    [[1, 0, 2], [3]],         # background not first
    [[0, 1, 2], [2, 3]],      # class listed twice
    [[0, 1, 1], [3]],         # class listed twice within a step
    "[[1,2],[3]]",            # string form, no background
    "[[0,1,2],[3,3]]",        # string form, duplicate
])
def test_bad_class_order_raises(order):
    with pytest.raises(ValueError):
        task_classes("voc", order)
