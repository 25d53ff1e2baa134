"""Every experiment file in experiments/ loads, resolves, and runs: a smoke pass of a few batches
per step on generated data in its dataset's real layout, so that no experiment file can rot.

Two checks per file, both in the default tier (~1 min for all files on 2 cores): its
configuration, methods, task, dataset layout and the images of every step; then every method of
the file end to end, one epoch of two batches per step.
"""
import copy
import json

import numpy as np
import pytest
from PIL import Image

from datamodules.datasets import coco as coco_dataset
from datamodules.incremental import IncrementalSegmentationDataModule
from datamodules.tasks import NUM_FOREGROUND, task_classes
from experiments import run, table
from experiments.config import apply_overrides, experiment_names, load_experiment, resolve
from experiments.store import run_directory
from lightning_modules.methods import METHODS, build_method
from lightning_modules.methods.recall import RECALL
from lightning_modules.methods.weak_baseline import WeakBaseline
from tests.conftest import TINY_SEGMENTER, tiny_weak_baseline, write_voc_tree
from tests.fake_coco import make_coco_voc_tree

SIZE = 32


def _single_class_sample(rng, cls: int) -> tuple[np.ndarray, np.ndarray]:
    """A random image whose mask holds one object of class `cls` (with a void border) on class 0."""
    image = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    top, left = rng.integers(2, 12, size=2)
    mask[top - 1:top + 15, left - 1:left + 15] = 255
    mask[top:top + 14, left:left + 14] = cls
    return image, mask


def make_voc_coverage_tree(data_root):
    """A prepared VOC tree (SegmentationClassAug + train_aug.txt, val.txt) in which every class has
    images of its own, so every step of every VOC task has training and test images."""
    rng = np.random.default_rng(0)
    voc = data_root / "VOCdevkit" / "VOC2012"
    train = {f"2007_{cls:04d}{k}": _single_class_sample(rng, cls) for cls in range(1, 21) for k in range(2)}
    val = {f"2008_{cls:04d}0": _single_class_sample(rng, cls) for cls in range(1, 21)}
    write_voc_tree(voc, train, {"train_aug.txt": list(train)}, mask_dir="SegmentationClassAug")
    write_voc_tree(voc, val, {"val.txt": list(val)}, mask_dir="SegmentationClass")


def make_coco_coverage_tree(data_root):
    """COCO prepared for `dataset: coco` (the COCO half of `make data DATASET=coco`: images, masks in
    COCO ids, the two-path lists) with one training and one validation image per used category,
    and two training images of background alone."""
    from datamodules.datasets.coco import COCO_UNUSED_IDS
    from datamodules.datasets.voc import save_mask

    rng = np.random.default_rng(0)
    coco = data_root / "coco"
    used = [c for c in range(1, 91) if c not in COCO_UNUSED_IDS]
    for split, samples in (("train2017", {f"{c:09d}1": c for c in used} | {"000000000010": 0, "000000000020": 0}),
                           ("val2017", {f"{c:09d}2": c for c in used})):
        (coco / "images" / split).mkdir(parents=True)
        (coco / "annotations_coco_voc" / split).mkdir(parents=True)
        for image_id, cls in samples.items():
            image, mask = _single_class_sample(rng, cls)
            Image.fromarray(image).save(coco / "images" / split / f"{image_id}.jpg")
            save_mask(coco / "annotations_coco_voc" / split / f"{image_id}.png", mask)
        lists = coco / "ImageSets" / "Segmentation"
        lists.mkdir(parents=True, exist_ok=True)
        (lists / f"{split}.txt").write_text("".join(f"/images/{split}/{i}.jpg /annotations_coco_voc/{split}/{i}.png\n"
                                                    for i in sorted(samples)))


def make_ade_coverage_tree(data_root):
    """ADEChallengeData2016 in miniature: two training images and one validation image per class
    (greyscale annotations, 0 = unlabeled, no void)."""
    rng = np.random.default_rng(0)
    ade = data_root / "ADEChallengeData2016"
    for split, directory, per_class in (("train", "training", 2), ("val", "validation", 1)):
        (ade / "images" / directory).mkdir(parents=True)
        (ade / "annotations" / directory).mkdir(parents=True)
        for cls in range(1, 151):
            for k in range(per_class):
                image, mask = _single_class_sample(rng, cls)
                mask[mask == 255] = 0
                name = f"ADE_{split}_{cls * 10 + k:08d}"
                Image.fromarray(image).save(ade / "images" / directory / f"{name}.jpg")
                Image.fromarray(mask, mode="L").save(ade / "annotations" / directory / f"{name}.png")


