"""Which images train (and test) each step: pure functions of a class-presence table.

`presence` is a boolean (images x K) table whose column c-1 says foreground class c appears
in the image's mask (background and void ignored); see datamodules.presence.
"""
from __future__ import annotations

import numpy as np

MODES = ("disjoint", "overlap")


def _columns(classes) -> np.ndarray:
    return np.array(sorted(c - 1 for c in classes if c != 0), dtype=np.int64)


def select_images(presence: np.ndarray, steps: list[list[int]], step: int, mode: str) -> np.ndarray:
    """Sorted row indices of the images that train `step` under `mode` (PROTOCOL.md §3).

    disjoint: cls(x) ∩ S_t ≠ ∅ and cls(x) ⊆ Seen_t (old classes may appear, future ones not);
    overlap:  cls(x) ∩ S_t ≠ ∅ (old and future classes may appear, labelled background).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if not 0 <= step < len(steps):
        raise ValueError(f"step {step} does not exist in a task of {len(steps)} steps")
    presence = np.asarray(presence, dtype=bool)
    has_current = presence[:, _columns(steps[step])].any(axis=1)
    if mode == "overlap":
        return np.flatnonzero(has_current)
    seen = set(c for s in steps[: step + 1] for c in s)
    unseen = [c for c in range(1, presence.shape[1] + 1) if c not in seen]
    has_unseen = presence[:, _columns(unseen)].any(axis=1)
    return np.flatnonzero(has_current & ~has_unseen)


def select_cumulative_images(presence: np.ndarray, steps: list[list[int]], step: int, mode: str,
                             select=select_images) -> np.ndarray:
    """Union of the training images of steps 0..step (the data a Joint model trains on), each
    step's images chosen by `select` (same signature as select_images; a dataset's own rule)."""
    chosen = [np.asarray(select(presence, steps, s, mode), dtype=np.int64) for s in range(step + 1)]
    return np.unique(np.concatenate(chosen))


def select_test_images(presence: np.ndarray, steps: list[list[int]], step: int, images: str = "seen") -> np.ndarray:
    """Test images after `step`: MiB's lineage keeps the images with at least one seen class
    ("seen", the default); SSUL/MBS test on every image ("all")."""
    presence = np.asarray(presence, dtype=bool)
    if images == "all":
        return np.arange(presence.shape[0])
    if images != "seen":
        raise ValueError(f"unknown test image selection {images!r}; expected 'seen' or 'all'")
    seen = [c for s in steps[: step + 1] for c in s]
    return np.flatnonzero(presence[:, _columns(seen)].any(axis=1))
