"""RECALL's background inpainting (lightning_modules.losses.recall_inpaint_labels) on a hand-made case."""
import pytest
import torch

from lightning_modules.losses import recall_inpaint_labels


def test_inpainting_by_hand():
    # old model over background + old classes 1, 2; the step's new class is 3
    labels = torch.tensor([[[0, 0, 255, 3],
                            [3, 255, 0, 0]]])
    argmax = torch.tensor([[[1, 0, 2, 1],     # what the old model predicts at each pixel
                            [2, 1, 0, 2]]])
    old_logits = torch.nn.functional.one_hot(argmax, 3).permute(0, 3, 1, 2).float() * 5.0 - 1.0
    expected = [[[1, 0, 2, 3],      # background -> old argmax (1, or 0 = background); void -> 2; new class kept
                 [3, 1, 0, 2]]]     # new class kept even where the old model sees an old class
    assert recall_inpaint_labels(labels, old_logits).tolist() == expected


def test_inpainting_checks_shapes():
    with pytest.raises(ValueError, match="must be"):
        recall_inpaint_labels(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 3, 4, 5))
