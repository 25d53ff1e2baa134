"""MBS's loss functions (METHODS_others.md §4.3-4.6, RoadoneP/ECCV2024_MBS) against float64
computations written pixel by pixel from the specification, with math.exp / math.log."""
from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.losses import (adaptive_feature_distillation, afd_patch_weights, label_guided_distillation,
                                      orthogonal_loss, selective_pseudo_labels)


def _softmax(values):
    top = max(values)
    e = [math.exp(v - top) for v in values]
    return [x / sum(e) for x in e]


def _random(*shape, seed=0, scale=2.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def test_selective_pseudo_labels_by_hand():
    # 4 pixels, old model over bg + 2 old classes; labels of the step (old classes are 0 there)
    probabilities = [[0.1, 0.8, 0.1],    # confident old class 1 on a background label -> 1
                     [0.3, 0.4, 0.3],    # not confident, but p_bg < sum of objects -> ignored (255)
                     [0.6, 0.3, 0.1],    # background believed -> stays 0
                     [0.1, 0.8, 0.1]]    # labelled new class 3: kept, whatever the old model says
    old_logits = torch.log(torch.tensor(probabilities, dtype=torch.float64)).T.reshape(1, 3, 1, 4)
    labels = torch.tensor([[[0, 0, 0, 3]]])
    assert selective_pseudo_labels(old_logits, labels, threshold=0.7).tolist() == [[[1, 255, 0, 3]]]
    # the threshold is inclusive; p_bg = sum of objects is not "some object" (strict)
    old_logits = torch.log(torch.tensor([[0.3, 0.7, 0.0 + 1e-300], [0.5, 0.25, 0.25]], dtype=torch.float64)).T.reshape(1, 3, 1, 2)
    assert selective_pseudo_labels(old_logits, torch.zeros(1, 1, 2, dtype=torch.long), 0.7).tolist() == [[[1, 0]]]
    # 255 in the labels stays 255
    assert selective_pseudo_labels(old_logits, torch.full((1, 1, 2), 255), 0.7).tolist() == [[[255, 255]]]


def test_afd_patch_weights_by_hand():
    masks = _random(1, 3, 2, 2, seed=1)
    labels = torch.tensor([[[0, 2], [4, 255]]])  # n_old = 3: 2 is old, 4 new
    weights = afd_patch_weights(masks, labels, n_old=3)
    bg = _softmax([float(masks[0, c, 0, 0]) for c in range(3)])[0]
    assert weights.tolist()[0][0][0] == pytest.approx(bg, rel=1e-12)
    assert weights.tolist()[0][0][1:] == [1.0] and weights.tolist()[0][1] == [0.0, 0.0]


def test_adaptive_feature_distillation_matches_the_formula_and_is_zero_without_weights():
    patches, old = _random(2, 3, 4, seed=2), _random(2, 3, 4, seed=3)
    weights = torch.tensor([[0.5, 0.0, 1.0], [0.0, 0.25, 0.0]], dtype=torch.float64)
    total = sum(float(weights[b, i]) * (float(patches[b, i, d]) - float(old[b, i, d])) ** 2
                for b in range(2) for i in range(3) for d in range(4))
    expected = total / (4 * 3)   # D = 4, three positive weights
    assert float(adaptive_feature_distillation(patches, old, weights)) == pytest.approx(expected, rel=1e-12)
    zero = adaptive_feature_distillation(patches.requires_grad_(), old, torch.zeros(2, 3, dtype=torch.float64))
    assert zero.item() == 0.0 and not torch.isnan(zero).item()
    zero.backward()


def test_label_guided_distillation_matches_a_per_pixel_loop():
    K, K_old, H, W = 5, 3, 2, 3
    logits, old_logits = _random(2, K, H, W, seed=4), _random(2, K_old, H, W, seed=5)
    # the step's labels: background, the new classes 3 and 4, void (old classes are 0 there)
    labels = torch.tensor([[[0, 3, 4], [255, 3, 0]], [[4, 4, 0], [0, 255, 3]]])
    total = 0.0
    for b in range(2):
        for h in range(H):
            for w in range(W):
                p = _softmax([float(logits[b, c, h, w]) for c in range(K)])
                q = _softmax([float(old_logits[b, c, h, w]) for c in range(K_old)]) + [0.0] * (K - K_old)
                y = int(labels[b, h, w])
                if y not in (0, 255):          # the background mass moves to the labelled class
                    bg = q[0]
                    q = list(q)
                    q[y], q[0] = bg, 0.0
                total += sum(q[c] * math.log(p[c]) for c in range(K)) / K
    expected = -total / (2 * H * W)
    assert float(label_guided_distillation(logits, old_logits, labels)) == pytest.approx(expected, rel=1e-12)


def test_orthogonal_loss_matches_the_pairwise_cosines_of_the_new_classes():
    K, n_old, D = 5, 3, 4
    embeddings = _random(2, K, D, seed=6)
    values = []
    for b in range(2):
        e = [[float(x) for x in embeddings[b, k]] for k in range(K)]
        for i in range(n_old, K):          # rows: the new classes only
            for j in range(K):             # columns: every other class
                if i == j:
                    continue
                dot = sum(a * c for a, c in zip(e[i], e[j]))
                values.append(abs(dot / (math.sqrt(sum(a * a for a in e[i])) * math.sqrt(sum(c * c for c in e[j])))))
    expected = sum(values) / len(values)
    assert float(orthogonal_loss(embeddings, n_old)) == pytest.approx(expected, rel=1e-12)
    # new embeddings equal to the background's (MBS's init): |cos| = 1 with it
    same = torch.zeros(1, 3, 2, dtype=torch.float64)
    same[0, 0] = same[0, 2] = torch.tensor([1.0, 0.0])
    same[0, 1] = torch.tensor([0.6, 0.8])
    assert float(orthogonal_loss(same, n_old=2)) == pytest.approx((1.0 + 0.6) / 2)


def test_orthogonal_loss_gradient_flows_only_through_the_rows():
    embeddings = _random(1, 3, 4, seed=7).requires_grad_()
    orthogonal_loss(embeddings, n_old=2).backward()
    # old rows receive no gradient: their only use is on the detached column side
    assert torch.all(embeddings.grad[0, :2] == 0) and torch.any(embeddings.grad[0, 2] != 0)
