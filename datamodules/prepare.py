"""Get a benchmark ready: `make data DATASET=voc|ade20k|coco` (this module's command line).

    python -m datamodules.prepare voc     [--root DIR] [--downloads DIR]
    python -m datamodules.prepare ade20k  ...
    python -m datamodules.prepare coco    ...   (needs voc first: COCO-to-VOC's step 1 is VOC)

Each command downloads the official archives into `<root>/downloads` (resuming a broken
download), verifies the published checksum before extracting (datamodules.download), converts
what the suite reads (SBD's .mat masks to SegmentationClassAug PNGs; COCO-Stuff maps and VOC
masks to COCO ids), checks the layout and the image counts, and builds the class-presence
tables once. Every step is idempotent: re-running after an interruption continues where it
stopped. The root defaults to $DATA_ROOT, else ./data (as the experiments).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console

from datamodules import datasets, fewshot
from datamodules.datasets import ade20k, coco, voc
from datamodules.download import (OFFICIAL_ARCHIVES, OFFICIAL_FILES, Archive, ChecksumError, DownloadError,
                                   UnverifiedArchiveError, fetch)
from datamodules.presence import dataset_presence
from datamodules.tasks import NUM_FOREGROUND

console = Console()
DATASETS = ("voc", "ade20k", "coco")


def _build_presence(dataset: str, data_root: Path, options: dict) -> None:
    located = datasets.locate(dataset, data_root, options)
    dataset_presence(located, NUM_FOREGROUND[dataset])


def prepare_voc(data_root: Path, *, downloads: Path | None = None, archives: dict[str, Archive] = OFFICIAL_ARCHIVES,
                options: dict | None = None, progress: bool = True, files: dict[str, Archive] = OFFICIAL_FILES) -> dict:
    """VOCtrainval_11-May-2012 + SBD -> <root>/VOCdevkit/VOC2012 with SegmentationClassAug and
    train_aug.txt (10,582) / val.txt (1,449), checked; and PIFS's official few-shot lists into
    <root>/fss/voc. `options` as data.options of an experiment
    (tests pass tiny expected_counts)."""
    data_root = Path(data_root)
    downloads = Path(downloads or data_root / "downloads")
    fetch(archives["voc2012"], downloads, data_root, progress=progress)   # holds VOCdevkit/VOC2012/
    fetch(archives["sbd"], downloads, data_root, progress=progress)       # holds benchmark_RELEASE/
    voc_root = data_root / "VOCdevkit" / "VOC2012"
    counts = voc.prepare_voc_aug(voc_root, data_root / "benchmark_RELEASE", progress=progress)
    _build_presence("voc", data_root, options or {})
    fewshot.fetch_official_lists("voc", data_root, files, progress)   # PIFS's (data.fewshot.class_lists=official)
    return counts


def prepare_ade20k(data_root: Path, *, downloads: Path | None = None, archives: dict[str, Archive] = OFFICIAL_ARCHIVES,
                   options: dict | None = None, progress: bool = True) -> dict:
    """ADEChallengeData2016 (20,210 train / 2,000 val) -> <root>/ADEChallengeData2016, checked."""
    data_root = Path(data_root)
    downloads = Path(downloads or data_root / "downloads")
    fetch(archives["ade20k"], downloads, data_root, progress=progress)    # holds ADEChallengeData2016/
    _build_presence("ade", data_root, options or {})
    located = datasets.locate("ade", data_root, options or {})
    return {"train": len(located.train), "val": len(located.test)}


def prepare_coco(data_root: Path, *, downloads: Path | None = None, archives: dict[str, Archive] = OFFICIAL_ARCHIVES,
                 options: dict | None = None, progress: bool = True, files: dict[str, Archive] = OFFICIAL_FILES) -> dict:
    """COCO 2017 images + COCO-Stuff pixel maps -> COCO ids (PROTOCOL.md §1), and the prepared
    VOC masks relabelled to COCO ids: WILSON's COCO-to-VOC setting, and COCO alone (PIFS's
    COCO-20i, with its official few-shot lists into <root>/fss/coco). Needs `prepare_voc` first."""
    data_root = Path(data_root)
    downloads = Path(downloads or data_root / "downloads")
    options = options or {}
    voc_counts = {k: v for k, v in (options.get("expected_counts") or {}).items() if k in ("train_aug", "val")}
    try:
        voc.check_voc(data_root / "VOCdevkit" / "VOC2012",
                      {**voc.VOC_EXPECTED_COUNTS, **voc_counts} if options.get("check_counts", True) else None)
    except datasets.DatasetMissing as error:
        raise datasets.DatasetMissing(f"COCO-to-VOC trains its step 1 on VOC, prepare it first (make data "
                                      f"DATASET=voc): {error}") from None
    images = data_root / "coco" / "images"
    fetch(archives["coco_train2017"], downloads, images, progress=progress)   # holds train2017/
    fetch(archives["coco_val2017"], downloads, images, progress=progress)     # holds val2017/
    maps = archives["cocostuff_stuffthingmaps"]
    target = data_root / "coco" / "stuffthingmaps_trainval2017"               # holds train2017/, val2017/
    if not maps.checksum:
        console.print(f"[yellow]note:[/] {maps.name} has no published checksum; the CRC-32 of every member of the "
                      "zip is checked while extracting instead")
    fetch(maps, downloads, target, allow_unverified=True, progress=progress)
    counts = coco.prepare_coco_voc(data_root, progress=progress)
    _build_presence("coco-voc", data_root, options)
    _build_presence("coco-voc", data_root, {**options, "test_set": "voc"})
    _build_presence("coco", data_root, options)   # COCO's 80 categories alone (PIFS's COCO-20i folds)
    fewshot.fetch_official_lists("coco", data_root, files, progress)
    return counts


PREPARERS = {"voc": prepare_voc, "ade20k": prepare_ade20k, "coco": prepare_coco}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datamodules.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("--root", default=os.environ.get("DATA_ROOT", "data"),
                        help="data root (default: $DATA_ROOT, else ./data)")
    parser.add_argument("--downloads", default=None, help="where the archives go (default: <root>/downloads)")
    args = parser.parse_args(argv)
    try:
        counts = PREPARERS[args.dataset](Path(args.root), downloads=args.downloads and Path(args.downloads))
    except (datasets.DatasetMissing, ChecksumError, DownloadError, UnverifiedArchiveError, ValueError) as error:
        console.print(f"[red]error:[/] {error}", soft_wrap=True)
        return 1
    console.print(f"[green]{args.dataset} ready[/] under {args.root}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