def make_replay_pool(pool, dataset: str, per_class: int = 2):
    """RECALL's replay pool in its layout (<pool>/<class name>/*.jpg), random images."""
    from datamodules.datasets import class_names
    from datamodules.replay_pool import class_directory

    rng = np.random.default_rng(1)
    for cls, name in class_names(dataset).items():
        if cls == 0:
            continue
        class_directory(pool, name).mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(class_directory(pool, name) / f"{k}.jpg")


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory):
    """One generated data root per dataset of the experiment files."""
    roots = {"synthetic": tmp_path_factory.mktemp("synthetic")}
    roots["voc"] = tmp_path_factory.mktemp("voc")
    make_voc_coverage_tree(roots["voc"])
    make_replay_pool(roots["voc"] / "recall_pool" / "voc", "voc")
    roots["ade"] = tmp_path_factory.mktemp("ade")
    make_ade_coverage_tree(roots["ade"])
    roots["coco-voc"] = tmp_path_factory.mktemp("coco")
    make_coco_voc_tree(roots["coco-voc"], n_coco_train=16, n_coco_val=6, n_voc_train=8, n_voc_val=4)
    coco_dataset.prepare_coco_voc(roots["coco-voc"], progress=False, workers=1)
    roots["coco"] = tmp_path_factory.mktemp("coco80")
    make_coco_coverage_tree(roots["coco"])
    return roots


def smoke_config(name: str, data_root, tmp_path, every_method: bool = False):
    """Experiment `name` shrunk to seconds: its data, task, mode, methods and their settings, on
    the generated tree, with a tiny network and one epoch of at most two batches per step. The
    costly methods a file only inherits are left out unless `every_method`."""
    config = load_experiment(name)
    config = copy.deepcopy(config)
    data = config["data"]
    data.update(root=str(data_root), crop_size=SIZE, batch_size=4, test_batch_size=8, num_workers=0)
    data["options"] = dict(data.get("options") or {})
    if data.get("fewshot"):   # one shot per novel class: every generated tree has that many
        data["fewshot"] = {**data["fewshot"], "nshot": 1, "ishot": 0}
    if data["dataset"] == "synthetic":
        data["options"]["synthetic"] = {"train": 48, "val": 16, "size": 40, "seed": 0}
    else:
        data["options"]["check_counts"] = False  # the real counts are checked in the dataset tests
    config["network"] = {"arch": "deeplabv3", "encoder": "tu-resnet10t", "encoder_depth": 3, "output_stride": 8,
                         "atrous_rates": [2, 4, 6], "decoder_channels": 16, "aspp_dropout": 0.0,
                         "encoder_weights": None}
    config["schedule"] = {"step0": {"epochs": 1, "lr": 0.01}, "incremental": {"epochs": 1, "lr": 0.001}}
    # The image-label baselines and MBS (its own network) run where the file reports them or defines
    # them; the files that only inherit them run the same entries on other tasks: skipped there to
    # keep the tier short (they run on the tasks of the files that keep them).
    reported = set(((config.get("expected") or {}).get("methods") or {}))
    inherited = set(load_experiment(config["based_on"]).get("methods") or {}) if config.get("based_on") else set()
    for name, entry in list((config.get("methods") or {}).items()):
        costly = name in METHODS and (issubclass(METHODS[name], WeakBaseline) or _network_kind(name, entry) == "segmenter")
        if costly and name in inherited - reported and not every_method:
            del config["methods"][name]
    for name, entry in (config.get("methods") or {}).items():
        if entry and "schedule" in entry:
            entry["schedule"] = {phase: {**schedule, "epochs": 1} for phase, schedule in entry["schedule"].items()}
        if name in METHODS and issubclass(METHODS[name], WeakBaseline):
            config["methods"][name] = {**(entry or {}), **tiny_weak_baseline(METHODS[name], SIZE)}
        if name in METHODS and issubclass(METHODS[name], RECALL):   # the embedded pool rendered small
            config["methods"][name] = {**(config["methods"][name] or {}), "embedded_pool_size": 2}
        if _network_kind(name, entry) == "segmenter":   # MBS's ViT-B/16 (or the embedded ViT) made tiny
            config["methods"][name] = {**(entry or {}), "network": dict(TINY_SEGMENTER)}
    config["trainer"] = {**(config.get("trainer") or {}), "devices": 1, "limit_train_batches": 2,
                         "limit_test_batches": 1, "accelerator": "cpu"}
    config["logger"] = {"wandb": "disabled", "project": "ciss"}
    config["figures"] = {"qualitative_images": 0, "draw": False}  # figures have tests of their own
    config.update(output_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"))
    return resolve(config)


def _network_kind(name: str, entry) -> str:
    """The network kind of a method entry: its own network section, else its method's settings."""
    own = ((entry or {}).get("network") or {}).get("kind")
    settings = (getattr(METHODS.get(name), "settings", {}) or {}).get("network") or {}
    return own or settings.get("kind", "deeplab")


EXPERIMENTS = experiment_names()
# The files of the longest tasks (11 steps) run end to end in the slow tier: their code paths are the
# shorter files' (every method, dataset and protocol is smoked in the default tier), 57 s of it.
LONG_TASK_FILES = {"ade_100_5_overlap", "voc_10_1_disjoint", "voc_10_1_overlap"}


def test_the_suite_has_every_paper_setting():
    expected = {"voc_15_5_disjoint", "voc_15_5_overlap", "voc_15_1_disjoint", "voc_15_1_overlap",
                "voc_10_10_disjoint", "voc_10_10_overlap", "voc_10_1_disjoint", "voc_10_1_overlap",
                "voc_19_1_disjoint", "voc_19_1_overlap", "voc_5_3_disjoint", "voc_5_3_overlap",
                "ade_100_50_overlap", "ade_100_10_overlap", "ade_100_5_overlap", "ade_50_50_overlap", "coco_voc"}
    assert expected <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_file_is_complete_and_every_step_has_data(name, data_roots, tmp_path):
    """The file resolves; its methods accept their settings; its expected numbers name a source and
    a convention; its network builds; and on a tree in its dataset's layout every step of its task
    selects training and test images."""
    original = resolve(load_experiment(name))
    assert original.description
    expected = original.expected
    if expected and expected.get("methods"):
        assert expected["source"] and expected["convention"], f"{name}: expected numbers need a source and convention"
        assert set(expected["methods"]) <= set(original.methods) | {"plop", "sdr", "recall", "mbs"}
    built = set()
    for method in original.methods:  # every method's own network (with its own settings) builds
        config = original.run_config(method)
        instance = build_method(method, **config.hparams)
        key = (type(instance).build_network, json.dumps(config.network.model_dump(), sort_keys=True))
        if key in built:   # the same builder and network section as another method's: built once
            continue
        built.add(key)
        instance.build_network(config.network, [len(task_classes(original.data.dataset, original.data.task)[0])],
                               pretrained=False)
    config = smoke_config(name, data_roots[original.data.dataset], tmp_path)
    steps = run.prepare(config)
    data = config.data
    fewshot = data.fewshot.model_dump() if data.fewshot else None
    for step in range(len(steps)):
        module = IncrementalSegmentationDataModule(
            dataset=data.dataset, data_root=data.root, task=data.task, mode=data.mode, step=step,
            crop_size=SIZE, test_images=data.test_images, num_workers=0, dataset_options=data.options,
            fewshot=fewshot)
        module.setup()
        assert len(module.test_set) >= 1, f"{name} step {step}"
        if fewshot and step > 0:   # the shots: nshot images per novel class
            assert len(module.train_set) == fewshot["nshot"] * len(steps[step]), f"{name} step {step}"
        else:
            assert len(module.train_set) >= 2, f"{name} step {step}"


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in LONG_TASK_FILES else n
                                  for n in EXPERIMENTS])
