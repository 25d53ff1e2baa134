"""LwF, ILT and LwF-MC as methods: registration, presets (MiB's `--method LWF / ILT / LWF-MC`),
their losses on a tiny fake module equal the loss functions with the preset weights, and the old
network gets no gradient."""
from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_modules.losses import (bce_one_hot, cross_entropy, feature_distillation, knowledge_distillation,
                                      lwf_mc_loss)
from lightning_modules.methods import METHODS
from lightning_modules.methods.base import Method

N_OLD, N_NEW = 4, 2
IGNORE = 255


class FakeNetwork(nn.Module):
    """images (B, 3, H, W) -> {"encoder": ReLU(1x1 conv) features at half resolution,
    "logits": 1x1 conv of the full-resolution image}: what the methods read of SegmentationNetwork."""

    def __init__(self, num_classes: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Conv2d(3, 5, 1)
        self.classifier = nn.Conv2d(3, num_classes, 1)

    def forward(self, images):
        encoder = torch.relu(self.features(images[:, :, ::2, ::2]))
        return {"encoder": encoder, "logits": 2.0 * self.classifier(images)}


def _module(step=1):
    old = FakeNetwork(N_OLD, seed=1)  # parameters left trainable on purpose: the method must not use them
    return SimpleNamespace(network=FakeNetwork(N_OLD + N_NEW, seed=0), old_network=old, step=step, current_epoch=0,
                           training=True, step_modules=nn.ModuleDict())


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 6, 8, generator=g)
    labels = torch.randint(N_OLD - 1, N_OLD + N_NEW, (2, 6, 8), generator=g)
    labels = labels.masked_fill(labels == N_OLD - 1, 0)  # old classes are labelled background
    labels = labels.masked_fill(torch.rand(2, 6, 8, generator=g) < 0.2, IGNORE)
    return {"image": images, "label": labels}


def _expected(name, module, batch, **hparams):
    """The method's formula from the loss functions and the MiB preset weights (or hparams)."""
    with torch.no_grad():
        new, old = module.network(batch["image"]), module.old_network(batch["image"])
    labels = batch["label"]
    if name == "lwf":
        return (cross_entropy(new["logits"], labels)
                + hparams.get("kd_weight", 100.0) * knowledge_distillation(new["logits"], old["logits"],
                                                                            alpha=hparams.get("kd_alpha", 1.0)))
    if name == "ilt":
        return (cross_entropy(new["logits"], labels)
                + hparams.get("kd_weight", 100.0) * knowledge_distillation(new["logits"], old["logits"],
                                                                            alpha=hparams.get("kd_alpha", 1.0))
                + hparams.get("feature_weight", 100.0) * feature_distillation(new["encoder"], old["encoder"]))
    return lwf_mc_loss(new["logits"], labels, old["logits"], importance=hparams.get("importance", 10.0))


NAMES = ["lwf", "ilt", "lwf_mc"]


def build_method(name, **hparams):
    """The registered class with these hyper-parameters (their checking at load belongs to the
    config, not to these tests)."""
    return METHODS[name](**hparams)


def test_registered():
    assert {"lwf", "lwf_mc", "ilt"} <= set(METHODS)
    assert METHODS["lwf"].step0_loss == "ce"
    assert METHODS["ilt"].step0_loss == "ce"
    assert METHODS["lwf_mc"].step0_loss == "bce"


@pytest.mark.parametrize("name", NAMES)
def test_data_needs_are_the_defaults_plus_the_old_model(name):
    cls = METHODS[name]
    assert cls.name == name
    assert cls.uses_old_model is True
    assert cls.supervision == "pixel" and cls.old_labels == "background" and cls.training_images == "step"
    # no MiB classifier init (the presets do not set `init_balanced`)
    assert cls.init_new_classifier is Method.init_new_classifier


def test_preset_hyper_parameters():
    # MiB's presets: LWF loss_kd 100; ILT loss_kd 100, loss_de 100; LWF-MC icarl_importance 10; alpha 1
    assert dataclasses.asdict(build_method("lwf")) == {"kd_weight": 100.0, "kd_alpha": 1.0}
    assert dataclasses.asdict(build_method("ilt")) == {"kd_weight": 100.0, "kd_alpha": 1.0, "feature_weight": 100.0,
                                                     "distilled_features": "encoder"}   # the backbone, as MiB's code
    assert dataclasses.asdict(build_method("lwf_mc")) == {"importance": 10.0}


