"""make bench builds step 1 through the same code as make run (experiments.training), for every
method alike; here each variant is measured in-process on the tiny configuration."""
from types import SimpleNamespace

import pytest

from experiments import bench
from tests.conftest import TINY_OVERRIDES


@pytest.mark.parametrize("method", ["mib", "wilson"])
def test_each_variant_measures_step_one_through_the_run_loops_builders(method, tmp_path):
    args = SimpleNamespace(preset="embedded", precision="32-true", channels_last=False, warmup=1, iterations=2,
                           experiment="synthetic_15_5_disjoint",
                           overrides=[*TINY_OVERRIDES, f"data.root={tmp_path / 'data'}",
                                      f"output_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}"])
    config = bench._config(args, method)
    assert config.method == method and config.trainer.limit_train_batches == 3
    # WILSON's full loss from the first iteration: its own full_loss_hparams, no special case in bench
    assert config.hparams.get("pseudo_label_epoch", 0) == 0
    built = bench._step_one(config)
    assert built.module.step == 1 and built.module.network.num_classes == 21
    assert built.callbacks[0].old_network is not None  # the frozen old model, handed over at setup
    for measure in (bench._measure_bare, bench._measure_suite, bench._measure_data):
        timer = measure(config, method, (args.warmup, args.iterations))
        assert timer.seconds is not None and timer.seconds > 0 and timer.images == 2 * config.data.batch_size


def test_the_data_path_measures_voc_sized_images_through_the_train_transform(tmp_path):
    """make bench --data-path: VOC-sized JPEG + mask pairs (500 x 375), decoded as the datamodule
    reads them and cut by the train transform to 512 crops; positive rates, decode alone faster."""
    import numpy as np
    from PIL import Image

    from datamodules.datasets.voc import load_mask
    from datamodules.transforms import train_transform

    pairs = bench.write_voc_sized_images(tmp_path, 3)
    for jpeg, png in pairs:
        with Image.open(jpeg) as image:
            assert image.size == (500, 375) and image.format == "JPEG"
        mask = load_mask(png)
        assert mask.shape == (375, 500) and set(np.unique(mask)) <= set(range(21)) | {255}
    out = train_transform(512)(image=np.zeros((375, 500, 3), np.uint8), mask=np.zeros((375, 500), np.uint8))
    assert tuple(out["image"].shape) == (3, 512, 512)
    rates = bench.data_path_rates(pairs, rounds=1)
    assert rates["decode"] > rates["decode_augment"] > 0
