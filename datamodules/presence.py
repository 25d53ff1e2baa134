"""The class-presence table: which foreground classes appear in each image's mask.

Computed once per dataset split by scanning the masks (in worker processes for large splits),
cached on disk beside the data, and recomputed when the cache no longer describes the masks.
Split selection (datamodules.splits) is a pure function of this table.

Cache key: a digest of every mask's path, size and modification time (ns). So the cache is
recomputed when the list of mask files changes (another list file, another order, a file added
or removed) and when any mask is rewritten (e.g. SegmentationClassAug re-converted), without
reading the masks themselves: one stat per file, against one decode per file for a rescan.
"""
from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from datamodules.datasets.voc import load_mask
from datamodules.parallel import SERIAL_BELOW, map_chunks


def mask_classes(mask: np.ndarray, num_foreground: int) -> np.ndarray:
    """Boolean vector (K,): entry c-1 is True iff foreground class c occurs in `mask`."""
    values = np.unique(mask)
    values = values[(values >= 1) & (values <= num_foreground)]
    present = np.zeros(num_foreground, dtype=bool)
    present[values.astype(np.int64) - 1] = True
    return present


def _presence_rows(mask_paths: Sequence[Path], num_foreground: int) -> list[np.ndarray]:
    """Worker: the presence row of each mask of a chunk."""
    return [mask_classes(load_mask(p), num_foreground) for p in mask_paths]


def compute_presence(mask_paths: Sequence[Path], num_foreground: int, description: str = "scanning masks", *,
                     workers: int | None = None, chunk_size: int = 64, progress: bool | None = None) -> np.ndarray:
    """Presence table (len(mask_paths), K) of the masks, row i = mask_paths[i].

    workers: None = min(4, CPUs) processes from SERIAL_BELOW (500) masks on, serial below;
    1 = serial. Each worker task scans `chunk_size` masks. progress: a rich progress bar
    (default: only for scans of SERIAL_BELOW+ masks, where it is worth watching)."""
    progress = len(mask_paths) >= SERIAL_BELOW if progress is None else progress
    rows = map_chunks(functools.partial(_presence_rows, num_foreground=num_foreground), list(mask_paths),
                      workers=workers, chunk_size=chunk_size, description=description, progress=progress)
    return np.stack(rows) if rows else np.zeros((0, num_foreground), dtype=bool)


def masks_key(mask_paths: Sequence[Path]) -> str:
    """Digest of the paths, sizes and modification times of `mask_paths` (the cache key)."""
    digest = hashlib.sha1()
    missing = []
    for p in mask_paths:
        try:
            stat = os.stat(p)
        except FileNotFoundError:
            missing.append(str(p))
            continue
        digest.update(f"{p}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(mask_paths)} masks are missing, e.g. {missing[0]}")
    return digest.hexdigest()


def cached_presence(cache_file: Path, mask_paths: Sequence[Path], num_foreground: int) -> np.ndarray:
    """The presence table of `mask_paths`, from `cache_file` when its key (masks_key) matches."""
    key = masks_key(mask_paths)
    if cache_file.exists():
        with np.load(cache_file) as cached:
            if str(cached["files_key"]) == key and cached["presence"].shape == (len(mask_paths), num_foreground):
                return cached["presence"]
    presence = compute_presence(mask_paths, num_foreground, description=f"class presence of {cache_file.stem}")
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    # A per-process temporary name: several DDP ranks may compute the same table at once.
    temporary = cache_file.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(temporary, presence=presence, files_key=np.array(key))
    temporary.replace(cache_file)
    return presence


def _cache_name(split: str, mask_paths: Sequence[Path]) -> str:
    """One cache file per file list (COCO-to-VOC tests on COCO val or on VOC val: two tables)."""
    names = hashlib.sha1("\n".join(str(p) for p in mask_paths).encode()).hexdigest()[:10]
    return f"{split}-{names}.npz"


def dataset_presence(located, num_foreground: int) -> tuple[np.ndarray, np.ndarray]:
    """The (train, test) presence tables of a located dataset (datamodules.datasets.locate),
    cached under `<dataset root>/.presence/`. Built once, e.g. by `make data`; every datamodule
    of every step then reads them."""
    cache = Path(located.root) / ".presence"
    return (cached_presence(cache / _cache_name("train", located.train.masks), located.train.masks, num_foreground),
            cached_presence(cache / _cache_name("test", located.test.masks), located.test.masks, num_foreground))
