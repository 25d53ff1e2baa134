"""The network: the papers' DeepLabV3 configuration, feature taps, and the incremental classifier."""
import pytest
import torch
import torch.nn.functional as F

from lightning_modules.network import SegmentationNetwork


def test_paper_network_is_resnet101_at_output_stride_16_with_rates_6_12_18():
    torch.manual_seed(0)
    network = SegmentationNetwork([16], encoder="resnet101", output_stride=16, atrous_rates=(6, 12, 18)).eval()
    dilations = sorted({m.dilation[0] for m in network.decoder.modules()
                        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and m.dilation[0] > 1})
    assert dilations == [6, 12, 18]
    with torch.no_grad():
        out = network(torch.randn(1, 3, 64, 64))
    assert out["encoder"].shape == (1, 2048, 4, 4)        # 64 / 16
    assert out["decoder"].shape == (1, 256, 4, 4)
    assert out["logits"].shape == (1, 16, 64, 64)


def test_incremental_classifier_channel_order_and_upsampling():
    torch.manual_seed(0)
    network = SegmentationNetwork([3], encoder="tu-resnet10t", encoder_depth=3, output_stride=8,
                                  atrous_rates=(2, 4, 6), decoder_channels=16).eval()
    network.classifier.add_step(2)
    network.classifier.add_step(1)
    assert network.classifier.classes_per_step == [3, 2, 1] and network.classifier.num_classes == 6
    with torch.no_grad():
        out = network(torch.randn(2, 3, 32, 32))
        heads = [head(out["decoder"]) for head in network.classifier.heads]
    torch.testing.assert_close(out["logits_lowres"], torch.cat(heads, dim=1))
    torch.testing.assert_close(out["logits_lowres"][:, 3:5], heads[1])  # step-1 classes are channels 3, 4
    expected = F.interpolate(out["logits_lowres"], size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out["logits"], expected)


def test_unavailable_pretrained_weights_stop_with_a_clear_message(monkeypatch):
    """No network (HF_HUB_OFFLINE, set for every test) and no cached copy: one clear error that
    says how to fix it, never a silent run from scratch."""
    from lightning_modules.network import PretrainedWeightsUnavailable
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsUnavailable, match="encoder_weights=null"):
        SegmentationNetwork([3], encoder="resnet18", encoder_weights="imagenet")
