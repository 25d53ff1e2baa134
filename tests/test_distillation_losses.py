"""Independent checks of LwF's KD, ILT's feature distillation and LwF-MC (the baselines of MiB's
code, fcdl94/MiB `utils/loss.py` + `train.py`; METHODS_wilson_mib.md §2.2).

Every expected value comes from slow, explicit float64 loops over pixels and channels written
with math.log / math.exp straight from the formulas, never from the implementation's helpers.
"""
from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.losses import (bce_one_hot, feature_distillation, knowledge_distillation, lwf_mc_loss,
                                      lwf_mc_terms)

IGNORE = 255


# --------------------------------------------------------------------------- reference code
def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def _bce(z, t):
    """BCE with logits, written out: -t log s - (1 - t) log(1 - s), s = sigmoid(z)."""
    s = _sigmoid(z)
    return -t * math.log(s) - (1.0 - t) * math.log(1.0 - s)


def _softmax(values):
    m = max(values)
    e = [math.exp(v - m) for v in values]
    total = sum(e)
    return [v / total for v in e]


def _pixels(shape):
    B, _, H, W = shape
    for b in range(B):
        for h in range(H):
            for w in range(W):
                yield b, h, w


def ref_kd(logits, old_logits, alpha):
    """-mean over pixels of (1/n_old) sum_{c<n_old} q_c log p_c, p = softmax of the new model's
    first n_old logits, q = softmax(alpha * old logits)."""
    n_old = old_logits.shape[1]
    total, count = 0.0, 0
    for b, h, w in _pixels(logits.shape):
        p = _softmax([float(logits[b, c, h, w]) for c in range(n_old)])
        q = _softmax([alpha * float(old_logits[b, c, h, w]) for c in range(n_old)])
        total += sum(q[c] * math.log(p[c]) for c in range(n_old)) / n_old
        count += 1
    return -total / count


def ref_lwf_mc(logits, labels, old_logits, importance):
    """MiB's `--icarl` (combined): the one-hot BCE summed over all C channels, averaged over ALL
    pixels (ignored ones add 0), + importance * n_old * (mean over the pixels x old channels of
    BCE(z_c, sigmoid(old z_c)))."""
    C, n_old = logits.shape[1], old_logits.shape[1]
    classification, distillation, pixels = 0.0, 0.0, 0
    for b, h, w in _pixels(logits.shape):
        pixels += 1
        y = int(labels[b, h, w])
        if y != IGNORE:
            classification += sum(_bce(float(logits[b, c, h, w]), 1.0 if c == y else 0.0) for c in range(C))
        for c in range(n_old):
            distillation += _bce(float(logits[b, c, h, w]), _sigmoid(float(old_logits[b, c, h, w])))
    return classification / pixels + importance * n_old * distillation / (pixels * n_old)


def ref_mse(features, old_features):
    flat, old_flat = features.flatten().tolist(), old_features.flatten().tolist()
    return sum((a - b) ** 2 for a, b in zip(flat, old_flat)) / len(flat)


