"""`make data` end to end against a local HTTP server: official-looking archives of miniature
datasets are downloaded, verified, extracted and prepared, and the experiments can read them."""
import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from datamodules import prepare
from datamodules.datasets import DatasetMissing, locate
from datamodules.download import Archive
from datamodules.incremental import IncrementalSegmentationDataModule
from tests.fake_datasets import make_ade_tree, make_voc_sbd_tree
from tests.test_download import server  # noqa: F401  (the local HTTP server fixture)


def tar_of(directory: Path, top: str, compression: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}") as archive:
        archive.add(directory / top, arcname=top)
    return buffer.getvalue()


def zip_of(directory: Path, *tops: str) -> bytes:
    import zipfile
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in sorted(p for top in tops for p in (directory / top).rglob("*")):
            archive.write(path, path.relative_to(directory).as_posix())
    return buffer.getvalue()


def serve(server, name: str, data: bytes, checksum: str | None = None) -> Archive:  # noqa: F811
    server.state.files[f"/{name}"] = data
    return Archive(name=name, url=server.url(name), checksum=checksum or hashlib.md5(data).hexdigest(),
                   algorithm="md5", source="test")


@pytest.fixture
def voc_archives(server, tmp_path):  # noqa: F811
    """The fake VOC 2012 tar and SBD tgz, served locally, and the tree they were made from."""
    staging = tmp_path / "staging"
    fake = make_voc_sbd_tree(staging, seed=3)
    archives = {"voc2012": serve(server, "VOCtrainval_11-May-2012.tar", tar_of(staging, "VOCdevkit")),
                "sbd": serve(server, "benchmark.tgz", tar_of(staging, "benchmark_RELEASE", "gz"))}
    return archives, fake


def official_fewshot_files(server, monkeypatch, dataset: str, train_ids: list[str], classes_of) -> dict[int, list[str]]:  # noqa: F811
    """PIFS's two official split files of `dataset` ("voc" | "coco") for a fake tree, served locally
    and pinned in place of the real ones: the official training list in reverse file order (VOC's
    train_ids.npy, COCO's train.txt) and per-class lists (indices into it) in an order of their own.
    classes_of(image_id): the image's classes. Returns each class's image ids in the official order."""
    import pickle

    from datamodules import download
    from datamodules.fewshot import OFFICIAL_LISTS

    official_ids = list(train_ids)[::-1]
    lists = {c: [i for i in range(len(official_ids)) if c in classes_of(official_ids[i])] for c in range(92)}
    lists = {c: v[1::2] + v[0::2] for c, v in lists.items()}   # odd positions first: in no file order
    ids_key, lists_key = OFFICIAL_LISTS[dataset]
    if dataset == "voc":
        buffer = io.BytesIO()
        np.save(buffer, np.array(official_ids))
        ids_bytes = buffer.getvalue()
    else:
        ids_bytes = ("\n".join(official_ids) + "\n").encode()
    for key, data in ((ids_key, ids_bytes), (lists_key, pickle.dumps({c: np.array(v) for c, v in lists.items()}))):
        name = download.OFFICIAL_FILES[key].name
        server.state.files[f"/{name}"] = data
        monkeypatch.setitem(download.OFFICIAL_FILES, key, Archive(name=name, url=server.url(name), source="test",
                                                                  checksum=hashlib.sha256(data).hexdigest(),
                                                                  algorithm="sha256"))
    return {c: [official_ids[i] for i in v] for c, v in lists.items()}


