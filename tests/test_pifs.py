"""PIFS and WI (lightning_modules/methods/pifs.py, wi.py): the cosine classifier, imprinting, the
prototype distillation and batch renormalisation against independent float64 computations, and
the steps as the step loop runs them."""
import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import start_step
from datamodules.tasks import task_classes
from lightning_modules.losses import imprinted_weights, imprinting_sums, prototype_distillation
from lightning_modules.network import (BatchRenorm2d, CosineClassifier, batch_renormalisation,
                                       use_batch_renormalisation)


def test_the_cosine_classifier_is_ten_times_the_cosine_of_feature_and_class_weight():
    torch.manual_seed(0)
    classifier = CosineClassifier(6, [3, 2])
    x = torch.randn(2, 6, 4, 5)
    logits = classifier(x).detach().double()
    weights = torch.cat([h.weight[:, :, 0, 0] for h in classifier.heads]).detach().double().numpy()
    features = x.double().numpy()
    for b in range(2):
        for i in range(4):
            for j in range(5):
                f = features[b, :, i, j]
                for c in range(5):
                    w = weights[c]
                    expected = 10.0 * f @ w / (np.linalg.norm(f) * np.linalg.norm(w))
                    assert float(logits[b, c, i, j]) == pytest.approx(expected, abs=1e-5)
    # A head's length does not matter; imprinting sets the newest head's directions.
    classifier.add_step(2)
    prototypes = torch.randn(2, 6)
    classifier.imprint_newest(prototypes)
    scaled = CosineClassifier(6, [3, 2, 2])
    scaled.load_state_dict(classifier.state_dict())
    scaled.heads[-1].weight.data *= 7.0
    assert torch.allclose(classifier(x), scaled(x), atol=1e-5)
    with pytest.raises(ValueError, match="classes x channels"):
        classifier.imprint_newest(torch.randn(3, 6))
    with pytest.raises(ValueError, match="no"):
        classifier.init_newest_from_background()


def _renorm_float64(x, gamma, beta, mean_run, var_run, eps):
    """The official ABR's training forward, written out in float64 (r and d treated as constants)."""
    x = x.double()
    per_channel = x.transpose(0, 1).reshape(x.shape[1], -1)
    n = per_channel.shape[1]
    mean_b = per_channel.mean(dim=1)
    var_biased = ((per_channel - mean_b[:, None]) ** 2).sum(dim=1) / n
    var_unbiased = var_biased * n / (n - 1)
    running_std = torch.sqrt(var_run.double() + eps)
    r = (torch.sqrt(var_unbiased + eps) / running_std).detach()
    d = ((mean_b - mean_run.double()) / running_std).detach()
    view = (1, -1, 1, 1)
    normalised = (x - mean_b.view(view)) / torch.sqrt(var_biased + eps).view(view)
    return gamma.double().view(view) * r.view(view) * normalised + beta.double().view(view) + \
        gamma.double().view(view) * d.view(view)


def test_batch_renormalisation_is_its_formula_in_value_and_gradient_and_never_moves_the_running_statistics():
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(3)
    bn.weight.data = torch.tensor([1.5, 0.5, -1.0])
    bn.bias.data = torch.tensor([0.1, -0.2, 0.3])
    bn.running_mean.data = torch.tensor([0.5, -1.0, 2.0])
    bn.running_var.data = torch.tensor([2.0, 0.5, 4.0])
    renorm = BatchRenorm2d(copy.deepcopy(bn)).train()
    x = (torch.randn(4, 3, 5, 6) * 2 + 1).requires_grad_(True)
    y = renorm(x)
    x64 = x.detach().double().requires_grad_(True)
    gamma = renorm.weight.detach().double().requires_grad_(True)
    expected = _renorm_float64(x64, gamma, renorm.bias.detach(), bn.running_mean, bn.running_var, bn.eps)
    assert torch.allclose(y.double(), expected, atol=1e-5)
    assert torch.equal(y, batch_renormalisation(x, renorm.weight, renorm.bias, bn.running_mean, bn.running_var, bn.eps))
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    (expected * upstream.double()).sum().backward()
    assert torch.allclose(x.grad.double(), x64.grad, atol=1e-5)
    assert torch.allclose(renorm.weight.grad.double(), gamma.grad, atol=1e-4)
    # The running statistics stay the base step's (momentum 0), and eval is batch norm's eval.
    assert torch.equal(renorm.running_mean, bn.running_mean) and torch.equal(renorm.running_var, bn.running_var)
    renorm.eval()
    bn.eval()
    assert torch.allclose(renorm(x.detach()), bn(x.detach()), atol=1e-6)
    # The forward value is the eval value but for the unbiased/biased variance ratio: close here.
    assert torch.allclose(y.detach(), bn(x.detach()), atol=5e-2)


