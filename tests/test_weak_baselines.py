"""The image-label baselines' pipeline (lightning_modules/methods/weak_baseline.py), CAM and EPS:
the segmentation loss against a float64 loop, each method's loss and inference on hand-made
inputs, the pseudo-mask quality score by hand, and the stage end to end (no ground truth of the
step reaches it or the training; cached, reused, invalidated; resumed after a kill)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.config import apply_overrides
from experiments.reporting.pseudo_masks import iou_from_confusion, pseudo_mask_confusion
from experiments.stages import run_stage_once, stage_directory
from experiments.training import build_datamodule, build_step
from lightning_modules.losses import pseudo_mask_bce
from lightning_modules.methods import build_method
from lightning_modules.methods.base import MethodUnavailable, StepContext
from lightning_modules.methods.cam import CAMClassifier, cam_pseudo_mask
from lightning_modules.methods.eps import eps_saliency_loss, spectral_residual_saliency
from lightning_modules.methods.weak_baseline import multiscale_maps
from lightning_modules.network import build_network
from tests.conftest import TINY_OVERRIDES, start_step

REPO = Path(__file__).resolve().parent.parent
SMALL_CLASSIFIER = {"classifier_encoder": "tu-resnet10t", "classifier_encoder_depth": 3, "stage_epochs": 2,
                    "stage_crop_size": 32, "stage_batch_size": 4, "inference_scales": [1.0, 0.5]}


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _bce(logit, target):
    return -(target * math.log(_sigmoid(logit)) + (1 - target) * math.log(1 - _sigmoid(logit)))


# --------------------------------------------------------------------------- pseudo_mask_bce
def test_pseudo_mask_bce_matches_a_float64_loop():
    generator = torch.Generator().manual_seed(0)
    B, C, n_old, H, W = 2, 6, 4, 3, 4
    logits = torch.randn(B, C, H, W, generator=generator, dtype=torch.float64) * 2
    old_logits = torch.randn(B, n_old, H, W, generator=generator, dtype=torch.float64) * 2
    masks = torch.tensor([[[0, 4, 5, 255], [0, 0, 4, 4], [255, 5, 0, 0]],
                          [[4, 4, 4, 0], [0, 255, 255, 5], [5, 5, 0, 0]]])
    total = 0.0
    for b in range(B):
        for h in range(H):
            for w in range(W):
                label = int(masks[b, h, w])
                for c in range(C):
                    one_hot = 1.0 if label == c else 0.0  # 255: no class at all
                    if c == 0:
                        target = min(one_hot, _sigmoid(float(old_logits[b, 0, h, w])))
                    elif c < n_old:
                        target = _sigmoid(float(old_logits[b, c, h, w]))
                    else:
                        target = one_hot
                    total += _bce(float(logits[b, c, h, w]), target)
    expected = total / (B * H * W)
    assert float(pseudo_mask_bce(logits, masks, old_logits)) == pytest.approx(expected, rel=1e-12)


def test_pseudo_mask_bce_rejects_ids_outside_the_channels():
    with pytest.raises(ValueError, match="outside"):
        pseudo_mask_bce(torch.zeros(1, 3, 2, 2), torch.full((1, 2, 2), 7), torch.zeros(1, 2, 2, 2))


# --------------------------------------------------------------------------- CAM
def test_cam_mask_normalises_each_present_class_and_thresholds_the_background_at_0_2():
    # 2 classes, 1x4 image. Class 1 peaks at 10 (normalised 1.0, 0.5, 0.1, 0.0), class 2 (absent
    # from the label) is ignored however large.
    cams = torch.tensor([[[10.0, 5.0, 1.0, 0.0]], [[100.0, 100.0, 100.0, 100.0]]])
    labels = torch.tensor([1.0, 0.0])
    mask = cam_pseudo_mask(cams, labels, background=0.20)
    assert mask.tolist() == [[1, 1, 0, 0]]  # 0.1 and 0.0 are under the background score
    # both present: per-class normalisation, then the larger wins; 0.2 exactly ties -> background
    cams = torch.tensor([[[4.0, 2.0, 0.8, 0.0]], [[1.0, 2.0, 0.2, 0.0]]])
    mask = cam_pseudo_mask(cams, torch.tensor([1.0, 1.0]), background=0.20)
    # class 1: 1/(4+1e-5)... = [1, .5, .2, 0]; class 2: [.5, 1, .1, 0]
    assert mask.tolist() == [[1, 2, 0, 0]]


def test_cam_scores_are_the_mean_of_the_cams_before_relu():
    from lightning_modules.methods.weak_baseline import build_classifier_encoder

    torch.manual_seed(0)
    classifier = CAMClassifier(build_classifier_encoder("tu-resnet10t", 3, 8, None), 3).eval()
    images = torch.randn(2, 3, 32, 32)
    features = classifier.features(images)
    maps = torch.einsum("kc,bchw->bkhw", classifier.fc.weight[:, :, 0, 0], features)
    torch.testing.assert_close(classifier(images), maps.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(classifier.cams(images), maps.clamp_min(0), rtol=1e-5, atol=1e-6)


def test_multiscale_maps_sum_the_flipped_views_flipped_back():
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    total = multiscale_maps(lambda x: x * 2, image, scales=[1.0], flip=True)
    torch.testing.assert_close(total, 4 * image[0])  # x2 for each view, the flip undone


# --------------------------------------------------------------------------- EPS
def _eps_reference(cams, saliency, labels, tau, lam):
    """The EPS repository's get_eps_loss, written out per pixel in float64 (saliency already at the
    maps' size)."""
    B, C1, H, W = cams.shape
    K = C1 - 1
    total = 0.0
    for b in range(B):
        probs = [[[0.0] * W for _ in range(H)] for _ in range(C1)]
        for h in range(H):
            for w in range(W):
                z = [float(cams[b, c, h, w]) for c in range(C1)]
                top = max(z)
                e = [math.exp(v - top) for v in z]
                for c in range(C1):
                    probs[c][h][w] = e[c] / sum(e)
        salient = []
        for c in range(K):
            inter = sum(round(probs[c][h][w]) * round(float(saliency[b, 0, h, w])) for h in range(H) for w in range(W))
            area = sum(round(probs[c][h][w]) + 1e-4 for h in range(H) for w in range(W))
            salient.append(inter / area > tau)
        for h in range(H):
            for w in range(W):
                fg = sum(probs[c][h][w] for c in range(K) if labels[b, c] and salient[c])
                bg = probs[K][h][w] + sum(probs[c][h][w] for c in range(K) if labels[b, c] and not salient[c])
                predicted = lam * fg + (1 - lam) * (1 - bg)
                total += (predicted - float(saliency[b, 0, h, w])) ** 2
    return total / (B * H * W)


