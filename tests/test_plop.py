"""PLOP's public functions against hand-worked cases and float64 loops, and the method on tiny inputs."""
import math

import pytest
import torch

from lightning_modules.losses import (local_pod, plop_entropy_histograms, plop_pseudo_labels, plop_thresholds,
                                      pod_embedding)


def _entropy64(logits_pixel):
    """PLOP's entropy of one pixel's old logits, in float64 with math only."""
    m = max(logits_pixel)
    e = [math.exp(v - m) for v in logits_pixel]
    p = [v / sum(e) for v in e]
    c = len(p)
    return -(1 / math.log(c + 1e-8)) * sum(q * math.log(q + 1e-8) for q in p) / c, p


def test_entropy_histograms_against_a_pixel_loop():
    generator = torch.Generator().manual_seed(0)
    old = torch.randn(2, 4, 5, 6, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, 3, (2, 5, 6), generator=generator)
    labels[0, 0, :3] = 255
    n_classes, bins = 6, 10
    expected = torch.zeros(n_classes, bins, dtype=torch.long)
    for b in range(2):
        for y in range(5):
            for x in range(6):
                if labels[b, y, x] != 0:
                    continue
                h, p = _entropy64(old[b, :, y, x].tolist())
                u = h / math.log(n_classes)
                expected[max(range(4), key=lambda k: p[k]), min(int(u * bins), bins - 1)] += 1
    got = plop_entropy_histograms(old, labels, n_classes, bins=bins)
    assert got.dtype == torch.long and torch.equal(got, expected)
    assert int(got.sum()) == int((labels == 0).sum())
    # integer counts: two halves of the batch sum to the whole
    halves = plop_entropy_histograms(old[:1], labels[:1], n_classes, bins) + plop_entropy_histograms(
        old[1:], labels[1:], n_classes, bins)
    assert torch.equal(halves, got)


def _histogram(**bins_counts):
    h = torch.zeros(100, dtype=torch.long)
    for name, count in bins_counts.items():
        h[int(name.removeprefix("b"))] = count
    return h


def test_legacy_median_walk_hand_worked():
    """Worked by hand from the official walk (running sum += k, not the bin's count):
    a) 10 pixels in bin 0: half 5 <= 0 + 10 at k = 0 -> 0 + 5/10 * 0.01 = 0.005;
    b) 4 + 4 in bins 5 and 40: the running sum 0, 1, 3, 6, 10, ... passes half = 4 before any
       bin holds it; the walk ends at k = 99 with (4 - 4851) / 0 = -inf: max(-inf, 0.001) = 0.001;
    c) 2 pixels in bin 50: half 1 equals the running sum 0 + 1 at k = 2, whose bin is empty:
       0.02 + 0/0 = NaN, which max(NaN, 0.001) keeps;
    d) 100 in bin 28, 900 in bin 99 (half 500): at k = 28, 500 > 378 + 100; at k = 29 the bin is
       int(29 / 100 * 100) = 28, and 406 <= 500 <= 406 + 100: 0.29 + (500 - 406) / 100 * 0.01 = 0.2994."""
    rows = torch.stack([_histogram(b0=10), _histogram(b5=4, b40=4), _histogram(b50=2),
                        _histogram(b28=100, b99=900), _histogram()])
    legacy = plop_thresholds(rows, base_threshold=0.001, legacy_median=True)
    assert legacy[0].item() == pytest.approx(0.005, abs=1e-7)
    assert legacy[1].item() == pytest.approx(0.001, abs=1e-9)
    assert math.isnan(legacy[2].item())
    assert legacy[3].item() == pytest.approx(0.2994, abs=1e-6)
    assert legacy[4].item() == pytest.approx(0.001, abs=1e-9)  # an empty row: the base threshold
    assert int(29 / 100 * 100) == 28 and int(57 / 100 * 100) == 56 and int(58 / 100 * 100) == 57


