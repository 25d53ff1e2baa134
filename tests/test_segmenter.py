"""The incremental Segmenter (lightning_modules/segmenter.py, issue 14's network): class-embedding
groups grow with the steps, an earlier step's state loads, MBS's background-token transfer."""
from __future__ import annotations

import torch

from lightning_modules.segmenter import MaskLayerNorm, SegmenterNetwork

TINY = dict(encoder="vit_tiny_patch16_224", image_size=32, patch_size=8, vit_depth=2, vit_width=32, vit_heads=2,
            decoder_drop_path=0.0)


def _network(classes):
    torch.manual_seed(0)
    return SegmenterNetwork(classes, **TINY).eval()


def test_forward_shapes_and_what_mbs_distils():
    network = _network([4, 3])
    out = network(torch.randn(2, 3, 30, 27))   # not a multiple of the patch: padded, then cut
    assert out["logits"].shape == (2, 7, 30, 27)
    assert out["logits_lowres"].shape == (2, 7, 4, 4)
    assert out["patches"].shape == (2, 16, 32) and out["class_features"].shape == (2, 7, 32)
    assert out["class_embeddings"].shape == (2, 7, 32)


def test_mask_layer_norm_by_hand():
    norm = MaskLayerNorm([2, 1])
    with torch.no_grad():
        norm.weight[1].fill_(2.0)
        norm.bias[0].fill_(0.5)
    x = torch.tensor([[[1.0, 2.0, 6.0]]])
    mean, std = 3.0, (((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2) ** 0.5   # unbiased
    expected = [(1 - mean) / (std + 1e-5) + 0.5, (2 - mean) / (std + 1e-5) + 0.5, 2 * (6 - mean) / (std + 1e-5)]
    torch.testing.assert_close(norm(x)[0, 0], torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_groups_grow_and_an_earlier_state_loads_into_the_grown_network():
    network = _network([4])
    saved = network.state()
    network.add_classes(3)
    assert network.classes_per_step == [4, 3] and network.num_classes == 7
    assert [tuple(p.shape) for p in network.decoder.class_embeddings] == [(1, 4, 32), (1, 3, 32)]
    # the saved step-0 network, rebuilt from its saved form, grows the same way
    rebuilt = SegmenterNetwork(saved["classes_per_step"], **TINY)
    rebuilt.load_state_dict(saved["state_dict"])
    rebuilt.add_classes(3)
    missing, unexpected = rebuilt.load_state_dict(saved["state_dict"], strict=False)
    assert not unexpected and set(missing) == {"decoder.class_embeddings.1", "decoder.mask_norm.weight.1",
                                                "decoder.mask_norm.bias.1"}
    torch.testing.assert_close(rebuilt.decoder.class_embeddings[0], network.decoder.class_embeddings[0])


def test_background_token_transfer_makes_new_masks_equal_the_background_before_its_affine():
    network = _network([4])
    with torch.no_grad():   # a trained background affine, as after step 0
        network.decoder.mask_norm.weight[0][0] = 1.5
        network.decoder.mask_norm.bias[0][0] = -0.25
    network.add_classes(2)
    network.init_new_classes_from_background()
    masks = network(torch.randn(2, 3, 32, 32))["logits_lowres"]
    background = (masks[:, 0] + 0.25) / 1.5       # the background's score before its affine
    for c in (4, 5):
        torch.testing.assert_close(masks[:, c], background, rtol=1e-4, atol=1e-5)
    assert torch.all(network.decoder.mask_norm.weight[1] == 1) and torch.all(network.decoder.mask_norm.bias[1] == 0)


def test_parameter_groups_cover_every_parameter_once():
    network = _network([4, 2])
    groups = network.parameter_groups()
    ids = [id(p) for group in groups.values() for p in group]
    assert len(ids) == len(set(ids)) == len(list(network.parameters()))


def test_frozen_copy_and_saved_form():
    network = _network([4, 2])
    old = network.frozen_copy()
    assert not old.training and not any(p.requires_grad for p in old.parameters())
    images = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(old(images)["logits"], network(images)["logits"])
    assert network.state()["classes_per_step"] == [4, 2]
