"""WILSON's loss functions (METHODS_wilson_mib.md §3.3) against direct float64 computations.

The references are explicit loops over pixels and classes written from the spec with
math.exp / math.log; none of them calls the implementation's helpers.
"""
from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.losses import (balanced_self_training_loss, bce_one_hot, ngwp_focal_scores, pamr,
                                      pseudo_label_masks, soft_segmentation_bce, wilson_targets)


def _softmax(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _bce(logit, target):
    """BCE with logits, written out: -(t log s(x) + (1 - t) log(1 - s(x)))."""
    return -(target * math.log(_sigmoid(logit)) + (1 - target) * math.log(1 - _sigmoid(logit)))


def _random(*shape, seed=0, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale


# --------------------------------------------------------------------------- nGWP + focal
def ref_ngwp_focal(logits):
    B, C, H, W = logits.shape
    scores = torch.zeros(B, C, dtype=torch.float64)
    for b in range(B):
        pixels = [[float(logits[b, c, h, w]) for c in range(C)] for h in range(H) for w in range(W)]
        probs = [_softmax(z) for z in pixels]
        for c in range(C):
            mass = sum(p[c] for p in probs)
            weighted = sum(p[c] * z[c] for p, z in zip(probs, pixels))
            mean = mass / len(pixels)
            scores[b, c] = weighted / (1.0 + mass) + (1 - mean) ** 3 * math.log(0.01 + mean)
    return scores


@pytest.mark.parametrize("seed", [0, 1])
def test_ngwp_focal_scores_match_the_formula(seed):
    logits = _random(2, 5, 4, 3, seed=seed)
    scores = ngwp_focal_scores(logits)
    assert scores.shape == (2, 5) and scores.dtype == torch.float64
    torch.testing.assert_close(scores, ref_ngwp_focal(logits), rtol=1e-10, atol=1e-12)


def test_ngwp_focal_scores_a_class_that_wins_everywhere_scores_its_mean_logit():
    """A channel with all the softmax mass: nGWP = sum z / (1 + HW) and the focal penalty is
    0^3 * log(1.01) = 0, so the score is HW/(1+HW) times the mean logit; a channel with no mass
    gets the focal penalty (1)^3 * log(0.01)."""
    logits = torch.full((1, 3, 2, 2), -50.0, dtype=torch.float64)
    logits[0, 1] = torch.tensor([[60.0, 70.0], [80.0, 90.0]], dtype=torch.float64)
    scores = ngwp_focal_scores(logits)
    assert scores[0, 1].item() == pytest.approx((60 + 70 + 80 + 90) / 5, rel=1e-9)
    assert scores[0, 0].item() == pytest.approx(math.log(0.01), rel=1e-6)


# --------------------------------------------------------------------------- targets
def ref_wilson_targets(old_logits, localizer_logits, new_labels, alpha):
    B, n_old, H, W = old_logits.shape
    C = localizer_logits.shape[1]
    out = torch.zeros(B, C, H, W, dtype=torch.float64)
    for b in range(B):
        keep = [1.0] + [0.0] * (n_old - 1) + [float(v) for v in new_labels[b]]
        for h in range(H):
            for w in range(W):
                probs = _softmax([float(localizer_logits[b, c, h, w]) for c in range(C)])
                masked = [p * k for p, k in zip(probs, keep)]
                top = max(masked)
                soft = [alpha * (1.0 if m >= top else 0.0) + (1 - alpha) * m for m in masked]
                old = [_sigmoid(float(old_logits[b, c, h, w])) for c in range(n_old)]
                out[b, 0, h, w] = min(old[0], soft[0])
                for c in range(1, n_old):
                    out[b, c, h, w] = old[c]
                for c in range(n_old, C):
                    out[b, c, h, w] = soft[c]
    return out


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_wilson_targets_match_the_formula(alpha):
    old_logits, localizer = _random(3, 4, 3, 3, seed=1), _random(3, 7, 3, 3, seed=2)
    # image 0: two of three new classes; image 1: no new class at all; image 2: all three
    labels = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.float64)
    targets = wilson_targets(old_logits, localizer, labels, alpha=alpha)
    assert targets.shape == (3, 7, 3, 3)
    torch.testing.assert_close(targets, ref_wilson_targets(old_logits, localizer, labels, alpha), rtol=1e-12, atol=1e-12)


def test_wilson_targets_edge_cases_by_hand():
    old_logits, localizer = _random(3, 4, 3, 3, seed=3), _random(3, 7, 3, 3, seed=4)
    labels = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.float64)
    old_probs = torch.sigmoid(old_logits)
    for alpha in (0.0, 0.5, 1.0):
        targets = wilson_targets(old_logits, localizer, labels, alpha=alpha)
        # old foreground targets are the old model's sigmoids, whatever the localizer says
        torch.testing.assert_close(targets[:, 1:4], old_probs[:, 1:])
        # absent new classes get no target mass; with no new class present, none at all
        assert torch.all(targets[0, 5] == 0) and torch.all(targets[1, 4:] == 0)
        # background never exceeds the old model's background
        assert torch.all(targets[:, 0] <= old_probs[:, 0] + 1e-15)
    # alpha = 1: new-class targets are one-hot (the argmax over bg and the present new classes)
    hard = wilson_targets(old_logits, localizer, labels, alpha=1.0)
    assert set(hard[:, 4:].unique().tolist()) <= {0.0, 1.0}
    # image 1 has no new class: bg is the argmax everywhere, target = min(sigmoid(old bg), 1)
    torch.testing.assert_close(hard[1, 0], old_probs[1, 0])
    # alpha = 0: new-class targets are the un-renormalised softmax of the localizer
    soft = wilson_targets(old_logits, localizer, labels, alpha=0.0)
    torch.testing.assert_close(soft[2, 4:], torch.softmax(localizer, 1)[2, 4:])


