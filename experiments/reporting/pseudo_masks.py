"""How good a weakly-supervised method's pseudo-labels are: their IoU against the ground truth of
the step's own training images, the number the WSSS papers report (a weak baseline shown to be a
working WSSS method, not a broken one).

Measured after the step's training, for reporting only: nothing here reaches the training. The
same way for every method: the whole training image (no crop), the method's pseudo-labels in
dataset ids (a weak baseline's stored masks, or `Method.pseudo_labels` on the image: WILSON's
localizer at the end of the step), scored over background + the classes the labels name (the
step's new classes). Ground truth: those classes kept, void ignored, everything else background.
A pixel where the method abstains (255) is a miss for its true class and no class's false positive.
"""
from __future__ import annotations

import numpy as np
import torch

from datamodules.datasets.voc import load_image, load_mask
from datamodules.labels import new_class_labels
from datamodules.transforms import eval_transform
from experiments.reporting.qualitative import channels_to_dataset_ids

VOID = 255


def pseudo_mask_confusion(predicted: np.ndarray, truth: np.ndarray, classes: list[int]) -> np.ndarray:
    """(K+1, K+2) counts: rows the true label (0 background, k the k-th of `classes`), columns the
    predicted one, the last column "abstained". Both masks in dataset ids."""
    table = np.zeros(256, dtype=np.int64)           # any other id: background
    for k, c in enumerate(classes, start=1):
        table[c] = k
    predicted_table, truth_table = table.copy(), table.copy()
    predicted_table[VOID] = len(classes) + 1
    truth_table[VOID] = -1
    p = predicted_table[np.asarray(predicted, dtype=np.int64)].ravel()
    t = truth_table[np.asarray(truth, dtype=np.int64)].ravel()
    keep = t >= 0
    size = len(classes) + 1
    return np.bincount(t[keep] * (size + 1) + p[keep], minlength=size * (size + 1)).reshape(size, size + 1)


def iou_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Per scored label: TP / (true pixels + predicted pixels - TP); NaN where neither occurs."""
    true_positive = np.diag(confusion[:, :-1]).astype(np.float64)
    union = confusion.sum(axis=1) + confusion[:, :-1].sum(axis=0) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, true_positive / union, np.nan)


def _mean_percent(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)]
    return float(values.mean() * 100) if len(values) else None


def summarize(confusion: np.ndarray, classes: list[int], names: dict[int, str] | None = None,
              images: int | None = None) -> dict:
    """IoU per scored label (%), their mean with and without background, the abstained share."""
    iou = iou_from_confusion(confusion)
    names = names or {}
    labels = ["background", *(names.get(c, str(c)) for c in classes)]
    return {"classes": classes, "iou": {n: (None if np.isnan(v) else float(v * 100)) for n, v in zip(labels, iou)},
            "miou": _mean_percent(iou), "new_miou": _mean_percent(iou[1:]),
            "abstained": float(confusion[:, -1].sum() / max(confusion.sum(), 1) * 100), "images": images}


@torch.no_grad()
def pseudo_label_quality(module, datamodule, names: dict[int, str] | None = None) -> dict | None:
    """The step's pseudo-label IoU (module docstring), or None for a method without pseudo-labels."""
    method, steps, step = module.method, module.steps, module.step
    classes = [c for c in steps[step] if c != 0]
    files, rows = datamodule.located.train, datamodule.train_indices
    transform = eval_transform(0, "full", module.network.output_stride)
    was_training = module.training
    module.eval()
    confusion = np.zeros((len(classes) + 1, len(classes) + 2), dtype=np.int64)
    try:
        for row in rows:
            row = int(row)
            truth = load_mask(files.masks[row])
            predicted = method.stored_pseudo_mask(files.ids[row])
            if predicted is None:
                image = load_image(files.images[row])
                tensor = transform(image=image)["image"][None].to(module.device)
                labels = torch.from_numpy(new_class_labels(datamodule.train_presence[row], steps, step))[None]
                pseudo = method.pseudo_labels(module, tensor, labels.to(module.device), None)
                if pseudo is None:
                    return None
                channels = pseudo[0, : image.shape[0], : image.shape[1]].cpu().numpy()
                predicted = channels_to_dataset_ids(channels, steps, step)
            confusion += pseudo_mask_confusion(predicted, truth, classes)
    finally:
        module.train(was_training)
    return summarize(confusion, classes, names, images=len(rows))
