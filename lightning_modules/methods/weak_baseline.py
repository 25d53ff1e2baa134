"""The image-label baselines of WILSON's table (CAM, SEAM, SS, EPS) as one pipeline
(shared/docs/METHODS_others.md §5): at every step t >= 1,

  (1) a stage trains the baseline's own classification network on exactly the step's training
      images, from the image-level labels of the new classes only (`old_image_labels: true`:
      of the old classes too, WILSON's Table 5), never from a mask of the step;
  (2) the stage runs the baseline's own inference (and refinement) on those images and writes one
      palette PNG per image, in dataset class ids, 255 where the method abstains
      (<cache_dir>/stages/<method>-step<t>-<digest>/masks/, experiments.stages: run once by rank 0,
      reused by any run with the same key, resumable after a kill);
  (3) the segmentation network, initialised from the previous step, trains on these masks (through
      the train label lookup, augmented with the image) with WILSON's loss for pseudo-labels,
      `pseudo_mask_bce`: one-hot of the masks for the new classes, sigmoid(old logits) for the
      old ones, min of both for the background. Step 0 is WILSON's BCE model (shared with it).

A baseline is one file defining a subclass of `WeakBaseline` with:
  build_classifier(num_classes)            its classification network (encoder from
                                           `build_classifier_encoder`)
  classifier_loss(classifier, batch, progress)   its training loss on a stage batch
                                           {"image", "labels" (B, K), "index", and its maps}
  infer(classifier, image, labels)         its pseudo-mask of one image: (H, W) ids in 0..K
                                           (0 background, k = the k-th class of `stage_classes`),
                                           255 where it abstains
and optionally stage_maps (per-image inputs besides the image, e.g. EPS's saliency),
classifier_parameter_groups, or run_stage itself for extra phases (SEAM's AffinityNet).

Deviations shared by the four, by necessity: ResNet-38 (MXNet weights), which the official
repositories use, is in neither smp nor timm: the classifier's encoder is an smp/timm ResNet
(`classifier_encoder`, dilated to output stride 8 like ResNet-38's last stages). The stage trains
with the suite's training transform (random resized crop + flip) at `stage_crop_size`, not each
repository's own resize/colour-jitter pipeline. The segmentation stage (3) uses WILSON's
optimiser and lr groups (backbone lr, decoder and classifier x10) with the code's default poly
policy (WILSON's warm-up belongs to its localizer's pseudo-label epoch, which the baselines lack).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from datamodules.datasets.voc import load_image, load_mask, save_mask
from datamodules.incremental import DECODED, TrainingSources
from datamodules.sampling import EpochTrainingSampler, seed_augmentation
from datamodules.tasks import channel_order
from datamodules.transforms import _to_network, train_geometry
from lightning_modules.losses import pseudo_mask_bce
from lightning_modules.methods.base import Method, StepContext
from lightning_modules.schedules import poly_factor

MASKS = "masks"
CLASSIFIER = "classifier.pt"


# --- the stage's data ----------------------------------------------------------------------------
class StageImages(Dataset):
    """The step's training images with their image-level labels (and, per image, the maps a
    baseline needs besides the image, e.g. saliency, augmented with it as masks), never a mask of
    the step. Item: {"image", "labels" (K,), "index" (train row), <map name>: (H, W) uint8}.
    Indexed by (epoch, i) the augmentation is seeded by (seed, epoch, row) (datamodules.sampling)."""

    def __init__(self, files, rows: np.ndarray, labels: np.ndarray, transform, maps: dict[str, list] | None = None,
                 seed: int = 0, cache_decoded: bool = False):
        self.files, self.rows, self.labels, self.transform = files, np.asarray(rows), labels, transform
        self.maps, self.seed, self.cache_decoded = maps or {}, seed, cache_decoded

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self, reader, path):
        return DECODED.get(reader, path) if self.cache_decoded else reader(path)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (None, key)
        row = int(self.rows[i])
        if epoch is not None:
            seed_augmentation(self.transform, self.seed, epoch, row)
        image = self._read(load_image, self.files.images[row])
        extra = {}
        for name, paths in self.maps.items():
            array = self._read(load_mask, paths[row])
            if array.shape != image.shape[:2]:
                raise ValueError(f"{paths[row]}: {name} map is {array.shape[0]}x{array.shape[1]}, its image is "
                                 f"{image.shape[0]}x{image.shape[1]}")
            extra[name] = array
        out = self.transform(image=image, **extra)
        item = {"image": out["image"], "labels": torch.from_numpy(self.labels[i]), "index": row}
        item.update({name: torch.as_tensor(out[name]) for name in self.maps})
        return item


def stage_transform(crop_size: int, scale, map_names=()) -> A.Compose:
    """The suite's training geometry and normalisation, the maps transformed as masks with the image."""
    return A.Compose(train_geometry(crop_size, scale) + _to_network(),
                     additional_targets={name: "mask" for name in map_names})