def test_eps_saliency_loss_matches_the_repository_formula_in_float64():
    generator = torch.Generator().manual_seed(1)
    cams = torch.randn(2, 4, 3, 5, generator=generator, dtype=torch.float64) * 3
    # class 0 dominant where salient in image 0 (overlap > tau), class 1 labelled but off the saliency
    cams[0, 0, :, :2] += 8
    cams[0, 1, :, 3:] += 8
    saliency = torch.zeros(2, 1, 3, 5, dtype=torch.float64)
    saliency[0, 0, :, :2] = 1.0
    saliency[1, 0, 1:, 1:4] = 0.8
    labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    expected = _eps_reference(cams, saliency, labels, tau=0.4, lam=0.5)
    assert float(eps_saliency_loss(cams, saliency, labels, tau=0.4, lam=0.5)) == pytest.approx(expected, rel=1e-6)
    # the class on the saliency counts as foreground, the other as background: a different loss
    # when tau excludes every class
    excluded = _eps_reference(cams, saliency, labels, tau=2.0, lam=0.5)
    assert excluded != pytest.approx(expected)
    assert float(eps_saliency_loss(cams, saliency, labels, tau=2.0, lam=0.5)) == pytest.approx(excluded, rel=1e-6)


def test_spectral_residual_saliency_finds_an_odd_patch_from_the_image_alone():
    rng = np.random.default_rng(0)
    image = np.full((80, 80, 3), 120, dtype=np.uint8) + rng.integers(0, 6, (80, 80, 3), dtype=np.uint8)
    image[30:46, 50:66] = (230, 40, 40)  # one odd square
    saliency = spectral_residual_saliency(image)
    assert saliency.shape == (80, 80) and saliency.dtype == np.uint8 and saliency.max() >= 240  # scaled to 0..255, then resized
    inside = saliency[30:46, 50:66].mean()
    outside = np.concatenate([saliency[:20].ravel(), saliency[60:, :40].ravel()]).mean()
    assert inside > 3 * outside


