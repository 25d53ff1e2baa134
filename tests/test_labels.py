"""Independent checks of the label remapping (PROTOCOL.md §4, METHODS_wilson_mib.md §1.5).
Every expected mask is written out by hand."""
from __future__ import annotations

import numpy as np
import pytest

from datamodules.labels import label_lookup, new_class_labels, remap

V = 255

# dataset ids: bg 0, and (at step 1 of STEPS) old 1, 2; current 3, 4; future 5; void 255
MASK = np.array([
    [0, 1, 2, 3, 4],
    [5, V, 0, 3, 1],
    [4, 4, 5, 2, V],
    [0, 3, 1, 5, 0],
], dtype=np.uint8)

STEPS = [[0, 1, 2], [3, 4], [5]]
# non-identity order: channels [0, 5, 2, 1, 4, 3]; at step 1 old = {5, 2}, current = {1, 4},
# future = {3}; id 5 -> 1, 2 -> 2, 1 -> 3, 4 -> 4 (and 3 -> 5 once it is learned)
STEPS_PERMUTED = [[0, 5, 2], [1, 4], [3]]


def _remapped(steps, step, phase, **kwargs):
    lookup = label_lookup(steps, step, phase, **kwargs)
    assert isinstance(lookup, np.ndarray)
    assert lookup.shape == (256,) and lookup.dtype == np.uint8
    out = remap(MASK, lookup)
    assert out.shape == MASK.shape
    return np.asarray(out)


def _check(got, expected):
    np.testing.assert_array_equal(got, np.array(expected, dtype=np.uint8))


# --------------------------------------------------------------------------- identity order, step 1
def test_train_mib_default():
    # old -> 0, future -> 0, current kept, void -> 0
    _check(_remapped(STEPS, 1, "train"), [
        [0, 0, 0, 3, 4],
        [0, 0, 0, 3, 0],
        [4, 4, 0, 0, 0],
        [0, 3, 0, 0, 0],
    ])


def test_train_void_not_background():
    _check(_remapped(STEPS, 1, "train", void_as_background=False), [
        [0, 0, 0, 3, 4],
        [0, V, 0, 3, 0],
        [4, 4, 0, 0, V],
        [0, 3, 0, 0, 0],
    ])


def test_train_old_classes_kept_joint():
    _check(_remapped(STEPS, 1, "train", old_classes="kept"), [
        [0, 1, 2, 3, 4],
        [0, 0, 0, 3, 1],
        [4, 4, 0, 2, 0],
        [0, 3, 1, 0, 0],
    ])


def test_train_old_kept_void_not_background():
    _check(_remapped(STEPS, 1, "train", old_classes="kept", void_as_background=False), [
        [0, 1, 2, 3, 4],
        [0, V, 0, 3, 1],
        [4, 4, 0, 2, V],
        [0, 3, 1, 0, 0],
    ])


def test_val_mib():
    # current kept, bg 0, old / future / void -> 255
    _check(_remapped(STEPS, 1, "val"), [
        [0, V, V, 3, 4],
        [V, V, 0, 3, V],
        [4, 4, V, V, V],
        [0, 3, V, V, 0],
    ])


def test_test_future_ignored_mib():
    # bg 0, current and old kept, future -> 255, void -> 255
    _check(_remapped(STEPS, 1, "test", future_classes="ignore"), [
        [0, 1, 2, 3, 4],
        [V, V, 0, 3, 1],
        [4, 4, V, 2, V],
        [0, 3, 1, V, 0],
    ])


def test_test_default_is_mib_future_ignored():
    _check(_remapped(STEPS, 1, "test"), _remapped(STEPS, 1, "test", future_classes="ignore"))


def test_test_future_background_wilson():
    _check(_remapped(STEPS, 1, "test", future_classes="background"), [
        [0, 1, 2, 3, 4],
        [0, V, 0, 3, 1],
        [4, 4, 0, 2, V],
        [0, 3, 1, 0, 0],
    ])


def test_test_last_step_keeps_everything():
    _check(_remapped(STEPS, 2, "test"), [
        [0, 1, 2, 3, 4],
        [5, V, 0, 3, 1],
        [4, 4, 5, 2, V],
        [0, 3, 1, 5, 0],
    ])


# --------------------------------------------------------------------------- ADE: id 0 = unlabeled
def test_ade_train_unlabeled_is_background():
    _check(_remapped(STEPS, 1, "train", background_is_unlabeled=True), [
        [0, 0, 0, 3, 4],
        [0, 0, 0, 3, 0],
        [4, 4, 0, 0, 0],
        [0, 3, 0, 0, 0],
    ])


def test_ade_val_unlabeled_is_ignored():
    _check(_remapped(STEPS, 1, "val", background_is_unlabeled=True), [
        [V, V, V, 3, 4],
        [V, V, V, 3, V],
        [4, 4, V, V, V],
        [V, 3, V, V, V],
    ])


def test_ade_test_unlabeled_is_ignored():
    _check(_remapped(STEPS, 1, "test", background_is_unlabeled=True), [
        [V, 1, 2, 3, 4],
        [V, V, V, 3, 1],
        [4, 4, V, 2, V],
        [V, 3, 1, V, V],
    ])


