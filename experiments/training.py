"""One step of one method: its datamodule, LightningModule and Trainer, built from the run's
configuration, then fit and test. `make run` (experiments.run) and `make bench` build them here.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl

from callbacks.checkpointing import AtomicCheckpointIO, RandomStateCallback
from callbacks.progress import progress_callbacks, shows_a_bar
from callbacks.selection import BestValidationState
from callbacks.teacher import TeacherCallback
from datamodules.incremental import IncrementalSegmentationDataModule
from datamodules.tasks import channel_order
from experiments.config import on_gpu
from experiments.distributed import agree, is_global_zero, loader_workers, rank, world_size
from lightning_modules.methods.base import StepContext
from lightning_modules.module import IncrementalSegmentationModule


# --- the numbers every step derives from the configuration -------------------------------------
def step_batch(config, step: int = 0) -> int:
    """The per-process batch of `step`: data.batch_size, or schedule.incremental.batch_size at the
    steps >= 1 when it is set."""
    own = config.schedule.incremental.batch_size
    return own if step > 0 and own else config.data.batch_size


def effective_batch(config, step: int = 0) -> int:
    """Images per optimizer update: processes x per-process batch x gradient accumulation."""
    return world_size(config.trainer) * step_batch(config, step) * config.trainer.accumulate_grad_batches


def lr_scale(config, step: int = 0) -> float:
    """Linear scaling of every lr from the reference batch (PROTOCOL.md §6), unless
    optimizer.scale_lr is false. A step batch of the steps >= 1's own is its own reference."""
    optimizer = config.optimizer
    reference = optimizer.reference_batch or config.data.batch_size
    if step > 0 and config.schedule.incremental.batch_size:
        reference = config.schedule.incremental.batch_size
    return effective_batch(config, step) / reference if optimizer.scale_lr else 1.0


def step_schedule(config, step: int):
    return config.schedule.step0 if step == 0 else config.schedule.incremental


def uses_sync_batchnorm(config) -> bool:
    """SyncBatchNorm under DDP (PROTOCOL.md §6) on GPUs. PyTorch implements it for GPUs only, so
    CPU processes keep per-process batch norm (and say so at the start)."""
    t = config.trainer
    return t.sync_batchnorm and world_size(t) > 1 and on_gpu(t.accelerator)


# --- building blocks ---------------------------------------------------------------------------
def build_datamodule(config, method, steps, step: int) -> IncrementalSegmentationDataModule:
    data = config.data
    return IncrementalSegmentationDataModule(
        dataset=data.dataset, data_root=data.root, task=steps, mode=data.mode, step=step,
        supervision=method.supervision, training_images=method.training_images, old_labels=method.old_labels,
        batch_size=step_batch(config, step), test_batch_size=data.test_batch_size, crop_size=data.crop_size,
        train_scale=data.train_scale, eval_mode=data.eval_mode, test_images=data.test_images,
        void_as_background=data.void_as_background, future_classes_in_test=data.future_classes_in_test,
        size_divisor=config.network.stride, num_workers=loader_workers(data.num_workers),
        dataset_options=data.options, validation_fraction=data.validation_fraction,
        eval_crop_size=data.eval_crop_size, seed=config.seed + step, on_unreadable=data.on_unreadable,
        cache_decoded=data.cache_decoded, fewshot=data.fewshot.model_dump() if data.fewshot else None)


def build_module(config, method, steps, step: int, network, class_names: dict[int, str] | None = None):
    schedule = step_schedule(config, step)
    names = class_names or {}
    return IncrementalSegmentationModule(
        network, method, steps, step, lr=schedule.lr, lr_scale=lr_scale(config, step),
        optimizer=config.optimizer.algorithm, momentum=config.optimizer.momentum, nesterov=config.optimizer.nesterov,
        weight_decay=config.optimizer.weight_decay, poly_power=config.optimizer.poly_power,
        class_names=[names.get(c, str(c)) for c in channel_order(steps, step)],
        channels_last=config.trainer.channels_last, compile_network=config.trainer.compile)