def test_a_network_changes_its_batch_norms_in_place_keeping_its_state_and_out_of_sync_batchnorm():
    network = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)))
    network[1].running_mean.data += 1.0
    state = copy.deepcopy(network.state_dict())
    assert use_batch_renormalisation(network) == 2
    assert isinstance(network[1], BatchRenorm2d) and isinstance(network[2][1], BatchRenorm2d)
    assert use_batch_renormalisation(network) == 0
    assert network.state_dict().keys() == state.keys()
    assert all(torch.equal(network.state_dict()[k], v) for k, v in state.items())
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(network)
    assert isinstance(converted[1], BatchRenorm2d)


def test_imprinting_sums_are_the_normalised_masked_means_of_unit_features_per_image():
    torch.manual_seed(2)
    features = torch.randn(2, 4, 3, 3)
    labels = torch.randint(0, 4, (2, 6, 6))
    labels[1][labels[1] == 3] = 255
    labels[0, 0, 0] = 3
    sums, images = imprinting_sums(features, labels, [2, 3])
    up = torch.nn.functional.interpolate(features.double(), size=(6, 6), mode="bilinear", align_corners=False)
    up = up.numpy()
    expected = np.zeros((2, 4))
    counts = [0, 0]
    for k, channel in enumerate([2, 3]):
        for b in range(2):
            total = np.zeros(4)
            hit = False
            for i in range(6):
                for j in range(6):
                    if labels[b, i, j] == channel:
                        f = up[b, :, i, j]
                        total += f / np.linalg.norm(f)
                        hit = True
            if hit:
                expected[k] += total / np.linalg.norm(total)
                counts[k] += 1
    assert images.tolist() == counts == [2, 1]
    assert sums.dtype == torch.float64 and np.allclose(sums.numpy(), expected, atol=1e-6)
    weights = imprinted_weights(sums).numpy()
    assert np.allclose(weights, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-6)
    # Batches add up: two halves give the same totals.
    first, second = imprinting_sums(features[:1], labels[:1], [2, 3]), imprinting_sums(features[1:], labels[1:], [2, 3])
    assert torch.allclose(first[0] + second[0], sums) and torch.equal(first[1] + second[1], images)


def test_prototype_distillation_distils_every_class_of_the_imprinted_teacher():
    torch.manual_seed(3)
    logits, teacher = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    z, t = logits.double().numpy(), teacher.double().numpy()
    total = 0.0
    for b in range(2):
        for i in range(3):
            for j in range(4):
                q = np.exp(t[b, :, i, j]) / np.exp(t[b, :, i, j]).sum()
                log_p = z[b, :, i, j] - np.log(np.exp(z[b, :, i, j]).sum())
                total += -(q * log_p).sum() / 5
    assert float(prototype_distillation(logits, teacher)) == pytest.approx(total / 24, rel=1e-5)
    with pytest.raises(ValueError, match="imprinted new classes"):
        prototype_distillation(logits, teacher[:, :3])


