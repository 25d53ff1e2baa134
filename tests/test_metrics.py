"""Per-class IoU and the old/new/all summaries on hand-made confusion matrices."""
import math

import numpy as np
import pytest

from lightning_modules.metrics import harmonic_mean, iou_from_confusion, summarize_run, summarize_step


def test_iou_from_a_hand_made_confusion_matrix():
    # rows = ground truth, columns = prediction
    confusion = np.array([[8, 2, 0],
                          [1, 3, 0],
                          [0, 0, 0]])   # class 2 has no ground truth (but could be predicted)
    iou = iou_from_confusion(confusion)
    assert iou[0] == pytest.approx(8 / (10 + 9 - 8))
    assert iou[1] == pytest.approx(3 / (4 + 5 - 3))
    assert math.isnan(iou[2])


def test_a_predicted_class_without_ground_truth_is_left_out_not_zero():
    confusion = np.array([[5, 0, 5], [0, 5, 0], [0, 0, 0]])
    iou = iou_from_confusion(confusion)
    assert math.isnan(iou[2]) and iou[0] == pytest.approx(0.5)


def test_summary_groups_and_conventions_by_hand():
    steps = [[0, 1, 2], [3], [4, 5]]
    iou = np.array([0.9, 0.6, 0.4, 0.2, 0.1, np.nan])  # channel 5 has no ground truth
    s = summarize_step(iou, steps, step=2)
    assert s["bg"] == pytest.approx(0.9)
    assert s["old_no_bg"] == pytest.approx(0.5)                   # (0.6 + 0.4) / 2
    assert s["old_with_bg"] == pytest.approx((0.9 + 0.6 + 0.4) / 3)
    assert s["new_no_bg"] == pytest.approx(0.15)                  # (0.2 + 0.1) / 2, NaN left out
    assert s["new_with_bg"] == pytest.approx(0.15)                # background never joins "new"
    assert s["all_no_bg"] == pytest.approx((0.6 + 0.4 + 0.2 + 0.1) / 4)
    assert s["all_with_bg"] == pytest.approx((0.9 + 0.6 + 0.4 + 0.2 + 0.1) / 5)
    assert s["past_no_bg"] == pytest.approx((0.6 + 0.4 + 0.2) / 3)
    assert s["current_no_bg"] == pytest.approx(0.1)
    assert s["hiou_no_bg"] == pytest.approx(2 * 0.5 * 0.15 / 0.65)


def test_summary_rejects_a_wrong_number_of_channels():
    with pytest.raises(ValueError):
        summarize_step(np.zeros(4), [[0, 1, 2], [3, 4]], step=1)


def test_avg_is_the_mean_of_all_over_steps():
    per_step = [{"all_no_bg": 0.6, "all_with_bg": 0.7, "old_no_bg": 0.6},
                {"all_no_bg": 0.4, "all_with_bg": 0.5, "old_no_bg": 0.3}]
    final = summarize_run(per_step)
    assert final["avg_no_bg"] == pytest.approx(0.5) and final["avg_with_bg"] == pytest.approx(0.6)
    assert final["old_no_bg"] == 0.3


def test_harmonic_mean():
    assert harmonic_mean(0.5, 0.25) == pytest.approx(1 / 3)
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert math.isnan(harmonic_mean(float("nan"), 0.3))