def test_wilson_targets_all_background_localizer():
    """A localizer sure of background everywhere: q_bg = 1, so the bg target is the old model's
    background and the new classes get (1 - alpha) x a vanishing probability."""
    old_logits = _random(2, 3, 2, 2, seed=5)
    localizer = torch.full((2, 5, 2, 2), -30.0, dtype=torch.float64)
    localizer[:, 0] = 30.0
    labels = torch.ones(2, 2, dtype=torch.float64)
    targets = wilson_targets(old_logits, localizer, labels, alpha=0.5)
    torch.testing.assert_close(targets[:, 0], torch.sigmoid(old_logits[:, 0]))
    assert targets[:, 3:].max() < 1e-20


def test_wilson_targets_reject_mismatched_labels():
    with pytest.raises(ValueError, match="new_labels has shape"):
        wilson_targets(torch.zeros(1, 3, 2, 2), torch.zeros(1, 5, 2, 2), torch.zeros(1, 3))


# --------------------------------------------------------------------------- PAMR
def ref_pamr(image, masks, iterations, dilations):
    """PAMR written as loops with clamped coordinates (= replicate padding)."""
    B, K, H, W = image.shape
    C = masks.shape[1]
    at = lambda t, b, k, y, x: float(t[b, k, min(max(y, 0), H - 1), min(max(x, 0), W - 1)])
    around = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    affinity = {}
    for b in range(B):
        for y in range(H):
            for x in range(W):
                neighbours = [(y + dy * d, x + dx * d) for d in dilations for dy, dx in around if (dy, dx) != (0, 0)]
                kernel = [0.0] * len(neighbours)
                for k in range(K):
                    window = [at(image, b, k, y + dy * d, x + dx * d) for d in dilations for dy, dx in around]
                    mean = sum(window) / len(window)
                    sigma = math.sqrt(sum((v - mean) ** 2 for v in window) / (len(window) - 1))
                    centre = at(image, b, k, y, x)
                    for n, (ny, nx) in enumerate(neighbours):
                        kernel[n] += -abs(centre - at(image, b, k, ny, nx)) / (0.1 * sigma + 1e-8) / K
                affinity[b, y, x] = (neighbours, _softmax(kernel))
    current = masks.clone()
    for _ in range(iterations):
        refined = torch.zeros_like(current)
        for (b, y, x), (neighbours, weights) in affinity.items():
            for c in range(C):
                refined[b, c, y, x] = sum(a * at(current, b, c, ny, nx) for a, (ny, nx) in zip(weights, neighbours))
        current = refined
    return current


