"""SDR's public functions against hand-made cases and float64 loops (legacy = the official code's
gathers, and the paper's definition), and the method's prototypes."""
import pytest
import torch
import torch.nn.functional as F

from lightning_modules.losses import (sdr_clustering_losses, sdr_prototype_matching_loss, sdr_sparsity_loss,
                                      sdr_update_prototypes)


def _pixels(features, mask):
    """The per-pixel feature vectors at mask (B, h, w), float64, with loops: (N, C)."""
    rows = []
    for b in range(features.shape[0]):
        for y in range(features.shape[2]):
            for x in range(features.shape[3]):
                if mask[b, y, x]:
                    rows.append(features[b, :, y, x].double())
    return torch.stack(rows)


def _legacy_rows(features, mask):
    """The code's `features[mask.expand(...)].view(C, -1)` written out: the selected elements in
    (b, c, h, w) order, cut into C rows."""
    values = []
    for b in range(features.shape[0]):
        for c in range(features.shape[1]):
            for y in range(features.shape[2]):
                for x in range(features.shape[3]):
                    if mask[b, y, x]:
                        values.append(float(features[b, c, y, x]))
    return torch.tensor(values, dtype=torch.float64).view(features.shape[1], -1)


@pytest.fixture
def two_images():
    """Class 1 in both images (legacy and paper gathers differ), class 2 in the second only."""
    generator = torch.Generator().manual_seed(0)
    features = torch.rand(2, 3, 2, 3, generator=generator, dtype=torch.float64)
    labels_down = torch.tensor([[[0, 1, 1], [0, 0, 0]],
                                [[1, 2, 2], [0, 0, 255]]])[:, None]
    return features, labels_down


def test_prototype_update_paper_and_legacy_gathers(two_images):
    features, labels_down = two_images
    prototypes = torch.rand(4, 3, dtype=torch.float64)
    counts = torch.tensor([0, 5, 0, 2])
    new, new_counts = sdr_update_prototypes(features, labels_down, prototypes, counts, exclude_background=True,
                                            legacy=False)
    # background (the first class present) excluded, 255 excluded; running means by hand
    assert new_counts.tolist() == [0, 8, 2, 2]
    mask1, mask2 = (labels_down[:, 0] == c for c in (1, 2))
    expected1 = (_pixels(features, mask1).sum(0) + 5 * prototypes[1]) / 8
    expected2 = _pixels(features, mask2).sum(0) / 2
    torch.testing.assert_close(new[1], expected1)
    torch.testing.assert_close(new[2], expected2)
    torch.testing.assert_close(new[0], prototypes[0])
    torch.testing.assert_close(new[3], prototypes[3])
    legacy, legacy_counts = sdr_update_prototypes(features, labels_down, prototypes, counts, True, legacy=True)
    assert legacy_counts.tolist() == [0, 8, 2, 2]
    torch.testing.assert_close(legacy[1], (_legacy_rows(features, mask1).sum(1) + 5 * prototypes[1]) / 8)
    assert not torch.allclose(legacy[1], new[1]), "class 1 is in two images: the code's gather mixes them"
    torch.testing.assert_close(legacy[2], new[2])  # class 2 in one image: both gathers agree
    # without exclusion background is updated too; with no background the *first* class is dropped
    with_bg, _ = sdr_update_prototypes(features, labels_down, prototypes, counts, exclude_background=False, legacy=False)
    torch.testing.assert_close(with_bg[0], _pixels(features, labels_down[:, 0] == 0).mean(0))
    no_bg = labels_down.clone()
    no_bg[no_bg == 0] = 2
    dropped, dropped_counts = sdr_update_prototypes(features, no_bg, prototypes, counts, True, legacy=False)
    assert dropped_counts[1] == counts[1] and torch.equal(dropped[1], prototypes[1]), "class 1, first present, dropped"


