"""The file check before training: each broken file is named with its problem, in one line, and a
passed split is not decoded again until one of its files changes."""
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from datamodules import validate
from datamodules.datasets import locate
from datamodules.datasets.voc import SplitFiles, save_mask
from datamodules.validate import DatasetFileError, check_dataset, check_pair, check_split, split_problems
from tests.conftest import write_voc_tree

HEIGHT, WIDTH = 10, 12


def sample(seed: int, classes=(0, 5, 20, 255)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    mask = rng.choice(np.array(classes, np.uint8), size=(HEIGHT, WIDTH))
    mask[0, : len(classes)] = classes  # every listed id occurs
    return image, mask


def voc_tree(root: Path, train: int = 4, val: int = 3) -> Path:
    """A tiny VOC 2012 (+SBD) directory: train_aug in SegmentationClassAug, val in SegmentationClass."""
    voc = root / "VOCdevkit" / "VOC2012"
    train_samples = {f"t{i:03d}": sample(i) for i in range(train)}
    val_samples = {f"v{i:03d}": sample(100 + i) for i in range(val)}
    write_voc_tree(voc, train_samples, {"train_aug.txt": list(train_samples)}, mask_dir="SegmentationClassAug")
    write_voc_tree(voc, val_samples, {"val.txt": list(val_samples)}, mask_dir="SegmentationClass")
    return voc


def located_voc(root: Path, **sizes):
    voc_tree(root, **sizes)
    return locate("voc", root, {"check_counts": False})


def write_pair(directory: Path, name: str, image: np.ndarray, mask: np.ndarray) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    image_path, mask_path = directory / f"{name}.jpg", directory / f"{name}.png"
    Image.fromarray(image).save(image_path, quality=95)
    save_mask(mask_path, mask)
    return image_path, mask_path


def message(error_info) -> str:
    text = str(error_info.value)
    assert "\n" not in text
    return text


# --- one pair ----------------------------------------------------------------------------------
def test_a_valid_pair_with_void_passes_and_a_mask_alone_may_be_skipped(tmp_path):
    image, mask = write_pair(tmp_path, "a", *sample(0, classes=(0, 1, 20, 255)))
    check_pair(image, mask, 20)
    check_pair(image, None, 20)


def test_a_class_id_above_the_datasets_classes_names_the_mask_and_the_ids(tmp_path):
    picture, labels = sample(1)
    labels[2, :3] = [23, 40, 255]
    image, mask = write_pair(tmp_path, "b", picture, labels)
    with pytest.raises(DatasetFileError) as error:
        check_pair(image, mask, 20)
    assert message(error) == f"{mask}: class ids [23, 40] outside 0-20 (and 255 = void)"
    check_pair(image, mask, 150)  # the same mask is valid for ADE's 150 classes


def test_a_truncated_jpeg_names_the_image(tmp_path):
    image, mask = write_pair(tmp_path, "c", *sample(2))
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetFileError) as error:
        check_pair(image, mask, 20)
    assert message(error).startswith(f"{image}: cannot read image (")
    assert "truncated" in message(error).lower()