def test_true_median_hand_worked():
    """The interpolated median of the binned values: bin b where the cumulative count reaches
    half, (b + (half - before) / count_b) / 100:
    a) (0 + 5/10) / 100 = 0.005;  b) half 4 reached in bin 5: (5 + 4/4) / 100 = 0.06;
    c) half 1 in bin 50: (50 + 1/2) / 100 = 0.505;  d) half 500 in bin 99: (99 + 400/900) / 100."""
    rows = torch.stack([_histogram(b0=10), _histogram(b5=4, b40=4), _histogram(b50=2),
                        _histogram(b28=100, b99=900), _histogram()])
    true = plop_thresholds(rows, base_threshold=0.001, legacy_median=False)
    expected = [0.005, 0.06, 0.505, (99 + 400 / 900) / 100, 0.001]
    for got, value in zip(true.tolist(), expected):
        assert got == pytest.approx(value, rel=1e-6)
    # the base threshold is a floor
    assert plop_thresholds(rows[:1], base_threshold=0.01, legacy_median=False).item() == pytest.approx(0.01)


def test_pseudo_labels_and_adaptive_factor_against_a_pixel_loop():
    generator = torch.Generator().manual_seed(1)
    n_old, n_classes = 4, 6
    old = torch.randn(2, n_old, 4, 5, generator=generator, dtype=torch.float64) * 2
    labels = torch.randint(0, n_classes, (2, 4, 5), generator=generator)
    labels[1, 0, 0] = 255
    thresholds = torch.tensor([0.02, float("nan"), 0.05, 0.0001, 0.03, 0.03])
    got, factor = plop_pseudo_labels(old, labels, thresholds, n_classes)
    for b in range(2):
        accepted = background = 0
        for y in range(4):
            for x in range(5):
                label = int(labels[b, y, x])
                if label >= n_old:  # new classes and void keep their label
                    assert got[b, y, x] == label
                    continue
                background += 1
                h, p = _entropy64(old[b, :, y, x].tolist())
                c = max(range(n_old), key=lambda k: p[k])
                ok = h / math.log(n_classes) < float(thresholds[c])  # NaN: never
                accepted += ok
                assert got[b, y, x] == (c if ok else 255), (b, y, x)
        assert factor[b].item() == pytest.approx(accepted / (background + 1e-6), rel=1e-6)  # float32, as the code
    # a class whose threshold is NaN (the legacy median of an empty bin) is never a pseudo-label
    assert not (got[labels < n_old] == 1).any()


def _embedding64(x, scales):
    """pod_embedding with loops, float64: per scale s, region side k = W // s, the means over the
    width then over the height of each region, channel by channel."""
    batch, channels, _, width = x.shape
    out = []
    for b in range(batch):
        values = []
        for s in scales:
            k = width // s
            for i in range(s):
                for j in range(s):
                    region = x[b, :, i * k:(i + 1) * k, j * k:(j + 1) * k]
                    values += [float(region[c, r, :].mean()) for c in range(channels) for r in range(k)]
                    values += [float(region[c, :, q].mean()) for c in range(channels) for q in range(k)]
        out.append(values)
    return torch.tensor(out, dtype=torch.float64)