def build_trainer(config, epochs: int, logger, callbacks: list, checkpoint_file: Path | None = None) -> pl.Trainer:
    """One Trainer per step. With `checkpoint_file`, a Lightning checkpoint of the step is written
    there (atomically) every checkpoint.every_n_epochs epochs, with the random states."""
    t = config.trainer
    strategy = "ddp" if t.strategy == "auto" and world_size(t) > 1 else t.strategy
    selecting = config.checkpoint.select == "best_validation"
    callbacks = callbacks + [RandomStateCallback(), *progress_callbacks(t.progress)]
    if checkpoint_file is not None:
        callbacks.append(pl.callbacks.ModelCheckpoint(
            dirpath=checkpoint_file.parent, filename=checkpoint_file.stem, save_top_k=1, save_last=False,
            every_n_epochs=config.checkpoint.every_n_epochs, save_on_train_epoch_end=True,
            enable_version_counter=False))
    return pl.Trainer(
        max_epochs=epochs, logger=logger, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=t.precision, accumulate_grad_batches=t.accumulate_grad_batches,
        sync_batchnorm=uses_sync_batchnorm(config),
        # The datamodule shards by itself (datamodules.sampling): the same global batches for any
        # number of processes, and no padded duplicates in the test set.
        use_distributed_sampler=False, enable_progress_bar=shows_a_bar(t.progress),
        enable_checkpointing=checkpoint_file is not None, enable_model_summary=False,
        # Validation during fit only to select the handed-on epoch (callbacks/selection.py).
        limit_val_batches=t.limit_test_batches if selecting else 0,
        check_val_every_n_epoch=config.checkpoint.validate_every_n_epochs, num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps, default_root_dir=config.output_dir,
        deterministic=t.deterministic,
        # A few batches per epoch and per test: the smoke test of every experiment file.
        limit_train_batches=t.limit_train_batches, limit_test_batches=t.limit_test_batches)


@dataclass
class Step:
    """The objects of one step, built and wired (before fit)."""
    datamodule: IncrementalSegmentationDataModule
    module: IncrementalSegmentationModule
    callbacks: list
    stage_directory: Path | None = None
    epochs: int | None = None          # a step t >= 1's epochs, as the method sets them (training_epochs)


