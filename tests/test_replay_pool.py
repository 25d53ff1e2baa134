"""RECALL's replay pool: its layout, the embedded dataset's rendered pool, the pool-missing error."""
import numpy as np
import pytest
from PIL import Image

from datamodules.datasets import class_names
from datamodules.datasets.synthetic import APPEARANCES, class_attributes
from datamodules.replay_pool import ReplayPoolMissing, build_synthetic_pool, pool_images


def test_the_embedded_pool_has_images_of_each_class_alone_in_the_pool_layout(tmp_path):
    pool = build_synthetic_pool(tmp_path / "pool", per_class=3, size=40, progress=False)
    names = class_names("synthetic")
    images = pool_images(pool, names, range(1, 21))
    assert all(len(paths) == 3 for paths in images.values())
    assert images[5][0].parent.name == names[5]
    # each image shows its class: the class's two colours cover a good part of it, other classes' little
    attributes = class_attributes(0)
    for cls in (1, 7, 13):
        pixels = np.asarray(Image.open(images[cls][0]).convert("RGB")).reshape(-1, 3).astype(float)
        first, second, _ = APPEARANCES[attributes[cls - 1][1]]
        near = lambda colour: (np.abs(pixels - colour).max(axis=1) < 45).mean()   # noqa: E731
        assert near(first) + near(second) > 0.08, cls
    # rendered once: a second call with the same parameters keeps the files, other parameters render again
    before = images[1][0].stat().st_mtime_ns
    build_synthetic_pool(tmp_path / "pool", per_class=3, size=40, progress=False)
    assert images[1][0].stat().st_mtime_ns == before
    build_synthetic_pool(tmp_path / "pool", per_class=2, size=40, progress=False)
    assert len(pool_images(pool, names, [1])[1]) == 2


def test_a_missing_pool_or_class_says_where_it_is_expected(tmp_path):
    names = class_names("synthetic")
    with pytest.raises(ReplayPoolMissing, match=r"not at .*<pool>/<class name>"):
        pool_images(tmp_path / "nowhere", names, [1])
    (tmp_path / "pool" / names[1]).mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "pool" / names[1] / "a.jpg")
    assert len(pool_images(tmp_path / "pool", names, [1])[1]) == 1
    with pytest.raises(ReplayPoolMissing, match=f"no images of class 2 \\({names[2]!r}\\)"):
        pool_images(tmp_path / "pool", names, [1, 2])