_NORMALISE = A.Compose(_to_network())


def normalised_image(path) -> torch.Tensor:
    """(1, 3, H, W) normalised, the whole image file (what a stage's inference sees)."""
    return _NORMALISE(image=load_image(path))["image"][None]


def full_image(files, row: int) -> torch.Tensor:
    """normalised_image of a split's row."""
    return normalised_image(files.images[row])


def id_table(values) -> np.ndarray:
    """A 256-entry lookup from the stage's ids (0 background, k the k-th stage class, 255 abstained)
    to `values` = [id of the background, id of each stage class], everything else 255."""
    table = np.full(256, 255, dtype=np.int64)
    table[: len(values)] = values
    return table


# --- the stage's training loop -----------------------------------------------------------------
@dataclass
class StageProgress:
    epoch: int
    epochs: int
    iteration: int
    iterations: int


def _atomic_save(obj, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


@contextlib.contextmanager
def stage_random_state(seed: int, device: str = "cpu"):
    """torch's random state forked and seeded for a network of the stage (initialisation, dropout):
    the same network whatever ran before in the process, and the caller's random numbers untouched
    (the same whether the stage runs or comes from the cache)."""
    devices = [torch.cuda.current_device()] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def train_stage_network(network: nn.Module, loss: Callable, dataset: Dataset, groups: list[dict], *, epochs: int,
                        batch_size: int, seed: int, checkpoint: Path, momentum: float = 0.9, weight_decay: float = 5e-4,
                        poly_power: float = 0.9, device: str = "cpu", autocast_dtype=None,
                        description: str = "stage", progress: str = "auto", num_workers: int = 0) -> nn.Module:
    """SGD with poly decay over `epochs`, as the WSSS repositories train (their PolyOptimizer):
    loss(network, batch, StageProgress) -> (loss, terms). The epoch order and augmentation are
    functions of (seed, epoch, image) (EpochTrainingSampler); after every epoch the network,
    optimiser, epoch and torch random state are saved atomically at `checkpoint`, and a run killed
    half-way continues from there as the uninterrupted run would have. `progress` as
    trainer.progress: a bar, one line per epoch, or nothing. Returns the network, eval mode."""
    from tqdm.auto import tqdm

    from callbacks.progress import shows_a_bar

    batch = min(batch_size, len(dataset))
    if batch < 2:
        raise ValueError(f"{description}: {len(dataset)} training images; at least 2 are needed (batch norm)")
    sampler = EpochTrainingSampler(len(dataset), batch, seed)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=num_workers,
                        pin_memory=device.startswith("cuda"))
    network.to(device)
    optimizer = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum, weight_decay=weight_decay)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    per_epoch = sampler.num_batches
    total = per_epoch * epochs
    start = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start = state["epochs_done"]
    bar = tqdm(total=total, initial=start * per_epoch, desc=description, unit="it", leave=False,
               disable=not shows_a_bar(progress))
    for epoch in range(start, epochs):
        network.train()
        sampler.set_epoch(epoch)
        for b, item in enumerate(loader):
            iteration = epoch * per_epoch + b
            factor = poly_factor(iteration, total, poly_power)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
            item = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in item.items()}
            with torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype, enabled=autocast_dtype is not None):
                value, terms = loss(network, item, StageProgress(epoch, epochs, iteration, total))
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            bar.update(1)
            bar.set_postfix(loss=f"{value.item():.3f}", epoch=epoch)
        if progress in ("auto", "epochs") and not shows_a_bar(progress):
            print(f"  {description} epoch {epoch + 1}/{epochs}: loss {value.item():.4f}", flush=True)
        _atomic_save({"network": network.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                      "epochs_done": epoch + 1}, checkpoint)
    bar.close()
    return network.eval()