def test_make_data_voc_downloads_verifies_converts_and_checks(voc_archives, server, tmp_path, monkeypatch):  # noqa: F811
    archives, fake = voc_archives
    train_aug = sorted((set(fake.sbd_train) | set(fake.sbd_val) | set(fake.voc_train)) - set(fake.voc_val)
                       - fake.without_voc_image)
    official = official_fewshot_files(server, monkeypatch, "voc", train_aug, lambda image_id: fake.classes[image_id])
    options = {"expected_counts": {"train_aug": len(train_aug), "val": len(fake.voc_val)}}
    root = tmp_path / "data"
    prepare.prepare_voc(root, archives=archives, options=options, progress=False)
    voc_root = root / "VOCdevkit" / "VOC2012"
    assert (voc_root / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split() == train_aug
    assert list((voc_root / ".presence").glob("train-*.npz")) and list((voc_root / ".presence").glob("test-*.npz"))
    assert {path for path, _ in server.state.requests} == {"/VOCtrainval_11-May-2012.tar", "/benchmark.tgz",
                                                           "/train_ids.npy", "/inverse_dict_train.pkl"}
    # A second run needs no network and changes nothing.
    server.state.requests.clear()
    prepare.prepare_voc(root, archives=archives, options=options, progress=False)
    assert server.state.requests == []
    # The experiments read what was prepared.
    module = IncrementalSegmentationDataModule(dataset="voc", data_root=root, task="10-10", mode="overlap", step=0,
                                               crop_size=32, num_workers=0, dataset_options=options)
    module.setup()
    expected = [i for i, image_id in enumerate(train_aug) if fake.classes[image_id] & set(range(1, 11))]
    assert module.train_indices.tolist() == expected
    # The few-shot draws from the official lists: image ishot*20 + k of each novel class's official
    # list (here ishot 0, 2 shots), not the first images in file order.
    draws = {}
    for class_lists in ("official", "file_order"):
        shots = IncrementalSegmentationDataModule(dataset="voc", data_root=root, task="fss-5-0", mode="disjoint", step=1,
                                                  crop_size=32, num_workers=0, dataset_options=options,
                                                  fewshot={"nshot": 2, "ishot": 0, "class_lists": class_lists})
        shots.setup()
        drawn = draws[class_lists] = [train_aug[row] for row in shots.train_indices]
        if class_lists == "official":
            assert drawn == [image_id for c in range(1, 6) for image_id in official[c][:2]]
        else:
            assert drawn == [image_id for c in range(1, 6) for image_id in
                             [i for i in train_aug if c in fake.classes[i]][:2]]
    assert draws["official"] != draws["file_order"]


def test_make_data_refuses_a_corrupt_archive_and_extracts_nothing(voc_archives, tmp_path, capsys):
    archives, _ = voc_archives
    archives["voc2012"] = Archive(**{**archives["voc2012"].__dict__, "checksum": "0" * 32})
    root = tmp_path / "data"
    with pytest.raises(Exception, match="expected 0{32}.*renamed to VOCtrainval_11-May-2012.tar.corrupt"):
        prepare.prepare_voc(root, archives=archives, progress=False)
    assert not (root / "VOCdevkit").exists()
    assert (root / "downloads" / "VOCtrainval_11-May-2012.tar.corrupt").exists()


def test_count_check_names_the_difference(voc_archives, tmp_path):
    archives, _ = voc_archives
    with pytest.raises(DatasetMissing, match="train_aug.*10,?582|10,?582.*train_aug"):
        prepare.prepare_voc(tmp_path / "data", archives=archives, progress=False)  # real counts expected


def test_make_data_ade20k(server, tmp_path):  # noqa: F811
    staging = tmp_path / "staging"
    fake = make_ade_tree(staging, n_train=12, n_val=5, seed=1)
    archives = {"ade20k": serve(server, "ADEChallengeData2016.zip", zip_of(staging, "ADEChallengeData2016"))}
    options = {"expected_counts": {"train": 12, "val": 5}}
    counts = prepare.prepare_ade20k(tmp_path / "data", archives=archives, options=options, progress=False)
    assert counts == {"train": 12, "val": 5}
    located = locate("ade", tmp_path / "data", options)
    assert [p.stem for p in located.train.images] == sorted(fake.train)


def _coco_archives(server, staging: Path, corrupt_maps: bool = False) -> dict:  # noqa: F811
    maps = zip_of(staging / "coco" / "stuffthingmaps_trainval2017", "train2017", "val2017")  # as the real zip
    # The COCO-Stuff zip has no published checksum: a flipped byte inside a member must be caught
    # by the members' CRCs. Stored (uncompressed) members make the byte easy to find.
    if corrupt_maps:
        position = maps.index(b"IDAT") + 8
        maps = maps[:position] + bytes([maps[position] ^ 0xFF]) + maps[position + 1:]
    archives = {"coco_train2017": serve(server, "train2017.zip", zip_of(staging / "coco" / "images", "train2017")),
                "coco_val2017": serve(server, "val2017.zip", zip_of(staging / "coco" / "images", "val2017")),
}
    server.state.files["/stuffthingmaps_trainval2017.zip"] = maps
    archives["cocostuff_stuffthingmaps"] = Archive("stuffthingmaps_trainval2017.zip",
                                                   server.url("stuffthingmaps_trainval2017.zip"), "", "sha256", "none")
    return archives


def test_make_data_coco(server, tmp_path, monkeypatch):  # noqa: F811
    from tests.fake_coco import make_coco_voc_tree
    staging, root = tmp_path / "staging", tmp_path / "data"
    truth = make_coco_voc_tree(staging, n_coco_train=8, n_coco_val=3, n_voc_train=4, n_voc_val=2)
    shutil.copytree(staging / "VOCdevkit", root / "VOCdevkit")  # VOC prepared first
    coco_ids = sorted(truth["coco_train"])
    official = official_fewshot_files(server, monkeypatch, "coco", coco_ids,
                                      lambda image_id: {t + 1 for t in truth["coco_train"][image_id]["things"]})
    options = {"check_counts": False}
    counts = prepare.prepare_coco(root, archives=_coco_archives(server, staging), options=options, progress=False)
    assert (counts["coco_train"], counts["coco_val"], counts["voc_train"]) == (8, 3, 4)
    located = locate("coco-voc", root, options)
    assert located.train_source == ("coco",) * 8 + ("voc",) * 4
    assert sorted(p.stem for p in located.test.images) == sorted(truth["coco_val"])
    # COCO alone (PIFS's COCO-20i): COCO train2017 / val2017 with its 80 categories, and the official lists.
    alone = locate("coco", root, options)
    assert alone.train.ids == coco_ids and sorted(alone.test.ids) == sorted(truth["coco_val"])
    from datamodules import fewshot
    rows = fewshot.load_official_class_lists("coco", root, alone.train.ids)
    assert {c: [coco_ids[r] for r in v] for c, v in rows.items() if v} == {c: v for c, v in official.items() if v and c}
    base = IncrementalSegmentationDataModule(dataset="coco", data_root=root, task="fss-20-0", mode="disjoint", step=0,
                                             crop_size=32, num_workers=0, dataset_options=options,
                                             fewshot={"nshot": 1, "ishot": 0})
    base.setup()
    novel = set(fewshot.coco_fold(0)[1])
    assert [coco_ids[r] for r in base.train_indices] == [
        i for i in coco_ids if not {t + 1 for t in truth["coco_train"][i]["things"]} & novel]


def test_make_data_coco_refuses_a_maps_zip_with_a_bad_crc(server, tmp_path):  # noqa: F811
    from tests.fake_coco import make_coco_voc_tree
    staging, root = tmp_path / "staging", tmp_path / "data"
    make_coco_voc_tree(staging, n_coco_train=4, n_coco_val=2, n_voc_train=2, n_voc_val=2)
    shutil.copytree(staging / "VOCdevkit", root / "VOCdevkit")
    with pytest.raises(Exception, match="CRC check.*nothing was extracted"):
        prepare.prepare_coco(root, archives=_coco_archives(server, staging, corrupt_maps=True),
                             options={"check_counts": False}, progress=False)
    assert not (root / "coco" / "stuffthingmaps_trainval2017").exists()
    assert (root / "downloads" / "stuffthingmaps_trainval2017.zip.corrupt").exists()


def test_command_line_gives_one_line_errors(tmp_path, capsys, monkeypatch):
    def missing(*args, **kwargs):
        raise DatasetMissing("VOC is not there (missing: JPEGImages)")
    monkeypatch.setitem(prepare.PREPARERS, "voc", missing)
    assert prepare.main(["voc", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "error:" in out and "missing: JPEGImages" in out and "Traceback" not in out


def test_coco_needs_voc_first(tmp_path):
    with pytest.raises(DatasetMissing, match="make data DATASET=voc"):
        prepare.prepare_coco(tmp_path, archives={}, progress=False)


def test_ade_partition_files_replace_the_overlap_rule(tmp_path):
    """A user-given partition (one .npy per step): each step trains on exactly its rows."""
    fake = make_ade_tree(tmp_path, n_train=20, n_val=4, seed=2)
    rows = np.random.default_rng(0).permutation(20)
    files = []
    for step, part in enumerate((rows[:9], rows[9:])):
        files.append(str(tmp_path / f"train-{step}.npy"))
        np.save(files[-1], part)
    options = {"check_counts": False, "partition": files}
    for step, part in enumerate((rows[:9], rows[9:])):
        module = IncrementalSegmentationDataModule(dataset="ade", data_root=tmp_path, task="100-50", mode="overlap",
                                                   step=step, crop_size=32, num_workers=0, dataset_options=options)
        module.setup()
        assert module.train_indices.tolist() == sorted(part.tolist())
    joint = IncrementalSegmentationDataModule(dataset="ade", data_root=tmp_path, task="100-50", mode="overlap", step=1,
                                              training_images="cumulative", crop_size=32, num_workers=0,
                                              dataset_options=options)
    joint.setup()
    assert joint.train_indices.tolist() == list(range(20))
    assert len(fake.train) == 20


def test_bad_partitions_are_refused(tmp_path):
    make_ade_tree(tmp_path, n_train=10, n_val=2, seed=2)
    np.save(tmp_path / "a.npy", np.array([0, 1, 2]))
    np.save(tmp_path / "b.npy", np.array([2, 3]))
    np.save(tmp_path / "far.npy", np.array([3, 99]))
    with pytest.raises(ValueError, match="share rows"):
        locate("ade", tmp_path, {"check_counts": False, "partition": [str(tmp_path / "a.npy"), str(tmp_path / "b.npy")]})
    with pytest.raises(ValueError, match="outside 0..9"):
        locate("ade", tmp_path, {"check_counts": False, "partition": [str(tmp_path / "far.npy")]})
    with pytest.raises(DatasetMissing, match="nothere.npy does not exist"):
        locate("ade", tmp_path, {"check_counts": False, "partition": [str(tmp_path / "nothere.npy")]})