# --------------------------------------------------------------------------- non-identity order
def test_permuted_train_step0():
    # current {5, 2}: 5 -> 1, 2 -> 2; everything else (incl. void) -> 0
    _check(_remapped(STEPS_PERMUTED, 0, "train"), [
        [0, 0, 2, 0, 0],
        [1, 0, 0, 0, 0],
        [0, 0, 1, 2, 0],
        [0, 0, 0, 1, 0],
    ])


def test_permuted_train_step1():
    # current {1, 4}: 1 -> 3, 4 -> 4; old {5, 2} and future {3} -> 0; void -> 0
    _check(_remapped(STEPS_PERMUTED, 1, "train"), [
        [0, 3, 0, 0, 4],
        [0, 0, 0, 0, 3],
        [4, 4, 0, 0, 0],
        [0, 0, 3, 0, 0],
    ])


def test_permuted_train_step1_old_kept():
    _check(_remapped(STEPS_PERMUTED, 1, "train", old_classes="kept"), [
        [0, 3, 2, 0, 4],
        [1, 0, 0, 0, 3],
        [4, 4, 1, 2, 0],
        [0, 0, 3, 1, 0],
    ])


def test_permuted_val_step1():
    _check(_remapped(STEPS_PERMUTED, 1, "val"), [
        [0, 3, V, V, 4],
        [V, V, 0, V, 3],
        [4, 4, V, V, V],
        [0, V, 3, V, 0],
    ])


def test_permuted_test_step1_mib():
    _check(_remapped(STEPS_PERMUTED, 1, "test", future_classes="ignore"), [
        [0, 3, 2, V, 4],
        [1, V, 0, V, 3],
        [4, 4, 1, 2, V],
        [0, V, 3, 1, 0],
    ])


def test_permuted_test_step1_wilson():
    _check(_remapped(STEPS_PERMUTED, 1, "test", future_classes="background"), [
        [0, 3, 2, 0, 4],
        [1, V, 0, 0, 3],
        [4, 4, 1, 2, V],
        [0, 0, 3, 1, 0],
    ])


def test_permuted_test_last_step():
    # all learned: 0->0, 5->1, 2->2, 1->3, 4->4, 3->5
    _check(_remapped(STEPS_PERMUTED, 2, "test"), [
        [0, 3, 2, 5, 4],
        [1, V, 0, 5, 3],
        [4, 4, 1, 2, V],
        [0, 5, 3, 1, 0],
    ])


def test_permuted_lookup_entries():
    lookup = label_lookup(STEPS_PERMUTED, 1, "test")
    assert [int(lookup[i]) for i in (0, 5, 2, 1, 4, 3, 255)] == [0, 1, 2, 3, 4, V, V]
    lookup = label_lookup(STEPS_PERMUTED, 1, "train")
    assert [int(lookup[i]) for i in (0, 5, 2, 1, 4, 3, 255)] == [0, 0, 0, 3, 4, 0, 0]


def test_remap_batch_of_masks():
    batch = np.stack([MASK, MASK[::-1]])
    out = np.asarray(remap(batch, label_lookup(STEPS_PERMUTED, 1, "train")))
    assert out.shape == (2, 4, 5)
    _check(out[0], [
        [0, 3, 0, 0, 4],
        [0, 0, 0, 0, 3],
        [4, 4, 0, 0, 0],
        [0, 0, 3, 0, 0],
    ])
    _check(out[1], [
        [0, 0, 3, 0, 0],
        [4, 4, 0, 0, 0],
        [0, 0, 0, 0, 3],
        [0, 3, 0, 0, 4],
    ])


def test_unknown_phase_raises():
    with pytest.raises(ValueError):
        label_lookup(STEPS, 1, "validation")


# --------------------------------------------------------------------------- image-level labels
def test_new_class_labels():
    # K = 5 classes; row: classes 1, 3, 5 present (column c-1 = class c)
    row = np.array([True, False, True, False, True])
    got = new_class_labels(row, STEPS_PERMUTED, 1)  # new classes [1, 4] in that order
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.array([1.0, 0.0], dtype=np.float32))
    np.testing.assert_array_equal(new_class_labels(row, STEPS_PERMUTED, 0), np.array([1.0, 0.0], dtype=np.float32))  # [5, 2]
    np.testing.assert_array_equal(new_class_labels(row, STEPS_PERMUTED, 2), np.array([1.0], dtype=np.float32))  # [3]
    only_4 = np.array([False, False, False, True, False])
    np.testing.assert_array_equal(new_class_labels(only_4, STEPS_PERMUTED, 1), np.array([0.0, 1.0], dtype=np.float32))
    only_2 = np.array([False, True, False, False, False])
    np.testing.assert_array_equal(new_class_labels(only_2, STEPS_PERMUTED, 0), np.array([0.0, 1.0], dtype=np.float32))
    # old classes present but no new one: all zeros (old entries are not in the vector)
    np.testing.assert_array_equal(new_class_labels(only_2, STEPS_PERMUTED, 1), np.array([0.0, 0.0], dtype=np.float32))


def test_new_class_labels_identity_order():
    row = np.array([False, True, False, True, True])  # classes 2, 4, 5
    np.testing.assert_array_equal(new_class_labels(row, STEPS, 1), np.array([0.0, 1.0], dtype=np.float32))  # [3, 4]
    np.testing.assert_array_equal(new_class_labels(row, STEPS, 2), np.array([1.0], dtype=np.float32))  # [5]
    np.testing.assert_array_equal(new_class_labels(row, STEPS, 0), np.array([0.0, 1.0], dtype=np.float32))  # [1, 2]
