"""MBS as a method (lightning_modules/methods/mbs.py) and the Segmenter in the configuration: the
step loss is the official sum of its terms, recomputed here pixel by pixel and patch by patch in
float64 from the networks' outputs; its pseudo-labels never read old-class ground truth; the
network kind, its identity and its weights error; AdamW for the embedded ViT."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from experiments.config import ConfigError, apply_overrides, load_experiment, resolve
from experiments.store import config_id
from lightning_modules.methods import build_method
from lightning_modules.methods.mbs import labels_on_patch_grid
from lightning_modules.network import PretrainedWeightsUnavailable, SegmentationNetwork, build_network
from lightning_modules.segmenter import SegmenterNetwork
from tests.conftest import TINY_SEGMENTER, start_step

N_OLD, N_NEW = 4, 2


def _step1():
    """A tiny Segmenter after step 0 (4 channels), its frozen copy, and the step-1 network (6)."""
    torch.manual_seed(0)
    network = build_network(TINY_SEGMENTER, [N_OLD])
    with torch.no_grad():   # an old model that is confident somewhere: scale the background's affine
        network.decoder.mask_norm.weight[0].copy_(torch.tensor([3.0, 2.0, 2.0, 2.0]))
    mbs = build_method("mbs")
    old = start_step(network, mbs, N_NEW)
    return mbs, network.eval(), old


def _softmax(values):
    top = max(values)
    e = [math.exp(v - top) for v in values]
    return [x / sum(e) for x in e]


def test_labels_on_the_patch_grid_are_each_patch_top_left_pixel_with_padding_as_void():
    labels = torch.arange(1, 1 + 10 * 7).reshape(1, 10, 7)      # 10 x 7, patches of 4: a 3 x 2 grid
    grid = labels_on_patch_grid(labels, (3, 2), 4)
    assert grid.tolist() == [[[int(labels[0, 4 * i, 4 * j]) for j in range(2)] for i in range(3)]]
    assert labels_on_patch_grid(torch.zeros(1, 6, 6, dtype=torch.long), (2, 2), 4)[0, 1, 1] == 0
    assert labels_on_patch_grid(torch.zeros(1, 5, 5, dtype=torch.long), (2, 2), 4)[0, 1, 1] == 0
    assert labels_on_patch_grid(torch.zeros(1, 3, 3, dtype=torch.long), (2, 2), 2)[0, 1, 1] == 0
    # a patch that starts in the padding is void
    assert labels_on_patch_grid(torch.zeros(1, 4, 4, dtype=torch.long), (2, 2), 3)[0, 1, 1] == 0
    assert labels_on_patch_grid(torch.zeros(1, 3, 3, dtype=torch.long), (2, 2), 3)[0, 1, 1] == 255


def test_step_loss_is_the_official_sum_of_its_terms_recomputed_in_float64():
    mbs, network, old = _step1()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[0, 8:20, 4:24] = 4
    labels[1, 16:, 16:] = 5
    labels[1, :3] = 255
    module = SimpleNamespace(network=network, old_network=old, n_old=N_OLD, num_classes=N_OLD + N_NEW)
    total, terms = mbs.incremental_training_loss(module, {"image": images, "label": labels})

    with torch.no_grad():
        new_out, old_out = network(images), old(images)
    out = {k: v.double() for k, v in new_out.items()}
    prev = {k: v.double() for k, v in old_out.items()}
    K, B, H, W = N_OLD + N_NEW, 2, 32, 32
    pseudo = [[[0] * W for _ in range(H)] for _ in range(B)]
    ce, counted, lgkd = 0.0, 0, 0.0
    for b in range(B):
        for h in range(H):
            for w in range(W):
                q = _softmax([float(prev["logits"][b, c, h, w]) for c in range(N_OLD)])
                p = _softmax([float(out["logits"][b, c, h, w]) for c in range(K)])
                y = int(labels[b, h, w])
                top = max(range(N_OLD), key=lambda c: q[c])
                label = top if (y == 0 and top > 0 and q[top] >= 0.7) else y
                if label == 0 and q[0] < sum(q[1:]):
                    label = 255
                pseudo[b][h][w] = label
                if label != 255:
                    ce -= math.log(p[label])
                    counted += 1
                teacher = q + [0.0] * N_NEW
                if y not in (0, 255):
                    teacher[y], teacher[0] = teacher[0], 0.0
                lgkd -= sum(teacher[c] * math.log(p[c]) for c in range(K)) / K
    ce, lgkd = ce / counted, lgkd / (B * H * W)
    # AFD on the 4 x 4 patch grid: each patch's top-left pseudo-label, the old background probability
    patch, d = 8, out["patches"].shape[-1]
    afd, positive = 0.0, 0
    for b in range(B):
        for i in range(4):
            for j in range(4):
                label = pseudo[b][i * patch][j * patch]
                s_bg = _softmax([float(prev["logits_lowres"][b, c, i, j]) for c in range(N_OLD)])[0]
                weight = s_bg if label == 0 else (1.0 if 1 <= label < N_OLD else 0.0)
                n = i * 4 + j
                afd += weight * sum((float(out["patches"][b, n, k]) - float(prev["patches"][b, n, k])) ** 2
                                    for k in range(d))
                positive += weight > 0
    afd /= d * positive
    classes = ((out["class_features"][:, :N_OLD] - prev["class_features"]) ** 2).mean().item()
    e = out["class_embeddings"][0] / out["class_embeddings"][0].norm(dim=-1, keepdim=True)
    cosines = [abs(float(e[i] @ e[j])) for i in range(N_OLD, K) for j in range(K) if j != i]
    ortho = sum(c for c in cosines if c != 0) / sum(c != 0 for c in cosines)
    expected = ce + afd + classes + 25.0 * lgkd + N_NEW / K * ortho
    flat = [pseudo[b][h][w] for b in range(B) for h in range(H) for w in range(W)]
    assert 255 in flat and 0 in flat and any(1 <= y < N_OLD for y in flat), "every case of the pseudo-labels occurs"
    for name, value in (("ce", ce), ("afd_patches", afd), ("afd_classes", classes), ("lgkd", lgkd), ("ortho", ortho)):
        assert float(terms[name].detach()) == pytest.approx(value, rel=1e-4), name
    assert float(total.detach()) == pytest.approx(expected, rel=1e-4)
    total.backward()    # gradients reach the new class embeddings through the orthogonal loss and the masks
    assert network.decoder.class_embeddings[1].grad is not None


def test_pseudo_labels_never_read_the_ground_truth_of_old_classes():
    mbs, network, old = _step1()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    module = SimpleNamespace(network=network, old_network=old, n_old=N_OLD, num_classes=N_OLD + N_NEW)
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, :10] = 5                     # a new class: kept
    labels[:, 20:, :10] = 255
    outputs = []
    for old_class in (0, 1, 3):             # the same pixels labelled background or an old class
        with_old = labels.clone()
        with_old[:, 12:20] = old_class
        outputs.append(mbs.pseudo_labels(module, images, None, with_old))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    assert torch.all(outputs[0][:, :10] == 5) and torch.all(outputs[0][:, 20:, :10] == 255)


def test_network_kind_builds_the_segmenter_and_keeps_deeplab_identities():
    network = build_network(TINY_SEGMENTER, [3, 2])
    assert isinstance(network, SegmenterNetwork) and network.classes_per_step == [3, 2]
    assert isinstance(build_network({"encoder": "tu-resnet10t", "encoder_depth": 3, "output_stride": 8,
                                     "atrous_rates": [2, 4, 6], "decoder_channels": 8}, [3]), SegmentationNetwork)
    experiment = resolve(load_experiment("synthetic_15_5_disjoint"))
    config = experiment.run_config("mib")
    # a DeepLab run's identity ignores the Segmenter's keys (and SGD the optimizer's name): the ids of
    # runs and cached models made before they existed are unchanged
    for overrides in (["network.image_size=96", "network.vit_depth=3"], ["optimizer.algorithm=sgd"]):
        changed = resolve(apply_overrides(load_experiment("synthetic_15_5_disjoint"), overrides)).run_config("mib")
        assert config_id(changed) == config_id(config)
    assert "kind" not in config.network.identity() and "image_size" not in config.network.identity()
    assert "algorithm" not in config.optimizer.identity()
    adamw = resolve(apply_overrides(load_experiment("synthetic_15_5_disjoint"), ["optimizer.algorithm=adamw"]))
    assert config_id(adamw.run_config("mib")) != config_id(config)
    segmenter = resolve(load_experiment("synthetic_15_5_disjoint_segmenter")).run_config("mbs")
    assert segmenter.network.stride == segmenter.network.patch_size == 4 and "arch" not in segmenter.network.identity()
    with pytest.raises(ConfigError, match="network.kind"):
        resolve(apply_overrides(load_experiment("synthetic_15_5_disjoint"), ["network.kind=vit"]))


def test_mbs_settings_are_its_codes_and_its_step0_is_its_own():
    from datamodules.tasks import task_classes
    from experiments import step0_cache

    experiment = resolve(load_experiment("voc_15_5_overlap"))
    config = experiment.run_config("mbs")
    assert (config.network.kind, config.network.encoder, config.network.encoder_weights) == \
        ("segmenter", "vit_base_patch16_384", "augreg_in21k_ft_in1k")
    assert config.data.void_as_background is False
    assert (config.optimizer.weight_decay, config.optimizer.poly_power, config.optimizer.nesterov) == (1e-5, 0.0, True)
    steps = task_classes("voc", "15-5")
    mib = experiment.run_config("mib")
    assert step0_cache.model_path(config, build_method("mbs"), steps) != step0_cache.model_path(mib, build_method("mib"), steps)


def test_a_constant_lr_and_adamw_from_the_optimizer_section():
    from lightning_modules.module import IncrementalSegmentationModule

    mbs, network, old = _step1()
    module = IncrementalSegmentationModule(network, mbs, [list(range(N_OLD)), [4, 5]], step=1, lr=1e-3,
                                           optimizer="adamw", weight_decay=1e-5, poly_power=0.0)
    optimizer, scheduler = module.build_optimizer(total_iterations=10, iterations_per_epoch=5)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["weight_decay"] == 1e-5
    for _ in range(9):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_unavailable_vit_weights_stop_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsUnavailable, match="encoder_weights=null"):
        build_network({**TINY_SEGMENTER, "encoder": "vit_tiny_patch16_224", "encoder_weights": "augreg_in21k_ft_in1k"}, [3])


def test_network_labels_name_resnet_and_vit_rows():
    from experiments.config import network_label

    assert network_label({"kind": "segmenter", "encoder": "vit_base_patch16_384", "patch_size": 16}) == "Segmenter ViT-B/16"
    assert network_label({"kind": "segmenter", "encoder": "vit_tiny_patch16_224", "patch_size": 4, "vit_width": 64,
                          "vit_depth": 4}) == "Segmenter ViT w64 d4 p4"
    assert network_label({"arch": "deeplabv3", "encoder": "resnet101"}) == "DeepLabV3 R-101"
    assert network_label({"arch": "deeplabv3plus", "encoder": "tu-resnet10t"}) == "DeepLabV3+ R-10t"
    assert network_label({}) == "-"
