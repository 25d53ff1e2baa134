"""Check a dataset's image and mask files before any training, failing with one line naming the file.

A corrupt JPEG or a mask with a stray class id otherwise surfaces hours into a run, inside a
DataLoader worker, as a traceback that names neither the file nor the problem. Here every image is
fully decoded (a truncated file only fails when its pixels are read, not when it is opened), every
mask is read, and the pair is compared: same size, class ids in 0..K plus 255 (void).

Decoding a split costs one read per file, so a passed split is remembered by a marker file under
`<dataset root>/.presence/` (beside the class-presence cache, datamodules.presence), keyed like
that cache by a digest of every file's path, size and modification time (ns): replacing or
editing any file, or listing other files, makes the check run again; an unchanged split costs
one stat per file.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from datamodules.datasets.voc import SplitFiles, load_mask
from datamodules.parallel import SERIAL_BELOW, map_chunks

VOID = 255
# How many stray class ids, and how many further problems, one message lists before "...".
_SHOWN_IDS = 8
_SHOWN_PROBLEMS = 3


class DatasetFileError(ValueError):
    """A dataset file is unreadable or inconsistent. The message is one line that starts with the
    offending file's path; `problems` holds every problem found (the first one is the message's)."""

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = tuple(problems) or (message,)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


@contextlib.contextmanager
def _strict_decoding() -> Iterator[None]:
    """PIL's LOAD_TRUNCATED_IMAGES (a process-wide flag some libraries set) makes a truncated file
    decode silently, padded with grey: off while checking, restored afterwards."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) of the image at `path`, after decoding all of its pixels."""
    try:
        with _strict_decoding(), Image.open(path) as image:
            image.convert("RGB")  # decodes every pixel: a truncated file fails here, not at open
            return image.height, image.width
    except FileNotFoundError:
        raise DatasetFileError(f"{path}: image file is missing") from None
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise DatasetFileError(f"{path}: cannot read image ({_one_line(error) or type(error).__name__})") from None


def _read_mask(path: Path) -> np.ndarray:
    try:
        with _strict_decoding():
            return load_mask(path)
    except FileNotFoundError:
        raise DatasetFileError(f"{path}: mask file is missing") from None
    except Exception as error:
        reason = _one_line(error).removeprefix(f"{path}: ") or type(error).__name__
        raise DatasetFileError(f"{path}: cannot read mask ({reason})") from None


def stray_class_ids(mask: np.ndarray, num_foreground: int) -> list[int]:
    """The ids in `mask` that are neither a class (0..num_foreground) nor void (255), sorted."""
    values = np.unique(mask)
    return [int(v) for v in values if v > num_foreground and v != VOID]


def check_pair(image_path: Path, mask_path: Path | None, num_foreground: int) -> None:
    """Raise DatasetFileError when the image cannot be fully decoded, or the mask (if given) cannot
    be read, differs in size from its image, or holds an id outside 0..num_foreground and 255."""
    height, width = _image_size(image_path)
    if mask_path is None:
        return
    mask = _read_mask(mask_path)
    if mask.shape != (height, width):
        raise DatasetFileError(f"{mask_path}: mask is {mask.shape[0]}x{mask.shape[1]}, "
                               f"its image {image_path} is {height}x{width}")
    stray = stray_class_ids(mask, num_foreground)
    if stray:
        shown = ", ".join(map(str, stray[:_SHOWN_IDS])) + (", ..." if len(stray) > _SHOWN_IDS else "")
        raise DatasetFileError(f"{mask_path}: class ids [{shown}] outside 0-{num_foreground} "
                               f"(and {VOID} = void)")


def _pair_problems(pairs: Sequence[tuple[Path, Path | None]], num_foreground: int) -> list[str | None]:
    """Worker: the problem of each (image, mask) pair of a chunk, None where it passed."""
    problems: list[str | None] = []
    for image, mask in pairs:
        try:
            check_pair(image, mask, num_foreground)
            problems.append(None)
        except DatasetFileError as error:
            problems.append(str(error))
    return problems


def _pairs(files: SplitFiles) -> list[tuple[Path, Path | None]]:
    masks = files.masks if files.masks else [None] * len(files.images)
    if len(masks) != len(files.images):
        raise ValueError(f"a split lists {len(files.images)} images but {len(masks)} masks")
    return list(zip(files.images, masks))


def split_problems(files: SplitFiles, num_foreground: int, *, workers: int | None = None,
                   progress: bool | None = None, chunk_size: int = 32) -> list[str]:
    """Every problem of a split, in list order (one message per failing pair).

    workers: None = worker processes from SERIAL_BELOW (500) pairs on, serial below; 1 = serial.
    Each worker task checks `chunk_size` pairs. progress: a progress bar (default: only for
    SERIAL_BELOW+ pairs, where it is worth watching)."""
    pairs = _pairs(files)
    progress = len(pairs) >= SERIAL_BELOW if progress is None else progress
    results = map_chunks(functools.partial(_pair_problems, num_foreground=num_foreground), pairs,
                         workers=workers, chunk_size=chunk_size, description="checking image and mask files",
                         progress=progress)
    return [problem for problem in results if problem is not None]


def summarize(problems: Sequence[str]) -> str:
    """One line: the first problem, then how many more and the first few of them."""
    first, rest = problems[0], problems[1:]
    if not rest:
        return first
    shown = "; ".join(rest[:_SHOWN_PROBLEMS]) + ("; ..." if len(rest) > _SHOWN_PROBLEMS else "")
    noun = "problem" if len(rest) == 1 else "problems"
    return f"{first} (and {len(rest)} more {noun}; first ones: {shown})"


def check_split(files: SplitFiles, num_foreground: int, *, workers: int | None = None,
                progress: bool | None = None, chunk_size: int = 32) -> None:
    """Check every (image, mask) pair of a split (see check_pair) and raise one DatasetFileError
    naming the first problem and counting the others, so a single run shows the extent of it."""
    problems = split_problems(files, num_foreground, workers=workers, progress=progress, chunk_size=chunk_size)
    if problems:
        raise DatasetFileError(summarize(problems), problems)


def files_key(files: SplitFiles, num_foreground: int) -> str:
    """Digest of num_foreground and of every image's and mask's path, size and mtime (ns): the
    name of a split's "checked" marker. A missing file raises DatasetFileError naming it."""
    digest = hashlib.sha1(f"K={num_foreground}\n".encode())
    for pair in _pairs(files):
        for path in pair:
            if path is None:
                continue
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                raise DatasetFileError(f"{path}: file is missing") from None
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def marker_path(root: Path, split: str, key: str) -> Path:
    return Path(root) / ".presence" / f"checked-{split}-{key}.ok"


def _write_marker(marker: Path, text: str) -> None:
    # A per-process temporary name, then a rename: several DDP ranks may pass the check at once.
    marker.parent.mkdir(parents=True, exist_ok=True)
    temporary = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, marker)
    finally:
        temporary.unlink(missing_ok=True)


def check_dataset(located, num_foreground: int, *, workers: int | None = None,
                  progress: bool | None = None) -> None:
    """Check the train and test splits of a located dataset (datamodules.datasets.locate), each
    skipped when its marker (see files_key) says these very files already passed."""
    for split, files in (("train", located.train), ("test", located.test)):
        marker = marker_path(located.root, split, files_key(files, num_foreground))
        if marker.is_file():
            continue
        check_split(files, num_foreground, workers=workers, progress=progress)
        _write_marker(marker, f"{len(files.images)} images checked, classes 0-{num_foreground} and {VOID}\n")
