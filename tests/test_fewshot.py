"""The incremental few-shot protocol (datamodules/fewshot.py) against the official rules of
fcdl94/FSS, on hand-made arrays and a generated file list."""
import numpy as np
import pytest
import torch

from datamodules import fewshot
from datamodules.tasks import task_classes


def test_voc_folds_as_the_official_task_table():
    # fold 2 written out by hand: novel 11-15, base the rest (ascending) behind background
    assert task_classes("voc", "fss-5-2") == [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 16, 17, 18, 19, 20],
                                              [11, 12, 13, 14, 15]]
    assert task_classes("voc", "fss-5-0")[1] == [1, 2, 3, 4, 5]
    assert task_classes("voc", "fss-5-3") == [[0, *range(1, 16)], [16, 17, 18, 19, 20]]   # PIFS's 5-3 = 15-5
    assert task_classes("voc", "fss-5-1m")[1:] == [[6], [7], [8], [9], [10]]
    assert task_classes("synthetic", "fss-5-0m") == task_classes("voc", "fss-5-0m")
    assert task_classes("voc", "5-3") != task_classes("voc", "fss-5-3")     # MiB's 5-3 is another task
    with pytest.raises(ValueError, match="folds 0-3"):
        fewshot.voc_fold(4)


def test_coco_folds_take_every_fourth_category_id():
    steps = fewshot.coco_fold(0)
    # the official 20-0 novel classes, by hand from COCO's ids (12, 26, 29, 30, 45, 66, 68, 69, 71, 83 unused)
    assert steps[1] == [1, 5, 9, 14, 18, 22, 27, 33, 37, 41, 46, 50, 54, 58, 62, 67, 74, 78, 82, 87]
    assert len(steps[0]) == 1 + 60 and 12 not in steps[0] and 2 in steps[0]
    assert fewshot.coco_fold(3)[1][:5] == [4, 8, 13, 17, 21]
    multi = fewshot.coco_fold(1, multi_step=True)
    assert len(multi) == 5 and multi[1] == [2, 6, 10, 15, 19] and multi[4] == [70, 75, 79, 84, 88]


def test_shots_are_images_ishot_times_20_onwards_of_each_class_list():
    """The official draw: class_to_images[c][ishot*20 : ishot*20 + nshot], in the list's own order
    (the official VOC lists are not in index order)."""
    lists = {3: list(range(100, 160))[::-1], 7: [5, 9, 2] + list(range(200, 260))}
    assert fewshot.shot_rows(lists, [3, 7], nshot=1, ishot=0) == {3: [159], 7: [5]}
    assert fewshot.shot_rows(lists, [7], nshot=5, ishot=0) == {7: [5, 9, 2, 200, 201]}
    assert fewshot.shot_rows(lists, [3], nshot=2, ishot=1) == {3: [139, 138]}          # images 20, 21
    assert fewshot.shot_rows(lists, [7], nshot=5, ishot=2) == {7: [237, 238, 239, 240, 241]}   # images 40-44
    with pytest.raises(ValueError, match="class 3 has 60 training images"):
        fewshot.shot_rows(lists, [3], nshot=5, ishot=3)
    with pytest.raises(ValueError, match="nshot must be 1-20"):
        fewshot.shot_rows(lists, [3], nshot=21, ishot=0)


def test_class_lists_from_a_generated_file_list_and_the_official_lists_mapped_onto_it():
    rng = np.random.default_rng(0)
    presence = rng.random((30, 20)) < 0.2
    lists = fewshot.class_image_lists(presence)
    for cls in range(1, 21):   # by a slow obvious loop
        assert lists[cls] == [row for row in range(30) if presence[row, cls - 1]]
    # the official files: ids in their own order, per-class indices into that order
    official_ids = np.array(["b", "c", "a"])
    official = {0: np.array([0, 1, 2]), 4: np.array([2, 0]), 9: np.array([1])}
    mapped = fewshot.official_class_lists(official, official_ids, ["a", "b", "c", "d"])
    assert mapped == {4: [0, 1], 9: [2]}   # "a" is row 0, "b" row 1, "c" row 2 of the suite's list
    with pytest.raises(ValueError, match="1 images of the official train_ids.npy are not in the training list"):
        fewshot.official_class_lists(official, official_ids, ["a", "b"])


