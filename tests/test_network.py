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


def _randomised(network):
    """Non-trivial batch-norm statistics and affines (timm zero-initialises the last BN of each
    block, which would make the residual sum equal to the shortcut), in eval mode."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
    return network.eval()


@pytest.mark.parametrize("encoder, depth, stride, expected_stages", [
    ("tu-resnet10t", 3, 8, 2),    # the embedded default: 2 ResNet stages
    ("resnet18", 5, 16, 4),       # smp's torchvision-style ResNet: 4 stages
    ("tu-resnet50", 4, 16, 3),    # timm Bottlenecks, depth 4: 3 stages
])
def test_stage_taps_are_each_stage_before_its_last_activation(encoder, depth, stride, expected_stages):
    """PLOP distils every ResNet stage's output taken before the last block's activation: the
    residual sum, which has negative values, and whose ReLU is the stage's output; asking for the
    taps changes nothing else of the forward."""
    torch.manual_seed(0)
    network = _randomised(SegmentationNetwork([3], encoder=encoder, encoder_depth=depth, output_stride=stride,
                                              decoder_channels=16))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain, tapped = network(images), network(images, taps=("stages",))
        features = network.encoder(images)
    stages = tapped["stages"]
    assert len(stages) == expected_stages
    for key in ("encoder", "decoder", "logits_lowres", "logits"):
        torch.testing.assert_close(tapped[key], plain[key], rtol=0, atol=0)
    # the stage outputs are the encoder's features after the stem: features[2:] (smp's list starts
    # with the input and the stem's output)
    for pre, post in zip(stages, features[2:], strict=True):
        assert float(pre.min()) < 0, "a tap after the activation would have no negative value"
        torch.testing.assert_close(torch.relu(pre), post, rtol=0, atol=0)
    # gradients flow through the taps (the new model's maps are distilled with gradients)
    network.train()
    out = network(images, taps=("stages",))
    out["stages"][0].sum().backward()
    assert network.encoder.parameters().__next__().grad is not None


def test_unknown_taps_and_non_resnet_encoders_are_refused():
    network = SegmentationNetwork([3], encoder="tu-resnet10t", encoder_depth=3, output_stride=8,
                                  decoder_channels=16)
    with pytest.raises(ValueError, match="unknown network taps"):
        network(torch.randn(2, 3, 32, 32), taps=("nope",))
    other = SegmentationNetwork([3], encoder="tu-mobilenetv3_small_050", encoder_depth=3, output_stride=8,
                                decoder_channels=16)
    with pytest.raises(ValueError, match="stage taps need a ResNet encoder"):
        other(torch.randn(2, 3, 32, 32), taps=("stages",))


def test_the_network_grows_and_initialises_its_classifier_and_keeps_its_saved_form():
    torch.manual_seed(0)
    settings = dict(encoder="tu-resnet10t", encoder_depth=3, output_stride=8, atrous_rates=(2, 4, 6),
                    decoder_channels=16)
    network = SegmentationNetwork([4], **settings)
    keys_before = set(network.state_dict())
    network.add_classes(3)
    network.init_new_classes_from_background()
    assert network.classes_per_step == [4, 3] and network.num_classes == 7
    torch.testing.assert_close(network.classifier.heads[1].weight,
                               network.classifier.heads[0].weight[:1].expand(3, -1, -1, -1))
    # the state-dict keys are those of the previous layout: earlier caches and checkpoints load
    assert keys_before <= set(network.state_dict())
    assert all(k.startswith(("encoder.", "decoder.", "classifier.heads.")) for k in network.state_dict())
    from experiments.config import NetworkConfig
    from lightning_modules.methods import build_method

    copy = build_method("ft").load_network(NetworkConfig(**{**settings, "atrous_rates": [2, 4, 6]}), network.state())
    for key, value in network.state_dict().items():
        torch.testing.assert_close(copy.state_dict()[key], value, rtol=0, atol=0)
    groups = network.parameter_groups()
    assert sum(len(v) for v in groups.values()) == len(list(network.parameters()))
    assert network.feature_channels == 128
