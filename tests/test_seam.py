"""SEAM (lightning_modules/methods/seam.py): each term of its training loss, the PCM, the dense-CRF
wrapper, the AffinityNet's labels and loss and the random walk against values worked out by hand or
with a plain float64 formula; the whole loss against a line-by-line transcription of train_SEAM.py;
one tiny stage end to end."""
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datamodules.datasets.voc import load_mask
from experiments.config import apply_overrides
from experiments.training import build_datamodule
from lightning_modules.methods import METHODS
from lightning_modules.methods.base import StepContext
from lightning_modules.methods.seam import (
    AFFINITY, CRF_SCORES, SEAM, AffinityImages, SEAMClassifier, adaptive_min_pooling_loss, affinity_labels,
    affinity_loss, block_mean, confident_labels, crf_inference, crf_scores, dense_affinity, ecr_loss, equivariance_loss,
    max_norm, max_onehot, normalise_cams, pair_affinities, pair_indices, pair_radius, pcm_input, pixel_correlation,
    random_walk, search_offsets, with_background)
from lightning_modules.methods.weak_baseline import full_image, mask_path

TINY = dict(classifier_encoder="tu-resnet10t", classifier_encoder_depth=3, stage_epochs=1, stage_crop_size=32,
            stage_batch_size=4, affinity_epochs=1, affinity_batch_size=4, inference_scales=[0.5, 1.0])


