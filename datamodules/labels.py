"""Label remapping per phase (PROTOCOL.md §4), as 256-entry lookup tables applied to masks.

A mask holds dataset ids (0 background, 1..K classes, 255 void). A lookup maps each id to the
label the loss or the metric sees: a contiguous channel index ("kept"), 0 (background) or 255
(ignored). Pure functions of the task; `remap(mask, lookup)` is a single indexing operation.
"""
from __future__ import annotations

import numpy as np

from datamodules.tasks import channel_order

VOID = 255
PHASES = ("train", "val", "test")


def label_lookup(
    steps: list[list[int]],
    step: int,
    phase: str,
    *,
    void_as_background: bool = True,
    old_classes: str = "background",
    future_classes: str = "ignore",
    background_is_unlabeled: bool = False,
) -> np.ndarray:
    """Lookup table (uint8, 256 entries) from dataset id to training/evaluation label.

    phase "train": current-step classes kept, old and future classes -> 0 (MiB/WILSON);
        `old_classes="kept"` keeps old classes instead (Joint, MiB's --no_mask);
        void -> 0 when `void_as_background` (the MiB and WILSON code train void pixels as
        background: their masking value is 0 and 255 is mapped to it), else 255.
    phase "val" (MiB's validation during a step): current kept, old/future/void -> 255.
    phase "test" (after step t): current and old kept, void -> 255, future classes -> 255
        (MiB, `future_classes="ignore"`) or 0 (WILSON, `future_classes="background"`).
    `background_is_unlabeled` (ADE20K): id 0 means "unlabeled", so it is never scored (-> 255
        in val/test) but is still trained as channel 0.
    Ids outside the task's classes (e.g. unused COCO ids) behave like future classes.
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
    if old_classes not in ("background", "kept"):
        raise ValueError(f"old_classes must be 'background' or 'kept', not {old_classes!r}")
    if future_classes not in ("ignore", "background"):
        raise ValueError(f"future_classes must be 'ignore' or 'background', not {future_classes!r}")
    seen = channel_order(steps, step)
    current = set(steps[step]) - {0}
    old = set(seen) - current - {0}
    index = {c: i for i, c in enumerate(seen)}

    if phase == "train":
        lookup = np.zeros(256, dtype=np.uint8)  # background, future (and old) classes
        kept = current | (old if old_classes == "kept" else set())
        lookup[VOID] = 0 if void_as_background else VOID
    elif phase == "val":
        lookup = np.full(256, VOID, dtype=np.uint8)
        kept = current
        lookup[0] = 0
    else:
        lookup = np.full(256, VOID if future_classes == "ignore" else 0, dtype=np.uint8)
        kept = current | old
        lookup[0] = 0
        lookup[VOID] = VOID
    for c in kept:
        lookup[c] = index[c]
    if background_is_unlabeled and phase != "train":
        lookup[0] = VOID
    return lookup


def remap(mask: np.ndarray, lookup: np.ndarray) -> np.ndarray:
    """Apply a label lookup to a mask of dataset ids."""
    return lookup[mask]


def new_class_labels(present_classes: np.ndarray, steps: list[list[int]], step: int) -> np.ndarray:
    """Image-level label of the step's new classes: a multi-hot (float32) over steps[step]
    (without background), in channel order. `present_classes` is one row of the presence table.
    Old and future classes are not in the vector at all (WILSON's masked labels)."""
    new = [c for c in steps[step] if c != 0]
    return np.asarray([present_classes[c - 1] for c in new], dtype=np.float32)
