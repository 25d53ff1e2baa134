"""WILSON as a method: schedule, active terms, gradient routing, data it sees, old model, a run."""
from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch

import datamodules.incremental
from callbacks.teacher import TeacherCallback
from datamodules.incremental import IncrementalSegmentationDataModule
from experiments import step0_cache
from experiments.run import run_experiment
from lightning_modules.methods import build_method
from lightning_modules.module import IncrementalSegmentationModule
from lightning_modules.network import SegmentationNetwork
from lightning_modules.schedules import warmup_poly_factor
from experiments.config import apply_overrides, resolve
from tests.conftest import start_step

SMALL_NET = dict(encoder="tu-resnet10t", encoder_depth=3, output_stride=8, atrous_rates=(2, 4, 6), decoder_channels=16)
STEPS = [list(range(16)), [16, 17, 18, 19, 20]]


def test_warmup_poly_factor_by_hand():
    # 40 epochs of 89 iterations, 5 warm-up epochs (the VOC 15-5 numbers of the spec)
    total, warmup = 40 * 89, 5 * 89
    assert warmup_poly_factor(0, total, warmup) == 1.0
    assert warmup_poly_factor(warmup - 1, total, warmup) == 1.0
    assert warmup_poly_factor(warmup, total, warmup) == pytest.approx((1 - 445 / 3560) ** 0.9)  # the x0.887 jump
    assert warmup_poly_factor(warmup, total, warmup) == pytest.approx(0.887, abs=5e-4)
    assert warmup_poly_factor(2000, total, warmup) == pytest.approx((1 - 2000 / 3560) ** 0.9)
    assert warmup_poly_factor(total, total, warmup) == 0.0


def _step1_module(tmp_path, **hparams):
    torch.manual_seed(0)
    network = SegmentationNetwork([16], **SMALL_NET)
    method = build_method("wilson", **hparams)
    old = start_step(network, method, 5)
    module = IncrementalSegmentationModule(network, method, STEPS, step=1, lr=0.002)
    module.teacher = TeacherCallback(old)
    datamodule = IncrementalSegmentationDataModule(
        dataset="synthetic", data_root=tmp_path, task="15-5", step=1, supervision="image", batch_size=4,
        crop_size=32, num_workers=0, dataset_options={"synthetic": {"train": 96, "val": 8, "size": 40}})
    return module, datamodule


class _Probe(pl.Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, module, batch, batch_index):
        old = module.old_network
        self.batches.append({
            "epoch": trainer.current_epoch, "iteration": trainer.global_step, "keys": set(batch),
            "lrs": {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups},
            "old_training": old.training, "old_requires_grad": any(p.requires_grad for p in old.parameters())})


def test_warmup_schedule_terms_data_and_frozen_old_model(tmp_path, monkeypatch):
    module, datamodule = _step1_module(tmp_path, pseudo_label_epoch=2, warmup_epochs=2, localizer_lr=0.03,
                                       head_lr_factor=10.0)
    terms_seen = []
    original = module.method.incremental_training_loss

    def recording(mod, batch):
        loss, terms = original(mod, batch)
        terms_seen.append((mod.current_epoch, set(terms)))
        return loss, terms

    module.method.incremental_training_loss = recording
    datamodule.setup("fit")  # the image labels come from the presence table, built here

    def no_masks(path):
        raise AssertionError(f"a weak step opened the mask {path}")

    monkeypatch.setattr(datamodules.incremental, "load_mask", no_masks)
    before = copy.deepcopy(module.network.state_dict())
    probe = _Probe()
    trainer = pl.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[module.teacher, probe])
    trainer.fit(module, datamodule=datamodule)

    per_epoch = len(datamodule.train_dataloader())
    total = 4 * per_epoch
    assert per_epoch >= 2 and len(probe.batches) == total
    base = {"encoder": 0.002, "decoder": 0.02, "classifier": 0.02, "localizer": 0.03}
    for record in probe.batches:
        factor = 1.0 if record["iteration"] < 2 * per_epoch else (1 - record["iteration"] / total) ** 0.9
        for name, lr in record["lrs"].items():
            assert lr == pytest.approx(base[name] * factor, rel=1e-9), (record["iteration"], name)
        assert record["keys"] == {"image", "new_class_labels", "index"}  # no mask in a weak batch
        assert record["old_training"] is False and record["old_requires_grad"] is False
    for epoch, terms in terms_seen:
        expected = {"cls", "loc", "enc"} | ({"seg", "sss"} if epoch >= 2 else set())
        assert terms == expected, epoch
    # the old model did not move; it holds no localizer; the localizer is outside the network
    for name, value in module.old_network.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    assert not any("localizer" in k for k in module.network.state_dict())
    assert set(module.step_modules) == {"localizer"}
    assert module.step_modules["localizer"][-1].out_channels == 21


