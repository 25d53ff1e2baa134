"""Verified, resumable downloads of the official dataset archives.

The archives are large (COCO train2017 is 18 GB) and their hosts are slow and drop connections,
so this module is built around three promises:

- an interrupted download is resumed, not restarted: bytes go to `<name>.part` and a re-run asks
  the server for the rest with an HTTP Range request;
- an archive is extracted only after its published checksum matched; a mismatching file is moved
  aside to `<name>.corrupt`, so the next run downloads afresh instead of trusting it again;
- an extraction is all or nothing: members go to a temporary sibling directory and are moved into
  place at the end, and a marker file `.<archive name>.extracted` says it finished.

Every checksum in OFFICIAL_ARCHIVES is copied from the public source named in its `source`; where
no source publishes one the checksum is empty and `fetch` refuses the archive unless the caller
passes `allow_unverified=True`.
"""
from __future__ import annotations

import hashlib
import http.client
import re
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn, track)

# Hex digest length of each supported algorithm (also the list of supported algorithms).
ALGORITHMS = {"md5": 32, "sha1": 40, "sha256": 64}

# Byte counts below this finish in seconds: no progress bar for them (it would only flicker).
LONG_TRANSFER_BYTES = 64 << 20


@dataclass(frozen=True)
class Archive:
    """One downloadable archive: its file name, where to get it and how to check it."""
    name: str
    url: str
    checksum: str  # hex digest; "" when no public source publishes one
    algorithm: str  # "md5" | "sha1" | "sha256"
    source: str  # where the published checksum comes from


OFFICIAL_ARCHIVES: dict[str, Archive] = {
    "voc2012": Archive(
        name="VOCtrainval_11-May-2012.tar",
        url="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
        checksum="6cd6e144f989b92b3379bac3b3de84fd", algorithm="md5",
        source="pytorch/vision torchvision/datasets/voc.py (DATASET_YEAR_DICT['2012']['md5']); "
               "same md5 in PaddlePaddle/PaddleDetection ppdet/utils/download.py"),
    "sbd": Archive(
        name="benchmark.tgz",
        url="http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
        checksum="82b4d87ceb2ed10f6038a1cba92111cb", algorithm="md5",
        source="pytorch/vision torchvision/datasets/sbd.py (SBDataset.md5)"),
    "ade20k": Archive(
        name="ADEChallengeData2016.zip",
        url="http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
        checksum="219e1696abb36c8ba3a3afe7fb2f4b4606a897c7", algorithm="sha1",
        source="dmlc/gluon-cv scripts/datasets/ade20k.py (_AUG_DOWNLOAD_URLS, sha1)"),
    "coco_train2017": Archive(
        name="train2017.zip",
        url="http://images.cocodataset.org/zips/train2017.zip",
        checksum="cced6f7f71b7629ddf16f17bbcfab6b2", algorithm="md5",
        source="PaddlePaddle/PaddleDetection ppdet/utils/download.py (DATASETS['coco']); "
               "dmlc/gluon-cv scripts/datasets/mscoco.py lists sha1 10ad623668ab00c62c096f0ed636d6aff41faca5"),
    "coco_val2017": Archive(
        name="val2017.zip",
        url="http://images.cocodataset.org/zips/val2017.zip",
        checksum="442b8da7639aecaf257c1dceb8ba8c80", algorithm="md5",
        source="PaddlePaddle/PaddleDetection ppdet/utils/download.py (DATASETS['coco']); "
               "dmlc/gluon-cv scripts/datasets/mscoco.py lists sha1 4950dc9d00dbe1c933ee0170f5797584351d2a41"),
    # The COCO-Stuff README (nightrome/cocostuff README.md, "Downloads") gives the URL and the size
    # (659 MB) but no checksum, and no public download script found lists one: left unverified.
    # sha256 is the algorithm to use if one is recorded here later.
    "cocostuff_stuffthingmaps": Archive(
        name="stuffthingmaps_trainval2017.zip",
        url="http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip",
        checksum="", algorithm="sha256",
        source="no public source found; nightrome/cocostuff README.md gives the URL and size (659 MB) only"),
}


# Single files, no archive: PIFS's official split files (fcdl94/FSS, MIT), pinned to the commit the suite
# was checked against, so that few-shot draws can take the official per-class image lists
# (datamodules/fewshot.py, data.fewshot.class_lists=official): for each dataset the official training
# list and, per class, indices into it. The sha256 is that of the files at the pinned commit (git
# blobs read from a snapshot of the repository).
FSS_COMMIT = "6910c6864761526a35ba0cb0e1bcabed01ce86dc"
_FSS_RAW = f"https://raw.githubusercontent.com/fcdl94/FSS/{FSS_COMMIT}/data"