def test_local_pod_against_loops_with_the_logits_fold():
    generator = torch.Generator().manual_seed(2)
    old_f, new_f = (torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    old_l = torch.randn(2, 4, 4, 4, generator=generator, dtype=torch.float64)
    new_l = torch.randn(2, 6, 4, 4, generator=generator, dtype=torch.float64)  # 2 new classes
    weights, n_classes, n_new = [0.01, 0.0005], 6, 2
    got = local_pod([old_f, old_l], [new_f, new_l], weights, n_classes, n_new)
    # the fold: channel 0 of the new logits absorbs the new classes (4 and 5), channels 1..3 stay
    folded = new_l[:, :4].clone()
    folded[:, 0] = new_l[:, 0] + new_l[:, 4] + new_l[:, 5]
    terms = []
    for w, a, b in ((0.01, old_f, new_f), (0.0005, old_l, folded)):
        d = _embedding64(a ** 2, (1, 2, 4)) - _embedding64(b ** 2, (1, 2, 4))
        terms.append(w * math.sqrt(n_classes / n_new) * sum(math.sqrt(float((d[i] ** 2).sum())) for i in range(2)) / 2)
    assert got.item() == pytest.approx(sum(terms) / 2, rel=1e-10)
    assert pod_embedding(old_f, (1, 2, 4)).shape == (2, 2 * 3 * 8 * (1 + 2 + 4))
    # remainders dropped: a 7-wide map at scale 2 uses regions of side 3
    assert pod_embedding(torch.zeros(1, 1, 7, 7), (2,)).shape == (1, 4 * 2 * 3)
    with pytest.raises(ValueError, match="only the last pair"):
        local_pod([old_l, old_l], [new_l, new_l], [1.0, 1.0], 6, 2)


# --- the method -------------------------------------------------------------------------------------
def test_plop_loss_is_the_pseudo_labelled_ce_plus_local_pod_on_stages_decoder_and_logits():
    from lightning_modules.methods import build_method
    from lightning_modules.module import IncrementalSegmentationModule
    from lightning_modules.network import SegmentationNetwork
    from tests.conftest import start_step

    torch.manual_seed(0)
    network = SegmentationNetwork([16], encoder="tu-resnet10t", encoder_depth=3, output_stride=8,
                                  atrous_rates=(2, 4, 6), decoder_channels=16)
    plop = build_method("plop")
    assert plop.hparams()["pod_logits_weight"] == 0.0005 and plop.settings["data"]["void_as_background"] is False
    old = start_step(network, plop, 5)
    module = IncrementalSegmentationModule(network, plop, [list(range(16)), [16, 17, 18, 19, 20]], step=1, lr=0.001)
    module.set_old_network(old)
    images = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 21, (2, 32, 32))
    labels[:, :2] = 255
    totals = plop.training_pass(module, {"image": images, "label": labels})
    plop.after_training_pass(module, totals)
    assert torch.equal(plop.carried["thresholds"], plop_thresholds(totals["histograms"]))
    loss, terms = plop.incremental_training_loss(module, {"image": images, "label": labels})
    # recomputed from the public functions
    with torch.no_grad():
        o, n = old(images, taps=("stages",)), network(images, taps=("stages",))
        pseudo, factor = plop_pseudo_labels(o["logits"], labels, plop.carried["thresholds"], 21)
        ce = (factor[:, None, None] * torch.nn.functional.cross_entropy(n["logits"], pseudo, ignore_index=255,
                                                                        reduction="none")).mean()
        pod = local_pod([*o["stages"], o["decoder"], o["logits_lowres"]], [*n["stages"], n["decoder"], n["logits_lowres"]],
                        [0.01, 0.01, 0.01, 0.0005], 21, 5)
    torch.testing.assert_close(terms["ce"], ce)
    torch.testing.assert_close(terms["pod"], pod)
    torch.testing.assert_close(loss, ce + pod)
    assert float(pod) > 0  # the new classifier changed the logits (MiB's init), the rest is the old network
    loss.backward()
    assert all(p.grad is None for p in old.parameters())


# Slow tier (CI runs it): two DDP processes, beside the probe method's 2-process check of the same pass
# mechanism (tests/test_robustness.py::test_two_processes_equal_one_process_at_the_same_effective_batch).
@pytest.mark.slow
def test_plop_thresholds_are_identical_with_one_and_two_processes(tmp_path):
    """The same old model (the step-0 model cached by the first run), the pass over the training
    images split over 2 gloo processes and summed: the same histograms and thresholds as 1 process
    (fp32; every image seen once over the processes)."""
    from tests.test_robustness import states_with_one_and_two_processes

    states = states_with_one_and_two_processes(tmp_path, "plop", "schedule.incremental={epochs: 1, lr: 0.001}")
    assert int(states[0]["histograms"].sum()) > 0
    assert torch.equal(states[0]["histograms"], states[1]["histograms"])
    torch.testing.assert_close(states[0]["thresholds"], states[1]["thresholds"], rtol=0, atol=0, equal_nan=True)