def _random_case(seed, B=2, C=6, n_old=4, H=3, W=4, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * scale
    old_logits = torch.randn(B, n_old, H, W, generator=g, dtype=torch.float64) * scale
    # old classes are labelled background by the data at steps >= 1: labels are 0 or new classes
    labels = torch.randint(n_old - 1, C, (B, H, W), generator=g)
    labels = labels.masked_fill(labels == n_old - 1, 0)
    labels = labels.masked_fill(torch.rand(B, H, W, generator=g) < 0.2, IGNORE)
    labels[0, 0, 0], labels[0, 0, 1], labels[1, 2, 3] = 0, n_old, IGNORE
    return logits, old_logits, labels


SEEDS = [0, 1, 2]


# --------------------------------------------------------------------------- LwF's KD
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("n_old", [1, 3, 6])
def test_knowledge_distillation_matches_per_pixel_reference(seed, alpha, n_old):
    logits, _, _ = _random_case(seed)
    old_logits = torch.randn(2, n_old, 3, 4, generator=torch.Generator().manual_seed(50 + seed), dtype=torch.float64) * 2
    got = knowledge_distillation(logits, old_logits, alpha=alpha)
    assert got.dim() == 0
    assert float(got) == pytest.approx(ref_kd(logits, old_logits, alpha), rel=1e-10, abs=1e-12)


def test_knowledge_distillation_default_alpha_is_one():
    logits, old_logits, _ = _random_case(3)
    assert float(knowledge_distillation(logits, old_logits)) == pytest.approx(ref_kd(logits, old_logits, 1.0), rel=1e-10)


def test_knowledge_distillation_hand_computed_pixel():
    # new model: channels [bg, old class 1, new class 2], exp(z) = 1, 3, 7; only the first
    # n_old = 2 enter the log-softmax: p = (1/4, 3/4) (the new channel's 7 plays no part)
    logits = torch.tensor([0.0, math.log(3.0), math.log(7.0)], dtype=torch.float64).view(1, 3, 1, 1)
    # old model: equal logits -> q = (1/2, 1/2); mean over the 2 old channels:
    # L = -(1/2 log 1/4 + 1/2 log 3/4) / 2 = log(16/3) / 4
    old = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    assert float(knowledge_distillation(logits, old)) == pytest.approx(math.log(16 / 3) / 4, rel=1e-12)
    # old logits (0, log 3) with alpha = 2: q ∝ (1, 9) = (0.1, 0.9); alpha scales the old logits only
    # L = -(0.1 log 1/4 + 0.9 log 3/4) / 2
    old = torch.tensor([0.0, math.log(3.0)], dtype=torch.float64).view(1, 2, 1, 1)
    expected = -(0.1 * math.log(0.25) + 0.9 * math.log(0.75)) / 2
    assert float(knowledge_distillation(logits, old, alpha=2.0)) == pytest.approx(expected, rel=1e-12)
    # two identical pixels: the same value (a mean over pixels, not a sum)
    two = knowledge_distillation(logits.expand(2, 3, 1, 2).contiguous(), old.expand(2, 2, 1, 2).contiguous(), alpha=2.0)
    assert float(two) == pytest.approx(expected, rel=1e-12)


def test_knowledge_distillation_is_a_mean_over_old_channels():
    # the sum over channels is divided by n_old (MiB's `.mean(dim=1)`)
    logits, old_logits, _ = _random_case(4)
    n_old = old_logits.shape[1]
    summed = -sum(
        sum(q * math.log(p) for q, p in zip(
            _softmax([float(old_logits[b, c, h, w]) for c in range(n_old)]),
            _softmax([float(logits[b, c, h, w]) for c in range(n_old)])))
        for b, h, w in _pixels(logits.shape)) / (2 * 3 * 4)
    got = float(knowledge_distillation(logits, old_logits))
    assert got * n_old == pytest.approx(summed, rel=1e-10)
    assert got != pytest.approx(summed, rel=1e-3)


def test_knowledge_distillation_gradient_matches_finite_differences():
    logits, old_logits, _ = _random_case(5)
    logits = logits[:1, :, :2, :2].clone().requires_grad_(True)
    old_logits = old_logits[:1, :, :2, :2].clone()
    assert torch.autograd.gradcheck(lambda z: knowledge_distillation(z, old_logits, alpha=0.5), (logits,))


# --------------------------------------------------------------------------- ILT's feature term
@pytest.mark.parametrize("seed", SEEDS)
def test_feature_distillation_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 5, 3, 2, generator=g, dtype=torch.float64)
    old_features = torch.randn(2, 5, 3, 2, generator=g, dtype=torch.float64)
    got = feature_distillation(features, old_features)
    assert got.dim() == 0
    assert float(got) == pytest.approx(ref_mse(features, old_features), rel=1e-12)


def test_feature_distillation_hand_computed():
    # one pixel, two feature channels (1, 3) against (0, 0): ((1 - 0)^2 + (3 - 0)^2) / 2 = 5
    features = torch.tensor([1.0, 3.0], dtype=torch.float64).view(1, 2, 1, 1)
    assert float(feature_distillation(features, torch.zeros_like(features))) == pytest.approx(5.0, rel=1e-12)
    # mean over ALL elements (batch x channels x pixels): append a pixel with no difference -> 10 / 4
    two = torch.cat([features, torch.zeros_like(features)], dim=3)
    assert float(feature_distillation(two, torch.zeros_like(two))) == pytest.approx(2.5, rel=1e-12)


# --------------------------------------------------------------------------- LwF-MC
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("importance", [10.0, 1.0, 0.0, 3.5])
def test_lwf_mc_matches_per_pixel_reference(seed, importance):
    logits, old_logits, labels = _random_case(seed)
    assert (labels == IGNORE).any()
    got = lwf_mc_loss(logits, labels, old_logits, importance=importance)
    assert got.dim() == 0
    assert float(got) == pytest.approx(ref_lwf_mc(logits, labels, old_logits, importance), rel=1e-10, abs=1e-12)


