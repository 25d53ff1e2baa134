"""Downloads against a local HTTP server on 127.0.0.1: resume, checksum, safe all-or-nothing extraction.

Expected digests are computed here with hashlib on the served bytes, never with the module's own
functions.
"""
import dataclasses
import hashlib
import io
import os
import re
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from datamodules.download import (ALGORITHMS, OFFICIAL_ARCHIVES, Archive, ChecksumError, DownloadError,
                                  UnsafeArchiveError, UnverifiedArchiveError, download, extract, fetch,
                                  file_checksum, verify)

# Incompressible content, so the archives are tens of kilobytes and a cut at CUT bytes is mid-file.
CONTENTS = {
    "dataset/a.txt": b"first file\n",
    "dataset/sub/b.bin": os.urandom(40_000),
    "dataset/sub/c.txt": b"third file\n" * 100,
}
CUT = 10_000


def tar_gz_bytes(contents: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in contents.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(contents: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in contents.items():
            archive.writestr(name, data)
    return buffer.getvalue()


ARCHIVES = {"data.tar.gz": tar_gz_bytes(CONTENTS), "data.zip": zip_bytes(CONTENTS)}


class ServerState:
    """What the handler serves and what it saw."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.cut_after: dict[str, int] = {}  # path -> bytes sent before dropping the first answer
        self.ranges = True  # False: ignore Range and answer 200 with the whole file


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        state = self.server.state
        range_header = self.headers.get("Range")
        state.requests.append((self.path, range_header))
        data = state.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if range_header and state.ranges:
            start = int(re.fullmatch(r"bytes=(\d+)-", range_header)[1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = state.cut_after.pop(self.path, None)
        self.wfile.write(body if cut is None else body[:cut])
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = ServerState()
    httpd.state.files = {f"/{name}": data for name, data in ARCHIVES.items()}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    httpd.url = lambda path: f"http://127.0.0.1:{httpd.server_address[1]}/{path}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def archive_for(server, name: str, algorithm: str = "sha256", checksum: str | None = None) -> Archive:
    digest = hashlib.new(algorithm, ARCHIVES[name]).hexdigest() if checksum is None else checksum
    return Archive(name=name, url=server.url(name), checksum=digest, algorithm=algorithm, source="test")


def assert_extracted(root):
    for name, data in CONTENTS.items():
        assert (root / name).read_bytes() == data
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert files - set(CONTENTS) == {m for m in files if m.startswith(".") and m.endswith(".extracted")}


@pytest.mark.parametrize("name,algorithm", [("data.tar.gz", "md5"), ("data.zip", "sha1"), ("data.tar.gz", "sha256")])
def test_fetch_downloads_verifies_extracts_and_second_fetch_needs_no_request(server, tmp_path, name, algorithm):
    archive = archive_for(server, name, algorithm)
    out = fetch(archive, tmp_path / "downloads", tmp_path / "data", progress=False)
    assert out == tmp_path / "data"
    assert (tmp_path / "downloads" / name).read_bytes() == ARCHIVES[name]
    assert not (tmp_path / "downloads" / f"{name}.part").exists()
    assert_extracted(out)
    assert (out / f".{name}.extracted").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".extracting")]
    assert len(server.state.requests) == 1

    fetch(archive, tmp_path / "downloads", tmp_path / "data", progress=False)
    (tmp_path / "downloads" / name).unlink()  # extracted already: not even a missing archive is fetched again
    fetch(archive, tmp_path / "downloads", tmp_path / "data", progress=False)
    assert len(server.state.requests) == 1


def test_interrupted_download_keeps_part_and_the_next_call_resumes(server, tmp_path):
    name, data = "data.tar.gz", ARCHIVES["data.tar.gz"]
    server.state.cut_after[f"/{name}"] = CUT
    destination = tmp_path / name
    part = tmp_path / f"{name}.part"
    with pytest.raises(DownloadError) as error:
        download(server.url(name), destination, chunk_size=4096, progress=False)
    message = str(error.value)
    assert "\n" not in message and str(part) in message and "resume" in message
    assert part.stat().st_size == CUT
    assert part.read_bytes() == data[:CUT]
    assert not destination.exists()

    assert download(server.url(name), destination, chunk_size=4096, progress=False) == destination
    assert server.state.requests[-1] == (f"/{name}", f"bytes={CUT}-")
    assert destination.read_bytes() == data
    assert not part.exists()


def test_interrupted_fetch_resumes_and_verifies(server, tmp_path):
    archive = archive_for(server, "data.zip", "md5")
    server.state.cut_after["/data.zip"] = CUT
    with pytest.raises(DownloadError):
        fetch(archive, tmp_path / "downloads", tmp_path / "data", progress=False)
    assert not (tmp_path / "data").exists()
    fetch(archive, tmp_path / "downloads", tmp_path / "data", progress=False)
    assert server.state.requests[-1][1] == f"bytes={CUT}-"
    assert_extracted(tmp_path / "data")


def test_server_without_range_support_restarts_and_yields_the_exact_bytes(server, tmp_path):
    name, data = "data.zip", ARCHIVES["data.zip"]
    server.state.ranges = False
    server.state.cut_after[f"/{name}"] = CUT
    destination = tmp_path / name
    with pytest.raises(DownloadError):
        download(server.url(name), destination, chunk_size=4096, progress=False)
    assert (tmp_path / f"{name}.part").stat().st_size == CUT

    download(server.url(name), destination, chunk_size=4096, progress=False)
    assert server.state.requests[-1][1] == f"bytes={CUT}-"  # asked for the rest, got the whole file
    assert destination.read_bytes() == data
    assert hashlib.sha256(destination.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()


def test_complete_part_file_is_finished_without_downloading_again(server, tmp_path):
    name, data = "data.zip", ARCHIVES["data.zip"]
    (tmp_path / f"{name}.part").write_bytes(data)  # killed between the last byte and the rename
    download(server.url(name), tmp_path / name, progress=False)
    assert (tmp_path / name).read_bytes() == data


def test_part_file_longer_than_the_file_starts_over(server, tmp_path):
    name, data = "data.zip", ARCHIVES["data.zip"]
    (tmp_path / f"{name}.part").write_bytes(data + b"stale bytes of another version")
    download(server.url(name), tmp_path / name, progress=False)
    assert [header for _, header in server.state.requests] == [f"bytes={len(data) + 30}-", None]
    assert (tmp_path / name).read_bytes() == data


def test_existing_destination_is_returned_without_network(server, tmp_path):
    (tmp_path / "data.zip").write_bytes(b"already here")
    assert download(server.url("data.zip"), tmp_path / "data.zip", progress=False) == tmp_path / "data.zip"
    assert server.state.requests == []


def test_http_error_is_a_one_line_download_error(server, tmp_path):
    with pytest.raises(DownloadError, match="404") as error:
        download(server.url("missing.zip"), tmp_path / "missing.zip", progress=False)
    assert "\n" not in str(error.value)


def test_corrupted_archive_raises_extracts_nothing_and_is_renamed_corrupt(server, tmp_path):
    name, data = "data.tar.gz", ARCHIVES["data.tar.gz"]
    expected = hashlib.md5(b"some other bytes").hexdigest()
    actual = hashlib.md5(data).hexdigest()
    archive = archive_for(server, name, "md5", checksum=expected)
    with pytest.raises(ChecksumError) as error:
        fetch(archive, tmp_path / "downloads", tmp_path / "data", progress=False)
    message = str(error.value)
    assert name in message and expected in message and actual in message and ".corrupt" in message
    assert "\n" not in message
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())
    assert not (tmp_path / "downloads" / name).exists()
    assert (tmp_path / "downloads" / f"{name}.corrupt").read_bytes() == data

    # With the right checksum the next run downloads afresh and succeeds.
    fetch(archive_for(server, name, "md5"), tmp_path / "downloads", tmp_path / "data", progress=False)
    assert len(server.state.requests) == 2 and server.state.requests[-1][1] is None
    assert_extracted(tmp_path / "data")


def test_verify_accepts_an_archive_or_a_bare_checksum(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"payload")
    verify(path, hashlib.sha1(b"payload").hexdigest(), "sha1")
    verify(path, Archive("file.bin", "http://x/file.bin", hashlib.md5(b"payload").hexdigest(), "md5", "test"))
    with pytest.raises(ChecksumError, match=r"file\.bin.*delete") as error:
        verify(path, hashlib.sha256(b"other").hexdigest(), "sha256")
    assert error.value.actual == hashlib.sha256(b"payload").hexdigest()
    assert error.value.expected == hashlib.sha256(b"other").hexdigest()


@pytest.mark.parametrize("algorithm", ["md5", "sha1", "sha256"])
def test_file_checksum_matches_hashlib(tmp_path, algorithm):
    data = os.urandom(10_000)
    path = tmp_path / "file.bin"
    path.write_bytes(data)
    assert file_checksum(path, algorithm, chunk_size=999) == hashlib.new(algorithm, data).hexdigest()
    assert file_checksum(path, algorithm) == hashlib.new(algorithm, data).hexdigest()


def test_file_checksum_rejects_an_unknown_algorithm(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(ValueError, match="crc32"):
        file_checksum(tmp_path / "f", "crc32")


def evil_tar(tmp_path, names):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as archive:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 4
            archive.addfile(info, io.BytesIO(b"evil"))
    return path


@pytest.mark.parametrize("names", [["good.txt", "../evil"], ["good.txt", "sub/../../evil"], ["/tmp/evil"]])
def test_tar_escaping_destination_is_rejected_before_anything_is_written(tmp_path, names):
    archive = evil_tar(tmp_path, names)
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(UnsafeArchiveError, match="evil"):
        extract(archive, root / "out", progress=False)
    assert list(root.iterdir()) == []  # neither the destination, nor a staging directory, nor ../evil
    assert not (tmp_path / "evil").exists()


def test_tar_symlink_pointing_outside_is_rejected(tmp_path):
    path = tmp_path / "link.tar"
    with tarfile.open(path, "w") as archive:
        info = tarfile.TarInfo("dataset/link")
        info.type, info.linkname = tarfile.SYMTYPE, "../../outside"
        archive.addfile(info)
    with pytest.raises(UnsafeArchiveError):
        extract(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_zip_escaping_destination_is_rejected(tmp_path):
    path = tmp_path / "evil.zip"
    path.write_bytes(zip_bytes({"good.txt": b"good", "../evil": b"evil"}))
    with pytest.raises(UnsafeArchiveError):
        extract(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil").exists()


def test_failed_extraction_leaves_nothing_half_written(tmp_path):
    path = tmp_path / "truncated.tar"
    path.write_bytes(tar_gz_bytes(CONTENTS, mode="w")[:20_000])  # uncompressed tar  # a.txt whole, b.bin cut in the middle
    with pytest.raises((tarfile.TarError, EOFError, OSError)):
        extract(path, tmp_path / "out", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["truncated.tar"]


def test_extract_merges_archives_sharing_a_top_directory_and_skips_when_marked(tmp_path):
    first, second = tmp_path / "first.tar.gz", tmp_path / "second.zip"
    first.write_bytes(tar_gz_bytes({"devkit/one.txt": b"1"}))
    second.write_bytes(zip_bytes({"devkit/two.txt": b"2"}))
    out = tmp_path / "out"
    extract(first, out, progress=False)
    extract(second, out, progress=False)
    assert (out / "devkit" / "one.txt").read_bytes() == b"1" and (out / "devkit" / "two.txt").read_bytes() == b"2"
    (out / "devkit" / "one.txt").write_bytes(b"edited")
    extract(first, out, progress=False)  # marker present: nothing re-extracted
    assert (out / "devkit" / "one.txt").read_bytes() == b"edited"


def test_archive_without_checksum_is_refused_unless_allowed(server, tmp_path):
    archive = archive_for(server, "data.zip", checksum="")
    with pytest.raises(UnverifiedArchiveError, match="allow_unverified"):
        fetch(archive, tmp_path / "downloads", tmp_path / "data", progress=False)
    assert server.state.requests == [] and not (tmp_path / "downloads").exists()
    fetch(archive, tmp_path / "downloads", tmp_path / "data", allow_unverified=True, progress=False)
    assert_extracted(tmp_path / "data")


@pytest.mark.parametrize("key", sorted(OFFICIAL_ARCHIVES))
def test_official_archive_entries_are_well_formed(key, server, tmp_path):
    archive = OFFICIAL_ARCHIVES[key]
    assert re.match(r"https?://[^/]+/", archive.url)
    assert archive.url.rsplit("/", 1)[1] == archive.name
    assert archive.algorithm in ALGORITHMS and archive.source
    if archive.checksum:
        assert re.fullmatch(f"[0-9a-f]{{{ALGORITHMS[archive.algorithm]}}}", archive.checksum)
    else:  # no published checksum: refused, before any request (pointed at the local server to be sure)
        local = dataclasses.replace(archive, url=server.url(archive.name))
        with pytest.raises(UnverifiedArchiveError, match=re.escape(archive.name)):
            fetch(local, tmp_path / "downloads", tmp_path / "data", progress=False)
        assert server.state.requests == []


def test_hex_digest_lengths_are_those_of_hashlib():
    assert ALGORITHMS == {name: len(hashlib.new(name).hexdigest()) for name in ALGORITHMS}


def test_fetch_file_keeps_a_verified_copy_refetches_a_corrupt_one_and_refuses_a_bad_download(server, tmp_path):
    from datamodules.download import fetch_file

    data = b"official split file\n" * 50
    server.state.files["/lists.pkl"] = data
    good = Archive("lists.pkl", server.url("lists.pkl"), hashlib.sha256(data).hexdigest(), "sha256", "test")
    path = fetch_file(good, tmp_path)
    assert path.read_bytes() == data and len(server.state.requests) == 1
    assert fetch_file(good, tmp_path) == path and len(server.state.requests) == 1   # verified copy: no request
    path.write_bytes(b"damaged")
    assert fetch_file(good, tmp_path).read_bytes() == data and len(server.state.requests) == 2
    assert (tmp_path / "lists.pkl.corrupt").read_bytes() == b"damaged"
    bad = dataclasses.replace(good, name="other.pkl", url=server.url("lists.pkl"), checksum="0" * 64)
    with pytest.raises(ChecksumError, match="expected 0{64}.*renamed to other.pkl.corrupt"):
        fetch_file(bad, tmp_path)
    assert not (tmp_path / "other.pkl").exists() and (tmp_path / "other.pkl.corrupt").read_bytes() == data
