"""Step-0 models, trained once and shared by every method (and experiment) that would train the same
one (PROTOCOL.md §7): runs/.step0_cache/step0-<key>.pt.

The key holds everything that determines the model: the data (dataset and its options, the step-0
classes, the mode, crops, augmentation, void handling, the data pipeline's version), the network,
the step-0 schedule and optimizer, the effective batch and lr scaling, the precision, the seed,
and the method's own step-0 definition (`Method.step0_key()`: its loss, or more). Methods whose
keys agree share the model, whatever their names (MiB, FT, LwF and Joint share the CE model; WILSON
and LwF-MC the BCE model when everything else agrees); 15-1 reuses 15-5's.

State a method carries out of a step-0 model (SDR's prototypes, an importance estimate) lives
beside the shared file, keyed by that model and by the method: step0-<key>.<method>-<digest>.pt,
never inside the shared file.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from callbacks.checkpointing import save_atomically
from datamodules.transforms import PIPELINE_VERSION
from experiments.training import effective_batch, lr_scale

# 3: the typed configuration, the method's step0_key and the data pipeline's version in the key.
CACHE_VERSION = 3


def _digest(value) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def step0_key(config, method, steps) -> dict:
    data, trainer = config.data, config.trainer
    key = {
        "version": CACHE_VERSION, "pipeline": PIPELINE_VERSION, "dataset": data.dataset, "dataset_options": data.options,
        "data_root": str(Path(data.root).resolve()) if data.dataset != "synthetic" else None,
        "step0_classes": steps[0], "mode": data.mode, "network": config.network.identity(),
        "method": method.step0_key(), "schedule": config.schedule.step0.model_dump(),
        "optimizer": config.optimizer.identity(), "batch_size": data.batch_size, "crop_size": data.crop_size,
        "train_scale": data.train_scale, "void_as_background": data.void_as_background,
        "validation_fraction": data.validation_fraction, "seed": config.seed, "precision": trainer.precision,
        "effective_batch": effective_batch(config), "lr_scale": lr_scale(config),
        "sync_batchnorm": trainer.sync_batchnorm, "limit_train_batches": trainer.limit_train_batches,
        "deterministic": trainer.deterministic, "channels_last": trainer.channels_last,
    }
    if data.fewshot is not None:   # the few-shot protocol's base step selects its own images
        key["fewshot_base_step"] = True
    if config.checkpoint.select != "last":   # which epoch's model is kept (absent: the last, as before)
        key["selection"] = config.checkpoint.identity()
    return key


def model_path(config, method, steps) -> Path:
    return Path(config.cache_dir) / f"step0-{_digest(step0_key(config, method, steps))}.pt"


def state_path(model: Path, method) -> Path:
    """Where `method`'s state carried out of the step-0 model `model` lives (beside it)."""
    return model.with_name(f"{model.stem}.{method.name}-{_digest(method.hparams())}.pt")


def load(path: Path, method, config):
    """The cached network, and the method's carried state beside it when there is one."""
    network = method.load_network(config.network, torch.load(path, map_location="cpu", weights_only=True))
    side = state_path(path, method)
    if side.exists():
        method.load_state_dict(torch.load(side, map_location="cpu", weights_only=True))
    return network


def save(path: Path, network, method) -> None:
    """The model (once: a cache entry is never rewritten) and the method's carried state beside it."""
    if not path.exists():
        save_atomically(network.state(), path)
    state = method.state_dict()
    if state:
        save_atomically(state, state_path(path, method))
