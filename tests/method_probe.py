"""A method defined in one file, outside lightning_modules/methods/, that uses every hook of the method
interface (lightning_modules.methods.base): the proof that PLOP, SDR, RECALL, MBS and the weak
baselines can each arrive as one file. It registers itself with `register`; nothing else in the suite
names it. What each hook did is recorded in CALLS (this process) and in the carried state (saved
with every step, so that a test in another process can read it back).

- own settings: void kept as 255 in training (PLOP, MBS), its own decoder width
- own network: the default builder's network, marked
- own step 0: its own cache key (step0_key) and a statistic accumulated during step-0 training
- image supervision: the default training source has no mask at all
- an extra stage per step: "pseudo-masks" from the images alone (bright pixels -> the step's first
  class, a void border), written by rank 0 into the stage directory
- its own training data: those pseudo-masks instead of no mask, plus a second source (constant
  "replay" images labelled background) whose global batches alternate with the first
- a pass over the training images with the old model before training: integer histograms
- taps: the per-stage encoder maps, in the loss
- per-epoch and per-optimizer-step hooks; state carried across steps and through resume
- pseudo_labels: the test images' pixel labels as they reach it
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from datamodules.datasets.voc import load_image, save_mask
from datamodules.incremental import TrainingSources
from lightning_modules.losses import cross_entropy
from lightning_modules.methods import register
from lightning_modules.methods.base import Method

CALLS: collections.Counter = collections.Counter()
RECORDS: dict[str, list] = collections.defaultdict(list)


class ConstantImages(Dataset):
    """`count` grey images labelled background, indexed by (epoch, i) like the suite's datasets;
    their "index" is negative, so a batch tells which source it came from."""

    def __init__(self, count: int, size: int):
        self.count, self.size = count, size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, key):
        epoch, i = key
        return {"image": torch.full((3, self.size, self.size), 0.1 * (i % 5)),
                "label": torch.zeros(self.size, self.size, dtype=torch.long), "index": -1 - i}


@register
@dataclass
class Probe(Method):
    name = "probe"
    supervision = "image"
    uses_old_model = True
    uses_training_pass = True
    settings = {"data": {"void_as_background": False}, "network": {"decoder_channels": 8}}

    tap_weight: float = 0.01
    replay_images: int = 8

    # --- network and step 0 -------------------------------------------------------------------
    def build_network(self, settings, classes_per_step, pretrained=True):
        CALLS["build_network"] += 1
        network = super().build_network(settings, classes_per_step, pretrained)
        network.built_by = self.name
        return network

    def step0_key(self) -> dict:
        return {"loss": "ce", "probe": True}

    def step0_training_loss(self, module, batch):
        self._accumulate(batch)
        return super().step0_training_loss(module, batch)

    def _accumulate(self, batch):
        # A running statistic updated by every training batch (SDR's prototypes are one).
        mean = batch["image"].detach().double().mean(dim=(0, 2, 3)).cpu()
        self.carried["image_sum"] = self.carried.get("image_sum", torch.zeros(3, dtype=torch.float64)) + mean
        self.carried["batches"] = self.carried.get("batches", torch.zeros((), dtype=torch.long)) + 1

    # --- the start of a step --------------------------------------------------------------------
    def init_new_classifier(self, network, old_network):
        CALLS["init_new_classifier"] += 1
        network.init_new_classes_from_background()

    def step_modules(self, network, n_old):
        return {"probe_head": nn.Conv2d(network.feature_channels, 1, 1)}

    def stage_key(self, context):
        return {"step": context.step, "rows": len(context.datamodule.train_indices)}

    def run_stage(self, context, directory):
        """Pseudo-masks from the images alone: pixels brighter than the image's mean -> the step's
        first class, others background, a void border of one pixel."""
        CALLS["run_stage"] += 1
        RECORDS["stage_ranks"].append(context.rank)
        datamodule = context.datamodule
        first_class = next(c for c in context.steps[context.step] if c != 0)
        files = datamodule.located.train
        for row in datamodule.train_indices:
            grey = load_image(files.images[row]).mean(axis=2)
            mask = np.where(grey > grey.mean(), first_class, 0).astype(np.uint8)
            mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 255
            save_mask(directory / f"{files.ids[row]}.png", mask)

    def training_data(self, context, default):
        CALLS["training_data"] += 1
        RECORDS["default_keys"].append(sorted(default.datasets[0][0]))
        files = context.datamodule.located.train
        pseudo = context.datamodule.pixel_labelled_training_set(
            [context.stage_directory / f"{image_id}.png" for image_id in files.ids])
        return TrainingSources([pseudo, ConstantImages(self.replay_images, context.config.data.crop_size)])

    # --- the pass before training -------------------------------------------------------------------
    def training_pass(self, module, batch):
        old = module.old_network(batch["image"])["logits"].argmax(dim=1)
        return {"old_argmax": torch.bincount(old.flatten(), minlength=module.n_old),
                "images": torch.tensor(len(batch["image"])),
                "labels": torch.bincount(batch["label"].flatten(), minlength=256)}

    def after_training_pass(self, module, totals):
        CALLS["after_training_pass"] += 1
        for name, value in totals.items():
            self.carried[f"pass{module.step}_{name}"] = value.clone()

    # --- training ---------------------------------------------------------------------------------
    def on_train_epoch_start(self, module):
        CALLS[f"epoch_start_step{module.step}"] += 1
        RECORDS[f"sources_step{module.step}"].append([])

    def on_before_optimizer_step(self, module, optimizer):
        key = f"updates_step{module.step}"
        self.carried[key] = self.carried.get(key, torch.zeros((), dtype=torch.long)) + 1

    def incremental_training_loss(self, module, batch):
        if module.step > 0 and RECORDS[f"sources_step{module.step}"]:
            RECORDS[f"sources_step{module.step}"][-1].append(int((batch["index"] < 0).all()))
            RECORDS["labels_seen"].append(sorted(torch.unique(batch["label"]).tolist()))
        self._accumulate(batch)
        out = module.network(batch["image"], taps=("stages",))
        RECORDS["stage_shapes"].append([tuple(s.shape[1:]) for s in out["stages"]])
        taps = sum(stage.float().pow(2).mean() for stage in out["stages"])
        probe = module.step_modules["probe_head"](out["encoder"]).float().mean()
        ce = cross_entropy(out["logits"], batch["label"])
        return ce + self.tap_weight * taps + 0.0 * probe, {"ce": ce, "taps": taps}

    # --- reporting ----------------------------------------------------------------------------------
    def pseudo_labels(self, module, images, new_labels, labels=None):
        # Counted for the qualitative sheet (test images, pixel labels given); the pseudo-label
        # quality report calls it on training images without them (and gets None back).
        CALLS["pseudo_labels"] += labels is not None
        return labels


METHOD = Probe