# --------------------------------------------------------------------------- quality
def test_pseudo_mask_confusion_and_iou_by_hand():
    classes = [16, 17]
    truth = np.array([[0, 16, 16, 17], [5, 255, 17, 17]])           # 5 (old) is background here
    predicted = np.array([[0, 16, 255, 17], [16, 16, 0, 255]])
    confusion = pseudo_mask_confusion(predicted, truth, classes)
    #               pred bg  16  17  abstain
    expected = np.array([[1, 1, 0, 0],      # true bg: (0,0) bg, (1,0) -> 16
                         [0, 1, 0, 1],      # true 16: one hit, one abstained
                         [1, 0, 1, 1]])     # true 17: (0,3) hit, (1,2) -> bg, (1,3) abstained; void ignored
    np.testing.assert_array_equal(confusion, expected)
    iou = iou_from_confusion(confusion)
    np.testing.assert_allclose(iou, [1 / (2 + 2 - 1), 1 / (2 + 2 - 1), 1 / (3 + 1 - 1)])


# --------------------------------------------------------------------------- the stage end to end
def _weak_config(tiny_config, method: str, **hparams):
    entry = {**SMALL_CLASSIFIER, **hparams}
    if method == "eps":
        entry.setdefault("saliency", "spectral_residual")
    text = ", ".join(f"{k}: {json.dumps(v)}" for k, v in entry.items())
    return apply_overrides(tiny_config, [f"methods={{{method}: {{{text}}}}}", "trainer.precision=32-true"])


def _step1(config, method_name):
    run_config = config.run_config(method_name)
    method = build_method(method_name, **run_config.hparams)
    steps = [list(range(16)), [16, 17, 18, 19, 20]]
    network = build_network(run_config.network, [16], pretrained=False)
    old = start_step(network, method, 5)
    return run_config, method, steps, network, old


