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
epochs).

From a task's third step on, replay images of a class added at step s >= 1 are labelled by step s's
helper decoder: trained at step s in the stage (on the frozen encoder, step s's images and classes
only, background included; poly lr 2e-4 over 1,000 updates per class at batch 4, as the code) and
carried on with the method's state, as is the step-0 model's decoder and classifier, which labels
the step-0 classes' replay images.
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
from lightning_modules.methods.weak_baseline import full_image, normalised_image, write_per_image

INPAINTED, REPLAY = "inpainted", "replay"


def tensors_digest(named_tensors) -> str:
    """A digest of (name, tensor) pairs in their order (a network's weights and buffers, the carried
    decoders): what the stage's labels depend on."""
    digest = hashlib.sha1()
    for name, value in named_tensors:
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def frozen_by_recall(network: nn.Module) -> list[nn.Module]:
    """What RECALL freezes after step 0: the encoder and every batch-norm layer."""
    return [network.encoder, *(m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))]


def _synthetic_options(config) -> dict:
    """The embedded dataset's parameters of the run (its defaults where the experiment sets none)."""
    from datamodules.datasets.synthetic import DEFAULTS

    return {**DEFAULTS, **(config.data.options or {}).get("synthetic", {})}


class FrozenEncoder(nn.Module):
    """A network trained as RECALL trains after step 0 (its helper decoders): train() leaves the
    encoder and every batch norm in eval mode, and their parameters take no gradient."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        for module in frozen_by_recall(network):
            module.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        for module in frozen_by_recall(self.network):
            module.eval()
        return self

    def forward(self, images):
        return self.network(images)


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
    # The helper decoder of each step s >= 1 that a later step follows (it labels the replay images of
    # step s's classes): trained on the frozen encoder with step s's images and classes only (+ background),
    # poly lr 2e-4 over 1,000 updates per class at batch 4, as RECALL's code
    helper_lr: float = 2e-4
    helper_iterations_per_class: int = 1000
    helper_batch_size: int = 4

    def training_epochs(self, context: StepContext, epochs: int, updates_per_epoch: int) -> int:
        if not self.iterations_per_class or updates_per_epoch < 1:
            return epochs
        iterations = self.iterations_per_class * len(context.steps[context.step])
        return -(-iterations // updates_per_epoch)

    # --- the pool ---------------------------------------------------------------------------------
    def pool_directory(self, config) -> Path:
        """The user's pool (`pool`), else <data root>/recall_pool/<dataset>; the embedded dataset's
        rendered pool in a directory of its own parameters (other sizes never overwrite it)."""
        if self.pool:
            return Path(self.pool)
        if config.data.dataset == "synthetic":
            options = _synthetic_options(config)
            name = f"synthetic-{options['size']}px-seed{options['seed']}-{self.embedded_pool_size}"
            return Path(config.data.root) / "recall_pool" / name
        return Path(config.data.root) / "recall_pool" / config.data.dataset

    def replay_images(self, context: StepContext) -> dict[int, list[Path]]:
        """The pool's images of the old classes (dataset ids), the embedded dataset's rendered first."""
        from datamodules.datasets import class_names
        from datamodules.replay_pool import ReplayPoolMissing, build_synthetic_pool, pool_images

        config = context.config
        directory = self.pool_directory(config)
        if config.data.dataset == "synthetic" and not self.pool:
            options = _synthetic_options(config)
            build_synthetic_pool(directory, self.embedded_pool_size, int(options["size"]),
                                 dataset_seed=int(options["seed"]), progress=False)
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
        dm, config = context.datamodule, context.config
        ids = [str(dm.located.train.ids[int(r)]) for r in dm.train_indices]
        pool = {}
        if self.replay:
            pool = {str(c): [[p.name, p.stat().st_size] for p in paths] for c, paths in self.replay_images(context).items()}
        return {"dataset": config.data.dataset, "options": config.data.options, "steps": context.steps,
                "mode": config.data.mode, "images": hashlib.sha1(json.dumps(ids).encode()).hexdigest(),
                "old_network": tensors_digest(context.old_network.state_dict().items()), "pool": pool,
                "labellers": tensors_digest(sorted(self.carried.items())), "helper": self._trains_helper(context) and self.helper_settings(),
                "precision": self._precision(config), "version": 2}

    def helper_settings(self) -> dict:
        return {"lr": self.helper_lr, "iterations_per_class": self.helper_iterations_per_class,
                "batch_size": self.helper_batch_size}

    def _trains_helper(self, context: StepContext) -> bool:
        """A step s >= 1 trains a helper decoder when a later step will replay its classes."""
        return self.replay and 1 <= context.step < len(context.steps) - 1

    def _precision(self, config) -> str:
        from experiments.config import resolve_precision

        return resolve_precision(config.trainer.precision, config.trainer.accelerator)

    def run_stage(self, context: StepContext, directory) -> None:
        """Rank 0: the inpainted label of every training image of the step and the replay label of
        every pool image of the old classes, by the previous model, in dataset ids."""
        from datamodules.datasets.voc import load_mask, save_mask
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
        images = self.replay_images(context)
        for origin in range(step):   # the classes of each earlier step, labelled by the model that knows them
            paths = [p for c in context.steps[origin] if c in images for p in images[c]]
            labeller, ids = self.labeller(context, origin, device)

            @torch.no_grad()
            def replay_label(i: int, temporary: Path, labeller=labeller, ids=ids, paths=paths) -> None:
                image = normalised_image(paths[i]).to(device)
                with torch.autocast(device_type=device, dtype=autocast, enabled=autocast is not None):
                    logits = labeller(image)["logits"].float()
                save_mask(temporary, ids[logits.argmax(dim=1)[0].cpu().numpy()])

            write_per_image(range(len(paths)), lambda i, paths=paths: self.replay_label_path(directory, paths[i]),
                            replay_label, f"{self.name} step {step}: replay labels of step {origin}'s classes",
                            config.trainer.progress)
        if self._trains_helper(context):
            self.train_helper(context, directory, device, autocast)

    # --- the labellers of the replay images, and the helper decoders ------------------------------
    def labeller(self, context: StepContext, origin: int, device: str) -> tuple[nn.Module, np.ndarray]:
        """The network that labels replay images of step `origin`'s classes, and its channels'
        dataset ids: at step 1 the old model (the step-0 model); later the step-0 model (the frozen
        encoder + the step-0 decoder and classifier, carried) for step-0 classes, and step s's helper
        decoder (carried) for step s's classes, which knows only those classes and background."""
        from datamodules.tasks import channel_order

        if context.step == 1:
            return context.old_network.to(device).eval(), np.array(channel_order(context.steps, 0), dtype=np.uint8)
        classes = [len(context.steps[0])] if origin == 0 else [1 + len(context.steps[origin])]
        ids = channel_order(context.steps, 0) if origin == 0 else [0, *context.steps[origin]]
        prefix = "step0/" if origin == 0 else f"helper{origin}/"
        encoder = {k: v for k, v in context.old_network.state_dict().items() if k.startswith("encoder.")}
        head = {k[len(prefix):]: v for k, v in self.carried.items() if k.startswith(prefix)}
        if not head:
            raise RuntimeError(f"{self.name}: no carried {prefix[:-1]} decoder at step {context.step} (its step did not keep it)")
        network = self.load_network(context.config.network, {"state_dict": {**encoder, **head}, "classes_per_step": classes})
        return network.to(device).eval(), np.array(ids, dtype=np.uint8)

    def train_helper(self, context: StepContext, directory: Path, device: str, autocast) -> None:
        """Step s's helper decoder: the old model's encoder (frozen since step 0) and decoder (its
        start), a new classifier for background + step s's classes, trained on step s's images with
        those classes only (every other class is background there), poly lr over RECALL's updates;
        written to the stage directory (training_data carries it on)."""
        from lightning_modules.methods.weak_baseline import stage_random_state, train_stage_network
        from lightning_modules.network import build_network

        config, dm, step = context.config, context.datamodule, context.step
        n_old, classes = sum(len(c) for c in context.steps[:step]), context.steps[step]
        with stage_random_state(config.seed + step, device):
            helper = build_network(config.network, [1 + len(classes)], pretrained=False)
        old = context.old_network.state_dict()
        helper.load_state_dict({k: v for k, v in old.items() if k.startswith(("encoder.", "decoder."))}, strict=False)
        wrapped = FrozenEncoder(helper)
        dataset = dm.pixel_labelled_training_set()   # channel ids: the step's classes n_old.., the rest 0
        batch = min(self.helper_batch_size, len(dataset))
        updates = self.helper_iterations_per_class * len(classes)
        epochs = max(1, -(-updates // max(1, len(dataset) // batch)))

        def loss(network, item, progress):
            labels = item["label"]
            labels = torch.where((labels >= n_old) & (labels != 255), labels - n_old + 1, labels)
            value = cross_entropy(network(item["image"])["logits"], labels)
            return value, {"ce": value}

        trained = train_stage_network(
            wrapped, loss, dataset, [{"params": [p for p in helper.parameters() if p.requires_grad], "lr": self.helper_lr}],
            epochs=epochs, batch_size=batch, seed=config.seed + step, checkpoint=directory / "helper-training.pt",
            momentum=0.9, weight_decay=1e-4, device=device, autocast_dtype=autocast,
            description=f"{self.name} step {step}: helper decoder", progress=config.trainer.progress)
        torch.save(trained.network.cpu().state(), directory / "helper.pt")

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
        if self.replay and context.step == 1 and len(context.steps) > 2:   # the step-0 model's head, for later steps
            self.carried.update({f"step0/{k}": v.detach().cpu().clone() for k, v in context.old_network.state_dict().items()
                                 if k.startswith(("decoder.", "classifier."))})
        if self._trains_helper(context):
            helper = torch.load(directory / "helper.pt", map_location="cpu", weights_only=True)["state_dict"]
            self.carried.update({f"helper{context.step}/{k}": v for k, v in helper.items()
                                 if k.startswith(("decoder.", "classifier."))})
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
