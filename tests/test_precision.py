"""Mixed precision: every loss that needs float32 computes in float32 when given bfloat16/float16
logits (what autocast hands it), so its value equals the float64 value of the same (rounded)
inputs to float32 accuracy; and runs with bf16-mixed, channels_last and torch.compile go through."""
import pytest
import torch

from experiments import run
from experiments.config import apply_overrides
from lightning_modules import losses

B, C, H, W, N_OLD = 2, 6, 5, 4, 4


def _inputs(dtype):
    generator = torch.Generator().manual_seed(0)
    # Large logits: where bfloat16 arithmetic (8-bit mantissa) would lose the log-sum-exp.
    logits = (torch.randn(B, C, H, W, generator=generator, dtype=torch.float64) * 40 + 100).to(dtype)
    old = (torch.randn(B, N_OLD, H, W, generator=generator, dtype=torch.float64) * 40).to(dtype)
    labels = torch.randint(0, C, (B, H, W), generator=generator)
    labels[0, 0, 0] = 255
    new_labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    targets = torch.rand(B, C, H, W, generator=generator, dtype=torch.float64).to(dtype)
    return logits, old, labels, new_labels, targets


LOSSES = {
    "cross_entropy": lambda l, o, y, n, t: losses.cross_entropy(l, y),
    "unbiased_cross_entropy": lambda l, o, y, n, t: losses.unbiased_cross_entropy(l, y, N_OLD),
    "unbiased_knowledge_distillation": lambda l, o, y, n, t: losses.unbiased_knowledge_distillation(l, o),
    "knowledge_distillation": lambda l, o, y, n, t: losses.knowledge_distillation(l, o),
    "lwf_mc_loss": lambda l, o, y, n, t: losses.lwf_mc_loss(l, y, o),
    "feature_distillation": lambda l, o, y, n, t: losses.feature_distillation(l, t),
    "bce_one_hot": lambda l, o, y, n, t: losses.bce_one_hot(l, y),
    "ngwp_focal_scores": lambda l, o, y, n, t: losses.ngwp_focal_scores(l),
    "wilson_targets": lambda l, o, y, n, t: losses.wilson_targets(o, l, n),
    "soft_segmentation_bce": lambda l, o, y, n, t: losses.soft_segmentation_bce(l, t),
    "balanced_self_training_loss": lambda l, o, y, n, t: losses.balanced_self_training_loss(
        l, (t > 0.5).to(l.dtype), n),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_losses_compute_in_float32_from_half_precision_logits(name, half):
    rounded = _inputs(half)
    reference = LOSSES[name](*[x.double() if x.is_floating_point() else x for x in rounded])
    got = LOSSES[name](*rounded)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # float32 accuracy on the same inputs; computing in bfloat16 would be off by ~1e-2
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_under_cpu_autocast(name):
    rounded = _inputs(torch.bfloat16)
    reference = LOSSES[name](*[x.double() if x.is_floating_point() else x for x in rounded])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = LOSSES[name](*rounded)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-5)


def test_pamr_refines_half_precision_masks_in_float32():
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 8, 8, generator=generator)
    masks = torch.rand(1, 3, 8, 8, generator=generator)
    reference = losses.pamr(image.double(), masks.bfloat16().double(), iterations=3, dilations=[1, 2])
    got = losses.pamr(image.bfloat16(), masks.bfloat16(), iterations=3, dilations=[1, 2])
    assert got.dtype == torch.float32
    # the image is rounded to bfloat16 here, not in the reference: affinities differ slightly
    torch.testing.assert_close(got.double(), reference, rtol=0, atol=2e-2)


@pytest.mark.parametrize("settings", [
    ["trainer.precision=bf16-mixed", "trainer.channels_last=true"],
    # torch.compile's plumbing, with a backend that needs no C compiler (20 s: in the slow tier)
    pytest.param(["trainer.compile=aot_eager"], marks=pytest.mark.slow),
])
def test_runs_with_mixed_precision_channels_last_and_compile(tiny_config, settings):
    results = run.run_experiment(apply_overrides(tiny_config, ["methods=[mib,wilson]", *settings]))
    for method in ("mib", "wilson"):
        assert results[method]["complete"]
        final = results[method]["steps"][-1]["summary"]
        assert 0.0 <= final["all_with_bg"] <= 1.0
        trainer = results[method]["config"]["trainer"]
        for setting in settings:  # the settings arrived in the run's config
            key, value = setting.removeprefix("trainer.").split("=")
            assert str(trainer[key]).lower() == value