def test_a_jpeg_missing_its_last_bytes_fails_even_where_pil_is_told_to_accept_truncated_files(tmp_path, monkeypatch):
    # Cut only the tail: the header is intact, so only the full decode can notice, and only when
    # PIL's LOAD_TRUNCATED_IMAGES is off (it would pad the picture with grey otherwise).
    image, mask = write_pair(tmp_path, "d", *sample(3))
    image.write_bytes(image.read_bytes()[:-10])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DatasetFileError) as error:
        check_pair(image, mask, 20)
    assert message(error).startswith(f"{image}: cannot read image (image file is truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_a_file_that_is_not_an_image_names_the_image(tmp_path):
    image, mask = write_pair(tmp_path, "e", *sample(4))
    image.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    with pytest.raises(DatasetFileError) as error:
        check_pair(image, mask, 20)
    assert message(error).startswith(f"{image}: cannot read image (cannot identify image file")


def test_a_mask_of_another_size_than_its_image_names_both(tmp_path):
    picture, _ = sample(5)
    image, mask = write_pair(tmp_path, "f", picture, np.zeros((WIDTH, HEIGHT), np.uint8))
    with pytest.raises(DatasetFileError) as error:
        check_pair(image, mask, 20)
    assert message(error) == f"{mask}: mask is {WIDTH}x{HEIGHT}, its image {image} is {HEIGHT}x{WIDTH}"


def test_an_rgb_mask_or_a_missing_file_is_named(tmp_path):
    image, mask = write_pair(tmp_path, "g", *sample(6))
    Image.new("RGB", (WIDTH, HEIGHT)).save(mask)
    with pytest.raises(DatasetFileError) as error:
        check_pair(image, mask, 20)
    assert message(error) == f"{mask}: cannot read mask (a mask must be a palette or greyscale PNG, not mode RGB)"
    image.unlink()
    with pytest.raises(DatasetFileError) as error:
        check_pair(image, mask, 20)
    assert message(error) == f"{image}: image file is missing"


# --- a split -----------------------------------------------------------------------------------
def broken_split(directory: Path, count: int) -> tuple[SplitFiles, list[str]]:
    """`count` pairs, every third one with a stray class id; returns the files and their problems."""
    pairs, expected = [], []
    for i in range(count):
        picture, labels = sample(10 + i)
        if i % 3 == 1:
            labels[1, 1] = 21 + i
        image, mask = write_pair(directory, f"p{i:02d}", picture, labels)
        pairs.append((image, mask))
        if i % 3 == 1:
            expected.append(f"{mask}: class ids [{21 + i}] outside 0-20 (and 255 = void)")
    return SplitFiles([p[0].stem for p in pairs], [p[0] for p in pairs], [p[1] for p in pairs]), expected


def test_a_split_reports_its_first_problem_and_counts_the_others_in_one_line(tmp_path):
    files, expected = broken_split(tmp_path, 14)  # problems at pairs 1, 4, 7, 10, 13
    with pytest.raises(DatasetFileError) as error:
        check_split(files, 20)
    assert message(error) == (f"{expected[0]} (and 4 more problems; first ones: "
                               f"{expected[1]}; {expected[2]}; {expected[3]}; ...)")
    assert error.value.problems == tuple(expected)


def test_a_split_with_two_problems_lists_the_second(tmp_path):
    files, expected = broken_split(tmp_path, 5)  # problems at pairs 1, 4
    with pytest.raises(DatasetFileError) as error:
        check_split(files, 20)
    assert message(error) == f"{expected[0]} (and 1 more problem; first ones: {expected[1]})"


def test_worker_processes_find_the_serial_problems_in_the_same_order(tmp_path):
    files, expected = broken_split(tmp_path, 20)
    serial = split_problems(files, 20, workers=1)
    parallel = split_problems(files, 20, workers=2, chunk_size=3, progress=True)
    assert serial == expected and parallel == expected
    with pytest.raises(DatasetFileError) as error:
        check_split(files, 20, workers=2, chunk_size=3)
    assert message(error).startswith(f"{expected[0]} (and {len(expected) - 1} more problems; ")


# --- a dataset, with its "checked" markers -----------------------------------------------------
def markers(root: Path) -> list[str]:
    return sorted(p.name for p in (root / ".presence").iterdir()) if (root / ".presence").is_dir() else []


def test_a_clean_dataset_passes_once_then_is_not_decoded_again(tmp_path, monkeypatch):
    located = located_voc(tmp_path)
    check_dataset(located, 20)
    names = markers(located.root)
    assert len(names) == 2 and names[0].startswith("checked-test-") and names[1].startswith("checked-train-")
    assert all(name.endswith(".ok") for name in names)  # no temporary file left behind

    def no_decoding(*args, **kwargs):
        raise AssertionError("a checked split was decoded again")

    monkeypatch.setattr(validate, "check_pair", no_decoding)
    monkeypatch.setattr(validate, "_pair_problems", no_decoding)
    check_dataset(located, 20)
    with pytest.raises(AssertionError, match="decoded again"):  # the patch does bite where a check runs
        check_dataset(located, 150)


def test_rewriting_a_file_makes_the_check_run_again(tmp_path):
    located = located_voc(tmp_path)
    check_dataset(located, 20)
    mask = located.train.masks[2]
    before = os.stat(mask)
    _, labels = sample(2)
    labels[:, :] = 23  # a constant mask compresses to fewer bytes: the size changes too
    save_mask(mask, labels)
    assert os.stat(mask).st_size != before.st_size
    os.utime(mask, ns=(before.st_atime_ns, before.st_mtime_ns))  # only the size tells
    with pytest.raises(DatasetFileError) as error:
        check_dataset(located, 20)
    assert message(error) == f"{mask}: class ids [23] outside 0-20 (and 255 = void)"
    assert len(markers(located.root)) == 2  # the failed split wrote no marker


def test_a_touched_file_of_the_same_size_is_checked_again(tmp_path):
    located = located_voc(tmp_path)
    check_dataset(located, 20)
    image = located.test.images[1]
    size = os.stat(image).st_size
    image.write_bytes(bytes(size))  # same size, no longer an image, newer mtime
    stat = os.stat(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert stat.st_size == size
    with pytest.raises(DatasetFileError) as error:
        check_dataset(located, 20)
    assert message(error).startswith(f"{image}: cannot read image (cannot identify image file")


def test_a_missing_file_is_named_before_anything_is_decoded(tmp_path):
    located = located_voc(tmp_path)
    located.train.images[3].unlink()
    with pytest.raises(DatasetFileError) as error:
        check_dataset(located, 20)
    assert message(error) == f"{located.train.images[3]}: file is missing"
    assert markers(located.root) == []
