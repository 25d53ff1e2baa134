"""The qualitative examples: which test images, the id mapping, WILSON's pseudo-label, the files."""
import numpy as np
import pytest
import torch
from torch import nn

from experiments.reporting.qualitative import (channels_to_dataset_ids, choose_examples, load_examples,
                                     plot_experiment_qualitative, save_examples)
from lightning_modules.methods.ft import METHOD as FineTuning
from lightning_modules.methods.wilson import WILSON

# 5 foreground classes; old = 1-3, new (last step) = 4-5.
STEPS = [[0, 1, 2, 3], [4, 5]]


def presence_of(rows):
    table = np.zeros((len(rows), 5), dtype=bool)
    for i, classes in enumerate(rows):
        for c in classes:
            table[i, c - 1] = True
    return table


def test_choose_examples_prefers_old_and_new_together_and_covers_new_classes():
    presence = presence_of([
        [1],        # 0: old only
        [4],        # 1: new only
        [1, 4],     # 2: old + new 4
        [2, 4],     # 3: old + new 4
        [3, 5],     # 4: old + new 5
        [],         # 5: nothing
    ])
    chosen = choose_examples(presence, STEPS, 3, seed=0)
    # Tier 0 (old + new) has rows 2, 3, 4; covering both new classes needs row 4 and one of 2/3.
    assert len(chosen) == 3 and set(chosen) == {2, 3, 4}
    first_two = set(chosen[:2].tolist())
    assert 4 in first_two and len(first_two & {2, 3}) == 1
    # Four images: the three of tier 0, then tier 1 (new only) before old-only and empty images.
    assert set(choose_examples(presence, STEPS, 4, seed=0)) == {1, 2, 3, 4}
    # All of them and more than there are: every row once.
    assert sorted(choose_examples(presence, STEPS, 10, seed=3)) == list(range(6))


def test_choose_examples_new_class_only_in_a_lower_tier_is_still_covered():
    presence = presence_of([[1, 4], [2, 4], [5], [3]])
    chosen = choose_examples(presence, STEPS, 2, seed=1)
    # Class 5 appears only without an old class (row 2): covering it beats a second tier-0 image.
    assert 2 in chosen and len(set(chosen.tolist()) & {0, 1}) == 1


def test_choose_examples_is_fixed_by_the_seed_and_handles_zero():
    presence = presence_of([[1, 4]] * 20)
    assert choose_examples(presence, STEPS, 5, seed=7).tolist() == choose_examples(presence, STEPS, 5, seed=7).tolist()
    assert len(choose_examples(presence, STEPS, 0)) == 0


def test_channels_to_dataset_ids_follows_the_channel_order():
    steps = [[0, 3, 1], [5, 2]]  # channels: 0->0, 1->3, 2->1, 3->5, 4->2
    mask = np.array([[0, 1, 2], [3, 4, 255]])
    assert channels_to_dataset_ids(mask, steps, 1).tolist() == [[0, 3, 1], [5, 2, 255]]
    # After step 0 only three channels exist.
    with pytest.raises(ValueError, match="channel ids outside 0..2"):
        channels_to_dataset_ids(mask, steps, 0)


class Fixed(nn.Module):
    """Returns a stored tensor whatever the input (a stand-in for a network or the localizer)."""

    def __init__(self, value, key=None):
        super().__init__()
        self.value, self.key = value, key

    def forward(self, images):
        return self.value if self.key is None else {self.key: self.value}


class FakeModule:
    def __init__(self, old_logits, localizer_logits, features):
        self.step = 1
        self.old_network = Fixed(old_logits, "logits_lowres")
        self.network = Fixed(features, "encoder")
        self.step_modules = {"localizer": Fixed(localizer_logits)}