def test_lwf_mc_default_importance_is_ten():
    logits, old_logits, labels = _random_case(6)
    assert float(lwf_mc_loss(logits, labels, old_logits)) == pytest.approx(
        ref_lwf_mc(logits, labels, old_logits, 10.0), rel=1e-10)


def test_lwf_mc_terms_are_the_two_unweighted_terms():
    logits, old_logits, labels = _random_case(7)
    classification, distillation = lwf_mc_terms(logits, labels, old_logits)
    assert float(classification) == pytest.approx(ref_lwf_mc(logits, labels, old_logits, 0.0), rel=1e-10)
    assert float(classification + 10.0 * distillation) == pytest.approx(float(lwf_mc_loss(logits, labels, old_logits)),
                                                                        rel=1e-12)


def test_lwf_mc_hand_computed_pixel():
    # one pixel, channels [bg, old class 1, new class 2], n_old = 2, label 0 (bg).
    # z = (log 3, 0, -log 3): sigmoid = (3/4, 1/2, 1/4)
    logits = torch.tensor([math.log(3.0), 0.0, -math.log(3.0)], dtype=torch.float64).view(1, 3, 1, 1)
    labels = torch.tensor([[[0]]])
    # one-hot BCE over ALL 3 channels (targets 1, 0, 0): -log 3/4 - log 1/2 - log 3/4 = 2 log(4/3) + log 2
    classification = 2 * math.log(4 / 3) + math.log(2)
    # old logits (0, log 3): targets sigmoid = (1/2, 3/4) on the first two channels
    #   channel 0 (s = 3/4, t = 1/2): -(1/2 log 3/4 + 1/2 log 1/4) = (log(4/3) + log 4) / 2
    #   channel 1 (s = 1/2, t = 3/4): -(3/4 log 1/2 + 1/4 log 1/2) = log 2
    # importance * n_old * mean over the 2 old channels = importance * (sum over them)
    old = torch.tensor([0.0, math.log(3.0)], dtype=torch.float64).view(1, 2, 1, 1)
    distillation = (math.log(4 / 3) + math.log(4)) / 2 + math.log(2)
    for importance in (10.0, 1.0):
        assert float(lwf_mc_loss(logits, labels, old, importance=importance)) == pytest.approx(
            classification + importance * distillation, rel=1e-12)
    # all-zero logits: every BCE is log 2 -> 3 log 2 + importance * 2 log 2 (= 23 log 2 at importance 10)
    zeros = torch.zeros(1, 3, 1, 1, dtype=torch.float64)
    assert float(lwf_mc_loss(zeros, labels, torch.zeros(1, 2, 1, 1, dtype=torch.float64))) == pytest.approx(
        23 * math.log(2), rel=1e-12)


def test_lwf_mc_ignored_pixels_count_in_the_mean_with_zero_classification():
    # two pixels: the hand-computed one above (label 0) and an ignored one with all-zero logits
    # and old logits. The classification term is (2 log(4/3) + log 2 + 0) / 2: divided by BOTH
    # pixels (MiB averages over all pixels); the distillation uses the ignored pixel too:
    # ((log(4/3) + log 4)/2 + log 2 + 2 log 2) / 2.
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [-math.log(3.0), 0.0]], dtype=torch.float64).view(1, 3, 1, 2)
    old = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64).view(1, 2, 1, 2)
    labels = torch.tensor([[[0, IGNORE]]])
    classification = (2 * math.log(4 / 3) + math.log(2)) / 2
    distillation = ((math.log(4 / 3) + math.log(4)) / 2 + math.log(2) + 2 * math.log(2)) / 2
    assert float(lwf_mc_loss(logits, labels, old, importance=10.0)) == pytest.approx(
        classification + 10.0 * distillation, rel=1e-12)


def test_lwf_mc_classification_is_bce_one_hot_without_void():
    # without 255 labels the all-pixel and the valid-pixel means agree: the classification term
    # is then WILSON's step-0 loss (bce_one_hot) on all channels
    logits, old_logits, labels = _random_case(8)
    labels = labels.masked_fill(labels == IGNORE, 0)
    classification, _ = lwf_mc_terms(logits, labels, old_logits)
    assert float(classification) == pytest.approx(float(bce_one_hot(logits, labels)), rel=1e-12)


