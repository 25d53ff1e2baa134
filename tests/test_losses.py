"""Independent checks of the losses (METHODS_wilson_mib.md §2.2) and MiB's classifier init.

Every expected value comes from slow, explicit float64 per-pixel loops written with
math.log / math.exp straight from the spec, never from the implementation's helpers.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from lightning_modules.losses import cross_entropy, unbiased_cross_entropy, unbiased_knowledge_distillation
from lightning_modules.network import IncrementalClassifier

IGNORE = 255


# --------------------------------------------------------------------------- reference code
def _lse(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def _pixels(logits):
    """Yield (b, h, w, [z_0..z_{C-1}] as python floats)."""
    B, C, H, W = logits.shape
    for b in range(B):
        for h in range(H):
            for w in range(W):
                yield b, h, w, [float(logits[b, k, h, w]) for k in range(C)]


def ref_cross_entropy(logits, labels):
    total, count = 0.0, 0
    for b, h, w, z in _pixels(logits):
        y = int(labels[b, h, w])
        if y == IGNORE:
            continue
        total += -(z[y] - _lse(z))
        count += 1
    return total / count


def ref_unbiased_ce(logits, labels, n_old):
    """-mean over non-ignored pixels of log p~(y): labels < n_old are background, whose
    probability is the mass of channels 0..n_old-1; new labels use their own channel."""
    total, count = 0.0, 0
    for b, h, w, z in _pixels(logits):
        y = int(labels[b, h, w])
        if y == IGNORE:
            continue
        log_all = math.log(sum(math.exp(v) for v in z))
        if y < n_old:
            log_p = math.log(sum(math.exp(z[k]) for k in range(n_old))) - log_all
        else:
            log_p = z[y] - log_all
        total += -log_p
        count += 1
    return total / count


def ref_unbiased_kd(logits, old_logits, alpha, divide_by_n_old=True):
    """-mean over all pixels of [q_0 log p^(bg) + sum_{c=1}^{n_old-1} q_c log p^(c)] / n_old,
    q = softmax(alpha * old logits), p^(bg) = mass of channel 0 and all new channels."""
    n_old = old_logits.shape[1]
    C = logits.shape[1]
    total, count = 0.0, 0
    for b, h, w, z in _pixels(logits):
        zo = [float(old_logits[b, k, h, w]) for k in range(n_old)]
        den_q = sum(math.exp(alpha * v) for v in zo)
        q = [math.exp(alpha * v) / den_q for v in zo]
        sum_all = sum(math.exp(v) for v in z)
        p_bg = (math.exp(z[0]) + sum(math.exp(z[k]) for k in range(n_old, C))) / sum_all
        term = q[0] * math.log(p_bg)
        for c in range(1, n_old):
            term += q[c] * math.log(math.exp(z[c]) / sum_all)
        if divide_by_n_old:
            term /= n_old
        total += term
        count += 1
    return -total / count


def _random_case(seed, B=2, C=7, n_old=4, H=3, W=3, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * scale
    old_logits = torch.randn(B, n_old, H, W, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, C, (B, H, W), generator=g)
    ignore = torch.rand(B, H, W, generator=g) < 0.2
    labels = labels.masked_fill(ignore, IGNORE)
    # make sure every kind of label occurs: bg 0, an old fg class, a new class, and void
    labels[0, 0, 0] = 0
    labels[0, 0, 1] = n_old - 1  # old foreground: counts as background
    labels[0, 0, 2] = n_old  # first new class
    labels[1, 2, 2] = IGNORE
    return logits, old_logits, labels


SEEDS = [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- plain CE
@pytest.mark.parametrize("seed", SEEDS)
def test_cross_entropy_matches_per_pixel_reference(seed):
    logits, _, labels = _random_case(seed)
    got = cross_entropy(logits, labels)
    assert got.dim() == 0
    assert float(got) == pytest.approx(ref_cross_entropy(logits, labels), rel=1e-10, abs=1e-12)


def test_cross_entropy_hand_computed_pixel():
    # one pixel, 3 channels, exp(z) = 1, 2, 5 (sum 8), label 2: loss = -log(5/8)
    logits = torch.tensor([0.0, math.log(2.0), math.log(5.0)], dtype=torch.float64).view(1, 3, 1, 1)
    labels = torch.tensor([[[2]]])
    assert float(cross_entropy(logits, labels)) == pytest.approx(math.log(8.0 / 5.0), rel=1e-12)


def test_cross_entropy_ignores_void_pixels_in_the_mean():
    # two pixels: one valid (loss log(8/5)), one ignored -> mean over the single valid pixel
    logits = torch.tensor([[0.0, 3.0], [math.log(2.0), -1.0], [math.log(5.0), 0.5]], dtype=torch.float64).view(1, 3, 1, 2)
    labels = torch.tensor([[[2, IGNORE]]])
    assert float(cross_entropy(logits, labels)) == pytest.approx(math.log(8.0 / 5.0), rel=1e-12)


# --------------------------------------------------------------------------- unbiased CE
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_old", [1, 4, 6])
def test_unbiased_ce_matches_per_pixel_reference(seed, n_old):
    logits, _, labels = _random_case(seed, n_old=4)
    got = unbiased_cross_entropy(logits, labels, n_old=n_old)
    assert got.dim() == 0
    assert float(got) == pytest.approx(ref_unbiased_ce(logits, labels, n_old), rel=1e-10, abs=1e-12)


def test_unbiased_ce_with_one_old_channel_is_plain_ce():
    # n_old = 1: the "old" mass is channel 0 alone, so UNCE reduces to softmax CE
    logits, _, labels = _random_case(11)
    assert float(unbiased_cross_entropy(logits, labels, n_old=1)) == pytest.approx(
        ref_cross_entropy(logits, labels), rel=1e-10)


def test_unbiased_ce_hand_computed_pixel():
    # one pixel, channels [bg, old class 1, new class 2], n_old = 2, exp(z) = 1, 2, 5 (sum 8)
    logits = torch.tensor([0.0, math.log(2.0), math.log(5.0)], dtype=torch.float64).view(1, 3, 1, 1)
    # label 0 (bg): p~(bg) = (1 + 2) / 8
    assert float(unbiased_cross_entropy(logits, torch.tensor([[[0]]]), n_old=2)) == pytest.approx(math.log(8 / 3), rel=1e-12)
    # label 1 (old fg) is forced to bg: same value, NOT -log(2/8)
    assert float(unbiased_cross_entropy(logits, torch.tensor([[[1]]]), n_old=2)) == pytest.approx(math.log(8 / 3), rel=1e-12)
    # label 2 (new): p~(2) = 5 / 8
    assert float(unbiased_cross_entropy(logits, torch.tensor([[[2]]]), n_old=2)) == pytest.approx(math.log(8 / 5), rel=1e-12)
    # two pixels, one label 1 and one ignored: mean over the valid pixel only
    two = torch.cat([logits, torch.zeros(1, 3, 1, 1, dtype=torch.float64)], dim=3)
    assert float(unbiased_cross_entropy(two, torch.tensor([[[1, IGNORE]]]), n_old=2)) == pytest.approx(math.log(8 / 3), rel=1e-12)
    # two valid pixels: (log(8/3) + log(8/5)) / 2
    two = torch.cat([logits, logits], dim=3)
    assert float(unbiased_cross_entropy(two, torch.tensor([[[0, 2]]]), n_old=2)) == pytest.approx(
        (math.log(8 / 3) + math.log(8 / 5)) / 2, rel=1e-12)


def test_unbiased_ce_void_is_ignored_not_background():
    logits, _, labels = _random_case(5)
    with_void = unbiased_cross_entropy(logits, labels, n_old=4)
    # treating void as background would give a different value (the case has void pixels)
    as_bg = ref_unbiased_ce(logits, labels.masked_fill(labels == IGNORE, 0), 4)
    assert float(with_void) != pytest.approx(as_bg, rel=1e-6)


def test_unbiased_ce_all_pixels_ignored_is_finite_zero_with_gradient():
    logits = torch.randn(2, 7, 3, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.full((2, 3, 3), IGNORE, dtype=torch.long)
    loss = unbiased_cross_entropy(logits, labels, n_old=4)
    assert torch.isfinite(loss)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert logits.grad is not None
    assert torch.all(torch.isfinite(logits.grad))
    assert torch.all(logits.grad == 0)


def test_cross_entropy_all_pixels_ignored_is_finite_zero_with_gradient():
    logits = torch.randn(2, 7, 3, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.full((2, 3, 3), IGNORE, dtype=torch.long)
    loss = cross_entropy(logits, labels)
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_unbiased_ce_gradient_matches_finite_differences():
    logits, _, labels = _random_case(7)
    logits = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: unbiased_cross_entropy(z, labels, n_old=4), (logits,))


# --------------------------------------------------------------------------- unbiased KD
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_unbiased_kd_matches_per_pixel_reference(seed, alpha):
    logits, old_logits, _ = _random_case(seed)
    got = unbiased_knowledge_distillation(logits, old_logits, alpha=alpha)
    assert got.dim() == 0
    assert float(got) == pytest.approx(ref_unbiased_kd(logits, old_logits, alpha), rel=1e-10, abs=1e-12)


def test_unbiased_kd_default_alpha_is_one():
    logits, old_logits, _ = _random_case(8)
    assert float(unbiased_knowledge_distillation(logits, old_logits)) == pytest.approx(
        ref_unbiased_kd(logits, old_logits, 1.0), rel=1e-10)


@pytest.mark.parametrize("n_old", [2, 4, 6])
def test_unbiased_kd_is_divided_by_n_old(n_old):
    logits, _, _ = _random_case(9, n_old=n_old)
    g = torch.Generator().manual_seed(99)
    old_logits = torch.randn(2, n_old, 3, 3, generator=g, dtype=torch.float64) * 2
    got = float(unbiased_knowledge_distillation(logits, old_logits, alpha=1.0))
    undivided = ref_unbiased_kd(logits, old_logits, 1.0, divide_by_n_old=False)
    assert got * n_old == pytest.approx(undivided, rel=1e-10)
    assert got != pytest.approx(undivided, rel=1e-3)  # the division really happens


def test_unbiased_kd_hand_computed_pixel():
    # new model: channels [bg, old class 1, new class 2], exp(z) = 1, 2, 5 (sum 8)
    # old model: 2 channels [bg, class 1] with exp(old z) = 1, 3
    logits = torch.tensor([0.0, math.log(2.0), math.log(5.0)], dtype=torch.float64).view(1, 3, 1, 1)
    old = torch.tensor([0.0, math.log(3.0)], dtype=torch.float64).view(1, 2, 1, 1)
    # alpha = 1: q = (1/4, 3/4); p^(bg) = (1 + 5)/8 = 3/4; p^(1) = 2/8 = 1/4; divided by n_old = 2
    expected = -(0.25 * math.log(0.75) + 0.75 * math.log(0.25)) / 2
    assert float(unbiased_knowledge_distillation(logits, old, alpha=1.0)) == pytest.approx(expected, rel=1e-12)
    # alpha = 0.5: q ∝ (1, sqrt 3)
    q0 = 1 / (1 + math.sqrt(3.0))
    q1 = math.sqrt(3.0) / (1 + math.sqrt(3.0))
    expected = -(q0 * math.log(0.75) + q1 * math.log(0.25)) / 2
    assert float(unbiased_knowledge_distillation(logits, old, alpha=0.5)) == pytest.approx(expected, rel=1e-12)


def test_unbiased_kd_mean_is_over_all_pixels():
    # two identical pixels -> same value as one pixel (a mean, not a sum)
    logits = torch.tensor([0.0, math.log(2.0), math.log(5.0)], dtype=torch.float64).view(1, 3, 1, 1)
    old = torch.tensor([0.0, math.log(3.0)], dtype=torch.float64).view(1, 2, 1, 1)
    expected = -(0.25 * math.log(0.75) + 0.75 * math.log(0.25)) / 2
    two_logits = logits.expand(2, 3, 2, 2).contiguous()
    two_old = old.expand(2, 2, 2, 2).contiguous()
    assert float(unbiased_knowledge_distillation(two_logits, two_old)) == pytest.approx(expected, rel=1e-12)


def test_unbiased_kd_gradient_matches_finite_differences():
    logits, old_logits, _ = _random_case(10)
    logits = logits[:1, :, :2, :2].clone().requires_grad_(True)
    old_logits = old_logits[:1, :, :2, :2].clone()
    assert torch.autograd.gradcheck(lambda z: unbiased_knowledge_distillation(z, old_logits, alpha=1.0), (logits,))


# --------------------------------------------------------------------------- MiB init
def _softmax(values):
    m = max(values)
    e = [math.exp(v - m) for v in values]
    s = sum(e)
    return [v / s for v in e]


def _check_init(steps_before, n_new, seed):
    torch.manual_seed(seed)
    classifier = IncrementalClassifier(8, list(steps_before)).double()
    with torch.no_grad():  # random, non-trivial weights and biases
        for head in classifier.heads:
            head.weight.normal_(0.0, 1.0)
            head.bias.normal_(0.0, 1.0)
    old = copy.deepcopy(classifier)
    n_old = sum(steps_before)

    classifier.add_step(n_new)
    classifier.double()
    classifier.init_newest_from_background()

    # explicit weights / biases
    shift = math.log(n_new + 1)
    w_bg = old.heads[0].weight[0].detach()
    b_bg_old = old.heads[0].bias[0].item()
    new_head = classifier.heads[-1]
    assert new_head.out_channels == n_new
    for c in range(n_new):
        assert torch.allclose(new_head.weight[c].detach(), w_bg, rtol=0, atol=1e-12)
        assert new_head.bias[c].item() == pytest.approx(b_bg_old - shift, abs=1e-12)
    assert classifier.heads[0].bias[0].item() == pytest.approx(b_bg_old - shift, abs=1e-12)
    # everything else of the old heads is untouched
    for i, old_head in enumerate(old.heads):
        assert torch.equal(classifier.heads[i].weight.detach(), old_head.weight.detach())
        assert torch.equal(classifier.heads[i].bias[1:].detach() if i == 0 else classifier.heads[i].bias.detach(),
                           old_head.bias[1:].detach() if i == 0 else old_head.bias.detach())

    # probabilities, per pixel, with an explicit python softmax
    features = torch.randn(2, 8, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        z_old = old(features)
        z_new = classifier(features)
    assert z_old.shape[1] == n_old and z_new.shape[1] == n_old + n_new
    for b, h, w, zn in _pixels(z_new):
        zo = [float(z_old[b, k, h, w]) for k in range(n_old)]
        p_old, p_new = _softmax(zo), _softmax(zn)
        assert p_new[0] + sum(p_new[n_old:]) == pytest.approx(p_old[0], rel=1e-10, abs=1e-14)
        for c in range(1, n_old):
            assert p_new[c] == pytest.approx(p_old[c], rel=1e-10, abs=1e-14)
        # every new class and the new background share the old bg mass equally
        for c in range(n_old, n_old + n_new):
            assert p_new[c] == pytest.approx(p_old[0] / (n_new + 1), rel=1e-10, abs=1e-14)
        assert p_new[0] == pytest.approx(p_old[0] / (n_new + 1), rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("seed", [0, 1])
def test_init_from_background_first_incremental_step(seed):
    _check_init([4], 3, seed)


def test_init_from_background_later_step_uses_step0_background_row():
    # two heads already (bg + 3 old, then 2), add 3: W_bg must be row 0 of the step-0 head
    _check_init([4, 2], 3, 2)


def test_init_from_background_single_new_class():
    _check_init([4], 1, 3)