@pytest.fixture
def one_thread():
    """Tiny networks run fastest on one thread (and stay fast when the cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def t64(values):
    return torch.tensor(values, dtype=torch.float64)


# --- the training terms --------------------------------------------------------------------------------
def test_max_norm_and_equivariance_by_hand():
    p = t64([[[[-1.0, 1.0, 3.0]]]])
    eps = 1e-5
    expected = t64([[[[0.0, (1 - eps) / (3 + eps), (3 - eps) / (3 + eps)]]]])
    torch.testing.assert_close(max_norm(p), expected)
    # min above 0: subtracted
    torch.testing.assert_close(max_norm(t64([[[[2.0, 4.0]]]])), t64([[[[0.0, (2 - eps) / (2 + eps)]]]]))
    # ER: the foreground channels only (channel 0 differs wildly and is ignored)
    a = t64([[[[9.0, -9.0]], [[0.2, 0.8]], [[0.5, 0.0]]]])
    b = t64([[[[0.0, 0.0]], [[0.4, 0.4]], [[0.5, 1.0]]]])
    assert float(equivariance_loss(a, b)) == pytest.approx((0.2 + 0.4 + 0.0 + 1.0) / 4)


def test_ecr_top_k_and_max_onehot_by_hand():
    # target: background channel 0, foreground 1, 2; pixels (0, 0) and (0, 1)
    target = t64([[[[0.9, 0.1]], [[0.3, 0.6]], [[0.2, 0.7]]]])
    onehot = max_onehot(target)
    torch.testing.assert_close(onehot, t64([[[[0.9, 0.1]], [[0.3, 0.0]], [[0.0, 0.7]]]]))
    torch.testing.assert_close(with_background(target), t64([[[[0.7, 0.3]], [[0.3, 0.6]], [[0.2, 0.7]]]]))
    refined = t64([[[[0.5, 0.5]], [[0.3, 0.1]], [[0.6, 0.2]]]])
    # |onehot - refined| = [0.4, 0.4, 0.0, 0.1, 0.6, 0.5]
    # fraction 0.2: k = int(3*1*2*0.2) = 1 -> the largest, 0.6; fraction 0.5: k = 3 -> (0.6 + 0.5 + 0.4) / 3
    assert float(ecr_loss(target, refined, 0.2)) == pytest.approx(0.6)
    assert float(ecr_loss(target, refined, 0.5)) == pytest.approx(1.5 / 3)
    # the target is detached: no gradient reaches it
    target.requires_grad_(True)
    refined.requires_grad_(True)
    ecr_loss(target, refined, 0.5).backward()
    assert target.grad is None and refined.grad.abs().sum() > 0


def test_adaptive_min_pooling_by_hand():
    # per pixel the max over the 2 channels: [[-1, 2], [3, 0.5], [4, 6], [7, 8]] -> 8 values, k = 2:
    # the two smallest are -1 and 0.5 -> (ReLU: 0 + 0.5) / (2 * 1)
    x = t64([[[[-1.0, 1.0], [3.0, 0.5], [4.0, 6.0], [7.0, 8.0]],
              [[-2.0, 2.0], [0.0, 0.2], [1.0, 1.0], [0.0, 0.0]]]])
    assert float(adaptive_min_pooling_loss(x)) == pytest.approx(0.25)


class FixedMaps(nn.Module):
    """A stand-in classifier: cam and cam_rv are fixed 1x1 mixtures of the image's channels."""

    def __init__(self, channels: int):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.a = nn.Parameter(torch.randn(channels, 3, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(channels, 3, generator=g, dtype=torch.float64))

    def forward(self, x):
        cam = torch.einsum("kc,nchw->nkhw", self.a, x).contiguous()
        return cam, torch.einsum("kc,nchw->nkhw", self.b, x).abs().contiguous()


def _official_loss(model, img1, labels):
    """train_SEAM.py's loop body, line by line (in-place as there), float64."""
    def max_norm_official(p, e=1e-5):
        N, C, H, W = p.size()
        p = F.relu(p)
        max_v = torch.max(p.view(N, C, -1), dim=-1)[0].view(N, C, 1, 1)
        min_v = torch.min(p.view(N, C, -1), dim=-1)[0].view(N, C, 1, 1)
        return F.relu(p - min_v - e) / (max_v - min_v + e)

    def min_pool_official(x):
        n, c, h, w = x.size()
        k = h * w // 4
        y = torch.sort(torch.max(x, dim=1)[0].view(n, -1), dim=-1)[0][:, :k]
        return torch.sum(F.relu(y)) / (k * n)

    def max_onehot_official(x):
        x_max = torch.max(x[:, 1:, :, :], dim=1, keepdim=True)[0]
        x[:, 1:, :, :][x[:, 1:, :, :] != x_max] = 0
        return x

    img2 = F.interpolate(img1, scale_factor=0.3, mode="bilinear", align_corners=True)
    N = img1.size(0)
    label = torch.cat((torch.ones((N, 1), dtype=labels.dtype), labels), dim=1).unsqueeze(2).unsqueeze(3)
    cam1, cam_rv1 = model(img1)
    label1 = F.adaptive_avg_pool2d(cam1, (1, 1))
    loss_rvmin1 = min_pool_official((cam_rv1 * label)[:, 1:, :, :])
    cam1 = F.interpolate(max_norm_official(cam1), scale_factor=0.3, mode="bilinear", align_corners=True) * label
    cam_rv1 = F.interpolate(max_norm_official(cam_rv1), scale_factor=0.3, mode="bilinear", align_corners=True) * label
    cam2, cam_rv2 = model(img2)
    label2 = F.adaptive_avg_pool2d(cam2, (1, 1))
    loss_rvmin2 = min_pool_official((cam_rv2 * label)[:, 1:, :, :])
    cam2 = max_norm_official(cam2) * label
    cam_rv2 = max_norm_official(cam_rv2) * label
    loss_cls1 = F.multilabel_soft_margin_loss(label1[:, 1:, :, :], label[:, 1:, :, :])
    loss_cls2 = F.multilabel_soft_margin_loss(label2[:, 1:, :, :], label[:, 1:, :, :])
    ns, cs, hs, ws = cam2.size()
    loss_er = torch.mean(torch.abs(cam1[:, 1:, :, :] - cam2[:, 1:, :, :]))
    cam1 = cam1.clone()
    cam2 = cam2.clone()
    cam1[:, 0, :, :] = 1 - torch.max(cam1[:, 1:, :, :], dim=1)[0]
    cam2[:, 0, :, :] = 1 - torch.max(cam2[:, 1:, :, :], dim=1)[0]
    tensor_ecr1 = torch.abs(max_onehot_official(cam2.detach().clone()) - cam_rv1)
    tensor_ecr2 = torch.abs(max_onehot_official(cam1.detach().clone()) - cam_rv2)
    k = int(cs * hs * ws * 0.2)
    loss_ecr1 = torch.mean(torch.sort(tensor_ecr1.view(ns, -1), dim=-1, descending=True)[0][:, :k])
    loss_ecr2 = torch.mean(torch.sort(tensor_ecr2.view(ns, -1), dim=-1, descending=True)[0][:, :k])
    loss_cls = (loss_cls1 + loss_cls2) / 2 + (loss_rvmin1 + loss_rvmin2) / 2
    return loss_cls + loss_er + loss_ecr1 + loss_ecr2


def test_the_loss_is_train_seam_py():
    torch.manual_seed(0)
    image = torch.randn(2, 3, 20, 20, dtype=torch.float64)
    labels = t64([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    model = FixedMaps(4)
    loss, terms = SEAM().classifier_loss(model, {"image": image, "labels": labels}, None)
    expected = _official_loss(model, image, labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(terms) == {"cls", "er", "ecr"}


# --- the PCM ------------------------------------------------------------------------------------------
def test_pcm_input_by_hand():
    # raw maps of 1 image, 3 channels (background first), 2 pixels
    cam = torch.tensor([[[[5.0, -1.0]], [[2.0, 4.0]], [[3.0, 1.0]]]])
    eps = 1e-5
    out = pcm_input(cam)
    fg1 = [(2 - eps) / (4 + eps), (4 - eps) / (4 + eps)]
    fg2 = [(3 - eps) / (3 + eps), (1 - eps) / (3 + eps)]
    # pixel 0: class 2 is the top (0.99..) -> class 1 zeroed; pixel 1: class 1 is the top
    expected = torch.tensor([[[[1 - fg2[0], 1 - fg1[1]]], [[0.0, fg1[1]]], [[fg2[0], 0.0]]]])
    torch.testing.assert_close(out, expected)


def _pcm_loop(cam, features):
    n, c, h, w = cam.shape
    f = features.reshape(n, -1, h * w)
    cam = cam.reshape(n, c, h * w)
    out = torch.zeros_like(cam)
    for b in range(n):
        unit = [f[b, :, i] / (f[b, :, i].norm() + 1e-5) for i in range(h * w)]
        a = [[max(0.0, (unit[i] @ unit[j]).item()) for j in range(h * w)] for i in range(h * w)]
        for j in range(h * w):
            column = sum(a[i][j] for i in range(h * w)) + 1e-5
            for k in range(c):
                out[b, k, j] = sum(float(cam[b, k, i]) * a[i][j] for i in range(h * w)) / column
    return out.reshape(n, c, h, w)


def test_pcm_against_an_explicit_loop():
    g = torch.Generator().manual_seed(1)
    cam = torch.rand(2, 3, 2, 3, generator=g, dtype=torch.float64)
    features = torch.randn(2, 4, 2, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(pixel_correlation(cam, features), _pcm_loop(cam, features))
    # the module: f9 applied to the concatenated features first
    classifier = SEAMClassifier.__new__(SEAMClassifier)
    nn.Module.__init__(classifier)
    classifier.f9 = nn.Conv2d(4, 5, 1, bias=False).double()
    projected = torch.einsum("oc,nchw->nohw", classifier.f9.weight[:, :, 0, 0], features)
    torch.testing.assert_close(classifier.pcm(cam, features), _pcm_loop(cam, projected))


def test_pcm_trains_only_its_own_layers(one_thread):
    """The taps and the CAM reach the PCM detached (as in the repository): cam_rv's gradient
    reaches f8_3, f8_4 and f9 only; the CAM's never reaches them."""
    method = SEAM(**TINY)
    classifier = method.build_classifier(2)
    cam, cam_rv = classifier(torch.randn(2, 3, 32, 32))
    assert cam.shape == cam_rv.shape == (2, 3, 32, 32)
    cam_rv.sum().backward()
    for name, p in classifier.named_parameters():
        has_grad = p.grad is not None and p.grad.abs().sum() > 0
        assert has_grad == name.startswith(("f8_3", "f8_4", "f9")), name
    classifier.zero_grad(set_to_none=True)
    classifier(torch.randn(2, 3, 32, 32))[0].sum().backward()
    assert all(p.grad is None for n, p in classifier.named_parameters() if n.startswith(("f8", "f9")))


# --- inference: CAM normalisation and the dense CRF ---------------------------------------------------
def test_normalise_cams_by_hand():
    summed = t64([[[0.0, 2.0, 4.0]], [[1.0, 2.0, 3.0]], [[5.0, 5.0, 5.0]]])
    present = torch.tensor([True, True, False])
    eps = 1e-5
    expected = t64([[[-eps / (4 + eps), (2 - eps) / (4 + eps), (4 - eps) / (4 + eps)]],
                    # min 1 > 0: the pixel at the minimum is set to 0 first, then (0 - 1 - eps) / (2 + eps)
                    [[(-1 - eps) / (2 + eps), (1 - eps) / (2 + eps), (2 - eps) / (2 + eps)]],
                    [[0.0, 0.0, 0.0]]])
    torch.testing.assert_close(normalise_cams(summed, present), expected)


def test_crf_wrapper():
    pytest.importorskip("pydensecrf.densecrf")
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, 4:] = 255
    p = np.empty((2, 8, 8), np.float32)
    p[0, :, :4], p[1, :, :4] = 0.9, 0.1
    p[0, :, 4:], p[1, :, 4:] = 0.1, 0.9
    p[:, 3, 1] = [0.45, 0.55]      # a weak outlier inside the black half
    q = crf_inference(image, p, 10)
    expected = np.zeros((8, 8), np.int64)
    expected[:, 4:] = 1
    assert np.array_equal(q.argmax(0), expected)  # the outlier is smoothed away, the edge kept
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)
    # 0 iterations: the normalised clipped unary, which shows the background formula of the scores
    cams = np.array([[[0.2, 0.9], [0.0, 0.5]]], np.float32)
    scores = crf_scores(np.zeros((2, 2, 3), np.uint8), cams, alpha=2.0, iterations=0)
    raw = np.stack([[[0.64, 0.01], [1.0, 0.25]], cams[0]]).astype(np.float64)
    raw = np.clip(raw, 1e-5, 1.0)
    np.testing.assert_allclose(scores, raw / raw.sum(0), atol=1e-6)


def test_crf_missing_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(RuntimeError, match=r"pip install pydensecrf2==1\.1"):
        crf_inference(np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 2), 0.5, np.float32))
    # the stage stops before training anything
    with pytest.raises(RuntimeError, match="pydensecrf2"):
        SEAM(**TINY).run_stage(None, tmp_path)
    assert not any(tmp_path.iterdir())


def test_confident_labels_and_block_mean_by_hand():
    # 3 channels [bg, class a, class b] at 4 pixels
    low = np.array([[0.9, 0.1, 0.2, 0.0], [0.05, 0.8, 0.1, 0.0], [0.05, 0.1, 0.7, 0.0]])
    high = np.array([[0.9, 0.1, 0.6, 0.0], [0.05, 0.8, 0.3, 0.0], [0.05, 0.1, 0.1, 0.0]])
    no_score = np.array([False, False, False, True])
    # la bg -> 255, ha bg -> 0; la class a -> 1; la class b but ha bg -> 0; no score -> 255
    assert confident_labels(low, high, no_score).tolist() == [0, 1, 0, 255]
    array = np.arange(9, dtype=np.float32).reshape(3, 3, 1)
    expected = np.array([[(0 + 1 + 3 + 4) / 4, (2 + 5) / 4], [(6 + 7) / 4, 8 / 4]], np.float32)
    np.testing.assert_allclose(block_mean(array, 2)[..., 0], expected)


# --- the AffinityNet's labels, loss and the random walk -----------------------------------------------
def test_pair_geometry():
    assert search_offsets(2) == [(0, 1), (1, -1), (1, 0), (1, 1)]
    assert len(search_offsets(5)) == 34 and search_offsets(5)[:5] == [(0, 1), (0, 2), (0, 3), (0, 4), (1, -4)]
    assert [pair_radius(56, 56, 5), pair_radius(12, 11, 5), pair_radius(10, 10, 5), pair_radius(4, 4, 5),
            pair_radius(3, 8, 5)] == [5, 5, 4, 2, 3]   # the last two: the fallback, min(r, (w + 1) // 2, h)
    with pytest.raises(ValueError, match="no pixel pairs"):
        pair_radius(2, 2, 5)
    source, targets = pair_indices(4, 4, 2)
    assert source.tolist() == [1, 2, 5, 6, 9, 10]
    assert targets[1].tolist() == [4, 5, 8, 9, 12, 13]   # offset (1, -1)


def test_affinity_labels_on_a_4x4_map_by_hand():
    label = torch.tensor([[[0, 0, 1, 1],
                           [0, 255, 1, 1],
                           [2, 2, 0, 1],
                           [2, 2, 2, 255]]])
    # radius 2: sources (0,1) (0,2) (1,1) (1,2) (2,1) (2,2) = labels 0 1 255 1 2 0; offsets
    # (0,1) (1,-1) (1,0) (1,1)
    bg, fg, neg = affinity_labels(label, 2)
    assert bg[0].tolist() == [[0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    assert fg[0].tolist() == [[0, 1, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 1, 0, 0, 1, 0], [0, 1, 0, 1, 1, 0]]
    assert neg[0].tolist() == [[1, 0, 0, 0, 1, 1], [0, 0, 0, 1, 0, 1], [0, 0, 0, 1, 0, 1], [1, 0, 0, 0, 0, 0]]


def test_pair_affinities_dense_matrix_and_loss_by_hand():
    g = torch.Generator().manual_seed(2)
    features = torch.randn(1, 3, 3, 3, generator=g, dtype=torch.float64)
    affinity = pair_affinities(features, 2)
    source, targets = pair_indices(3, 3, 2)
    flat = features[0].reshape(3, 9)
    for p in range(targets.shape[0]):
        for m in range(targets.shape[1]):
            i, j = int(source[m]), int(targets[p, m])
            assert float(affinity[0, p, m]) == pytest.approx(float(torch.exp(-(flat[:, i] - flat[:, j]).abs().mean())))
    matrix = dense_affinity(features[0], 2)
    torch.testing.assert_close(matrix, matrix.T)
    assert torch.all(matrix.diagonal() == 1)
    # pixel 0 (corner) and pixel 8 (opposite corner) are beyond radius 2; 1 and 4 are neighbours
    assert float(matrix[0, 8]) == 0
    assert float(matrix[1, 4]) == pytest.approx(float(torch.exp(-(flat[:, 1] - flat[:, 4]).abs().mean())))
    a = t64([[0.5, 0.9], [0.2, 0.99]])
    bg, fg, neg = t64([[1, 0], [0, 0]]), t64([[0, 1], [0, 0]]), t64([[0, 0], [1, 1]])
    loss, terms = affinity_loss(a, bg, fg, neg)
    expected_bg = -np.log(0.5 + 1e-5) / (1 + 1e-5)
    expected_fg = -np.log(0.9 + 1e-5) / (1 + 1e-5)
    expected_neg = (-np.log(1 + 1e-5 - 0.2) - np.log(1 + 1e-5 - 0.99)) / (2 + 1e-5)
    assert float(loss) == pytest.approx(expected_bg / 4 + expected_fg / 4 + expected_neg / 2)
    assert float(terms["neg"]) == pytest.approx(expected_neg)


def test_random_walk_against_a_numpy_matrix_power():
    affinity = np.array([[1.0, 0.8, 0.1], [0.8, 1.0, 0.5], [0.1, 0.5, 1.0]])
    cams = np.array([[0.9, 0.2, 0.0], [0.1, 0.3, 0.8]])
    beta, logt = 8, 3
    powered = affinity ** beta
    transition = powered / powered.sum(axis=0, keepdims=True)
    expected = cams @ np.linalg.matrix_power(transition, 2 ** logt)
    out = random_walk(torch.from_numpy(cams), torch.from_numpy(affinity), beta, logt)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)


def test_affinity_images_crop_flip_and_labels(tmp_path):
    """An image equal to its crop: the cell labels of the la/ha scores (or their mirror image)."""
    from PIL import Image

    class Files:
        images = [tmp_path / "a.png"]
        ids = ["a"]

    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(Files.images[0])
    low = np.zeros((2, 16, 16), np.uint8)
    low[0, :8], low[1, 8:] = 255, 255              # la: top half background, bottom half the class
    high = np.zeros((2, 16, 16), np.uint8)
    high[1] = 255
    high[0, :8, :8], high[1, :8, :8] = 255, 0      # ha: background only in the top-left quadrant
    (tmp_path / CRF_SCORES).mkdir()
    np.savez_compressed(tmp_path / CRF_SCORES / "a.npz", low=low, high=high)
    dataset = AffinityImages(Files, [0], tmp_path, crop_size=16, stride=8, seed=0)
    seen = set()
    for epoch in range(8):
        item = dataset[(epoch, 0)]
        label = item["label"].tolist()
        assert label in ([[0, 255], [1, 1]], [[255, 0], [1, 1]])
        flipped = label == [[255, 0], [1, 1]]
        seen.add(flipped)
        source = pixels[:, ::-1] if flipped else pixels
        expected = (source / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
        np.testing.assert_allclose(item["image"].numpy().transpose(1, 2, 0), expected, atol=1e-5)
    assert seen == {True, False}
    # a crop larger than the image: the image at a random place on black, the cells it does not
    # reach have no score (255)
    for epoch in range(4):
        item = AffinityImages(Files, [0], tmp_path, crop_size=32, stride=8, seed=0)[(epoch, 0)]
        black = (0.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
        inside = ~np.isclose(item["image"].numpy().transpose(1, 2, 0), black, atol=1e-5).all(axis=-1)
        rows, cols = np.nonzero(inside)
        assert rows.max() - rows.min() == 15 and cols.max() - cols.min() == 15
        reached = inside.reshape(4, 8, 4, 8).any(axis=(1, 3))
        label = item["label"].numpy()
        assert label.shape == (4, 4) and np.all(label[~reached] == 255) and (label == 1).any()


# --- one tiny stage end to end ------------------------------------------------------------------------
def test_a_tiny_stage_writes_every_mask(tiny_config, tmp_path, one_thread):
    pytest.importorskip("pydensecrf.densecrf")
    assert METHODS["seam"] is SEAM
    config = apply_overrides(tiny_config, ["trainer.precision=32-true", "trainer.accelerator=cpu"]).run_config("seam")
    method = SEAM(**TINY)
    steps = [list(range(16)), [16, 17, 18, 19, 20]]
    datamodule = build_datamodule(config, method, steps, 1)
    datamodule.setup("fit")
    directory = tmp_path / "stage"
    directory.mkdir()
    context = StepContext(config=config, steps=steps, step=1, datamodule=datamodule, stage_directory=directory)
    method.run_stage(context, directory)
    files = datamodule.located.train
    image_labels = method.stage_labels(context)
    assert len(datamodule.train_indices) >= 4
    masks = {}
    for i, row in enumerate(datamodule.train_indices):
        mask = load_mask(mask_path(directory, files.ids[int(row)]))
        assert mask.shape == full_image(files, int(row)).shape[-2:]
        # background and the classes of the image's label only (SEAM never abstains)
        labelled = {c for c, present in zip(steps[1], image_labels[i]) if present}
        assert set(np.unique(mask).tolist()) <= {0, *labelled}
        masks[int(row)] = mask
    assert (directory / AFFINITY).exists() and (directory / "affinity-training.pt").exists()
    assert not (directory / CRF_SCORES).exists()
    # killed after the AffinityNet's last epoch, before its final file and the masks: the rerun
    # recomputes the CRF scores, resumes the training from its checkpoint and writes the same masks
    (directory / AFFINITY).unlink()
    for path in (directory / "masks").iterdir():
        path.unlink()
    method.run_stage(context, directory)
    for row, mask in masks.items():
        assert np.array_equal(load_mask(mask_path(directory, files.ids[row])), mask)
    # the figure's inference (infer) loads the stage's AffinityNet: it gives the stage's mask
    method.stage_dir = directory
    row = int(datamodule.train_indices[0])
    classifier = method.stage_classifier(steps, 1, "cpu")
    labels = torch.from_numpy(method.stage_labels(context)[0])
    with torch.no_grad():
        ids = method.infer(classifier, full_image(files, row), labels).numpy()
    classes = np.array([0, *steps[1]])
    assert np.array_equal(classes[ids], load_mask(mask_path(directory, files.ids[row])))