def test_prototype_matching_legacy_mixes_channels_even_for_one_image():
    generator = torch.Generator().manual_seed(1)
    features = torch.rand(1, 3, 2, 2, generator=generator, dtype=torch.float64)
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, 2:, 2:] = 5  # a new class: not background
    old_logits = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    old_logits[0, 1, :2, :] = 10  # old class 1 where the old model sees it (top rows)
    old_logits[0, 2, 2:, :2] = 10  # old class 2 (bottom left)
    prototypes = torch.rand(6, 3, generator=generator, dtype=torch.float64)
    # downsampled to 2x2 (nearest: rows/cols 0 and 2): pseudo = [[1, 1], [2, 0(new)]]
    paper = sdr_prototype_matching_loss(features, old_logits, labels, prototypes, 3, legacy=False)
    mean1 = features[0, :, 0, :].mean(dim=1)
    mean2 = features[0, :, 1, 0]
    expected = (F.mse_loss(mean1, prototypes[1]) + F.mse_loss(mean2, prototypes[2])) / 2
    assert paper.item() == pytest.approx(expected.item(), rel=1e-12)
    legacy = sdr_prototype_matching_loss(features, old_logits, labels, prototypes, 3, legacy=True)
    # the code's view(-1, C) of the 2 x 3 selected values of class 1: rows of consecutive elements
    values = torch.stack([features[0, c, 0, x] for c in range(3) for x in range(2)]).view(-1, 3)
    legacy_expected = (F.mse_loss(values.mean(0), prototypes[1]) + F.mse_loss(mean2, prototypes[2])) / 2
    assert legacy.item() == pytest.approx(legacy_expected.item(), rel=1e-12)
    assert legacy.item() != pytest.approx(paper.item())


def test_clustering_attractive_running_division_and_repulsive_finite_mean(two_images):
    features, labels_down = two_images
    labels = labels_down[:, 0]  # at feature resolution already: the nearest downsampling is the identity
    prototypes = torch.rand(256, 3, dtype=torch.float64)
    attractive, repulsive = sdr_clustering_losses(features.clone().requires_grad_(True), labels, prototypes,
                                                  legacy=False)
    present = [0, 1, 2]  # 255 left out
    running = 0.0
    means = []
    for cl in present:
        pixels = _pixels(features, labels == cl)  # (N, C)
        running = (running + float(((pixels - prototypes[cl]) ** 2).mean())) / len(present)
        means.append(pixels.mean(0))
    assert attractive.item() == pytest.approx(running, rel=1e-12)
    distances = [float((means[i] - means[j]).norm()) for i in range(3) for j in range(3) if i != j]
    assert repulsive.item() == pytest.approx(sum(1 / d for d in distances) / len(distances), rel=1e-10)
    assert repulsive.requires_grad  # the class means keep their gradient
    single = torch.zeros_like(labels)
    _, alone = sdr_clustering_losses(features, single, prototypes)
    assert alone.item() == 0.0  # one class: the mean over no finite entry is NaN -> 0
    legacy_attractive, _ = sdr_clustering_losses(features, labels, prototypes, legacy=True)
    assert legacy_attractive.item() != pytest.approx(attractive.item())  # class 0 and 1 are in both images


def test_sparsity_normalises_by_the_class_maximum_over_the_batch(two_images):
    features, labels_down = two_images
    labels = labels_down[:, 0]
    got = sdr_sparsity_loss(features, labels)
    total, pixels = 0.0, 0
    peaks = {cl: float(_pixels(features, labels == cl).max()) for cl in (0, 1, 2, 255)}
    for b in range(2):
        for y in range(2):
            for x in range(3):
                f = features[b, :, y, x] / (peaks[int(labels[b, y, x])] + 1e-15)
                total += float(torch.exp(f).sum() / (f.sum() + 1e-15))
                pixels += 1
    assert got.item() == pytest.approx(total / pixels, rel=1e-12)
    # background alone is dropped: nothing normalised, the loss is 0
    assert sdr_sparsity_loss(features, torch.zeros_like(labels)).item() == 0.0


# --- the method ---------------------------------------------------------------------------------------
THREE_STEPS = "data.task=[[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15],[16,17,18],[19,20]]"


