"""The incremental datamodule on the embedded dataset: splits, image-level supervision, transforms."""
import numpy as np
import pytest
import torch

from datamodules import splits
from datamodules.datasets import synthetic
from datamodules.incremental import IncrementalSegmentationDataModule
from datamodules.transforms import train_transform


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    synthetic.ensure_generated(root, train=60, val=20, size=40)
    return root


def _module(data_root, **kwargs):
    options = {"synthetic": {"train": 60, "val": 20, "size": 40, "seed": 0}}
    arguments = dict(dataset="synthetic", data_root=data_root, task="15-5", mode="disjoint", batch_size=4,
                     crop_size=32, num_workers=0, dataset_options=options)
    arguments.update(kwargs)
    dm = IncrementalSegmentationDataModule(**arguments)
    dm.setup("fit")
    return dm


def test_image_supervision_batches_hold_no_mask_and_the_new_class_labels(data_root):
    dm = _module(data_root, step=1, supervision="image")
    new = dm.steps[1]
    for batch in dm.train_dataloader():
        assert set(batch) == {"image", "new_class_labels", "index"}  # no mask, no label map
        assert batch["new_class_labels"].shape[1] == len(new)
        for labels, row in zip(batch["new_class_labels"], batch["index"]):
            present = dm.train_presence[int(row)]
            assert labels.tolist() == [float(present[c - 1]) for c in new]
            assert labels.sum() >= 1  # every training image of the step has a new class


def test_image_supervision_never_opens_a_mask(data_root, monkeypatch):
    dm = _module(data_root, step=1, supervision="image")
    import datamodules.incremental as incremental

    def forbidden(path):
        raise AssertionError(f"a weak step opened the mask {path}")

    monkeypatch.setattr(incremental, "load_mask", forbidden)
    next(iter(dm.train_dataloader()))


def test_pixel_step_labels_follow_the_train_remapping(data_root):
    dm = _module(data_root, step=1)
    assert dm.train_indices.tolist() == splits.select_images(dm.train_presence, dm.steps, 1, "disjoint").tolist()
    batch = next(iter(dm.train_dataloader()))
    assert batch["label"].dtype == torch.long
    values = set(torch.unique(batch["label"]).tolist())
    assert values <= {0, 16, 17, 18, 19, 20}  # old classes and void are background in training


def test_step_zero_is_pixel_supervised_even_when_the_method_is_weak(data_root):
    dm = _module(data_root, step=0, supervision="image")
    assert "label" in dm.train_set[0]


def test_joint_trains_on_the_union_of_the_steps_with_old_classes_kept(data_root):
    dm = _module(data_root, step=1, training_images="cumulative", old_labels="kept")
    union = np.union1d(splits.select_images(dm.train_presence, dm.steps, 0, "disjoint"),
                       splits.select_images(dm.train_presence, dm.steps, 1, "disjoint"))
    assert dm.train_indices.tolist() == union.tolist()


def test_test_labels_keep_seen_classes_and_ignore_void(data_root):
    dm = _module(data_root, step=0, test_images="seen")
    labels = torch.cat([b["label"] for b in dm.test_dataloader()])
    assert set(torch.unique(labels).tolist()) <= set(range(16)) | {255}
    assert (labels == 255).any()  # the void borders (and future classes) are ignored


def test_random_resized_crop_keeps_between_half_and_all_of_the_image():
    # scale (0.5, 2.0) as MiB/WILSON: draws above the image area are rejected -> 50-100 % crops,
    # with whole-image fallbacks. Mark each pixel of a 100x100 mask with its own row/column.
    transform = train_transform(crop_size=20)
    transform.set_random_seed(0)
    image = np.zeros((100, 100, 3), np.uint8)
    areas = []
    for _ in range(300):
        crop = transform.transforms[0]
        params = crop.get_params_dependent_on_data({"shape": (100, 100)}, {})
        x0, y0, x1, y1 = params["crop_coords"]
        areas.append((x1 - x0) * (y1 - y0) / 100 ** 2)
    areas = np.array(areas)
    assert areas.min() >= 0.45 and areas.max() <= 1.0
    assert 0.02 < (areas == 1.0).mean() < 0.5  # some whole-image fallbacks, not mostly


def test_full_resolution_eval_pads_to_the_output_stride_with_void():
    from datamodules.transforms import eval_transform

    image, mask = np.zeros((37, 50, 3), np.uint8), np.ones((37, 50), np.uint8)
    out = eval_transform(crop_size=32, mode="full", size_divisor=16)(image=image, mask=mask)
    assert tuple(out["image"].shape) == (3, 48, 64)
    assert (out["mask"][:37, :50] == 1).all() and (out["mask"][37:] == 255).all() and (out["mask"][:, 50:] == 255).all()


def test_center_crop_eval_resizes_the_short_side_then_crops():
    from datamodules.transforms import eval_transform

    mask = np.zeros((40, 80), np.uint8)
    mask[:, :20] = 1  # left quarter; after resize to 32x64 and a center crop of 32, it is cut away
    out = eval_transform(crop_size=32)(image=np.zeros((40, 80, 3), np.uint8), mask=mask)
    assert tuple(out["mask"].shape) == (32, 32) and (out["mask"] == 0).all()