def test_base_step_keeps_every_image_without_a_non_base_class():
    presence = np.zeros((5, 20), dtype=bool)
    presence[0, [0, 1]] = True     # classes 1, 2: base
    presence[1, [0, 15]] = True    # 1 and 16 (novel)
    presence[3, 19] = True         # 20 only (novel)
    presence[4, 4] = True          # 5
    # row 2: background alone (kept by the official rule, unlike MiB's disjoint step 0)
    assert fewshot.base_step_rows(presence, task_classes("voc", "fss-5-3")[0]).tolist() == [0, 2, 4]


def test_a_shot_keeps_background_the_old_classes_and_its_own_class_only():
    mask = np.array([[0, 3, 16, 17], [255, 18, 3, 0]], dtype=np.uint8)
    # step 1 of fss-5-3: old = 1..15, shot of class 16; 17 and 18 (other novel classes) are ignored
    out = fewshot.shot_lookup(np.arange(256, dtype=np.uint8), list(range(1, 16)), 16)[mask]   # ids kept as ids
    assert out.tolist() == [[0, 3, 16, 255], [255, 255, 3, 0]]


def test_the_datamodule_trains_the_base_step_and_each_shot_as_the_official_code(tmp_path):
    """data.fewshot on a generated dataset: step 0 on base_step_rows; step 1 on the nshot images
    of draw ishot per novel class, each labelled for its own class (old kept, other novel classes
    and void ignored), worked out here by a slow loop over the raw masks; the test set is all images."""
    from datamodules.datasets.voc import load_mask
    from datamodules.incremental import IncrementalSegmentationDataModule
    from datamodules.tasks import channel_order

    options = {"synthetic": {"train": 500, "val": 12, "size": 32, "seed": 0}}
    common = dict(dataset="synthetic", data_root=tmp_path, task="fss-5-0", crop_size=32, num_workers=0,
                  dataset_options=options, test_images="all", fewshot={"nshot": 2, "ishot": 1})
    base = IncrementalSegmentationDataModule(step=0, **common)
    base.setup()
    assert base.train_indices.tolist() == fewshot.base_step_rows(base.train_presence, [0, *range(6, 21)]).tolist()
    assert len(base.test_set) == 12                                   # every test image
    shots = IncrementalSegmentationDataModule(step=1, **common)
    shots.setup()
    lists = {c: [r for r in range(500) if shots.train_presence[r, c - 1]] for c in range(1, 6)}
    assert shots.train_indices.tolist() == [r for c in range(1, 6) for r in lists[c][20:22]]
    assert shots.shot_classes.tolist() == [c for c in range(1, 6) for _ in range(2)]
    channel = {c: i for i, c in enumerate(channel_order(shots.steps, 1))}
    for i, (row, shot_class) in enumerate(zip(shots.train_indices, shots.shot_classes)):
        raw = load_mask(shots.located.train.masks[row])
        expected = np.full(raw.shape, 255, dtype=np.int64)
        for y in range(raw.shape[0]):
            for x in range(raw.shape[1]):
                value = int(raw[y, x])
                if value == 0 or 6 <= value <= 20 or value == shot_class:
                    expected[y, x] = channel[value]
        assert np.array_equal(shots.train_set.lookup[i][raw], expected), (row, shot_class)


def test_the_fewshot_option_is_checked_and_keys_its_runs_and_base_model(tiny_config):
    from experiments import step0_cache
    from experiments.config import ConfigError, apply_overrides, resolve
    from experiments.store import config_id
    from lightning_modules.methods import build_method

    with pytest.raises(ConfigError, match="data.fewshot.nshot"):
        resolve(apply_overrides(tiny_config, ["data.fewshot={nshot: 21}"]))
    shots = resolve(apply_overrides(tiny_config, ["data.task=fss-5-0", "data.fewshot={nshot: 2, ishot: 1}"]))
    usual = resolve(apply_overrides(tiny_config, ["data.task=fss-5-0"]))
    assert shots.data.fewshot.nshot == 2 and usual.data.fewshot is None
    assert config_id(shots.run_config("ft")) != config_id(usual.run_config("ft"))
    steps = task_classes("synthetic", "fss-5-0")
    method = build_method("ft")
    keys = [step0_cache.model_path(c.run_config("ft"), method, steps) for c in (shots, usual)]
    assert keys[0] != keys[1]   # the base step trains on other images than MiB's disjoint step 0
    other_draw = resolve(apply_overrides(tiny_config, ["data.task=fss-5-0", "data.fewshot={nshot: 5, ishot: 0}"]))
    assert step0_cache.model_path(other_draw.run_config("ft"), method, steps) == keys[0]   # one base model for every draw


