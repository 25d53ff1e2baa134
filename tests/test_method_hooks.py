"""The method interface: a method defined in one file (tests/method_probe.py) reaches every hook
without any other file naming it; its carried state survives a kill and a resume; methods share a
step-0 model exactly when everything that determines it agrees."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import datamodules.incremental
import tests.method_probe as probe
from experiments import run, step0_cache
from experiments.config import apply_overrides, load_experiment, resolve
from experiments.reporting.qualitative import load_examples
from experiments.store import run_directory
from lightning_modules.methods import METHODS, build_method
from tests.conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parent.parent
# 3 steps, so that state is carried twice: 0-15 | 16-18 | 19-20
THREE_STEPS = "data.task=[[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15],[16,17,18],[19,20]]"


def _probe_config(tiny_config, *extra):
    return apply_overrides(tiny_config, ["methods=[probe]", THREE_STEPS, "schedule.incremental={epochs: 2, lr: 0.001}",
                                         *extra])


def test_a_method_in_one_file_reaches_every_hook(tiny_config, monkeypatch):
    assert METHODS["probe"] is probe.Probe  # registered by its own file, nothing else names it
    probe.CALLS.clear()
    probe.RECORDS.clear()
    masks_read = []
    original_load_mask = datamodules.incremental.load_mask

    def recording_load_mask(path):
        masks_read.append(Path(path))
        return original_load_mask(path)

    monkeypatch.setattr(datamodules.incremental, "load_mask", recording_load_mask)
    config = _probe_config(tiny_config)
    run_config = config.run_config("probe")
    # its own settings, merged over the experiment's
    assert run_config.data.void_as_background is False and run_config.network.decoder_channels == 8
    assert config.run_config("mib").data.void_as_background is True
    results = run.run_experiment(config)["probe"]
    assert results["complete"] and [s["step"] for s in results["steps"]] == [0, 1, 2]
    calls, records = probe.CALLS, probe.RECORDS

    # own network (built for step 0, rebuilt for the saved step-0 model: none here), own step-0 model
    assert calls["build_network"] >= 1
    steps = [list(range(16)), [16, 17, 18], [19, 20]]
    cache = step0_cache.model_path(run_config, build_method("probe"), steps)
    assert cache.exists() and cache != step0_cache.model_path(config.run_config("probe"), build_method("ft"), steps)
    # the state accumulated during step 0 lives beside the cached model, not inside it
    side = step0_cache.state_path(cache, build_method("probe"))
    assert side.exists() and "image_sum" in torch.load(side, weights_only=True)
    assert "image_sum" not in torch.load(cache, weights_only=True)
    # start of each step: the classifier initialised by the method, the stage run by rank 0 once
    assert calls["init_new_classifier"] == 2 and calls["run_stage"] == 2 and records["stage_ranks"] == [0, 0]
    stages = sorted((Path(config.cache_dir) / "stages").iterdir())
    assert [d.name.split("-")[1] for d in stages] == ["step1", "step2"] and all((d / "COMPLETE").exists() for d in stages)
    # training data: the default source of an image-label method has no mask; the method replaced it
    # by its pseudo-masks (void kept as 255: its own setting) and added a second source
    assert records["default_keys"] == [["image", "index", "new_class_labels"]] * 2
    assert any(255 in labels for labels in records["labels_seen"])
    stage_masks = [p for p in masks_read if "stages" in p.parts]
    assert stage_masks, "the pseudo-masks were read"
    # the image-label steps never read a ground-truth mask of their training images (stage,
    # pass and training included); step 0 (pixel labels) and the test set do
    weak_rows = set()
    for step in (1, 2):
        datamodule = datamodules.incremental.IncrementalSegmentationDataModule(
            dataset="synthetic", data_root=config.data.root, task=steps, step=step, crop_size=32, num_workers=0,
            dataset_options=config.data.options)
        datamodule.setup()
        weak_rows |= {datamodule.located.train.masks[r] for r in datamodule.train_indices}
    assert weak_rows and not weak_rows & set(masks_read)
    saved = torch.load(run_directory(run_config) / "checkpoints" / "step2.pt", weights_only=True)
    state = saved["method_state"]
    # the pass over the training images before each step: integer totals over every image of the step
    assert calls["after_training_pass"] == 2
    for step in (1, 2):
        assert int(state[f"pass{step}_images"]) == results["steps"][step]["train_images"]
        assert state[f"pass{step}_old_argmax"].dtype == torch.long
        assert int(state[f"pass{step}_old_argmax"].sum()) == int(state[f"pass{step}_images"]) * 32 * 32
        assert int(state[f"pass{step}_labels"][255]) > 0  # the void border of the pseudo-masks
    # global batches alternate between the two sources, starting with the step's own images
    for step in (1, 2):
        epochs = records[f"sources_step{step}"]
        assert len(epochs) == 2 and calls[f"epoch_start_step{step}"] == 2
        for sources in epochs:
            assert sources == [b % 2 for b in range(len(sources))] and len(sources) >= 2
        assert int(state[f"updates_step{step}"]) == sum(len(e) for e in epochs)
    # stage taps: the two ResNet stages of the embedded encoder
    assert records["stage_shapes"][0] == [(64, 8, 8), (128, 4, 4)]
    # state carried across steps: every training batch of every step counted
    assert int(state["batches"]) == int(torch.load(side, weights_only=True)["batches"]) + len(records["stage_shapes"])
    # pseudo_labels receives the test images' pixel labels: the qualitative sheet shows them
    examples = load_examples(run_directory(run_config) / "qualitative.npz")
    assert calls["pseudo_labels"] == len(examples["rows"])
    for pseudo, truth in zip(examples["pseudo_labels"], examples["ground_truths"]):
        assert np.array_equal(pseudo, truth)


def test_a_second_run_reuses_the_stage_the_step0_model_and_its_side_state(tiny_config):
    config = _probe_config(tiny_config, "trainer.precision=32-true")  # bit-exact on CPU
    first = run.run_experiment(config)["probe"]
    probe.CALLS.clear()
    second = run.run_experiment(apply_overrides(config, ["resume=false"]))["probe"]
    assert probe.CALLS["run_stage"] == 0  # the cached pseudo-masks of both steps
    assert second["steps"][0]["trained"] is False
    for a, b in zip(first["steps"], second["steps"], strict=True):
        assert a["confusion"] == b["confusion"]
    states = [torch.load(run_directory(config.run_config("probe")).parent / name / "checkpoints" / "step2.pt",
                         weights_only=True)["method_state"]
              for name in ("seed42", next(p.name for p in run_directory(config.run_config("probe")).parent.iterdir()
                                          if p.name.startswith("seed42.")))]
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0, msg=key)


def _subprocess_env() -> dict:
    return dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(REPO), NO_ALBUMENTATIONS_UPDATE="1")


def _command(out: Path, data: Path, *extra) -> list[str]:
    return [sys.executable, str(REPO / "tests" / "run_with_probe.py"), "synthetic_15_5_disjoint", *TINY_OVERRIDES,
            f"data.root={data}", f"output_dir={out / 'runs'}", f"cache_dir={out / 'cache'}", "methods=[probe]",
            THREE_STEPS, "schedule.incremental={epochs: 4, lr: 0.001}", "trainer.precision=32-true", *extra]


def _state(out: Path) -> dict:
    (path,) = (out / "runs").glob("synthetic_15_5_disjoint/probe/latest/seed42/checkpoints/step2.pt")
    return torch.load(path, weights_only=True)["method_state"]


def test_the_carried_state_survives_a_kill_mid_step_and_resumes_exactly(tmp_path):
    """SIGKILL inside step 2 (once its first epoch's checkpoint exists), then the same command: the
    state updated by every batch (and the pass totals, and every confusion matrix) equals an
    uninterrupted run's exactly; the pass is not run again (its totals come from the checkpoint)."""
    data = tmp_path / "data"
    reference = subprocess.run(_command(tmp_path / "reference", data), cwd=REPO, env=_subprocess_env(),
                               capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stdout[-2000:] + reference.stderr[-2000:]
    out = tmp_path / "killed"
    marker = out / "runs" / "synthetic_15_5_disjoint" / "probe" / "latest" / "seed42" / "checkpoints" / "fit-step2.ckpt"
    process = subprocess.Popen(_command(out, data), cwd=REPO, env=_subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    from tests.test_robustness import wait_for

    wait_for(marker, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = subprocess.run(_command(out, data), cwd=REPO, env=_subprocess_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resuming step 2 from" in resumed.stdout.replace("\n", " ")
    expected, got = _state(tmp_path / "reference"), _state(out)
    assert set(expected) == set(got)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    a, b = (json.loads(next((o / "runs").rglob("seed42/results.json")).read_text()) for o in (tmp_path / "reference", out))
    assert [s["confusion"] for s in a["steps"]] == [s["confusion"] for s in b["steps"]]


def test_lwf_mc_shares_wilsons_bce_step0_model_exactly_when_everything_else_agrees(tiny_config):
    steps = [list(range(16)), [16, 17, 18, 19, 20]]

    def key(config, name):
        return step0_cache.model_path(config.run_config(name), build_method(name), steps)

    config = apply_overrides(tiny_config, ["methods=[mib,lwf,ilt,lwf_mc,wilson]"])
    assert key(config, "lwf_mc") == key(config, "wilson") != key(config, "mib")  # BCE vs CE
    assert key(config, "mib") == key(config, "lwf") == key(config, "ilt")
    # anything that changes WILSON's step 0 alone separates them
    other_precision = "32-true" if config.run_config("wilson").trainer.precision == "bf16-mixed" else "bf16-mixed"
    for change in ("methods.wilson.data.batch_size=2", "methods.wilson.schedule.step0={epochs: 2, lr: 0.01}",
                   f"methods.wilson.trainer.precision={other_precision}", "methods.wilson.network.decoder_channels=8",
                   "methods.wilson.data.void_as_background=false"):
        changed = apply_overrides(config, [change])
        assert key(changed, "lwf_mc") != key(changed, "wilson"), change
    # what happens after step 0 does not
    for change in ("methods.wilson.alpha=0.9", "methods.wilson.schedule.incremental={epochs: 3, lr: 0.01}",
                   "methods.lwf_mc.importance=5"):
        changed = apply_overrides(config, [change])
        assert key(changed, "lwf_mc") == key(changed, "wilson"), change
    # in the GPU files WILSON trains under fp16 autocast and LwF-MC (MiB's code) in fp32: not shared
    # where the precisions differ; on a CPU without bfloat16 both train in fp32 and share
    voc = resolve(load_experiment("voc_15_5_disjoint"))
    same = voc.run_config("wilson").trainer.precision == voc.run_config("lwf_mc").trainer.precision
    assert (key(voc, "lwf_mc") == key(voc, "wilson")) == same
    # and a run trains the BCE model once: LwF-MC after WILSON takes it from the cache
    results = run.run_experiment(apply_overrides(tiny_config, ["methods=[wilson,lwf_mc]"]))
    assert results["wilson"]["steps"][0]["trained"] is True and results["lwf_mc"]["steps"][0]["trained"] is False
    assert results["wilson"]["steps"][0]["confusion"] == results["lwf_mc"]["steps"][0]["confusion"]