def test_experiment_file_runs_end_to_end(name, data_roots, tmp_path):
    """Every method of the file through every step (one epoch of two batches each), with results
    written: the run loop, the methods and the data of the file work together."""
    config = smoke_config(name, data_roots[load_experiment(name)["data"]["dataset"]], tmp_path)
    if name in dict(table.PROTOCOL_EXPERIMENTS["synthetic"]).values():
        # The table's methods of these two files run end to end in tests/test_table.py (make table)
        others = [m for m in config.methods if m not in table.TABLE_METHODS]
        config = resolve(apply_overrides(config, [f"methods=[{','.join(others)}]"]))
    if config.data.fewshot is not None and load_experiment(name).get("based_on"):
        # Another fold or the multi-step task of a few-shot file whose methods run end to end in that
        # file: PIFS only (imprinting, batch renormalisation, the teacher) on this file's steps.
        config = resolve(apply_overrides(config, ["methods=[pifs]"]))
    results = run.run_experiment(config)
    steps = task_classes(config.data.dataset, config.data.task)
    assert set(results) == set(config.methods)
    for method, result in results.items():
        assert result["complete"] and len(result["steps"]) == len(steps)
        saved = json.loads((run_directory(config.run_config(method)) / "results.json").read_text())
        assert saved["complete"]
        assert NUM_FOREGROUND[config.data.dataset] >= len(saved["steps"][-1]["iou"]) - 1
        assert len(saved["steps"][-1]["iou"]) == sum(len(s) for s in steps), "one IoU per output channel"
