"""RECALL (Maracani et al., ICCV 2021, "RECALL: Replay-based Continual Learning in Semantic
Segmentation"), as its official code trains (LTTM/RECALL, TensorFlow 1; shared/docs/METHODS_others.md
§3), on the suite's network:

- step 0: the suite's shared CE step-0 model. RECALL's own step 0 trains a DeepLab-v2 (ResNet-101,
  frozen batch norm, COCO-pretrained in its configs) with poly lr 5e-4, batch 4, crop 321; the suite's
  DeepLabV3 and step-0 schedule are shared with MiB and the others, so the rows differ by the step
  only;
- steps >= 1: the encoder and every batch-norm layer frozen (statistics and affine; the code trains
  only the decoder, `train_op_decoder`), softmax CE over every seen class, on
  (a) the step's images with their background inpainted by the previous model
      (`recall_inpaint_labels`: void -> background, then every background pixel takes the previous
      model's argmax; new-class pixels keep their label), computed once per step on the
      un-augmented images and cached (the method's stage), then augmented with the image; and
  (b) the replay pool's images of the old classes (datamodules/replay_pool.py), labelled once per
      step by the model that knows them (hard argmax), cached the same way;
  global batches alternating one to one, the step's images first (the code re-batches each
  "4 new + 4 replay" chunk into an all-new and an all-replay batch), the same for any number of
  processes. New classes keep PyTorch's default initialisation (the code has no special one).
- `recall_noreplay` (recall_noreplay.py; the code's FINE_TUNING configs, `interleave_ratio_old = 0`):
  the inpainting alone, no pool: an ablation, not RECALL.

The schedule: the experiment's epochs (an epoch with replay has twice the batches of the step's
images alone), or RECALL's unit, `iterations_per_class` (updates per new class, rounded up to whole
epochs). Not yet: the helper decoders that label the replay images of classes added after step 0
(needed from a task's third step on): RECALL refuses such tasks at step 1, in one line.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from lightning_modules.losses import cross_entropy, recall_inpaint_labels
from lightning_modules.methods.base import Method, MethodUnavailable, StepContext
from lightning_modules.methods.weak_baseline import full_image, write_per_image

INPAINTED, REPLAY = "inpainted", "replay"


def network_digest(network: nn.Module) -> str:
    """A digest of a network's weights and buffers: what the stage's labels depend on."""
    digest = hashlib.sha1()
    for name, value in network.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def frozen_by_recall(network: nn.Module) -> list[nn.Module]:
    """What RECALL freezes after step 0: the encoder and every batch-norm layer."""
    return [network.encoder, *(m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))]


@dataclass
class RECALL(Method):
    name = "recall"
    uses_old_model = True
    replay: ClassVar[bool] = True

    pool: str | None = None            # <pool>/<class name>/*; null: <data root>/recall_pool/<dataset>
    pool_images_per_class: int = 0     # 0: every image of a class in the pool; n: its first n (file-name order)
    embedded_pool_size: int = 40       # images per class the suite renders for the embedded dataset
    # RECALL's schedule unit: optimizer updates per new class of the step (1,000 disjoint, 1,500 overlapped
    # in its code, at batch 4), rounded up to whole epochs; 0: the experiment's epochs
    iterations_per_class: int = 0

    def training_epochs(self, context: StepContext, epochs: int, updates_per_epoch: int) -> int:
        if context.step == 0 or not self.iterations_per_class or updates_per_epoch < 1:
            return epochs
        iterations = self.iterations_per_class * len(context.steps[context.step])
        return -(-iterations // updates_per_epoch)

    # --- the pool ---------------------------------------------------------------------------------
    def pool_directory(self, config) -> Path:
        if self.pool:
            return Path(self.pool)
        return Path(config.data.root) / "recall_pool" / config.data.dataset

    def replay_images(self, context: StepContext) -> dict[int, list[Path]]:
        """The pool's images of the old classes (dataset ids), the embedded dataset's rendered first."""
        from datamodules.datasets import class_names
        from datamodules.replay_pool import ReplayPoolMissing, build_synthetic_pool, pool_images

        config = context.config
        directory = self.pool_directory(config)
        if config.data.dataset == "synthetic" and not self.pool:
            options = (config.data.options or {}).get("synthetic", {})
            build_synthetic_pool(directory, self.embedded_pool_size, int(options.get("size", 80)),
                                 dataset_seed=int(options.get("seed", 0)), progress=False)
        old = [c for s in context.steps[: context.step] for c in s if c != 0]
        try:
            images = pool_images(directory, class_names(config.data.dataset, config.data.options), old)
        except ReplayPoolMissing as error:
            raise MethodUnavailable(str(error)) from None
        if self.pool_images_per_class:
            images = {c: paths[: self.pool_images_per_class] for c, paths in images.items()}
        return images

    # --- the stage: inpainted labels and replay labels, once per step ---------------------------
    def stage_key(self, context: StepContext) -> dict:
        if self.replay and len(context.steps) > 2:   # said at step 1, before anything of the task is trained
            raise MethodUnavailable(
                "RECALL's helper decoders (replay labels of classes added after step 0) are not built yet: "
                "RECALL runs two-step tasks here (15-5, 10-10, 19-1); recall_noreplay runs every task")
        dm, config = context.datamodule, context.config
        ids = [str(dm.located.train.ids[int(r)]) for r in dm.train_indices]
        pool = {}
        if self.replay:
            pool = {str(c): [[p.name, p.stat().st_size] for p in paths] for c, paths in self.replay_images(context).items()}
        return {"dataset": config.data.dataset, "options": config.data.options, "steps": context.steps,
                "mode": config.data.mode, "images": hashlib.sha1(json.dumps(ids).encode()).hexdigest(),
                "old_network": network_digest(context.old_network), "pool": pool,
                "precision": self._precision(config), "version": 1}

    def _precision(self, config) -> str:
        from experiments.config import resolve_precision

        return resolve_precision(config.trainer.precision, config.trainer.accelerator)

    def run_stage(self, context: StepContext, directory) -> None:
        """Rank 0: the inpainted label of every training image of the step and the replay label of
        every pool image of the old classes, by the previous model, in dataset ids."""
        from datamodules.datasets.voc import load_image, load_mask, save_mask
        from datamodules.labels import label_lookup
        from datamodules.tasks import channel_order
        from experiments.config import on_gpu

        directory = Path(directory)
        config, dm, step = context.config, context.datamodule, context.step
        device = "cuda" if on_gpu(config.trainer.accelerator) and torch.cuda.is_available() else "cpu"
        autocast = torch.bfloat16 if self._precision(config) == "bf16-mixed" else None
        old = context.old_network.to(device).eval()
        to_dataset = np.array(channel_order(context.steps, step), dtype=np.uint8)
        # The step's labels as every other method trains on them: old classes are background, so no
        # old-class ground truth is read; void stays 255 (inpainting makes it background anyway).
        lookup = label_lookup(context.steps, step, "train", void_as_background=False,
                              background_is_unlabeled=dm.located.background_is_unlabeled)

        @torch.no_grad()
        def old_logits(image: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device_type=device, dtype=autocast, enabled=autocast is not None):
                return old(image.to(device))["logits"].float()

        def inpainted(row: int, temporary: Path) -> None:
            labels = torch.from_numpy(lookup[load_mask(dm.located.train.masks[row])].astype(np.int64))[None]
            mixed = recall_inpaint_labels(labels.to(device), old_logits(full_image(dm.located.train, row)))
            save_mask(temporary, to_dataset[mixed[0].cpu().numpy()])

        files = dm.located.train
        write_per_image(dm.train_indices, lambda row: self.inpainted_path(directory, files.ids[row]), inpainted,
                        f"{self.name} step {step}: inpainted labels", config.trainer.progress)
        if not self.replay:
            return
        from lightning_modules.methods.weak_baseline import _NORMALISE

        paths = [p for images in self.replay_images(context).values() for p in images]

        def replay_label(i: int, temporary: Path) -> None:
            image = _NORMALISE(image=load_image(paths[i]))["image"][None]
            save_mask(temporary, to_dataset[old_logits(image).argmax(dim=1)[0].cpu().numpy()])

        write_per_image(range(len(paths)), lambda i: self.replay_label_path(directory, paths[i]), replay_label,
                        f"{self.name} step {step}: replay labels", config.trainer.progress)

    @staticmethod
    def inpainted_path(directory: Path, image_id: str) -> Path:
        return Path(directory) / INPAINTED / (str(image_id).replace("/", "__") + ".png")

    @staticmethod
    def replay_label_path(directory: Path, image: Path) -> Path:
        return Path(directory) / REPLAY / image.parent.name / (image.stem + ".png")

    def training_data(self, context: StepContext, default):
        """Source 0: the step's images with their inpainted labels (rows outside the step point at a
        file that does not exist); source 1: the replay pool with its labels."""
        from datamodules.datasets.voc import SplitFiles
        from datamodules.incremental import TrainingSources

        directory, dm = Path(context.stage_directory), context.datamodule
        train = set(int(r) for r in dm.train_indices)
        missing = directory / "not-a-training-image-of-this-step.png"
        masks = [self.inpainted_path(directory, image_id) if row in train else missing
                 for row, image_id in enumerate(dm.located.train.ids)]
        sources = [dm.pixel_labelled_training_set(masks, old_classes="kept")]
        if self.replay:
            paths = [p for images in self.replay_images(context).values() for p in images]
            pool = SplitFiles([f"{p.parent.name}/{p.stem}" for p in paths], paths,
                              [self.replay_label_path(directory, p) for p in paths])
            sources.append(dm.pixel_labelled_training_set(old_classes="kept", files=pool))
        return TrainingSources(sources)

    # --- the step: encoder and batch norm frozen, CE on the mixed labels --------------------------
    def init_new_classifier(self, network, old_network) -> None:
        for module in frozen_by_recall(network):
            module.requires_grad_(False)

    def on_train_epoch_start(self, module) -> None:
        if module.step > 0:   # Lightning puts every module in train mode: the frozen ones go back
            for frozen in frozen_by_recall(module.network):
                frozen.eval()

    def parameter_groups(self, module, lr: float) -> list[dict]:
        if module.step == 0:
            return super().parameter_groups(module, lr)
        return [{"params": [p for p in module.network.parameters() if p.requires_grad], "lr": lr}]

    def incremental_training_loss(self, module, batch):
        ce = cross_entropy(module.network(batch["image"])["logits"], batch["label"])
        return ce, {"ce": ce}


METHOD = RECALL