def test_wilson_pseudo_label_worked_by_hand():
    """bg + old class 1 (channels 0, 1), new classes in channels 2 and 3; image labels: channel 2
    present, channel 3 absent; alpha 0.5; features at the image size (no upsampling).
    Pixel by pixel (sigma = sigmoid, m = masked softmax of the localizer, q = .5 h + .5 m):
      (0,0) old logits (0, 3): T_1 = s(3) = .953; localizer (0,0,0,0): m_bg = m_2 = .25 tie,
            q = .625 each; T_bg = min(.5, .625) = .5, T_2 = .625        -> 1
      (0,1) old (0, -3): T_1 = .047; localizer (0,0,5,0): m_2 = e5/(e5+3) = .980, q_2 = .990 -> 2
      (1,0) old (0, -3); localizer (3,0,0,5): class 3 is absent and masked out although the
            localizer prefers it; m_bg = e3/(e3+e5+2) = .118 > m_2 = .006, q_bg = .559,
            T_bg = min(.5, .559) = .5, T_2 = .003, T_1 = .047             -> 0
      (1,1) old (0, -3); localizer (0,0,0,0): as (0,0) but T_1 = .047: T_2 = .625 > .5 -> 2
    """
    old = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[3.0, -3.0], [-3.0, -3.0]]])[None]
    localizer = torch.zeros(1, 4, 2, 2)
    localizer[0, 2, 0, 1] = 5.0
    localizer[0, 0, 1, 0], localizer[0, 3, 1, 0] = 3.0, 5.0
    module = FakeModule(old, localizer, torch.zeros(1, 8, 2, 2))
    labels = WILSON(alpha=0.5).pseudo_labels(module, torch.zeros(1, 3, 2, 2), torch.tensor([[1.0, 0.0]]))
    assert labels.tolist() == [[[1, 2], [0, 2]]]


def test_wilson_pseudo_label_is_upsampled_to_the_image_and_methods_on_ground_truth_have_none():
    old = torch.zeros(1, 2, 2, 2)
    old[0, 1] = -6.0
    old[0, 1, 0, 0] = 6.0  # old class 1 in the top-left feature cell only
    module = FakeModule(old, torch.full((1, 3, 2, 2), -4.0), torch.zeros(1, 8, 2, 2))
    labels = WILSON(alpha=0.5).pseudo_labels(module, torch.zeros(1, 3, 8, 8), torch.tensor([[0.0]]))
    assert labels.shape == (1, 8, 8)
    assert (labels[0, :2, :2] == 1).all() and (labels[0, 6:, 6:] == 0).all()
    assert FineTuning().pseudo_labels(module, torch.zeros(1, 3, 8, 8), torch.tensor([[0.0]])) is None


def test_examples_round_trip_and_figure(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)]
    truths = [np.full(im.shape[:2], 4, np.uint8) for im in images]
    truths[0][0, 0] = 255
    mib = {"rows": [3, 9], "images": images, "ground_truths": truths, "predictions": [t.copy() for t in truths],
           "pseudo_labels": None}
    wilson = dict(mib, predictions=[np.zeros_like(t) for t in truths], pseudo_labels=[np.ones_like(t) for t in truths])
    save_examples(tmp_path / "mib.npz", mib)
    save_examples(tmp_path / "wilson.npz", wilson)
    loaded = {"mib": load_examples(tmp_path / "mib.npz"), "wilson": load_examples(tmp_path / "wilson.npz")}
    assert loaded["mib"]["rows"] == [3, 9] and loaded["mib"]["pseudo_labels"] is None
    for kind in ("images", "ground_truths", "predictions"):
        for saved, original in zip(loaded["mib"][kind], mib[kind]):
            assert saved.shape == original.shape and (saved == original).all()
    assert all((p == 1).all() for p in loaded["wilson"]["pseudo_labels"])
    path = plot_experiment_qualitative(tmp_path / "q.png", loaded, {0: "background", 4: "four"})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    loaded["wilson"]["rows"] = [3, 10]
    with pytest.raises(ValueError, match="must be the same images"):
        plot_experiment_qualitative(tmp_path / "bad.png", loaded)