def _fss_file(path: str, sha256: str, size: int) -> Archive:
    return Archive(name=path.rsplit("/", 1)[1], url=f"{_FSS_RAW}/{path}", checksum=sha256, algorithm="sha256",
                   source=f"fcdl94/FSS@{FSS_COMMIT[:7]} data/{path} ({size:,} bytes)")


OFFICIAL_FILES: dict[str, Archive] = {
    "fss_voc_train_ids": _fss_file("voc/split/train_ids.npy",
                                   "04436d1b28cfa2cd5c7b2ae8f6e730b842ae55b936e01664424a9a37008e2ece", 465_736),
    "fss_voc_class_lists": _fss_file("voc/split/inverse_dict_train.pkl",
                                     "5be33debff39214bb26ff4eb01c846efc0038f204dd14ad4763fee26d189b969", 210_070),
    "fss_coco_train_ids": _fss_file("coco/split/train.txt",
                                    "566a2f9fd829f2a5ee0fbeb566dca3d869dbee20f4d0525822e5abee7a6311e2", 1_537_731),
    "fss_coco_class_lists": _fss_file("coco/split/inverse_dict_train_coco.pkl",
                                      "a6ef87e6328c069ad64d2c539b0f42ae6e3812eabda64322c82cac04f90a8d8d", 1_304_076),
}


class DownloadError(RuntimeError):
    """A download stopped early; whatever arrived is kept in the `.part` file for the next run."""


class ChecksumError(RuntimeError):
    """A file's digest differs from the published one: the file must not be used."""

    def __init__(self, message: str, path: Path, algorithm: str, expected: str, actual: str):
        super().__init__(message)
        self.path, self.algorithm, self.expected, self.actual = path, algorithm, expected, actual


class UnverifiedArchiveError(RuntimeError):
    """`fetch` was asked for an archive without a published checksum and no permission to skip it."""


class UnsafeArchiveError(ValueError):
    """An archive member would land outside the extraction directory (absolute path or `..`)."""


def _byte_progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), transient=True, disable=not enabled)


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown checksum algorithm {algorithm!r}; expected one of {sorted(ALGORITHMS)}")


def file_checksum(path: Path, algorithm: str, *, chunk_size: int = 1 << 20, progress: bool = False) -> str:
    """Hex digest of the file at `path`, read in chunks so that an 18 GB archive needs no 18 GB of memory."""
    _check_algorithm(algorithm)
    path = Path(path)
    digest = hashlib.new(algorithm)
    size = path.stat().st_size
    with open(path, "rb") as file, _byte_progress(progress and size >= LONG_TRANSFER_BYTES) as bar:
        task = bar.add_task(f"{algorithm} of {path.name}", total=size)
        while chunk := file.read(chunk_size):
            digest.update(chunk)
            bar.advance(task, len(chunk))
    return digest.hexdigest()


def verify(path: Path, archive_or_checksum: Archive | str, algorithm: str | None = None, *,
           progress: bool = False) -> None:
    """Raise ChecksumError unless the digest of `path` is the published one.

    `archive_or_checksum` is an Archive (its checksum and algorithm are used) or a hex digest, in which
    case `algorithm` names its algorithm.
    """
    path = Path(path)
    if isinstance(archive_or_checksum, Archive):
        expected, algorithm = archive_or_checksum.checksum, algorithm or archive_or_checksum.algorithm
    else:
        expected = archive_or_checksum
    if algorithm is None:
        raise ValueError("verify needs the algorithm of a bare checksum")
    _check_algorithm(algorithm)
    if not expected:
        raise ValueError(f"no checksum to verify {path} against")
    actual = file_checksum(path, algorithm, progress=progress)
    if actual != expected.lower():
        raise ChecksumError(f"{path}: {algorithm} is {actual}, expected {expected.lower()}; the file is corrupt "
                            f"or incomplete: delete it and download it again",
                            path, algorithm, expected.lower(), actual)


def _content_range_start(value: str | None) -> int | None:
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(?:\d+|\*)\s*", value or "")
    return int(match[1]) if match else None


def _range_total(value: str | None) -> int | None:
    """The total length in a 416 answer's `Content-Range: bytes */N`."""
    match = re.fullmatch(r"\s*bytes\s+\*/(\d+)\s*", value or "")
    return int(match[1]) if match else None