@pytest.mark.parametrize("method_name", ["cam", "eps"])
def test_no_ground_truth_of_the_step_reaches_the_stage_or_the_training(tiny_config, method_name, monkeypatch):
    import PIL.Image

    from datamodules.incremental import DECODED

    config = _weak_config(tiny_config, method_name)
    run_config, method, steps, network, old = _step1(config, method_name)
    probe = build_datamodule(run_config, method, steps, 1)
    probe.setup("fit")
    # Opening the ground-truth mask of any of the step's training images fails, whichever code
    # path reads it (every PNG is opened through PIL.Image.open).
    forbidden = {str(Path(probe.located.train.masks[int(row)])) for row in probe.train_indices}
    opened = []
    original_open = PIL.Image.open

    def guarded_open(path, *args, **kwargs):
        opened.append(str(path))
        if str(path) in forbidden:
            raise AssertionError(f"a ground-truth mask of the weak step was opened: {path}")
        return original_open(path, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", guarded_open)
    DECODED.arrays.clear()
    built = build_step(run_config, method, steps, 1, network, old)
    loader = built.datamodule.train_dataloader()
    loader.sampler.set_epoch(0)
    seen = set()
    for batch in loader:
        seen.update(int(i) for i in batch["index"])
        assert set(batch) >= {"image", "label"} and "new_class_labels" not in batch
    assert seen and seen <= set(int(r) for r in probe.train_indices)
    assert any("masks" in Path(p).parts for p in opened), "the pseudo-masks were read"
    # one loss of the step on a batch of pseudo-masks
    module = built.module
    module.set_old_network(old)
    loss, terms = method.training_loss(module, batch)
    assert torch.isfinite(loss) and set(terms) == {"pseudo_bce"}
    monkeypatch.undo()
    # the masks: one per training image, background, abstention or the step's classes only
    masks = sorted((built.stage_directory / "masks").glob("*.png"))
    assert len(masks) == len(probe.train_indices)
    from datamodules.datasets.voc import load_mask

    values = set(np.unique(np.concatenate([load_mask(p).ravel() for p in masks])).tolist())
    assert values <= {0, 255, 16, 17, 18, 19, 20}


def test_the_stage_is_reused_and_invalidated_by_what_shapes_the_masks(tiny_config, monkeypatch):
    config = _weak_config(tiny_config, "cam")
    run_config, method, steps, network, old = _step1(config, "cam")
    datamodule = build_datamodule(run_config, method, steps, 1)
    datamodule.setup("fit")

    def context(cfg):
        return StepContext(config=cfg, steps=steps, step=1, datamodule=datamodule, old_network=old)

    calls = []
    monkeypatch.setattr(type(method), "run_stage", lambda self, ctx, directory: calls.append(directory))
    first = run_stage_once(method, context(run_config), run_config.cache_dir)
    again = run_stage_once(method, context(run_config), run_config.cache_dir)
    assert first == again and len(calls) == 1 and (first / "COMPLETE").exists()
    # the segmentation stage's lr does not change the masks: the same directory
    same = build_method("cam", **{**run_config.hparams, "head_lr_factor": 5.0})
    assert stage_directory(same, context(run_config), run_config.cache_dir) == first
    # what the masks depend on: inference, classifier, its labels, the step's images, the seed
    for changed in ({"background_score": 0.3}, {"stage_epochs": 3}, {"old_image_labels": True}):
        other = build_method("cam", **{**run_config.hparams, **changed})
        assert stage_directory(other, context(run_config), run_config.cache_dir) != first, changed
    reseeded = apply_overrides(config, ["seed=7"]).run_config("cam")
    assert stage_directory(method, context(reseeded), run_config.cache_dir) != first


def test_old_image_labels_give_the_classifier_every_seen_class(tiny_config):
    config = _weak_config(tiny_config, "cam", old_image_labels=True)
    run_config, method, steps, network, old = _step1(config, "cam")
    datamodule = build_datamodule(run_config, method, steps, 1)
    datamodule.setup("fit")
    ctx = StepContext(config=run_config, steps=steps, step=1, datamodule=datamodule, old_network=old)
    assert method.stage_classes(steps, 1) == list(range(1, 21))
    labels = method.stage_labels(ctx)
    presence = datamodule.train_presence[datamodule.train_indices]
    np.testing.assert_array_equal(labels, presence[:, :20].astype(np.float32))
    new_only = build_method("cam", **{**run_config.hparams, "old_image_labels": False})
    np.testing.assert_array_equal(new_only.stage_labels(ctx), presence[:, 15:20].astype(np.float32))


STAGE_SCRIPT = """
import sys, json
from pathlib import Path
from experiments.config import apply_overrides, load_experiment, resolve
from experiments.stages import run_stage_once
from experiments.training import build_datamodule
from lightning_modules.methods import build_method
from lightning_modules.methods.base import MethodUnavailable, StepContext
overrides = json.loads(sys.argv[1])
config = resolve(apply_overrides(load_experiment("synthetic_15_5_disjoint"), overrides)).run_config("cam")
method = build_method("cam", **config.hparams)
steps = [list(range(16)), [16, 17, 18, 19, 20]]
datamodule = build_datamodule(config, method, steps, 1)
datamodule.setup("fit")
print(run_stage_once(method, StepContext(config=config, steps=steps, step=1, datamodule=datamodule), config.cache_dir))
"""


def _stage_command(tmp_path, name):
    overrides = TINY_OVERRIDES + [
        f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / name / 'runs'}", f"cache_dir={tmp_path / name}",
        "trainer.precision=32-true", "trainer.progress=none",
        "methods={cam: {classifier_encoder: tu-resnet10t, classifier_encoder_depth: 3, stage_epochs: 12, "
        "stage_crop_size: 32, stage_batch_size: 4, inference_scales: [1.0]}}"]
    return [sys.executable, "-c", STAGE_SCRIPT, json.dumps(overrides)]