def _loss_and_grads(module, datamodule, current_epoch_gate):
    datamodule.setup("fit")
    module.teacher.setup(None, module, "fit")
    module.old_network.eval()
    module.train()
    batch = next(iter(datamodule.train_dataloader()))
    module.method.pseudo_label_epoch = current_epoch_gate  # module.current_epoch is 0 without a trainer
    loss, terms = module.method.training_loss(module, batch)
    loss.backward()
    grads = {name: [p.grad for p in part.parameters()] for name, part in
             [("encoder", module.network.encoder), ("decoder", module.network.decoder),
              ("classifier", module.network.classifier), ("localizer", module.step_modules["localizer"])]}
    return terms, grads


def _norm(grads):
    return sum(float(g.abs().sum()) for g in grads if g is not None)


def test_warmup_trains_localizer_and_encoder_only(tmp_path):
    module, datamodule = _step1_module(tmp_path)
    terms, grads = _loss_and_grads(module, datamodule, current_epoch_gate=5)
    assert set(terms) == {"cls", "loc", "enc"}
    assert _norm(grads["localizer"]) > 0 and _norm(grads["encoder"]) > 0  # the localizer's losses reach the encoder
    # the segmentation head gets an exact zero gradient (present for DDP, but zero)
    assert all(g is not None for g in grads["decoder"] + grads["classifier"])
    assert _norm(grads["decoder"]) == 0 and _norm(grads["classifier"]) == 0


def test_after_warmup_every_term_trains_the_segmentation_head(tmp_path):
    module, datamodule = _step1_module(tmp_path)
    terms, grads = _loss_and_grads(module, datamodule, current_epoch_gate=0)
    assert set(terms) == {"cls", "loc", "enc", "seg", "sss"}
    assert all(torch.isfinite(v) for v in terms.values())
    assert _norm(grads["decoder"]) > 0 and _norm(grads["classifier"]) > 0 and _norm(grads["localizer"]) > 0


def test_wilson_step0_uses_bce_and_its_own_cache(tiny_config):
    config = apply_overrides(tiny_config, ["methods=[ft,wilson]", "schedule.incremental={epochs: 2, lr: 0.001}",
                                           "methods.wilson.pseudo_label_epoch=1", "methods.wilson.warmup_epochs=1"])
    steps = STEPS
    ft_cache, wilson_cache = (step0_cache.model_path(config.run_config(m), build_method(m), steps) for m in ("ft", "wilson"))
    assert ft_cache != wilson_cache
    results = run_experiment(config)
    assert ft_cache.exists() and wilson_cache.exists()
    wilson = results["wilson"]
    assert wilson["complete"] and [s["step"] for s in wilson["steps"]] == [0, 1]
    assert wilson["hparams"]["alpha"] == 0.5 and wilson["hparams"]["pseudo_label_epoch"] == 1
    final = wilson["steps"][-1]["summary"]
    assert 0.0 <= final["all_with_bg"] <= 1.0
    # the two methods started from different step-0 models (CE vs BCE; a 1-epoch tiny model may
    # predict background everywhere either way, so the weights are compared, not the metrics)
    ce, bce = (torch.load(path, weights_only=True)["state_dict"] for path in (ft_cache, wilson_cache))
    assert not torch.equal(ce["classifier.heads.0.weight"], bce["classifier.heads.0.weight"])


@pytest.mark.parametrize("name,expected", [
    ("voc_15_5_disjoint", (73.6, 43.8, 67.3)), ("voc_15_5_overlap", (74.2, 41.7, 67.2)),
    ("voc_10_10_disjoint", (64.5, 54.3, 60.8)), ("voc_10_10_overlap", (70.4, 57.1, 65.0))])
def test_voc_files_carry_wilsons_paper_setting(name, expected):
    from experiments.config import load_experiment

    experiment = resolve(load_experiment(name))
    config = experiment.run_config("wilson")
    method = build_method("wilson", **config.hparams)
    assert config.schedule.incremental.model_dump() == {"epochs": 40, "lr": 0.001, "iterations": None,
                                                         "batch_size": None}   # epochs, not iterations; the data batch
    assert config.schedule.step0.model_dump() == {"epochs": 30, "lr": 0.01}
    assert (method.alpha, method.pseudo_label_epoch, method.warmup_epochs) == (0.5, 5, 5)
    assert (method.head_lr_factor, method.localizer_lr, method.enc_weight) == (10.0, 0.01, 1.0)
    assert config.network.output_stride == 16 and config.data.crop_size == 512
    # WILSON's code trains and tests under fp16 autocast: the GPU files say so (a CPU turns it into bf16 or fp32)
    assert load_experiment(name)["methods"]["wilson"]["trainer"]["precision"] == "16-mixed"
    assert config.trainer.precision in ("16-mixed", "bf16-mixed", "32-true")
    paper = experiment.expected["methods"]["wilson"]
    assert (paper["old"], paper["new"], paper["all"]) == expected and paper["all_includes_background"] is True