def write_per_image(rows, path_of: Callable[[int], Path], write: Callable[[int, Path], None], description: str,
                    progress: str = "auto") -> None:
    """For every train row whose file path_of(row) is not there yet: write(row, temporary), then the
    temporary moved into place (atomic: a kill leaves no half-written file, and a restart keeps
    what an interrupted start finished). A bar, or one final line, as trainer.progress."""
    from tqdm.auto import tqdm

    from callbacks.progress import shows_a_bar

    rows = [int(r) for r in rows]
    for row in tqdm(rows, desc=description, unit="img", leave=False, disable=not shows_a_bar(progress)):
        path = Path(path_of(row))
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
        write(row, temporary)
        os.replace(temporary, path)
    if progress in ("auto", "epochs") and not shows_a_bar(progress):
        print(f"  {description}: {len(rows)} images", flush=True)


def write_masks(directory: Path, files, rows, make_mask: Callable[[int], np.ndarray], description: str = "masks",
                progress: str = "auto") -> None:
    """One palette PNG per train row (make_mask(row): (H, W) dataset ids, 255 abstained)."""
    write_per_image(rows, lambda row: mask_path(directory, files.ids[row]),
                    lambda row, temporary: save_mask(temporary, make_mask(row)), description, progress)


def mask_path(directory: Path, image_id: str) -> Path:
    return Path(directory) / MASKS / (str(image_id).replace("/", "__") + ".png")


# --- inference helpers shared by the baselines -----------------------------------------------------
def multiscale_maps(forward: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, scales, flip: bool = True) -> torch.Tensor:
    """sum over scales (and horizontal flips) of forward(resized image) -> (1, K, h, w) maps,
    each upsampled bilinearly (align_corners=False) to the image's size: (K, H, W). The images
    are resized bilinearly (the repositories resize with PIL/cv2 bilinear or bicubic). A view and
    its flip go through `forward` as one batch of two (the networks are in eval mode: the same maps)."""
    height, width = image.shape[-2:]
    total = None
    for scale in scales:
        size = (max(1, int(round(height * scale))), max(1, int(round(width * scale))))
        resized = image if size == (height, width) else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        maps = forward(torch.cat([resized, resized.flip(-1)]) if flip else resized).float()
        if flip:
            maps = maps[:1] + maps[1:].flip(-1)
        maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)[0]
        total = maps if total is None else total + maps
    return total


