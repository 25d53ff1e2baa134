"""From a confusion matrix to per-class IoU and the field's summaries (PROTOCOL.md §5).

Pure functions of arrays. Conventions, both reported: "no_bg" excludes background from old,
new and all (MiB); "with_bg" includes it (WILSON's "All", PLOP's "0-15"). A class without
ground-truth pixels in the test set gets IoU NaN and is left out of every mean.
"""
from __future__ import annotations

import math

import numpy as np


def iou_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Per-class IoU from a (C, C) confusion matrix (rows = ground truth, columns = prediction);
    NaN for classes with no ground-truth pixel."""
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positive = np.diag(confusion)
    ground_truth = confusion.sum(axis=1)
    union = ground_truth + confusion.sum(axis=0) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = true_positive / union
    iou[ground_truth == 0] = np.nan
    return iou


def _mean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def harmonic_mean(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b) or a + b == 0:
        return float("nan") if (math.isnan(a) or math.isnan(b)) else 0.0
    return 2 * a * b / (a + b)


def summarize_step(iou: np.ndarray, steps: list[list[int]], step: int) -> dict[str, float]:
    """Old/new/all after `step` from per-channel IoU (channels in task order [bg, step 0, ...]).

    old = step-0 classes; new = classes of steps 1..step (the papers' "1-15"/"16-20" columns);
    past/current = classes of steps < step / of step itself (for multi-step tasks). Keys:
    "<group>_no_bg" and "<group>_with_bg" (background, channel 0, added to old/all/past; new and
    current never contain it, so their two values are equal), plus
    "bg", "hiou_no_bg"/"hiou_with_bg" (harmonic mean of old and new).
    """
    sizes = [len(s) for s in steps[: step + 1]]
    bounds = np.cumsum([0] + sizes)
    iou = np.asarray(iou, dtype=np.float64)
    if iou.shape[0] != bounds[-1]:
        raise ValueError(f"{iou.shape[0]} IoU values for {bounds[-1]} channels after step {step}")
    channels = np.arange(bounds[-1])
    groups = {
        "old": channels[1:bounds[1]],
        "new": channels[bounds[1]:],
        "all": channels[1:],
        "past": channels[1:bounds[step]] if step > 0 else channels[1:bounds[1]],
        "current": channels[bounds[step]:] if step > 0 else channels[1:bounds[1]],
    }
    result = {"bg": float(iou[0])}
    for name, members in groups.items():
        result[f"{name}_no_bg"] = _mean(iou[members])
        # Background belongs with the classes learned at step 0: PLOP's "0-15" and WILSON's "All"
        # include it, the new-class columns never do.
        with_bg = members if name in ("new", "current") else np.concatenate([[0], members])
        result[f"{name}_with_bg"] = _mean(iou[with_bg])
    for convention in ("no_bg", "with_bg"):
        result[f"hiou_{convention}"] = harmonic_mean(result[f"old_{convention}"], result[f"new_{convention}"])
    return result


def summarize_run(per_step: list[dict[str, float]]) -> dict[str, float]:
    """Over the steps of a run: the last step's summary plus PLOP's "avg" (mean of "all" over
    the steps, in both conventions)."""
    final = dict(per_step[-1])
    for convention in ("no_bg", "with_bg"):
        final[f"avg_{convention}"] = _mean(np.array([s[f"all_{convention}"] for s in per_step]))
    return final