def test_prototypes_are_carried_through_the_steps_and_equal_a_direct_computation(tiny_config, monkeypatch):
    """Every batch's features and downsampled labels recorded; the prototypes the run carries into
    and out of step 2 equal the public update applied to them in order, from zeros (the state is
    carried, never reset); in step 2 only the step's classes move (disjoint, steps >= 1: the first
    class present, background, is excluded, and old classes are labelled background)."""
    import lightning_modules.methods.sdr as sdr_module
    from experiments import run
    from experiments.config import apply_overrides
    from experiments.store import run_directory

    recorded = []
    original = sdr_module.sdr_prototype_statistics

    def recording(features, labels_down, num_classes, exclude_background=True, legacy=True):
        recorded.append((features.detach().clone(), labels_down.clone(), num_classes, exclude_background))
        return original(features, labels_down, num_classes, exclude_background, legacy)

    monkeypatch.setattr(sdr_module, "sdr_prototype_statistics", recording)
    config = apply_overrides(tiny_config, ["methods=[sdr]", THREE_STEPS, "trainer.precision=32-true",
                                           "schedule.incremental={epochs: 2, lr: 0.001}"])
    results = run.run_experiment(config)["sdr"]
    state = torch.load(run_directory(config.run_config("sdr")) / "checkpoints" / "step2.pt",
                       weights_only=True)["method_state"]
    prototypes, counts = torch.zeros(16, recorded[0][0].shape[1]), torch.zeros(16, dtype=torch.long)
    at_step2 = None
    for features, labels_down, num_classes, exclude in recorded:
        if num_classes > prototypes.shape[0]:
            if num_classes == 21:
                at_step2 = counts.clone()
            prototypes = torch.cat([prototypes, prototypes.new_zeros(num_classes - prototypes.shape[0], prototypes.shape[1])])
            counts = torch.cat([counts, counts.new_zeros(num_classes - counts.shape[0])])
        prototypes, counts = sdr_update_prototypes(features, labels_down, prototypes, counts, exclude, legacy=True)
    assert [r[3] for r in recorded].count(False) == results["steps"][0]["train_images"] // 4 * 1  # step 0: bg kept
    torch.testing.assert_close(state["prototypes"], prototypes, rtol=0, atol=0)
    assert torch.equal(state["prototype_counts"], counts)
    assert int(counts[0]) > 0 and int(at_step2[16:19].sum()) > 0  # step-0 background and step-1 classes
    assert torch.equal(counts[:19], at_step2[:19]), "step 2 updates only its own classes (19, 20)"
    assert int(counts[19:].sum()) > 0


# Slow tier (CI runs it): two DDP processes, beside the probe method's 2-process check of the same pass
# mechanism (tests/test_robustness.py::test_two_processes_equal_one_process_at_the_same_effective_batch).
@pytest.mark.slow
def test_prototypes_with_one_and_two_processes(tmp_path):
    """The same step-0 model and prototypes (cached by the first run, with its side state); in step 1
    two gloo processes apply both processes' batch statistics in rank order, one process its two
    accumulated batches in the same order, so the pixel counts are identical. The prototypes may
    differ: the losses see them at different points (after both halves of an update under DDP, after
    the first half when accumulating; they enter the loss with weights 0.01 and 0.001), and float
    sums run in another order. Measured here: 4.6e-7 relative on the final prototypes after 2
    epochs; the tolerance, 1e-4, leaves room for other machines' float order while any
    missing or reordered update (tens of percent on a class's mean) would fail."""
    from tests.test_robustness import states_with_one_and_two_processes

    states = states_with_one_and_two_processes(tmp_path, "sdr", "schedule.incremental={epochs: 2, lr: 0.001}",
                                               "data.batch_size=4", "methods.sdr.data.batch_size=4")
    assert torch.equal(states[0]["prototype_counts"], states[1]["prototype_counts"])
    a, b = states[0]["prototypes"], states[1]["prototypes"]
    relative = float((a - b).abs().max() / a.abs().max())
    assert relative < 1e-4, relative
