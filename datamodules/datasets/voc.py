"""Reader for the Pascal VOC directory layout (also used by the embedded synthetic dataset).

    <root>/JPEGImages/<id>.jpg
    <root>/SegmentationClass/<id>.png        palette PNG of class ids, 255 = void
    <root>/SegmentationClassAug/<id>.png     SBD-augmented masks (real VOC train_aug)
    <root>/ImageSets/Segmentation/<split>.txt

A list file has one image id per line, or two root-relative paths per line
("/JPEGImages/x.jpg /SegmentationClassAug/x.png", the DeepLab/SBD convention).

Real VOC needs the SBD-augmented masks, which VOC itself does not ship: `prepare_voc_aug` builds
`SegmentationClassAug/` and `train_aug.txt` from VOC + SBD (benchmark_RELEASE), and `check_voc`
says, in one line, what is missing from a VOC directory.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.datasets.errors import DatasetMissing
from datamodules.parallel import map_chunks

# The VOC colour palette (the standard bit-interleaving construction), index 255 = void (cream).
def voc_palette() -> list[int]:
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    palette[255 * 3: 256 * 3] = [224, 224, 192]
    return palette


@dataclass(frozen=True)
class SplitFiles:
    """The image and mask files of one split, in list-file order."""
    ids: list[str]
    images: list[Path]
    masks: list[Path]

    def __len__(self) -> int:
        return len(self.ids)

    def head(self, count: int) -> "SplitFiles":
        """The first `count` files."""
        return SplitFiles(self.ids[:count], self.images[:count], self.masks[:count])


def read_split(root: Path, list_file: str, mask_dir: str = "SegmentationClass") -> SplitFiles:
    """Read `<root>/ImageSets/Segmentation/<list_file>` into image and mask paths."""
    root = Path(root)
    list_path = root / "ImageSets" / "Segmentation" / list_file
    if not list_path.is_file():
        raise DatasetMissing(f"list file {list_path} is missing")
    ids, images, masks = [], [], []
    for number, line in enumerate(list_path.read_text().splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) == 2:
            image, mask = (root / t.lstrip("/") for t in tokens)
            ids.append(image.stem)
        elif len(tokens) == 1:
            ids.append(tokens[0])
            image, mask = root / "JPEGImages" / f"{tokens[0]}.jpg", root / mask_dir / f"{tokens[0]}.png"
        else:
            raise ValueError(f"{list_path}:{number}: expected an id or two paths, got {line!r}")
        images.append(image)
        masks.append(mask)
    return SplitFiles(ids, images, masks)


def load_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def load_mask(path: Path) -> np.ndarray:
    """Class ids uint8 (H, W) from a palette (or greyscale) PNG."""
    with Image.open(path) as mask:
        if mask.mode not in ("P", "L"):
            raise ValueError(f"{path}: a mask must be a palette or greyscale PNG, not mode {mask.mode}")
        return np.asarray(mask, dtype=np.uint8)


def save_mask(path: Path, mask: np.ndarray) -> None:
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(voc_palette())
    image.save(path)


# --- VOC + SBD: the train_aug set and its masks ------------------------------------------------
# Sizes of the real splits (PROTOCOL.md §1); check_voc compares against them by default.
VOC_EXPECTED_COUNTS = {"train_aug": 10582, "val": 1449}
VOC_HOW_TO_GET = ("Run `make data DATASET=voc` (downloads VOC 2012 + SBD, builds SegmentationClassAug/ and "
                  "train_aug.txt), or point DATA_ROOT (data.root=...) at the directory holding a prepared "
                  "VOCdevkit/VOC2012; the default experiment needs no download: make run")
# How many ids an error message lists before "...".
_SHOWN_IDS = 5


def _first_ids(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:_SHOWN_IDS])
    return shown + (", ..." if len(ids) > _SHOWN_IDS else "")


def read_id_list(path: Path) -> list[str]:
    """Image ids of a list file, in file order (the stem of the first token of each line, so both
    plain-id lists and DeepLab's two-path lists work)."""
    return [Path(line.split()[0]).stem for line in Path(path).read_text().splitlines() if line.strip()]


def train_aug_ids(sbd_train: Iterable[str], sbd_val: Iterable[str], voc_train: Iterable[str],
                  voc_val: Iterable[str], images: set[str] | None = None) -> list[str]:
    """The `train_aug` ids: (SBD train ∪ SBD val ∪ VOC train) − VOC val, sorted; restricted to
    `images` (the ids with a JPEG) when given. On the real lists this gives 10,582 ids.

    SBD's val is used for training too: it is not VOC's val, and VOC val (the test set) is
    removed from the union because SBD's train list overlaps it."""
    ids = (set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val)
    if images is not None:
        ids &= images
    return sorted(ids)


def sbd_dataset_dir(sbd_root: Path) -> Path:
    """SBD's `dataset/` directory (cls/, img/, train.txt, val.txt) under `sbd_root`, which may be
    the directory holding benchmark_RELEASE/, benchmark_RELEASE/ itself, or dataset/ itself."""
    sbd_root = Path(sbd_root)
    for candidate in (sbd_root / "benchmark_RELEASE" / "dataset", sbd_root / "dataset", sbd_root):
        if (candidate / "cls").is_dir():
            return candidate
    raise DatasetMissing(f"SBD not found at {sbd_root}: no benchmark_RELEASE/dataset/cls/ directory. Extract "
                         "benchmark.tgz (Hariharan et al., Semantic Boundaries Dataset) there")


def read_sbd_mask(path: Path) -> np.ndarray:
    """Class ids (H, W) uint8 of an SBD `cls/<id>.mat` (MATLAB struct GTcls, field Segmentation;
    0 background, 1..20 classes, no void: SBD has no 255 borders)."""
    from scipy.io import loadmat  # only SBD conversion needs scipy

    segmentation = np.asarray(loadmat(path, struct_as_record=False, squeeze_me=True)["GTcls"].Segmentation)
    if segmentation.ndim != 2 or segmentation.size == 0 or segmentation.min() < 0 or segmentation.max() > 255:
        raise ValueError(f"{path}: GTcls.Segmentation is not a 2-D map of class ids "
                         f"(shape {segmentation.shape}, dtype {segmentation.dtype})")
    return segmentation.astype(np.uint8)


def _replace_atomically(dest: Path, write) -> None:
    # Write beside the target, then rename: an interrupted conversion never leaves a truncated
    # PNG behind, which the idempotent re-run would otherwise skip as done.
    temporary = dest.with_name(f".{dest.stem}.{os.getpid()}.tmp.png")
    try:
        write(temporary)
        os.replace(temporary, dest)
    finally:
        temporary.unlink(missing_ok=True)


def _write_aug_masks(jobs: Sequence[tuple[Path, Path]]) -> list[str]:
    """Worker: write each (source, dest) mask; a VOC PNG is copied byte for byte, an SBD .mat is
    converted to a VOC-palette PNG. Returns the source kind of each job ("voc" or "sbd")."""
    kinds = []
    for source, dest in jobs:
        if source.suffix == ".png":
            _replace_atomically(dest, lambda tmp: shutil.copyfile(source, tmp))
            kinds.append("voc")
        else:
            mask = read_sbd_mask(source)
            _replace_atomically(dest, lambda tmp: save_mask(tmp, mask))
            kinds.append("sbd")
    return kinds


def _require(base: Path, pieces: Sequence[str], what: str) -> None:
    missing = [p for p in pieces if not (base / p.rstrip("/")).exists()]
    if missing:
        raise DatasetMissing(f"{what} at {base} is incomplete (missing: {', '.join(missing)})")


def prepare_voc_aug(voc_root: Path, sbd_root: Path, progress: bool = True, *,
                    workers: int | None = None) -> dict[str, int]:
    """Build `<voc_root>/SegmentationClassAug/<id>.png` and `ImageSets/Segmentation/train_aug.txt`
    from VOC 2012 (`voc_root` = VOCdevkit/VOC2012) and SBD (`sbd_root`, see sbd_dataset_dir).

    Masks are written for every train_aug id and every VOC val id. VOC's own mask
    (SegmentationClass/<id>.png, with its 255 object borders) is copied where it exists: it is
    the official annotation, and the val masks must be VOC's; otherwise SBD's cls/<id>.mat is
    converted (no 255 borders there). train_aug.txt: see train_aug_ids; only ids whose JPEG is
    in VOC's JPEGImages (SBD's img/ holds the same pictures). Idempotent: existing PNGs are kept.
    Conversion runs in min(4, CPUs) processes (serially for small inputs, or with workers=1).

    Returns counts: train_aug (ids listed), masks (ids needing a mask), from_voc / from_sbd
    (written now), existing (kept from an earlier run), without_image (listed ids with no JPEG).
    """
    voc_root = Path(voc_root)
    sbd = sbd_dataset_dir(sbd_root)
    lists = voc_root / "ImageSets" / "Segmentation"
    _require(voc_root, ["JPEGImages/", "SegmentationClass/", "ImageSets/Segmentation/train.txt",
                        "ImageSets/Segmentation/val.txt"], "Pascal VOC 2012")
    _require(sbd, ["cls/", "train.txt", "val.txt"], "SBD")
    voc_train, voc_val = read_id_list(lists / "train.txt"), read_id_list(lists / "val.txt")
    sbd_train, sbd_val = read_id_list(sbd / "train.txt"), read_id_list(sbd / "val.txt")
    images = {p.stem for p in (voc_root / "JPEGImages").glob("*.jpg")}
    train_aug = train_aug_ids(sbd_train, sbd_val, voc_train, voc_val, images)
    without_image = len(set(train_aug_ids(sbd_train, sbd_val, voc_train, voc_val)) - images)

    out_dir = voc_root / "SegmentationClassAug"
    out_dir.mkdir(exist_ok=True)
    mask_ids = sorted(set(train_aug) | set(voc_val))
    jobs, unannotated, existing = [], [], 0
    for image_id in mask_ids:
        dest = out_dir / f"{image_id}.png"
        voc_mask, sbd_mask = voc_root / "SegmentationClass" / f"{image_id}.png", sbd / "cls" / f"{image_id}.mat"
        if dest.exists():
            existing += 1
        elif voc_mask.is_file():
            jobs.append((voc_mask, dest))
        elif sbd_mask.is_file():
            jobs.append((sbd_mask, dest))
        else:
            unannotated.append(image_id)
    if unannotated:
        raise DatasetMissing(f"{len(unannotated)} of {len(mask_ids)} listed images have neither a VOC mask "
                             f"({voc_root}/SegmentationClass/<id>.png) nor an SBD mask ({sbd}/cls/<id>.mat): "
                             f"{_first_ids(unannotated)}")
    kinds = map_chunks(_write_aug_masks, jobs, workers=workers, chunk_size=32, progress=progress,
                       description="VOC + SBD -> SegmentationClassAug")

    list_file = lists / "train_aug.txt"
    temporary = list_file.with_suffix(".txt.tmp")
    temporary.write_text("".join(f"{image_id}\n" for image_id in train_aug))
    os.replace(temporary, list_file)
    return {"train_aug": len(train_aug), "masks": len(mask_ids), "from_voc": kinds.count("voc"),
            "from_sbd": kinds.count("sbd"), "existing": existing, "without_image": without_image}


def _missing_files(root: Path, name: str, ids: Sequence[str], paths: Sequence[Path], kind: str) -> str | None:
    missing = [i for i, p in zip(ids, paths) if not p.is_file()]
    if not missing:
        return None
    first = paths[ids.index(missing[0])].parent
    where = first.relative_to(root) if first.is_relative_to(root) else first
    return f"{len(missing)} of {len(ids)} {name} {kind} missing in {where}/ ({_first_ids(missing)})"


def check_voc(voc_root: Path, expected_counts: Mapping[str, int] | None = VOC_EXPECTED_COUNTS) -> dict[str, int]:
    """Check a VOC 2012 (+SBD) directory (VOCdevkit/VOC2012): the directories, the list files
    train_aug.txt and val.txt, every listed image and mask, and (unless `expected_counts` is None)
    the number of ids in each list. Raises DatasetMissing with one line naming what is missing
    or which count differs; returns the counts {"train_aug": n, "val": n}."""
    root = Path(voc_root)

    def failure(problem: str) -> DatasetMissing:
        return DatasetMissing(f"Pascal VOC 2012 (+SBD) not usable at {root}: {problem}. {VOC_HOW_TO_GET}")

    if not root.is_dir():
        raise failure("the directory does not exist")
    pieces = ["JPEGImages/", "SegmentationClass/", "SegmentationClassAug/",
              "ImageSets/Segmentation/train_aug.txt", "ImageSets/Segmentation/val.txt"]
    missing = [p for p in pieces if not (root / p.rstrip("/")).exists()]
    if missing:
        raise failure(f"missing {', '.join(missing)}")
    splits = {"train_aug": read_split(root, "train_aug.txt", "SegmentationClassAug"),
              "val": read_split(root, "val.txt", "SegmentationClass")}
    problems = []
    for name, split in splits.items():
        problems.append(_missing_files(root, name, split.ids, split.images, "images"))
        problems.append(_missing_files(root, name, split.ids, split.masks, "masks"))
    for name, expected in (expected_counts or {}).items():
        if name not in splits:
            raise ValueError(f"unknown VOC split {name!r} in expected_counts; known: {', '.join(splits)}")
        if len(splits[name]) != expected:
            problems.append(f"ImageSets/Segmentation/{name}.txt lists {len(splits[name]):,} images, expected {expected:,}")
    problems = [p for p in problems if p]
    if problems:
        raise failure("; ".join(problems))
    return {name: len(split) for name, split in splits.items()}