def test_what_the_fewshot_steps_cannot_do_is_one_line_at_load(tiny_config):
    from experiments.config import ConfigError, apply_overrides, resolve

    with pytest.raises(ConfigError, match="no images to hold out"):
        resolve(apply_overrides(tiny_config, ["data.task=fss-5-0", "data.fewshot={nshot: 5}",
                                              "data.validation_fraction=0.1"])).run_config("ft")


def test_a_step_given_in_iterations_trains_iterations_over_updates_per_epoch_epochs(tiny_config):
    """schedule.incremental.iterations (PIFS's scripts): epochs = max(1, iterations // updates per
    epoch), as the official run.py, where a few-shot epoch is 20 // nshot passes over the shots:
    here 5 shots (1 per novel class) in batches of 4 = 1 update per pass, 20 per epoch, so 40
    iterations are 2 epochs of 20 updates."""
    from experiments import run
    from experiments.config import apply_overrides, resolve

    config = resolve(apply_overrides(tiny_config, ["data.task=fss-5-0", "data.fewshot={nshot: 1, ishot: 0}",
                                                   "data.test_images=all", "methods=[ft]",
                                                   "schedule.incremental={epochs: 1, lr: 0.001, iterations: 40}"]))
    step1 = run.run_experiment(config)["ft"]["steps"][1]
    assert (step1["train_images"], step1["epochs"], step1["optimizer_updates"]) == (5, 2, 40)


def test_an_epoch_of_several_passes_is_the_passes_one_after_the_other():
    """EpochTrainingSampler(passes=k): epoch e is the one-pass epochs e*k ... e*k + k - 1 in a row
    (each its own permutation and augmentation), for every rank."""
    from datamodules.sampling import EpochTrainingSampler

    for rank in (0, 1):
        repeated = EpochTrainingSampler(7, 2, seed=3, rank=rank, world_size=2, passes=3)
        single = EpochTrainingSampler(7, 2, seed=3, rank=rank, world_size=2)
        repeated.set_epoch(2)
        expected = []
        for number in (6, 7, 8):
            single.set_epoch(number)
            expected += list(single)
        assert list(repeated) == expected and len(repeated) == len(expected) == 3 * 2
        assert repeated.num_batches == 3 * single.num_batches


def test_a_one_shot_step_of_one_class_trains_on_single_images_with_the_pooling_norm_on_running_statistics(tiny_config):
    """Fold 5-0m with one shot: each step trains on one image, so batches of one. The image-pooling
    branch's norm then normalises by its running statistics (the official --no_pooling), which a
    batch of one leaves untouched, while its affine parameters still train."""
    from experiments.config import apply_overrides, resolve
    from experiments.training import build_step, fit_and_test
    from lightning_modules.methods import build_method
    from lightning_modules.network import RunningStatisticsNorm
    from tests.conftest import start_step

    config = resolve(apply_overrides(tiny_config, ["data.task=fss-5-0m", "data.fewshot={nshot: 1, ishot: 0}",
                                                   "data.test_images=all", "methods=[ft]",
                                                   "schedule.incremental={epochs: 1, lr: 0.1, iterations: 40}"])).run_config("ft")
    method = build_method("ft")
    steps = task_classes("synthetic", "fss-5-0m")
    network = method.build_network(config.network, [len(steps[0])], pretrained=False)
    start_step(network, method, 1)
    built = build_step(config, method, steps, 1, network)
    norms = [m for m in network.decoder.modules() if isinstance(m, RunningStatisticsNorm)]
    assert len(norms) == 1 and built.datamodule.per_process_batch(1) == 1
    mean, var, weight = norms[0].running_mean.clone(), norms[0].running_var.clone(), norms[0].weight.detach().clone()
    record = fit_and_test(config, built, logger=None)
    assert (record["train_images"], record["epochs"], record["optimizer_updates"]) == (1, 2, 40)   # 20 passes an epoch
    assert torch.equal(norms[0].running_mean, mean) and torch.equal(norms[0].running_var, var)
    assert not torch.equal(norms[0].weight.detach(), weight)
    # A step of several shots keeps every batch norm as it is.
    several = resolve(apply_overrides(tiny_config, ["data.task=fss-5-0m", "data.fewshot={nshot: 2, ishot: 0}",
                                                    "data.test_images=all", "methods=[ft]"])).run_config("ft")
    other = method.build_network(several.network, [len(steps[0])], pretrained=False)
    start_step(other, method, 1)
    build_step(several, method, steps, 1, other)
    assert not any(isinstance(m, RunningStatisticsNorm) for m in other.modules())
