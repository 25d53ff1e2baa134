"""RECALL as a method (lightning_modules/methods/recall.py): what is frozen after step 0, the
alternation of new-step and replay batches for 1 and 2 processes, labels that never read a mask they
must not, and the pool-missing error."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datamodules.datasets.voc import load_mask
from datamodules.tasks import channel_order, task_classes
from experiments import run, step0_cache
from experiments.config import apply_overrides
from experiments.store import run_directory
from experiments.training import build_datamodule
from lightning_modules.methods import build_method
from lightning_modules.methods.base import MethodUnavailable, StepContext
from lightning_modules.methods.recall import RECALL
from lightning_modules.methods.weak_baseline import normalised_image

# fp32, so that the replay labels can be recomputed exactly here
TINY_RECALL = ["methods=[recall]", "methods.recall.embedded_pool_size=3", "schedule.incremental={epochs: 2, lr: 0.01}",
               "trainer.precision=32-true"]


def _is_batchnorm(key: str, state: dict) -> bool:
    prefix = key.rsplit(".", 1)[0]
    return f"{prefix}.running_mean" in state


def test_the_encoder_and_every_batch_norm_are_bit_identical_after_a_step(tiny_config):
    config = apply_overrides(tiny_config, TINY_RECALL)
    run.run_experiment(config)
    run_config = config.run_config("recall")
    steps = task_classes("synthetic", "15-5")
    before = torch.load(step0_cache.model_path(run_config, build_method("recall"), steps), weights_only=True)["state_dict"]
    after = torch.load(run_directory(run_config) / "checkpoints" / "step1.pt", weights_only=True)["network"]["state_dict"]
    frozen = [k for k in before if k.startswith("encoder.") or _is_batchnorm(k, before)]
    assert any(k.startswith("decoder.") for k in frozen), "the decoder's batch norms are frozen too"
    for key in frozen:
        assert torch.equal(before[key], after[key]), key
    trained = [k for k in before if k not in frozen and k.startswith(("decoder.", "classifier."))]
    assert any(not torch.equal(before[k], after[k]) for k in trained), "the decoder and classifier learn"


def _step1(tiny_config, method="recall"):
    config = apply_overrides(tiny_config, TINY_RECALL)
    run_config = config.run_config(method)
    steps = task_classes("synthetic", "15-5")
    recall = build_method(method, **run_config.hparams)
    run.prepare(config)
    network = recall.build_network(run_config.network, [len(steps[0])])
    old = network.frozen_copy()
    network.add_classes(len(steps[1]))
    dm = build_datamodule(run_config, recall, steps, 1)
    dm.setup("fit")
    return run_config, steps, recall, old, dm


def test_the_stage_reads_only_the_steps_masks_and_labels_the_pool_by_the_old_model(tiny_config, tmp_path, monkeypatch):
    run_config, steps, recall, old, dm = _step1(tiny_config)
    context = StepContext(config=run_config, steps=steps, step=1, datamodule=dm, old_network=old)
    allowed = {str(dm.located.train.masks[int(r)]) for r in dm.train_indices}
    read = []
    import datamodules.datasets.voc as voc

    def guarded(path):
        read.append(str(path))
        assert str(path) in allowed, f"the stage read a mask that is not the step's own: {path}"
        return load_mask(path)
    monkeypatch.setattr(voc, "load_mask", guarded)
    recall.run_stage(context, tmp_path)
    assert sorted(read) == sorted(allowed)   # each training mask of the step once, nothing else
    # every replay label is the old model's argmax on the pool image, in dataset ids
    order = np.array(channel_order(steps, 0))
    images = recall.replay_images(context)
    assert set(images) == set(steps[0]) - {0} and all(len(v) == 3 for v in images.values())
    path = images[4][1]
    with torch.no_grad():
        expected = old(normalised_image(path))["logits"].argmax(dim=1)[0].numpy()
    np.testing.assert_array_equal(load_mask(recall.replay_label_path(tmp_path, path)), order[expected])
    # the inpainted label of a training image: its new classes kept, the rest the old argmax
    row = int(dm.train_indices[0])
    inpainted = load_mask(recall.inpainted_path(tmp_path, dm.located.train.ids[row]))
    truth = load_mask(dm.located.train.masks[row])
    new = np.isin(truth, steps[1])
    np.testing.assert_array_equal(inpainted[new], truth[new])
    assert set(np.unique(inpainted[~new])) <= set(steps[0]) and 255 not in inpainted


def test_batches_alternate_new_and_replay_the_same_for_one_and_two_processes(tiny_config, tmp_path):
    run_config, steps, recall, old, dm = _step1(tiny_config)
    context = StepContext(config=run_config, steps=steps, step=1, datamodule=dm, old_network=old,
                          stage_directory=tmp_path)
    recall.run_stage(context, tmp_path)
    sources = recall.training_data(context, dm.training_sources)
    dm.set_training_sources(sources)
    n_new = len(sources.datasets[0])
    assert n_new == len(dm.train_indices) and len(sources.datasets[1]) == 15 * 3
    global_batches = {}
    for world in (1, 2):
        dm.batch_size = 4 // world
        per_rank = []
        for rank in range(world):
            dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, accumulate_grad_batches=1)
            per_rank.append(list(dm.train_dataloader().sampler))
        batches = []
        for b in range(len(per_rank[0]) // dm.batch_size):
            batch = [key for shard in per_rank for key in shard[b * dm.batch_size:(b + 1) * dm.batch_size]]
            batches.append(sorted(index for _, index in batch))
        global_batches[world] = batches
    assert global_batches[1] == global_batches[2]
    for b, batch in enumerate(global_batches[1]):   # counted from 0: even ones the step's images, odd ones replay
        assert all((index < n_new) == (b % 2 == 0) for index in batch), b
    assert len(global_batches[1]) == 2 * (n_new // 4)
    # RECALL's schedule unit: updates per new class, rounded up to whole epochs of these batches
    dm.trainer, dm.batch_size = None, 4
    updates = dm.updates_per_epoch(world=1)
    assert updates == len(global_batches[1])
    assert RECALL(iterations_per_class=7).training_epochs(context, 10, updates) == -(-7 * 5 // updates)
    assert RECALL().training_epochs(context, 10, updates) == 10      # 0: the experiment's epochs
    # the replay source's labels are the stage's files (never a mask of the dataset)
    assert all(Path(m).is_relative_to(tmp_path / "replay") for m in sources.datasets[1].files.masks)


def test_without_a_pool_recall_stops_with_one_line_and_the_ablation_needs_none(tiny_config, tmp_path):
    run_config, steps, recall, old, dm = _step1(tiny_config)
    missing = RECALL(pool=str(tmp_path / "no-pool"))
    context = StepContext(config=run_config, steps=steps, step=1, datamodule=dm, old_network=old)
    with pytest.raises(MethodUnavailable, match=r"replay pool is not at .*no-pool: lay it out as <pool>/<class name>"):
        missing.stage_key(context)
    ablation = build_method("recall_noreplay", pool=str(tmp_path / "no-pool"))
    assert ablation.stage_key(context)["pool"] == {}
    ablation.run_stage(context, tmp_path / "stage")
    assert not (tmp_path / "stage" / "replay").exists()
    staged = dataclasses.replace(context, stage_directory=tmp_path / "stage")
    assert len(ablation.training_data(staged, dm.training_sources).datasets) == 1


def test_longer_tasks_label_later_classes_by_their_helper_decoder(tiny_config):
    """From the third step on, replay images of step s's classes are labelled by step s's helper
    decoder (only those classes and background), those of step-0 classes by the carried step-0 model."""
    task = "[[" + ", ".join(str(c) for c in range(16)) + "], [16, 17], [18, 19, 20]]"
    config = apply_overrides(tiny_config, [*TINY_RECALL, f"data.task={task}", "data.mode=overlap",
                                           "data.options.synthetic={train: 96, val: 16, size: 40, seed: 0}",
                                           "methods.recall.helper_iterations_per_class=2"])
    results = run.run_experiment(config)["recall"]
    assert results["complete"] and len(results["steps"]) == 3
    steps = [list(range(16)), [16, 17], [18, 19, 20]]
    stage1, stage2 = (Path(results["steps"][t]["stage"]["directory"]) for t in (1, 2))
    assert (stage1 / "helper.pt").exists() and not (stage2 / "helper.pt").exists(), "no later step follows step 2"
    recall = build_method("recall", **config.run_config("recall").hparams)
    pool = recall.replay_images(SimpleNamespace(config=config.run_config("recall"), steps=steps, step=2))
    for cls in (16, 17):
        for path in pool[cls]:
            assert set(np.unique(load_mask(recall.replay_label_path(stage2, path)))) <= {0, 16, 17}
    # a step-0 class's replay image: the step-0 model's argmax (the cached model, in fp32 as the run)
    run_config = config.run_config("recall")
    step0 = step0_cache.load(step0_cache.model_path(run_config, recall, steps), recall, run_config).eval()
    path = pool[3][0]
    with torch.no_grad():
        expected = step0(normalised_image(path))["logits"].argmax(dim=1)[0].numpy()
    np.testing.assert_array_equal(load_mask(recall.replay_label_path(stage2, path)), np.arange(16)[expected])
    # the helper learnt on the frozen encoder: its encoder and batch norms are the step-0 model's
    helper = torch.load(stage1 / "helper.pt", weights_only=True)
    assert helper["classes_per_step"] == [3]
    reference = step0.state_dict()
    for key, value in helper["state_dict"].items():
        if key.startswith("encoder.") or _is_batchnorm(key, reference):
            assert torch.equal(value, reference[key]), key