def test_pifs_drops_a_batch_distillation_above_the_official_clip():
    from lightning_modules.methods import build_method

    pifs = build_method("pifs")
    confident = torch.tensor([20.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    logits = confident.clone().requires_grad_(True)
    calm, wild = confident.clone(), torch.tensor([0.0, 0.0, 80.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    for teacher, kept in ((calm, True), (wild, False)):
        module = SimpleNamespace(network=lambda images: {"logits": logits},
                                 old_network=lambda images, t=teacher: {"logits": t})
        loss, terms = pifs.incremental_training_loss(module, {"image": torch.zeros(1, 3, 2, 2), "label": labels})
        expected = terms["ce"] + (10.0 * terms["kd"] if kept else 0.0)
        assert float(loss.detach()) == pytest.approx(float(expected.detach()))
        assert (10.0 * float(terms["kd"]) <= 10.0) == kept


# --- the steps, as the step loop runs them ---------------------------------------------------------------
@pytest.fixture
def fewshot_experiment(tiny_config):
    from experiments.config import apply_overrides, resolve

    return resolve(apply_overrides(tiny_config, ["data.task=fss-5-0", "data.fewshot={nshot: 2, ishot: 0}",
                                                 "data.test_images=all", "methods=[wi, pifs]",
                                                 "schedule.incremental={epochs: 1, lr: 0.001, iterations: 2}",
                                                 "trainer.precision=32-true"]))  # float32: compared at 1e-5


def _whole_shots(network, datamodule):
    """Each shot of the step whole (no augmentation), through `network` in eval mode: its decoder
    features upsampled to the image in float64 (D, H, W) and its labels (H, H), read again from the
    files with the shot's own label lookup."""
    from datamodules.datasets.voc import load_image, load_mask
    from datamodules.labels import remap
    from datamodules.transforms import eval_transform

    network.eval()
    transform = eval_transform(datamodule.eval_crop_size, "full", datamodule.size_divisor)
    train = datamodule.train_set
    for i, row in enumerate(train.indices):
        out = transform(image=load_image(train.files.images[row]), mask=remap(load_mask(train.files.masks[row]),
                                                                              train.lookup[i]))
        with torch.no_grad():
            features = network(out["image"][None])["decoder"]
        yield (torch.nn.functional.interpolate(features.double(), size=out["mask"].shape, mode="bilinear",
                                               align_corners=False)[0].numpy(), out["mask"].numpy())


def _independent_prototypes(network, datamodule) -> np.ndarray:
    """The WI weights worked out again: float64 unit features of each shot's class pixels, their
    normalised sum, summed over the shots and normalised."""
    n_old = len(datamodule.steps[0])
    sums = np.zeros((5, network.classifier.in_channels))
    for features, labels in _whole_shots(network, datamodule):
        for k in range(5):
            pixels = features[:, labels == n_old + k]
            if pixels.shape[1]:
                total = (pixels / np.linalg.norm(pixels, axis=0, keepdims=True)).sum(axis=1)
                sums[k] += total / np.linalg.norm(total)
    return sums / np.linalg.norm(sums, axis=1, keepdims=True)


def test_wi_imprints_the_shots_prototypes_and_trains_nothing(fewshot_experiment):
    from experiments.training import build_step, fit_and_test
    from lightning_modules.methods import build_method

    config = fewshot_experiment.run_config("wi")
    method = build_method("wi")
    steps = task_classes("synthetic", "fss-5-0")
    torch.manual_seed(0)
    network = method.build_network(config.network, [len(steps[0])], pretrained=False)
    assert isinstance(network.classifier, CosineClassifier) and isinstance(network.decoder.relu, nn.Identity)
    start_step(network, method, len(steps[1]))
    before = {k: v.clone() for k, v in network.state_dict().items() if not k.startswith("classifier.heads.1")}
    built = build_step(config, method, steps, 1, network)
    record = fit_and_test(config, built, logger=None)
    assert (record["epochs"], record["optimizer_updates"], record["train_images"]) == (0, 0, 10)
    assert all(torch.equal(network.state_dict()[k], v) for k, v in before.items())
    imprinted = network.classifier.heads[1].weight[:, :, 0, 0].detach().double().numpy()
    assert np.allclose(imprinted, _independent_prototypes(copy.deepcopy(network), built.datamodule), atol=1e-5)


def test_pifs_starts_from_the_imprinted_teacher_with_renormalised_frozen_statistics(fewshot_experiment):
    from experiments.training import build_step, fit_and_test
    from lightning_modules.methods import build_method

    config = fewshot_experiment.run_config("pifs")
    method = build_method("pifs")
    assert method.step0_key() == build_method("wi").step0_key()   # the official COS base step, shared
    steps = task_classes("synthetic", "fss-5-0")
    torch.manual_seed(0)
    network = method.build_network(config.network, [len(steps[0])], pretrained=False)
    old = start_step(network, method, len(steps[1]))
    old_before = copy.deepcopy(old.state_dict())
    renorms = [m for m in network.modules() if isinstance(m, BatchRenorm2d)]
    assert renorms and not any(isinstance(m, nn.BatchNorm2d) for m in network.modules())
    statistics = [(m.running_mean.clone(), m.running_var.clone()) for m in renorms]
    built = build_step(config, method, steps, 1, network, old)
    expected = _independent_prototypes(copy.deepcopy(network), built.datamodule)
    record = fit_and_test(config, built, logger=None)
    assert record["optimizer_updates"] == 20   # one epoch: 10 passes (20 // nshot) of 2 batches
    teacher = built.module.old_network
    assert teacher.classes_per_step == [16, 5]
    assert np.allclose(teacher.classifier.heads[1].weight[:, :, 0, 0].double().numpy(), expected, atol=1e-5)
    assert teacher is old
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in old_before.items())
    assert all(torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
               for m, (mean, var) in zip(renorms, statistics))
    assert not torch.equal(network.classifier.heads[1].weight, teacher.classifier.heads[1].weight)  # trained on
    # A resumed step keeps its trained weights and rebuilds the same teacher from the saved totals.
    trained = network.classifier.heads[1].weight.clone()
    built.module.pass_restored = True
    method.after_training_pass(built.module, built.module.pass_totals)
    assert torch.equal(network.classifier.heads[1].weight, trained)
    assert torch.equal(built.module.old_network.classifier.heads[1].weight, teacher.classifier.heads[1].weight)


def test_mean_feature_sums_are_plain_means_of_each_present_channel():
    from lightning_modules.losses import mean_feature_sums

    torch.manual_seed(4)
    features = torch.randn(2, 3, 2, 2)
    labels = torch.randint(0, 3, (2, 4, 4))
    labels[0, 0, 0] = 255
    sums, images = mean_feature_sums(features, labels, 4)
    up = torch.nn.functional.interpolate(features.double(), size=(4, 4), mode="bilinear", align_corners=False).numpy()
    expected, counts = np.zeros((4, 3)), [0, 0, 0, 0]
    for b in range(2):
        for k in range(4):
            pixels = [up[b, :, i, j] for i in range(4) for j in range(4) if labels[b, i, j] == k]
            if pixels:
                expected[k] += np.mean(pixels, axis=0)
                counts[k] += 1
    assert images.tolist() == counts and counts[3] == 0
    assert np.allclose(sums.numpy(), expected, atol=1e-6)


def test_amp_adapts_every_class_the_shots_show_and_sets_the_new_ones_to_their_proxies(fewshot_experiment):
    from experiments.config import apply_overrides, resolve
    from experiments.training import build_step, fit_and_test
    from lightning_modules.methods import build_method

    experiment = resolve(apply_overrides(fewshot_experiment, ["methods=[amp]"]))
    config = experiment.run_config("amp")
    method = build_method("amp")
    steps = task_classes("synthetic", "fss-5-0")
    torch.manual_seed(0)
    network = method.build_network(config.network, [len(steps[0])], pretrained=False)
    start_step(network, method, len(steps[1]))
    before = [h.weight.detach().clone()[:, :, 0, 0] for h in network.classifier.heads]
    biases = [h.bias.detach().clone() for h in network.classifier.heads]
    built = build_step(config, method, steps, 1, network)
    # The proxies worked out again: whole shots, eval mode, float64 plain means per image, averaged.
    sums, counts = np.zeros((21, network.classifier.in_channels)), np.zeros(21)
    for features, labels in _whole_shots(copy.deepcopy(network), built.datamodule):
        for k in range(21):
            if (labels == k).any():
                sums[k] += features[:, labels == k].mean(axis=1)
                counts[k] += 1
    record = fit_and_test(config, built, logger=None)
    assert record["optimizer_updates"] == 0
    after = torch.cat([h.weight.detach()[:, :, 0, 0] for h in network.classifier.heads]).double().numpy()
    old_before, bias_after = torch.cat(before).double().numpy(), torch.cat([h.bias.detach() for h in network.classifier.heads])
    assert counts[16:].min() >= 1 and counts[0] >= 1
    for k in range(21):
        if counts[k] == 0:
            assert np.allclose(after[k], old_before[k]) and float(bias_after[k]) == float(torch.cat(biases)[k])
            continue
        proxy = sums[k] / counts[k]
        proxy /= np.linalg.norm(proxy)
        keep = 0.0 if k >= 16 else 0.25
        assert np.allclose(after[k], keep * old_before[k] + (1 - keep) * proxy, atol=1e-5), k
        assert float(bias_after[k]) == 0.0