def _env():
    return dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(REPO), NO_ALBUMENTATIONS_UPDATE="1")


@pytest.mark.slow
def test_a_kill_during_the_stage_resumes_to_the_uninterrupted_result(tmp_path):
    from datamodules.datasets.voc import load_mask

    reference = subprocess.run(_stage_command(tmp_path, "reference"), cwd=REPO, env=_env(), capture_output=True,
                               text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-2000:]
    reference_dir = Path(reference.stdout.strip().splitlines()[-1])

    process = subprocess.Popen(_stage_command(tmp_path, "killed"), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    checkpoints = []
    while time.time() < deadline and not checkpoints:
        checkpoints = list((tmp_path / "killed" / "stages").glob("*/classifier-training.pt"))
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert checkpoints, "the stage never wrote its checkpoint"
    killed_dir = checkpoints[0].parent
    assert not (killed_dir / "COMPLETE").exists(), "the stage finished before the kill: make it longer"
    done = torch.load(checkpoints[0], weights_only=False)["epochs_done"]
    assert 1 <= done < 12

    resumed = subprocess.run(_stage_command(tmp_path, "killed"), cwd=REPO, env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert Path(resumed.stdout.strip().splitlines()[-1]) == killed_dir and (killed_dir / "COMPLETE").exists()
    expected = torch.load(reference_dir / "classifier.pt", weights_only=True)
    got = torch.load(killed_dir / "classifier.pt", weights_only=True)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    reference_masks = sorted((reference_dir / "masks").glob("*.png"))
    assert reference_masks and [p.name for p in reference_masks] == sorted(p.name for p in (killed_dir / "masks").glob("*.png"))
    for path in reference_masks:
        np.testing.assert_array_equal(load_mask(killed_dir / "masks" / path.name), load_mask(path))


def test_eps_reads_saliency_from_salimages_and_says_where_when_there_is_none(tiny_config):
    from PIL import Image

    config = _weak_config(tiny_config, "eps", saliency="files")
    run_config, method, steps, network, old = _step1(config, "eps")
    datamodule = build_datamodule(run_config, method, steps, 1)
    datamodule.setup("fit")
    ctx = StepContext(config=run_config, steps=steps, step=1, datamodule=datamodule, old_network=old)
    with pytest.raises(MethodUnavailable, match=r"EPS needs saliency maps: .*SALImages"):
        method.stage_maps(ctx)
    with pytest.raises(MethodUnavailable):   # every process meets it, before any stage runs
        stage_directory(method, ctx, run_config.cache_dir)
    # the WILSON/EPS layout: JPEGImages/<id>.jpg -> SALImages/<id>.png
    files = datamodule.located.train
    for row in datamodule.train_indices:
        image = Path(files.images[int(row)])
        target = image.parent.parent / "SALImages" / f"{image.stem}.png"
        target.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((40, 40), 200, np.uint8)).save(target)
    paths = method.stage_maps(ctx)["saliency"]
    dataset = method.stage_dataset(ctx)
    item = dataset[(0, 0)]
    assert paths[int(datamodule.train_indices[0])].parent.name == "SALImages"
    assert item["saliency"].shape == item["image"].shape[1:] and int(item["saliency"].max()) == 200


def test_a_method_that_cannot_run_here_stops_alone_in_one_line(tiny_config, capsys):
    from experiments import run

    entry = ", ".join(f"{k}: {json.dumps(v)}" for k, v in SMALL_CLASSIFIER.items())
    config = apply_overrides(tiny_config, [f"methods={{eps: {{saliency: files, {entry}}}, cam: {{{entry}}}}}",
                                           "trainer.precision=32-true"])
    results = run.run_experiment(config)
    assert set(results) == {"cam"} and results["cam"]["complete"]   # the other method still ran
    out = capsys.readouterr().out.replace("\n", " ")
    assert "error: eps: EPS needs saliency maps" in out and "Traceback" not in out