@pytest.mark.parametrize("dilations,iterations", [((1, 2), 2), ((1, 2, 4, 8, 12), 3)])
def test_pamr_matches_the_loop(dilations, iterations):
    image = torch.rand(2, 3, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    masks = torch.rand(2, 2, 5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    refined = pamr(image, masks, iterations=iterations, dilations=dilations)
    torch.testing.assert_close(refined, ref_pamr(image, masks, iterations, dilations), rtol=1e-9, atol=1e-12)


def test_pamr_keeps_a_constant_mask_constant():
    image = torch.rand(1, 3, 9, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    masks = torch.empty(1, 3, 9, 7, dtype=torch.float64)
    masks[:, 0], masks[:, 1], masks[:, 2] = 0.25, 0.7, 0.0
    torch.testing.assert_close(pamr(image, masks), masks, rtol=0, atol=1e-12)


def test_pamr_does_not_leak_across_a_strong_edge():
    """Two-colour image (black left, white right) and a mask that is 1 on the left half: after
    refinement almost no mass crosses the edge, while on a flat image the same mask diffuses
    across the same columns."""
    image = torch.zeros(1, 3, 16, 16, dtype=torch.float64)
    image[..., 8:] = 1.0
    masks = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    masks[..., :8] = 1.0
    across_edge = pamr(image, masks)[..., 8:].sum().item()
    flat = pamr(torch.full_like(image, 0.5), masks)[..., 8:].sum().item()
    within_region = pamr(image, masks)[..., :8].sum().item()
    assert across_edge < 1e-6 * flat
    assert flat > 10.0  # the flat image really spreads mass over the right half
    assert within_region == pytest.approx(8 * 16, rel=1e-6)  # and nothing is lost on the left


def test_pamr_rejects_an_image_of_another_size():
    with pytest.raises(ValueError, match="resized"):
        pamr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 2, 4, 4))


# --------------------------------------------------------------------------- L_SSS, L_SEG, step 0
def test_pseudo_label_masks_thresholds_by_hand():
    # one image, bg + 2 classes, 1x4 pixels
    refined = torch.tensor([[[[1.0, 0.8, 0.1, 0.1]],      # bg: cutoff 0.7 -> pixels 0, 1
                             [[0.0, 0.5, 0.9, 0.3]],      # class 1: cutoff 0.54 -> pixel 2 (pixel 1: 0.5 no)
                             [[0.0, 0.0, 0.1, 0.15]]]], dtype=torch.float64)  # class 2: 0.09 -> floor 0.2: none
    masks = pseudo_label_masks(refined)
    expected = torch.tensor([[[[1, 1, 0, 0]], [[0, 0, 1, 0]], [[0, 0, 0, 0]]]], dtype=torch.float64)
    torch.testing.assert_close(masks, expected)
    # a pixel above two cutoffs is ambiguous and cleared
    refined[0, 1, 0, 0] = 0.95
    assert pseudo_label_masks(refined)[0, :, 0, 0].sum() == 0


def ref_balanced_self_training(logits, masks, labels):
    B, C, H, W = logits.shape
    total = 0.0
    for b in range(B):
        counts = [float(masks[b, c].sum()) for c in range(C)]
        n = sum(counts)
        weight = [(n - counts[c]) / (1 + n) for c in range(C)]
        loss = 0.0
        for h in range(H):
            for w in range(W):
                active = [c for c in range(C) if masks[b, c, h, w] > 0]
                if not active:
                    continue
                y = active[0]
                z = [float(logits[b, c, h, w]) for c in range(C)]
                loss += weight[y] * -math.log(_softmax(z)[y])
        present = sum(1 for c in counts if c > 0)
        image_weight = 1.0 if present == float(labels[b].sum()) + 1 else 0.0
        total += image_weight * loss / (H * W)
    return total / B


def test_balanced_self_training_loss_matches_the_formula():
    logits = _random(3, 4, 3, 3, seed=6)
    masks = torch.zeros(3, 4, 3, 3, dtype=torch.float64)
    masks[0, 0, :2], masks[0, 2, 2, :2] = 1, 1          # bg + class 2 present; one pixel ignored
    masks[1, 0, 0], masks[1, 3, 1:] = 1, 1              # bg + class 3
    masks[2, 0] = 1                                     # only bg: misses its labelled class
    labels = torch.tensor([[1, 0], [0, 1], [1, 0]], dtype=torch.float64)  # new classes = channels 2, 3
    value = balanced_self_training_loss(logits, masks, labels)
    assert value.item() == pytest.approx(ref_balanced_self_training(logits, masks, labels), rel=1e-10)
    # image 2's masks miss its labelled class: weight 0, so its logits do not matter at all
    changed = logits.clone()
    changed[2] += 5.0
    assert balanced_self_training_loss(changed, masks, labels).item() == pytest.approx(value.item(), rel=1e-12)
    assert value.item() > 0


def test_soft_segmentation_bce_matches_the_formula():
    logits, targets = _random(2, 3, 2, 2, seed=7), torch.rand(2, 3, 2, 2, dtype=torch.float64)
    weights = torch.tensor([1.0, 0.0], dtype=torch.float64)
    per_image = [sum(_bce(float(logits[b, c, h, w]), float(targets[b, c, h, w]))
                     for c in range(3) for h in range(2) for w in range(2)) / 4 for b in range(2)]
    value = soft_segmentation_bce(logits, targets, weights)
    assert value.item() == pytest.approx(per_image[0] / (1 + 1e-5), rel=1e-10)
    assert soft_segmentation_bce(logits, targets).item() == pytest.approx(sum(per_image) / (2 + 1e-5), rel=1e-10)


def test_bce_one_hot_matches_the_formula():
    logits = _random(2, 4, 3, 3, seed=8)
    labels = torch.randint(0, 4, (2, 3, 3), generator=torch.Generator().manual_seed(9))
    labels[0, 0, 0] = 255
    total, count = 0.0, 0
    for b in range(2):
        for h in range(3):
            for w in range(3):
                y = int(labels[b, h, w])
                if y == 255:
                    continue
                total += sum(_bce(float(logits[b, c, h, w]), 1.0 if c == y else 0.0) for c in range(4))
                count += 1
    assert bce_one_hot(logits, labels).item() == pytest.approx(total / count, rel=1e-10)
