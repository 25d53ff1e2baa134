"""The qualitative figure: for a fixed set of test images, image | ground truth | each method's
prediction after the last step, and for a method that makes its own labels (WILSON) the
pseudo-label it trains on.

The images are chosen from the test set alone (`choose_examples`), so every method of an
experiment shows the same ones. Each run saves its examples to `<run dir>/qualitative.npz`
(`save_examples`); the experiment's figure gathers them (`plot_experiment_qualitative`).
Masks are stored in dataset class ids (255 = void, which includes classes not yet seen).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from experiments.reporting.figures import plot_qualitative
from datamodules.datasets.voc import voc_palette
from datamodules.labels import new_class_labels
from datamodules.tasks import channel_order
from datamodules.transforms import unnormalize

EXAMPLES_FILE = "qualitative.npz"


def choose_examples(presence: np.ndarray, steps: list[list[int]], count: int, seed: int = 0) -> np.ndarray:
    """Positions (rows of `presence`) of `count` test images worth looking at after the last step.

    presence: (N, K) bool, foreground class c in column c - 1, one row per test image.
    Preferred, in this order: images with a class of the last step and an old foreground class
    (they show both learning and forgetting), then images with a class of the last step, then
    the rest. Among the first two tiers, an image showing a last-step class not shown yet comes
    first, so the figure covers as many new classes as it can. Ties are broken by a permutation
    seeded with `seed`, so the choice is fixed for a test set.
    """
    presence = np.asarray(presence, dtype=bool)
    count = min(int(count), len(presence))
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    new = np.asarray([c for c in steps[-1] if c != 0], dtype=np.int64)
    old = np.asarray([c for s in steps[:-1] for c in s if c != 0], dtype=np.int64)
    has_new = presence[:, new - 1].any(axis=1) if len(new) else np.zeros(len(presence), bool)
    has_old = presence[:, old - 1].any(axis=1) if len(old) else np.zeros(len(presence), bool)
    tier = np.where(has_new & has_old, 0, np.where(has_new, 1, 2))
    order = np.random.default_rng(seed).permutation(len(presence))

    chosen: list[int] = []
    covered: set[int] = set()
    for wanted in (0, 1):  # first pass: one image per new class not covered yet
        for i in order:
            if len(chosen) == count:
                break
            shown = {int(c) for c in new[presence[i, new - 1]]}
            if tier[i] == wanted and shown - covered:
                chosen.append(int(i))
                covered |= shown
    for wanted in (0, 1, 2):  # then fill, best tier first
        for i in order:
            if len(chosen) == count:
                break
            if tier[i] == wanted and int(i) not in chosen:
                chosen.append(int(i))
    return np.asarray(chosen, dtype=np.int64)


def channels_to_dataset_ids(mask: np.ndarray, steps: list[list[int]], step: int) -> np.ndarray:
    """Channel ids of the model after `step` (255 = void) -> dataset class ids (255 kept)."""
    table = np.full(256, 255, dtype=np.int64)
    order = channel_order(steps, step)
    table[: len(order)] = order
    mask = np.asarray(mask, dtype=np.int64)
    if mask.size and (mask.min() < 0 or (mask[mask != 255].max(initial=0) >= len(order))):
        raise ValueError(f"mask holds channel ids outside 0..{len(order) - 1} and 255")
    return table[mask]


@torch.no_grad()
def predict_examples(module, dataset, positions, presence: np.ndarray) -> dict:
    """Run `module` (network, method, old network) on the test images at `positions` of `dataset`
    (a PixelLabelled test set): the images (uint8 HxWx3), ground truths, predictions and, when
    the method makes its own labels, its pseudo-labels, all in dataset ids. `presence` is the
    test split's presence table, for the image-level labels the pseudo-labels are made with; the
    test images' pixel labels reach `pseudo_labels` too (a method like MBS keeps the ground truth of
    the new classes in its pseudo-labels)."""
    steps, step = module.steps, module.step
    was_training = module.training
    module.eval()
    out = {"rows": [], "images": [], "ground_truths": [], "predictions": [], "pseudo_labels": []}
    try:
        for position in positions:
            item = dataset[int(position)]
            image = item["image"][None].to(module.device)
            prediction = module.network(image)["logits"].argmax(dim=1)[0]
            labels = torch.from_numpy(new_class_labels(presence[item["index"]], steps, step))[None].to(module.device)
            pixel_labels = item["label"][None].to(module.device)
            pseudo = module.method.pseudo_labels(module, image, labels, pixel_labels) if step > 0 else None
            out["rows"].append(int(item["index"]))
            pixels = unnormalize(image.float())[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy()
            out["images"].append(np.round(pixels * 255).astype(np.uint8))
            out["ground_truths"].append(channels_to_dataset_ids(item["label"].cpu().numpy(), steps, step))
            out["predictions"].append(channels_to_dataset_ids(prediction.cpu().numpy(), steps, step))
            if pseudo is not None:
                out["pseudo_labels"].append(channels_to_dataset_ids(pseudo[0].cpu().numpy(), steps, step))
    finally:
        module.train(was_training)
    if not out["pseudo_labels"]:
        out["pseudo_labels"] = None
    return out


def save_examples(path, examples: dict) -> Path:
    """One compressed npz; per-image arrays (full-image evaluation gives images of several sizes)."""
    arrays = {"rows": np.asarray(examples["rows"], dtype=np.int64)}
    for kind in ("images", "ground_truths", "predictions", "pseudo_labels"):
        for i, array in enumerate(examples.get(kind) or []):
            arrays[f"{kind}_{i}"] = np.asarray(array, dtype=np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(temporary, **arrays)
    temporary.replace(path)
    return path


def load_examples(path) -> dict:
    with np.load(path) as data:
        count = len(data["rows"])
        examples = {"rows": data["rows"].tolist()}
        for kind in ("images", "ground_truths", "predictions", "pseudo_labels"):
            arrays = [data[f"{kind}_{i}"] for i in range(count) if f"{kind}_{i}" in data]
            examples[kind] = arrays if len(arrays) == count else None
    return examples


def plot_experiment_qualitative(path, examples_by_method: Mapping[str, dict], class_names=None,
                                palette=None) -> Path:
    """The figure of an experiment from each method's saved examples (all on the same images)."""
    if not examples_by_method:
        raise ValueError("no method has saved qualitative examples")
    first_name, first = next(iter(examples_by_method.items()))
    for name, examples in examples_by_method.items():
        if examples["rows"] != first["rows"]:
            raise ValueError(f"{name} shows test images {examples['rows']}, {first_name} shows {first['rows']}: "
                             "the qualitative examples must be the same images")
    predictions = {name: examples["predictions"] for name, examples in examples_by_method.items()}
    pseudo = {name: examples["pseudo_labels"] for name, examples in examples_by_method.items()
              if examples.get("pseudo_labels")}
    return plot_qualitative(first["images"], first["ground_truths"], predictions, path,
                            palette=palette if palette is not None else voc_palette(),
                            class_names=class_names, pseudo_labels=pseudo or None)
