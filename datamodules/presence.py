"""The class-presence table: which foreground classes appear in each image's mask.

Computed once per dataset split by scanning the masks, cached on disk beside the data, and
recomputed when the list of mask files changes. Split selection (datamodules.splits) is a pure
function of this table.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image
from rich.progress import track


def mask_classes(mask: np.ndarray, num_foreground: int) -> np.ndarray:
    """Boolean vector (K,): entry c-1 is True iff foreground class c occurs in `mask`."""
    values = np.unique(mask)
    values = values[(values >= 1) & (values <= num_foreground)]
    present = np.zeros(num_foreground, dtype=bool)
    present[values.astype(np.int64) - 1] = True
    return present


def compute_presence(mask_paths: list[Path], num_foreground: int, description: str = "scanning masks") -> np.ndarray:
    rows = [mask_classes(np.asarray(Image.open(p)), num_foreground)
            for p in track(mask_paths, description=description, transient=True, disable=len(mask_paths) < 500)]
    return np.stack(rows) if rows else np.zeros((0, num_foreground), dtype=bool)


def _files_key(mask_paths: list[Path]) -> str:
    digest = hashlib.sha1()
    for p in mask_paths:
        digest.update(str(p).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def cached_presence(cache_file: Path, mask_paths: list[Path], num_foreground: int) -> np.ndarray:
    """The presence table of `mask_paths`, from `cache_file` when it matches the file list."""
    key = _files_key(mask_paths)
    if cache_file.exists():
        with np.load(cache_file) as cached:
            if str(cached["files_key"]) == key and cached["presence"].shape == (len(mask_paths), num_foreground):
                return cached["presence"]
    presence = compute_presence(mask_paths, num_foreground, description=f"class presence of {cache_file.stem}")
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    temporary = cache_file.with_suffix(".tmp.npz")
    np.savez(temporary, presence=presence, files_key=np.array(key))
    temporary.replace(cache_file)
    return presence