@pytest.mark.parametrize("name", NAMES)
def test_incremental_loss_is_the_formula_with_the_preset_weights(name):
    module, batch = _module(), _batch()
    method = build_method(name)
    loss, terms = method.training_loss(module, batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(float(_expected(name, module, batch)), rel=1e-6)
    assert all(value.dim() == 0 for value in terms.values())


@pytest.mark.parametrize("name,hparams", [("lwf", {"kd_weight": 3.0, "kd_alpha": 0.5}),
                                          ("ilt", {"kd_weight": 2.0, "kd_alpha": 2.0, "feature_weight": 7.0}),
                                          ("lwf_mc", {"importance": 1.5})])
def test_incremental_loss_follows_the_hyper_parameters(name, hparams):
    module, batch = _module(), _batch(1)
    loss, _ = build_method(name, **hparams).training_loss(module, batch)
    assert loss.item() == pytest.approx(float(_expected(name, module, batch, **hparams)), rel=1e-6)
    assert loss.item() != pytest.approx(float(_expected(name, module, batch)), rel=1e-4)


def test_terms_recombine_into_the_loss():
    module, batch = _module(), _batch(2)
    loss, terms = build_method("lwf").training_loss(module, batch)
    assert set(terms) == {"ce", "kd"}
    assert loss.item() == pytest.approx((terms["ce"] + 100.0 * terms["kd"]).item(), rel=1e-6)
    loss, terms = build_method("ilt").training_loss(module, batch)
    assert set(terms) == {"ce", "kd", "feature"}
    assert loss.item() == pytest.approx((terms["ce"] + 100.0 * terms["kd"] + 100.0 * terms["feature"]).item(), rel=1e-6)
    assert terms["feature"].item() > 0  # the two fake encoders differ
    loss, terms = build_method("lwf_mc").training_loss(module, batch)
    assert set(terms) == {"bce", "distillation"}
    assert loss.item() == pytest.approx((terms["bce"] + 10.0 * terms["distillation"]).item(), rel=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_old_network_gets_no_gradient_and_the_new_one_does(name):
    module, batch = _module(), _batch(3)
    loss, _ = build_method(name).training_loss(module, batch)
    loss.backward()
    assert all(p.grad is None for p in module.old_network.parameters())
    assert module.network.classifier.weight.grad is not None
    assert torch.isfinite(module.network.classifier.weight.grad).all()
    if name == "ilt":  # the feature term reaches the encoder
        assert module.network.features.weight.grad is not None and module.network.features.weight.grad.abs().sum() > 0
    else:
        assert module.network.features.weight.grad is None


@pytest.mark.parametrize("name,step0", [("lwf", "ce"), ("ilt", "ce"), ("lwf_mc", "bce")])
def test_step0_loss(name, step0):
    module, batch = _module(step=0), _batch(4)
    module.old_network = None  # no old model at step 0
    loss, terms = build_method(name).training_loss(module, batch)
    with torch.no_grad():
        logits = module.network(batch["image"])["logits"]
    expected = bce_one_hot(logits, batch["label"]) if step0 == "bce" else cross_entropy(logits, batch["label"])
    assert set(terms) == {step0}
    assert loss.item() == pytest.approx(float(expected), rel=1e-6)


def test_lwf_hand_computed_single_pixel():
    # constant networks on a 1x1 image: new logits (0, log 3, log 7) over [bg, old 1, new 2],
    # old logits (0, 0); label 0. CE = -log(1/11) = log 11; KD = log(16/3)/4 (see
    # test_distillation_losses); LwF = log 11 + 100 log(16/3) / 4.
    new = torch.tensor([0.0, math.log(3.0), math.log(7.0)]).view(1, 3, 1, 1)
    old = torch.zeros(1, 2, 1, 1)
    module = SimpleNamespace(network=lambda images: {"logits": new}, old_network=lambda images: {"logits": old},
                             step=1, current_epoch=0)
    batch = {"image": torch.zeros(1, 3, 1, 1), "label": torch.tensor([[[0]]])}
    loss, _ = build_method("lwf").training_loss(module, batch)
    assert loss.item() == pytest.approx(math.log(11) + 100 * math.log(16 / 3) / 4, rel=1e-6)
