"""SS (lightning_modules/methods/single_stage.py) against values worked out independently: its
class scores and loss by a float64 loop formula, the stochastic gate, the inference's
background power and score cut by hand, the self-training term (PAMR, pseudo_gtmask, balanced CE
written out as loops), the code's parameter groups and frozen layers, and one tiny stage."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD
from lightning_modules.methods import build_method
from lightning_modules.methods.base import StepContext
from lightning_modules.methods.single_stage import SingleStage, StochasticGate, merge_views
from lightning_modules.methods.weak_baseline import StageProgress, mask_path


class FixedLogits(nn.Module):
    """A classifier whose foreground logits (B, K, H, W) are given; the background logit 1 is
    prepended as SingleStageNet does. forward ignores the image."""

    def __init__(self, foreground: torch.Tensor):
        super().__init__()
        self.foreground = nn.Parameter(foreground.clone().float())

    def forward(self, images):
        fg = self.foreground
        return torch.cat([torch.ones_like(fg[:, :1]), fg], dim=1)


def _softmax(z):
    e = np.exp(z - z.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def reference_classification_loss(foreground: np.ndarray, labels: np.ndarray) -> float:
    """nGWP + focal scores and the multi-label soft margin, one image, class and pixel at a time."""
    batch, classes, height, width = foreground.shape
    total = 0.0
    for b in range(batch):
        z = np.concatenate([np.ones((1, height, width)), foreground[b]], axis=0)   # background logit 1
        m = np.zeros_like(z)
        for y in range(height):
            for x in range(width):
                e = [math.exp(z[c, y, x]) for c in range(classes + 1)]
                for c in range(classes + 1):
                    m[c, y, x] = e[c] / sum(e)
        per_image = 0.0
        for c in range(1, classes + 1):
            weighted = sum(m[c, y, x] * z[c, y, x] for y in range(height) for x in range(width))
            mass = sum(m[c, y, x] for y in range(height) for x in range(width))
            mean = mass / (height * width)
            score = weighted / (1.0 + mass) + (1.0 - mean) ** 3 * math.log(0.01 + mean)
            target = labels[b, c - 1]
            sigmoid = 1.0 / (1.0 + math.exp(-score))
            per_image += -(target * math.log(sigmoid) + (1 - target) * math.log(1 - sigmoid))
        total += per_image / classes
    return total / batch


def reference_pamr(image: np.ndarray, mask: np.ndarray, iterations: int, dilations) -> np.ndarray:
    """PAMR pixel by pixel: replicate borders = clamped indices; sigma per colour channel over the
    9 values of every dilation (unbiased); affinity softmax over the 8 neighbours of every dilation."""
    _, height, width = image.shape
    all9 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    ring = [o for o in all9 if o != (0, 0)]
    clamp = lambda v, n: min(max(v, 0), n - 1)  # noqa: E731
    neighbours, affinities = {}, {}
    for y in range(height):
        for x in range(width):
            around = [image[:, clamp(y + dy * d, height), clamp(x + dx * d, width)]
                      for d in dilations for dy, dx in all9]
            sigma = np.std(np.stack(around, axis=1), axis=1, ddof=1)
            points = [(clamp(y + dy * d, height), clamp(x + dx * d, width)) for d in dilations for dy, dx in ring]
            k = np.array([np.mean(-np.abs(image[:, y, x] - image[:, py, px]) / (0.1 * sigma + 1e-8))
                          for py, px in points])
            a = np.exp(k - k.max())
            neighbours[y, x], affinities[y, x] = points, a / a.sum()
    for _ in range(iterations):
        new = np.zeros_like(mask)
        for (y, x), points in neighbours.items():
            for (py, px), a in zip(points, affinities[y, x]):
                new[:, y, x] += a * mask[:, py, px]
        mask = new
    return mask


def reference_self_training(images: np.ndarray, foreground: np.ndarray, labels: np.ndarray):
    """The code's L_self at image resolution (no resizing needed): softmax, PAMR on the
    un-normalised image, absent classes zeroed, pseudo_gtmask, class-balanced CE, image weight."""
    batch, classes, height, width = foreground.shape
    mean, std = np.array(IMAGENET_MEAN)[:, None, None], np.array(IMAGENET_STD)[:, None, None]
    losses, margins = [], []
    for b in range(batch):
        z = np.concatenate([np.ones((1, height, width)), foreground[b]], axis=0)
        refined = reference_pamr(images[b] * std + mean, _softmax(z), 10, (1, 2, 4, 8, 12, 24))
        refined[1:] *= labels[b][:, None, None]
        pseudo = np.zeros_like(refined)
        for c in range(classes + 1):
            cutoff = max(refined[c].max() * (0.7 if c == 0 else 0.6), 0.2)
            pseudo[c] = refined[c] > cutoff
            margins.append(np.abs(refined[c] - cutoff).min())
        pseudo[:, pseudo.sum(axis=0) > 1] = 0
        counts = pseudo.reshape(classes + 1, -1).sum(axis=1)
        weights = (counts.sum() - counts) / (1 + counts.sum())
        total = 0.0
        for y in range(height):
            for x in range(width):
                if pseudo[:, y, x].sum() == 0:
                    continue
                target = int(np.argmax(pseudo[:, y, x]))
                log_p = z[:, y, x] - z[:, y, x].max() - math.log(np.exp(z[:, y, x] - z[:, y, x].max()).sum())
                total += weights[target] * -log_p[target]
        image_weight = float((counts > 0).sum() == labels[b].sum() + 1)
        losses.append(image_weight * total / (height * width))
    return float(np.mean(losses)), losses, min(margins)


# --- class scores and the classification loss ---------------------------------------------------
def test_class_scores_and_soft_margin_loss_match_the_loop_formula():
    generator = torch.Generator().manual_seed(0)
    foreground = torch.randn(2, 3, 3, 4, generator=generator, dtype=torch.float64) * 2
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    method = SingleStage(pretrain_epochs=5)
    batch = {"image": torch.zeros(2, 3, 3, 4), "labels": labels}
    loss, terms = method.classifier_loss(FixedLogits(foreground), batch, StageProgress(0, 20, 0, 100))
    expected = reference_classification_loss(foreground.numpy(), labels.numpy())
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert float(terms["cls"]) == pytest.approx(expected, rel=1e-5, abs=1e-6)


# --- the stochastic gate ---------------------------------------------------------------------------
def test_stochastic_gate_mixes_at_random_in_training_and_deterministically_in_eval():
    psi = 0.3
    deep, shallow = torch.randn(1, 8, 40, 40, dtype=torch.float64), torch.randn(1, 8, 40, 40, dtype=torch.float64)
    gate = StochasticGate(psi)
    gate.eval()
    assert torch.allclose(gate(deep, shallow), 0.7 * deep + 0.3 * shallow, atol=1e-12)
    assert torch.equal(gate(deep, shallow), gate(deep, shallow))
    gate.train()
    torch.manual_seed(0)
    first, second = gate(deep, shallow), gate(deep, shallow)
    rescaled_deep = (deep - psi * shallow) / (1 - psi)
    took_deep = torch.isclose(first, rescaled_deep, atol=1e-9)
    took_shallow = torch.isclose(first, shallow, atol=1e-9)
    assert bool((took_deep | took_shallow).all())          # every element is one of the two
    assert abs(took_deep.double().mean().item() - (1 - psi)) < 0.03   # deep with probability 1 - psi
    assert not torch.equal(first, second)                  # drawn again at every call


# --- inference: background power and score cut ----------------------------------------------------
# Two views, background + 2 classes, 1 x 3 pixels. Means: (0.7, 0.2, 0.1), (0.5, 0.3, 0.2), (0.3, 0.1, 0.6)
VIEWS = torch.tensor([[[[0.6, 0.5, 0.2]], [[0.3, 0.4, 0.1]], [[0.1, 0.1, 0.7]]],
                      [[[0.8, 0.5, 0.4]], [[0.1, 0.2, 0.1]], [[0.1, 0.3, 0.5]]]])


def test_merge_views_raises_the_mean_background_to_the_power_by_hand():
    both = torch.tensor([1.0, 1.0])
    # bg^3: 0.343 > 0.2 (bg); 0.125 < 0.3 (class 1, where the plain mean 0.5 would keep bg); 0.027 < 0.6 (class 2)
    assert merge_views(VIEWS, both, 3.0).tolist() == [[0, 1, 2]]
    assert merge_views(VIEWS, both, 1.0).tolist() == [[0, 0, 2]]
    # class 2 absent: pixel 3 becomes (0.027, 0.1, 0) -> class 1
    assert merge_views(VIEWS, torch.tensor([1.0, 0.0]), 3.0).tolist() == [[0, 1, 1]]
    assert merge_views(VIEWS, torch.tensor([0.0, 1.0]), 3.0).tolist() == [[0, 2, 2]]


def test_present_classes_use_the_labels_or_else_the_score_cut_never_both():
    scores = torch.tensor([[-2.0, -1.0], [-0.5, -0.9]])   # max sigmoid: 0.3775 (class 1), 0.2891 (class 2)
    labels = torch.tensor([0.0, 1.0])
    assert SingleStage(use_gt_labels=True).present_classes(scores, labels).tolist() == [0.0, 1.0]
    assert SingleStage(use_gt_labels=False, fp_cut_score=0.3).present_classes(scores, labels).tolist() == [1.0, 0.0]
    assert SingleStage(use_gt_labels=False, fp_cut_score=0.25).present_classes(scores, labels).tolist() == [1.0, 1.0]


class ColourClassifier(nn.Module):
    """Logits at full resolution: background 1, one class with 10 x the first (normalised) colour
    channel; padding (0) gives background probability e / (e + 1)."""

    def forward(self, images):
        return torch.cat([torch.ones_like(images[:, :1]), 10 * images[:, :1]], dim=1)


def test_inference_cuts_the_padding_and_flips_every_view_back():
    image = torch.ones(1, 3, 8, 8)
    image[..., 4:] = -1.0       # class on the left half, background on the right
    method = SingleStage(inference_pad_size=[16, 16])   # scales 1, 0.75, 1.25, 1.5 with flips
    ids = method.infer(ColourClassifier(), image, torch.tensor([1.0]))
    assert ids.shape == (8, 8)
    # a view cut at the wrong place sees padding (bg^3 = 0.39 > 0.27) on the left; a view not
    # flipped back puts the class on the right
    assert bool((ids[:, :3] == 1).all()) and bool((ids[:, 5:] == 0).all())
    assert bool((method.infer(ColourClassifier(), image, torch.tensor([0.0])) == 0).all())


# --- the self-training term ------------------------------------------------------------------------
def _self_training_batch():
    generator = torch.Generator().manual_seed(1)
    height = width = 6
    raw = torch.empty(2, 3, height, width)
    raw[..., :3] = torch.tensor([0.1, 0.2, 0.3])[:, None, None]
    raw[..., 3:] = torch.tensor([0.8, 0.7, 0.6])[:, None, None]
    raw = raw + 0.02 * torch.rand(raw.shape, generator=generator)
    images = (raw - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    foreground = torch.full((2, 2, height, width), -3.0)
    foreground[:, 0, :, 3:] = 4.0       # class 1 on the right half, background on the left
    foreground[:, 0, :, :3] = -2.0
    foreground[0, 1, :2, :2] = 5.0      # image 0: class 2 strong in a corner, but not labelled
    foreground = foreground + 0.3 * torch.randn(foreground.shape, generator=generator)
    # image 0 labels class 1 only: its class-2 masks are zeroed, so its pseudo-masks have bg + class 1
    # (counted); image 1 also labels class 2, which its masks miss: weight 0
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    return images, foreground, labels


def test_self_training_is_off_before_the_pretrain_epochs_and_adds_exactly_its_term_after():
    images, foreground, labels = _self_training_batch()
    method = SingleStage(pretrain_epochs=5)
    classifier = FixedLogits(foreground)
    batch = {"image": images, "labels": labels}
    before, terms_before = method.classifier_loss(classifier, batch, StageProgress(4, 20, 40, 200))
    after, terms_after = method.classifier_loss(classifier, batch, StageProgress(5, 20, 50, 200))

    expected_cls = reference_classification_loss(foreground.double().numpy(), labels.numpy())
    expected_self, per_image, margin = reference_self_training(images.double().numpy(), foreground.double().numpy(),
                                                               labels.numpy())
    assert margin > 1e-3                         # no refined value sits at a cutoff (float32 vs float64 safe)
    assert per_image[0] > 0.01 and per_image[1] == 0.0
    assert before.item() == pytest.approx(expected_cls, rel=1e-5)
    assert float(terms_before["self_training"]) == pytest.approx(expected_self, rel=1e-4)
    assert (after - before).item() == pytest.approx(expected_self, rel=1e-4)
    assert torch.equal(terms_before["cls"], terms_after["cls"])
    assert torch.equal(after, terms_after["cls"] + terms_after["self_training"])

    # the pseudo-masks are targets: the gradient of the term is that of a CE with fixed targets
    classifier.zero_grad()
    term, pseudo = method.self_training_loss(images, classifier(images), labels)
    term.backward()
    gradient = classifier.foreground.grad.clone()
    fixed = FixedLogits(foreground)
    logits = fixed(images)
    from lightning_modules.losses.weak_supervision import balanced_self_training_loss

    balanced_self_training_loss(logits, pseudo, labels).backward()
    assert torch.allclose(gradient, fixed.foreground.grad, atol=1e-7)


# --- the code's optimiser groups and frozen layers ---------------------------------------------------
def test_parameter_groups_and_frozen_layers_follow_the_code():
    method = SingleStage(classifier_encoder="tu-resnet10t", classifier_encoder_depth=3, stage_lr=0.01,
                         stage_weight_decay=5e-4)
    net = method.build_classifier(3)
    groups = method.classifier_parameter_groups(net, method.stage_lr)
    # no trainable backbone bias in a ResNet (its BNs are frozen): weights at lr, new weights and biases at 10x
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(0.01, 5e-4), (0.1, 5e-4), (0.1, 0.0)]
    in_groups = {id(p) for g in groups for p in g["params"]}
    stem = list(net.encoder.model.conv1.parameters()) + list(net.encoder.model.bn1.parameters())
    backbone_norms = [m for m in net.encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not p.requires_grad and id(p) not in in_groups for p in stem)
    assert all(not p.requires_grad for m in backbone_norms for p in m.parameters())
    assert in_groups == {id(p) for p in net.parameters() if p.requires_grad}
    assert {id(p) for p in groups[0]["params"]} <= {id(p) for p in net.encoder.parameters()}
    net.train()
    aspp_norms = [m for m in net.aspp.modules() if isinstance(m, nn.BatchNorm2d)]
    assert not any(m.training for m in backbone_norms + aspp_norms)
    assert all(p.requires_grad for m in aspp_norms for p in m.parameters())   # affine learnt, statistics fixed
    assert net.last_conv.training and net.gci.fc_skip[1].training
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 4, 8, 8)     # K + 1 channels at stride 4


def test_the_backbone_is_at_stride_16_with_its_last_stage_undilated():
    net = SingleStage(classifier_encoder="resnet18").build_classifier(2)
    convs = [m for m in net.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.dilation == (1, 1) and m.padding == tuple(k // 2 for k in m.kernel_size) for m in convs)
    assert net.encoder.layer4[0].conv1.stride == (1, 1)
    features = net.encoder(torch.zeros(1, 3, 64, 64))
    assert features[-1].shape[-2:] == (4, 4) and features[2].shape[-2:] == (16, 16)


# --- a tiny stage ------------------------------------------------------------------------------
def test_a_tiny_stage_writes_a_mask_of_the_labelled_classes_for_every_training_image(tiny_config, tmp_path):
    from experiments.run import prepare
    from experiments.training import build_datamodule

    steps = prepare(tiny_config)
    config = tiny_config.run_config("ss")
    method = build_method("ss", classifier_encoder="tu-resnet10t", classifier_encoder_depth=3, stage_epochs=1,
                          stage_crop_size=32, stage_batch_size=8, pretrain_epochs=0, inference_scales=[1.0, 0.5],
                          inference_pad_size=[40, 40])
    datamodule = build_datamodule(config, method, steps, 1)
    datamodule.setup("fit")
    context = StepContext(config=config, steps=steps, step=1, datamodule=datamodule)
    directory = tmp_path / "stage"
    directory.mkdir()     # experiments.stages makes it
    method.run_stage(context, directory)

    assert (directory / "classifier.pt").exists()
    # train.py keeps the lr constant: after the last iteration every group is still at its lr
    state = torch.load(directory / "classifier-training.pt", map_location="cpu", weights_only=False)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == pytest.approx(
        [method.stage_lr, 10 * method.stage_lr, 10 * method.stage_lr])
    classes = method.stage_classes(steps, 1)
    assert classes == steps[1]
    labels = method.stage_labels(context)
    rows = datamodule.train_indices
    assert len(rows) >= 2
    for i, row in enumerate(rows):
        path = mask_path(directory, datamodule.located.train.ids[int(row)])
        assert path.exists()
        from datamodules.datasets.voc import load_image, load_mask

        mask = load_mask(path)
        assert mask.shape == load_image(datamodule.located.train.images[int(row)]).shape[:2]
        values = set(np.unique(mask).tolist())
        assert values <= {0, 255, *steps[1]}
        # with the image labels (TEST.USE_GT_LABELS) only the image's labelled classes can appear
        assert values - {0, 255} <= {c for c, present in zip(classes, labels[i]) if present}