def download(url: str, destination: Path, *, chunk_size: int = 1 << 20, progress: bool = True,
             timeout: float = 60) -> Path:
    """Download `url` to `destination`, resuming an earlier interrupted attempt.

    Bytes go to `<destination>.part`; when that file already exists the request carries
    `Range: bytes=<its size>-`. A 206 answer is appended; a 200 answer means the server ignores
    ranges, so the file is written from the start. Only a complete transfer is renamed to
    `destination`, so an existing `destination` is complete and is returned without any request.
    Any failure raises DownloadError and keeps the `.part` file for the next run.
    """
    destination = Path(destination)
    if destination.exists():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})

    def failed(reason: object) -> DownloadError:
        kept = part.stat().st_size if part.exists() else 0
        what_next = (f"the partial file {part} ({kept} bytes) is kept, run again to resume" if kept
                     else "run again to retry")
        return DownloadError(f"downloading {url} failed: {reason}; {what_next}")

    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        # 416: nothing is left after `offset`. The .part is then either already complete (the earlier
        # run died between the last byte and the rename) or longer than the file: start over.
        if error.code == 416 and offset:
            total = _range_total(error.headers.get("Content-Range"))
            error.close()
            if total == offset:
                part.replace(destination)
                return destination
            part.unlink()
            return download(url, destination, chunk_size=chunk_size, progress=progress, timeout=timeout)
        error.close()
        raise failed(f"HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise failed(getattr(error, "reason", None) or error) from None

    with response:
        length = response.headers.get("Content-Length")
        if offset and response.status == 206:
            if _content_range_start(response.headers.get("Content-Range")) != offset:
                # The bytes would not line up with the .part: it cannot be continued.
                part.unlink()
                raise failed(f"the server answered a range other than bytes={offset}- "
                             f"({response.headers.get('Content-Range')}); the partial file was removed")
            mode = "ab"
        else:
            mode, offset = "wb", 0  # a 200 answer is the whole file: start over
        total = offset + int(length) if length is not None else None
        received = offset
        try:
            with open(part, mode) as file, \
                    _byte_progress(progress and (total is None or total >= LONG_TRANSFER_BYTES)) as bar:
                task = bar.add_task(destination.name, total=total, completed=offset)
                while chunk := response.read(chunk_size):
                    file.write(chunk)
                    received += len(chunk)
                    bar.advance(task, len(chunk))
        except (OSError, http.client.HTTPException) as error:
            raise failed(error) from None
    # http.client returns an empty read (no error) when the connection closes before Content-Length.
    if total is not None and received != total:
        raise failed(f"connection closed after {received} of {total} bytes")
    part.replace(destination)
    return destination


def _escapes(name: str) -> bool:
    """Whether an archive path is absolute or climbs above the directory it is extracted into."""
    name = name.replace("\\", "/")
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        return True
    depth = 0
    for part in PurePosixPath(name).parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            return True
    return False


def _unsafe_members(archive: zipfile.ZipFile | tarfile.TarFile) -> list[str]:
    """The members of an open archive that would be written outside its extraction directory."""
    if isinstance(archive, zipfile.ZipFile):
        return [name for name in archive.namelist() if _escapes(name)]
    unsafe = []
    for member in archive.getmembers():
        if _escapes(member.name):
            unsafe.append(member.name)
        elif member.issym() and _escapes(str(PurePosixPath(member.name).parent / member.linkname)):
            unsafe.append(f"{member.name} -> {member.linkname}")
        elif member.islnk() and _escapes(member.linkname):
            unsafe.append(f"{member.name} => {member.linkname}")
    return unsafe


def _open_archive(archive_path: Path) -> zipfile.ZipFile | tarfile.TarFile:
    if zipfile.is_zipfile(archive_path):
        return zipfile.ZipFile(archive_path)
    if tarfile.is_tarfile(archive_path):
        return tarfile.open(archive_path, "r:*")
    raise ValueError(f"{archive_path} is neither a tar nor a zip archive")


def _move_into_place(source: Path, target: Path) -> None:
    """Rename `source` to `target`, merging directories that exist already (e.g. two archives that both
    unpack into VOCdevkit/); files from the archive replace existing ones."""
    if source.is_dir() and target.is_dir() and not target.is_symlink():
        for child in source.iterdir():
            _move_into_place(child, target / child.name)
        source.rmdir()
    else:
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        source.replace(target)


def extraction_marker(archive_path: Path, destination: Path) -> Path:
    """The file whose presence says `archive_path` was fully extracted into `destination`."""
    return Path(destination) / f".{Path(archive_path).name}.extracted"


def extract(archive_path: Path, destination: Path, *, progress: bool = True) -> Path:
    """Extract a tar (any compression) or zip archive into `destination`, all or nothing.

    Archives with a member that would land outside `destination` (absolute path, `..`, a link
    pointing out) are rejected before anything is written. Members are extracted into a temporary
    sibling directory and moved into place only once all succeeded, so a failure leaves no
    half-written tree; the marker `.<archive name>.extracted` is written last, and its presence
    makes a later call return at once.
    """
    archive_path, destination = Path(archive_path), Path(destination)
    marker = extraction_marker(archive_path, destination)
    if marker.exists():
        return destination
    with _open_archive(archive_path) as archive:
        unsafe = _unsafe_members(archive)
        if unsafe:
            raise UnsafeArchiveError(f"{archive_path}: refusing to extract, {len(unsafe)} member(s) would be "
                                     f"written outside {destination}: {', '.join(unsafe[:5])}")
        destination.parent.mkdir(parents=True, exist_ok=True)
        # A sibling of `destination`, so that moving entries into place is a rename on the same filesystem.
        staging = destination.parent / f".{destination.name}.{archive_path.name}.extracting"
        if staging.exists():
            shutil.rmtree(staging)  # left by an earlier run that was killed mid-extraction
        staging.mkdir()
        try:
            members = archive.infolist() if isinstance(archive, zipfile.ZipFile) else archive.getmembers()
            shown = track(members, description=f"extracting {archive_path.name}", transient=True,
                          disable=not progress or len(members) < 500)
            if isinstance(archive, zipfile.ZipFile):
                archive.extractall(staging, members=shown)
            else:
                # extractall (not extract one by one) sets directory times and modes after their contents;
                # the "data" filter is a second guard (links, devices, permissions) behind _unsafe_members.
                archive.extractall(staging, members=shown, filter="data")
            destination.mkdir(exist_ok=True)
            for entry in sorted(staging.iterdir()):
                _move_into_place(entry, destination / entry.name)
            marker.write_text(f"{archive_path.name} extracted completely\n")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return destination


def fetch(archive: Archive, download_dir: Path, extract_to: Path, *, allow_unverified: bool = False,
          progress: bool = True) -> Path:
    """Download (resuming), verify and extract `archive`; returns `extract_to`.

    Returns at once, without network, when `extract_to` already holds the archive's extraction
    marker. A checksum mismatch extracts nothing: the file is renamed to `<name>.corrupt`, so that
    the next run downloads it afresh, and ChecksumError says so.
    """
    download_dir, extract_to = Path(download_dir), Path(extract_to)
    if not archive.checksum and not allow_unverified:
        raise UnverifiedArchiveError(
            f"{archive.name} has no published checksum ({archive.source}), so its download cannot be "
            f"verified; refusing it. Pass allow_unverified=True to use it anyway")
    path = download_dir / archive.name
    if extraction_marker(path, extract_to).exists():
        return extract_to
    download(archive.url, path, progress=progress)
    if archive.checksum:
        _verify_or_quarantine(path, archive, "nothing was extracted, ", progress)
    try:
        return extract(path, extract_to, progress=progress)
    except zipfile.BadZipFile as error:
        # Extracting a zip checks every member's CRC-32: for an archive without a published
        # checksum (COCO-Stuff's maps) that is the integrity check, and it extracts nothing on failure.
        corrupt = path.with_name(path.name + ".corrupt")
        path.replace(corrupt)
        raise ChecksumError(f"{path}: {error} (CRC check failed); nothing was extracted, the file was renamed to "
                            f"{corrupt.name} and the next run downloads it afresh", corrupt, "crc32", "", "") from None


def _verify_or_quarantine(path: Path, archive: Archive, done: str = "", progress: bool = False) -> None:
    """verify(); a file whose digest differs is renamed to `<name>.corrupt` (so that the next run
    downloads it afresh) and ChecksumError says so, after `done` (what was left undone)."""
    try:
        verify(path, archive, progress=progress)
    except ChecksumError as error:
        corrupt = path.with_name(path.name + ".corrupt")
        path.replace(corrupt)
        raise ChecksumError(
            f"{path}: {error.algorithm} is {error.actual}, expected {error.expected}; {done}the file was renamed "
            f"to {corrupt.name} and the next run downloads it afresh",
            corrupt, error.algorithm, error.expected, error.actual) from None


def fetch_file(file: Archive, directory: Path, *, progress: bool = False) -> Path:
    """A single published file (no archive) in `directory`, downloaded (resuming) unless a verified
    copy is there; a copy on disk whose digest differs is set aside as `<name>.corrupt` and fetched
    again, a download whose digest differs is a ChecksumError. Returns its path."""
    path = Path(directory) / file.name
    if path.exists():
        try:
            verify(path, file)
            return path
        except ChecksumError:
            path.replace(path.with_name(path.name + ".corrupt"))
    download(file.url, path, progress=progress)
    _verify_or_quarantine(path, file)
    return path