def max_normalised(cams: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each class map divided by its maximum (after ReLU): values in [0, 1] (K, H, W)."""
    cams = torch.relu(cams)
    return cams / (cams.flatten(1).amax(dim=1)[:, None, None] + eps)


def threshold_background(cams: torch.Tensor, labels: torch.Tensor, background: float) -> torch.Tensor:
    """argmax over [background score, normalised CAMs of the classes present in the image label]:
    (K, H, W) maps in [0, 1], labels (K,) -> (H, W) ids in 0..K (0 background). A pixel whose
    best present class is at or below `background` is background (argmax picks the first of ties)."""
    present = labels.to(cams.device) > 0
    scores = torch.cat([cams.new_full((1, *cams.shape[1:]), background), cams * present[:, None, None]], dim=0)
    scores[1:][~present] = -1.0
    return scores.argmax(dim=0)


def build_classifier_encoder(name: str, depth: int, output_stride: int, weights: str | None):
    """An smp encoder (smp ResNets or timm's `tu-` ones), dilated to `output_stride`: the
    classifier backbone of a baseline (ResNet-38 stands in; see the module docstring)."""
    from segmentation_models_pytorch.encoders import get_encoder

    return get_encoder(name, in_channels=3, depth=depth, weights=weights, output_stride=output_stride)


# --- the method -------------------------------------------------------------------------------------
@dataclass
class WeakBaseline(Method):
    """Shared by CAM, SEAM, SS, EPS: the stage, the pseudo-mask data and the segmentation loss."""
    name = "weak_baseline"
    supervision = "image"
    uses_old_model = True
    step0_loss = "bce"           # WILSON's step-0 model (its code trains step 0 with BCE)
    # WILSON's loader: void (and, through the train lookup, old classes) become 0 in the masks.
    settings = {"data": {"void_as_background": True}}

    old_image_labels: bool = False          # WILSON Table 5: the classifier also gets the old classes' labels
    head_lr_factor: float = 10.0            # segmentation stage: decoder and classifier at 10x (WILSON)
    classifier_encoder: str = "resnet50"    # ResNet-38 stands in (module docstring)
    classifier_encoder_depth: int = 5
    classifier_output_stride: int = 8
    classifier_encoder_weights: str | None = None   # "imagenet" in the paper-setting files
    stage_epochs: int = 8
    stage_batch_size: int = 8
    stage_crop_size: int = 448
    stage_scale: list = field(default_factory=lambda: [0.5, 2.0])
    stage_lr: float = 0.01
    stage_new_layer_lr_factor: float = 10.0   # layers not in the ImageNet encoder
    stage_weight_decay: float = 5e-4
    stage_poly_power: float = 0.9             # the repositories' PolyOptimizer; 0: constant lr (SS)
    inference_scales: list = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    inference_flip: bool = True

    def __post_init__(self):
        super().__post_init__()
        self.stage_dir: Path | None = None
        self._classifier: nn.Module | None = None

    # --- what a baseline defines -------------------------------------------------------------
    def build_classifier(self, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def classifier_loss(self, classifier, batch: dict, progress: StageProgress) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def infer(self, classifier, image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stage_maps(self, context: StepContext) -> dict[str, list[Path]]:
        """Per-image inputs of the stage besides the image: {name: one path per train row of the
        split}, read as uint8 greyscale and augmented with the image (EPS: saliency). During the
        stage, context.stage_directory is the directory being written."""
        return {}

    def classifier_parameter_groups(self, classifier: nn.Module, lr: float) -> list[dict]:
        """The encoder at lr, every other layer at stage_new_layer_lr_factor x lr (the repositories'
        10x for the layers trained from scratch)."""
        encoder = list(classifier.encoder.parameters())
        ids = {id(p) for p in encoder}
        rest = [p for p in classifier.parameters() if id(p) not in ids]
        return [{"params": encoder, "lr": lr}, {"params": rest, "lr": lr * self.stage_new_layer_lr_factor}]

    # --- the stage ---------------------------------------------------------------------------------
    def without_pretrained_weights(self) -> "WeakBaseline":
        """This method with classifier_encoder_weights None: for networks about to receive a saved
        state (no ImageNet download for them)."""
        return dataclasses.replace(self, classifier_encoder_weights=None)

    def stage_classes(self, steps, step: int) -> list[int]:
        """The dataset ids the classifier learns: the step's new classes, or every seen
        foreground class with old_image_labels (in channel order)."""
        if self.old_image_labels:
            return [c for c in channel_order(steps, step) if c != 0]
        return [c for c in steps[step] if c != 0]

    def stage_labels(self, context: StepContext) -> np.ndarray:
        """(N, K) multi-hot of the stage classes for the step's training rows, from the presence table."""
        dm = context.datamodule
        classes = self.stage_classes(context.steps, context.step)
        presence = dm.train_presence[dm.train_indices]
        return np.ascontiguousarray(presence[:, [c - 1 for c in classes]]).astype(np.float32)

    def stage_requirements(self, context: StepContext) -> None:
        """Raise MethodUnavailable when something the stage needs is missing (EPS's saliency maps,
        SEAM's dense CRF). Checked by every process in stage_key, before the stage runs."""

    def stage_key(self, context: StepContext) -> dict:
        self.stage_requirements(context)
        dm, config = context.datamodule, context.config
        rows = np.asarray(dm.train_indices, dtype=np.int64)
        ids = [str(dm.located.train.ids[int(r)]) for r in rows]
        content = hashlib.sha1(json.dumps([ids, self.stage_labels(context).tolist()]).encode()).hexdigest()
        return {"dataset": config.data.dataset, "options": config.data.options, "steps": context.steps,
                "mode": config.data.mode, "images_and_labels": content, "seed": config.seed + context.step,
                "precision": self._autocast_name(config), "hparams": self.stage_hparams()}

    def stage_hparams(self) -> dict:
        """The hyper-parameters that shape the pseudo-masks (all but the segmentation stage's)."""
        return {k: v for k, v in self.hparams().items() if k != "head_lr_factor"}

    def _autocast_name(self, config) -> str:
        from experiments.config import resolve_precision

        return resolve_precision(config.trainer.precision, config.trainer.accelerator)

    def stage_device(self, config) -> str:
        from experiments.config import on_gpu

        return "cuda" if on_gpu(config.trainer.accelerator) and torch.cuda.is_available() else "cpu"

    def stage_autocast(self, config):
        """bf16 autocast when the run trains in bf16-mixed; otherwise fp32 (16-mixed included: fp16
        would need a gradient scaler, which the stage does not have)."""
        return torch.bfloat16 if self._autocast_name(config) == "bf16-mixed" else None

    def stage_workers(self, config) -> int:
        from experiments.distributed import loader_workers

        return loader_workers(config.data.num_workers)

    def stage_dataset(self, context: StepContext) -> StageImages:
        dm = context.datamodule
        maps = self.stage_maps(context)
        return StageImages(dm.located.train, dm.train_indices, self.stage_labels(context),
                           stage_transform(self.stage_crop_size, self.stage_scale, tuple(maps)), maps=maps,
                           seed=context.config.seed + context.step, cache_decoded=context.config.data.cache_decoded)

    def train_classifier(self, context: StepContext, directory: Path) -> nn.Module:
        """Stage (1): the classifier trained on the step's images and image labels; saved as
        classifier.pt (kept for the qualitative figure's pseudo-masks of test images)."""
        num_classes = len(self.stage_classes(context.steps, context.step))
        return self.trained_network(
            context, directory, "classifier", lambda method: method.build_classifier(num_classes),
            self.classifier_loss, lambda: self.stage_dataset(context),
            lambda network: self.classifier_parameter_groups(network, self.stage_lr), epochs=self.stage_epochs,
            batch_size=self.stage_batch_size, weight_decay=self.stage_weight_decay, final=CLASSIFIER)

    def trained_network(self, context: StepContext, directory: Path, name: str, build: Callable, loss: Callable,
                        dataset: Callable[[], Dataset], parameter_groups: Callable, *, epochs: int, batch_size: int,
                        weight_decay: float, final: str) -> nn.Module:
        """A network of the stage, trained once: `final` in the stage directory when it is there
        (built without ImageNet weights, then loaded), else build(method) trained with
        train_stage_network (resumable from <name>-training.pt) and saved as `final`. Its
        initialisation and dropout draw from their own generator, seeded with (seed + step): the
        same network whatever ran before in the process, and the step's own random numbers the same
        whether the stage ran or came from the cache."""
        path = Path(directory) / final
        device = self.stage_device(context.config)
        if path.exists():
            network = build(self.without_pretrained_weights())
            network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return network.to(device).eval()
        seed = context.config.seed + context.step
        with stage_random_state(seed, device):
            network = build(self)
            train_stage_network(
                network, loss, dataset(), parameter_groups(network), epochs=epochs, batch_size=batch_size, seed=seed,
                checkpoint=Path(directory) / f"{name}-training.pt", weight_decay=weight_decay,
                poly_power=self.stage_poly_power, device=device, autocast_dtype=self.stage_autocast(context.config),
                description=f"{self.name} step {context.step}: {name}", progress=context.config.trainer.progress,
                num_workers=self.stage_workers(context.config))
        _atomic_save(network.state_dict(), path)
        return network.eval()

    def run_stage(self, context: StepContext, directory) -> None:
        """Stages (1) and (2): train the classifier, then write the pseudo-mask of every training
        image with the baseline's inference (whole image, no crop)."""
        directory = Path(directory)
        classifier = self.train_classifier(context, directory)
        self.write_pseudo_masks(context, directory, lambda image, labels, row: self.infer(classifier, image, labels))

    def write_pseudo_masks(self, context: StepContext, directory: Path,
                           infer: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]) -> None:
        """infer(image (1, 3, H, W), labels (K,), train row) -> (H, W) ids in 0..K or 255, written as
        dataset ids for every training image of the step."""
        dm = context.datamodule
        classes = id_table([0, *self.stage_classes(context.steps, context.step)]).astype(np.uint8)
        labels = self.stage_labels(context)
        position = {int(r): i for i, r in enumerate(dm.train_indices)}
        device = self.stage_device(context.config)
        autocast = self.stage_autocast(context.config)

        @torch.no_grad()
        def make_mask(row: int) -> np.ndarray:
            image = full_image(dm.located.train, row).to(device)
            with torch.autocast(device_type=device, dtype=autocast, enabled=autocast is not None):
                ids = infer(image, torch.from_numpy(labels[position[row]]).to(device), row)
            return classes[ids.cpu().numpy().astype(np.int64)]

        write_masks(directory, dm.located.train, dm.train_indices, make_mask,
                    description=f"{self.name} step {context.step}: pseudo-masks", progress=context.config.trainer.progress)

    # --- stage (3): the segmentation training on the masks ---------------------------------------------
    def training_data(self, context: StepContext, default):
        """The step's images with their pseudo-masks in place of any mask; rows outside the step
        point at a file that does not exist (no ground truth can be read in their stead)."""
        self.stage_dir = Path(context.stage_directory)
        self._classifier = None
        dm = context.datamodule
        train = set(int(r) for r in dm.train_indices)
        missing = self.stage_dir / "not-a-training-image-of-this-step.png"
        masks = [mask_path(self.stage_dir, image_id) if row in train else missing
                 for row, image_id in enumerate(dm.located.train.ids)]
        return TrainingSources([dm.pixel_labelled_training_set(masks)])

    def parameter_groups(self, module, lr: float) -> list[dict]:
        if module.step == 0:
            return super().parameter_groups(module, lr)
        groups = module.network.parameter_groups()
        return [{"params": groups["encoder"], "lr": lr, "name": "encoder"},
                {"params": groups["decoder"], "lr": lr * self.head_lr_factor, "name": "decoder"},
                {"params": groups["classifier"], "lr": lr * self.head_lr_factor, "name": "classifier"}]

    def incremental_training_loss(self, module, batch):
        images = batch["image"]
        with torch.no_grad():
            old_logits = module.old_network(images)["logits"]
        logits = module.network(images)["logits"]
        loss = pseudo_mask_bce(logits, batch["label"], old_logits)
        return loss, {"pseudo_bce": loss}

    # --- reporting -------------------------------------------------------------------------------
    def stage_classifier(self, steps, step: int, device) -> nn.Module | None:
        if self.stage_dir is None or not (self.stage_dir / CLASSIFIER).exists():
            return None
        if self._classifier is None:
            classifier = self.without_pretrained_weights().build_classifier(len(self.stage_classes(steps, step)))
            classifier.load_state_dict(torch.load(self.stage_dir / CLASSIFIER, map_location="cpu", weights_only=True))
            self._classifier = classifier.eval()
        return self._classifier.to(device)

    def stored_pseudo_mask(self, image_id: str) -> np.ndarray:
        """The stage's mask of one training image (dataset ids, 255 abstained): what the
        pseudo-label quality report scores (experiments.reporting.pseudo_masks)."""
        return load_mask(mask_path(self.stage_dir, image_id))

    @torch.no_grad()
    def pseudo_labels(self, module, images, new_labels, labels=None):
        """The baseline's pseudo-mask of each image (its classifier's inference, as in the stage),
        in the model's channel ids, 255 where it abstains. With old_image_labels, the old classes'
        image labels come from the images' pixel labels."""
        if module.step == 0:
            return None
        classifier = self.stage_classifier(module.steps, module.step, images.device)
        if classifier is None:
            return None
        order = channel_order(module.steps, module.step)
        stage = self.stage_classes(module.steps, module.step)
        to_channel = torch.from_numpy(id_table([0, *(order.index(c) for c in stage)])).to(images.device)
        n_old = len(order) - new_labels.shape[1]
        out = []
        for b in range(images.shape[0]):
            present = new_labels[b].float()
            if self.old_image_labels:
                seen = torch.zeros(n_old, device=images.device)
                if labels is not None:
                    ids = labels[b][labels[b] < n_old].unique()
                    seen[ids] = 1.0
                present = torch.cat([seen[1:], present])
            out.append(to_channel[self.infer(classifier, images[b: b + 1].float(), present).long()])
        return torch.stack(out)