def test_lwf_mc_gradient_matches_finite_differences():
    logits, old_logits, labels = _random_case(9)
    logits = logits[:1, :, :2, :2].clone().requires_grad_(True)
    old_logits, labels = old_logits[:1, :, :2, :2].clone(), labels[:1, :2, :2].clone()
    assert torch.autograd.gradcheck(lambda z: lwf_mc_loss(z, labels, old_logits, importance=3.0), (logits,))


# --------------------------------------------------------------------------- half precision
# bf16 keeps 8 mantissa bits (relative rounding 2^-9), fp16 11 bits (2^-12): with logits of scale 2
# the rounded inputs move each loss by well under 1% (bf16) and 0.1% (fp16). Inside the loss the
# inputs are promoted to float32, so a half-precision input gives the float32 value of the rounded
# input (to float32 accuracy) and a float32 result.
HALF = [(torch.bfloat16, 1e-2), (torch.float16, 1e-3)]


def _losses(logits, old_logits, labels, features, old_features):
    return {"kd": knowledge_distillation(logits, old_logits, alpha=0.5),
            "lwf_mc": lwf_mc_loss(logits, labels, old_logits, importance=10.0),
            "feature": feature_distillation(features, old_features)}


@pytest.mark.parametrize("dtype,tolerance", HALF)
def test_half_precision_inputs_agree_with_float32(dtype, tolerance):
    logits, old_logits, labels = _random_case(10)
    logits, old_logits = logits.float(), old_logits.float()
    g = torch.Generator().manual_seed(10)
    features = torch.randn(2, 8, 3, 4, generator=g).relu()
    old_features = torch.randn(2, 8, 3, 4, generator=g).relu()
    reference = _losses(logits, old_logits, labels, features, old_features)
    halves = [t.to(dtype) for t in (logits, old_logits, features, old_features)]
    got = _losses(halves[0], halves[1], labels, halves[2], halves[3])
    rounded = _losses(halves[0].float(), halves[1].float(), labels, halves[2].float(), halves[3].float())
    for name in reference:
        assert got[name].dtype == torch.float32, name
        assert torch.isfinite(got[name]), name
        assert float(got[name]) == pytest.approx(float(rounded[name]), rel=1e-6), name  # promoted, not computed in half
        assert float(got[name]) == pytest.approx(float(reference[name]), rel=tolerance), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_large_logits_stay_finite(dtype):
    # logits of size ~60 (typical of a confident network): exp overflows in fp16, so the loss
    # must not be computed in half precision
    logits, old_logits, labels = _random_case(11, scale=30.0)
    got = lwf_mc_loss(logits.to(dtype), labels, old_logits.to(dtype))
    assert torch.isfinite(got)
    assert float(got) == pytest.approx(float(lwf_mc_loss(logits.to(dtype).double(), labels, old_logits.to(dtype).double())),
                                       rel=1e-5)
    assert torch.isfinite(knowledge_distillation(logits.to(dtype), old_logits.to(dtype)))


# --------------------------------------------------------------------------- shape errors
def test_old_logits_with_more_channels_than_the_new_model_raise():
    logits, old_logits, labels = _random_case(12, C=3, n_old=3)
    too_many = torch.zeros(2, 4, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="old_logits has 4 channels"):
        knowledge_distillation(logits, too_many)
    with pytest.raises(ValueError, match="old_logits has 4 channels"):
        lwf_mc_loss(logits, labels, too_many)


def test_mismatched_spatial_or_batch_size_raises():
    logits, old_logits, labels = _random_case(13)
    with pytest.raises(ValueError, match="batch and spatial size"):
        knowledge_distillation(logits, old_logits[:, :, :2])
    with pytest.raises(ValueError, match="batch and spatial size"):
        lwf_mc_loss(logits, labels, old_logits[:1])
    with pytest.raises(ValueError, match=r"must both be \(B, C, H, W\)"):
        knowledge_distillation(logits[0], old_logits[0])


def test_labels_of_the_wrong_shape_raise():
    logits, old_logits, labels = _random_case(14)
    with pytest.raises(ValueError, match=r"labels \(2, 3, 3\) must be \(B, H, W\)"):
        lwf_mc_loss(logits, labels[:, :, :3], old_logits)


def test_feature_shapes_must_match():
    with pytest.raises(ValueError, match="must have the same shape"):
        feature_distillation(torch.zeros(2, 8, 4, 4), torch.zeros(2, 8, 4, 2))
    with pytest.raises(ValueError, match="must have the same shape"):  # no silent broadcasting
        feature_distillation(torch.zeros(2, 8, 4, 4), torch.zeros(1, 8, 4, 4))