def build_step(config, method, steps, step: int, network, old_network=None, class_names=None) -> Step:
    """The datamodule (set up, with the method's training sources), the method's stage (run once,
    experiments.stages), the module and the callbacks of `step`; `network` already has its
    classifier for the step's classes."""
    from experiments.stages import run_stage_once

    # Seeded again (the step loop seeds before the classifier grows): what follows draws the same
    # random numbers however many the new head's initialisation took.
    pl.seed_everything(config.seed + step, verbose=False)
    datamodule = build_datamodule(config, method, steps, step)
    datamodule.setup("fit")
    context = StepContext(config=config, steps=steps, step=step, datamodule=datamodule, old_network=old_network,
                          rank=rank(), world_size=world_size(config.trainer))
    if step > 0:
        context.stage_directory = run_stage_once(method, context, config.cache_dir)
        datamodule.set_training_sources(method.training_data(context, datamodule.training_sources))
    one_image = datamodule.per_process_batch(world_size(config.trainer), config.trainer.accumulate_grad_batches) == 1
    one_shot_steps = config.data.fewshot is not None and config.data.fewshot.nshot == 1 and len(steps) > 2
    if step > 0 and (one_image or one_shot_steps) and hasattr(network, "freeze_image_pooling_statistics"):
        # A one-image batch has no batch statistics in the image-pooling branch's 1x1 map: it normalises
        # by its running ones (the official --no_pooling, which PIFS's multi-step scripts pass to every
        # 1-shot run, VOC's one-image steps and COCO's five-image ones alike).
        network.freeze_image_pooling_statistics()
    module = build_module(config, method, steps, step, network, class_names)
    epochs = None
    if step > 0:   # a method's own step length (step 0's belongs to the cached model's key: the schedule's)
        updates = datamodule.updates_per_epoch(world_size(config.trainer), config.trainer.accumulate_grad_batches)
        schedule = step_schedule(config, step)
        # PIFS's scripts count a step in iterations: epochs = iterations // updates per epoch (its run.py)
        planned = max(1, schedule.iterations // updates) if schedule.iterations else schedule.epochs
        epochs = method.training_epochs(context, planned, updates)
    return Step(datamodule, module, [TeacherCallback(old_network)], context.stage_directory, epochs)


# --- fit and test -------------------------------------------------------------------------------
def fit_and_test(config, built: Step, logger, train: bool = True, checkpoint_file: Path | None = None,
                 examples_path: Path | None = None) -> dict:
    """Train the step (unless `train` is False: a cached step-0 model), test it (and the held-out
    validation images, when there are any); with `examples_path`, save the qualitative examples
    there. With `checkpoint_file`, the training is checkpointed there and resumed from it if it
    exists (it can only be this run's: one directory per configuration, experiments.store).
    Returns the step's record for results.json."""
    from experiments.reporting.qualitative import choose_examples, predict_examples, save_examples

    datamodule, module, step = built.datamodule, built.module, built.module.step
    schedule = step_schedule(config, step)
    selection = BestValidationState() if train and config.checkpoint.select == "best_validation" else None
    epochs = schedule.epochs if built.epochs is None else built.epochs   # 0: nothing to train (WI, AMP)
    trainer = build_trainer(config, epochs, logger, built.callbacks + ([selection] if selection else []),
                            checkpoint_file=checkpoint_file if train else None)
    started = time.time()
    if train:
        resume_from = agree(checkpoint_file is not None and checkpoint_file.exists())
        if resume_from and is_global_zero():
            print(f"  resuming step {step} from {checkpoint_file}")
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(checkpoint_file) if resume_from else None)
    train_seconds = time.time() - started
    validation = None
    if datamodule.val_set is not None:
        module.evaluation_split = datamodule.evaluated_split = "val"
        trainer.test(module, datamodule=datamodule, verbose=False)
        validation = {"images": len(datamodule.val_set), "summary": module.test_summary}
        module.evaluation_split = datamodule.evaluated_split = "test"
    trainer.test(module, datamodule=datamodule, verbose=False)
    stage, pseudo_labels = None, None
    if built.stage_directory is not None:
        stage = {"directory": str(built.stage_directory), **stage_record(built.stage_directory)}
    if train and step > 0 and module.method.supervision == "image" and trainer.is_global_zero:
        from experiments.reporting.pseudo_masks import pseudo_label_quality

        started_quality = time.time()
        names = dict(zip(channel_order(module.steps, step), module.class_names))
        pseudo_labels = pseudo_label_quality(module, datamodule, names)
        if pseudo_labels is not None:
            pseudo_labels["seconds"] = round(time.time() - started_quality, 1)
    count = config.figures.qualitative_images
    if examples_path is not None and count and trainer.is_global_zero:
        positions = choose_examples(datamodule.test_presence[datamodule.test_indices], module.steps[: step + 1], count)
        save_examples(examples_path, predict_examples(module, datamodule.test_set, positions, datamodule.test_presence))
    return {
        "step": step, "classes": module.steps[step], "trained": train, "train_images": len(datamodule.train_set),
        "test_images": len(datamodule.test_set), "train_seconds": round(train_seconds, 1),
        "epochs": trainer.max_epochs if train else 0, "optimizer_updates": int(trainer.global_step) if train else 0,
        "unreadable_skipped": len(module.unreadable),
        "iou": {module.class_names[i]: (None if math.isnan(v) else float(v)) for i, v in enumerate(module.test_iou)},
        "summary": module.test_summary, "confusion": module.test_confusion.tolist(), "validation": validation,
        "stage": stage, "pseudo_labels": pseudo_labels, "selection": selection.record() if selection else None,
    }


def stage_record(directory: Path) -> dict:
    """What the stage's COMPLETE marker says (its run time), {} when it is unreadable."""
    import json

    from experiments.stages import MARKER

    try:
        return json.loads((Path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return {}
