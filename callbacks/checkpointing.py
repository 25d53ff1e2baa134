"""Checkpoints that survive a kill at any moment, and a resume that continues exactly.

- `save_atomically`: write to a temporary file in the same directory, fsync, then rename over the
  target. A kill during the save leaves the previous file (or none), never half a file.
- `AtomicCheckpointIO`: Lightning's checkpoint writer, made atomic the same way.
- `RandomStateCallback`: the process's random states (torch, numpy, python, CUDA) go into every
  Lightning checkpoint and are put back at the start of the first epoch after a resume, so
  dropout draws the same masks as the uninterrupted run would have. The data order and the
  augmentation do not depend on these states (datamodules.sampling), so a run resumed from an
  epoch-end checkpoint retraces the uninterrupted one.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


def save_atomically(obj, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        save_atomically(checkpoint, path)


def random_states() -> dict:
    """Tensors, numbers and lists only, so that checkpoints load with torch.load(weights_only=True)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    states = {"torch": torch.get_rng_state(),
              "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
              "python": {"version": version, "state": list(python_state), "gauss_next": gauss_next}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = states["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RandomStateCallback(pl.Callback):
    """See the module docstring. The states are restored at on_train_epoch_start, the point
    that follows the epoch-end save in the uninterrupted run with nothing random in between
    (the DataLoader draws its base seed afterwards, when the epoch's iterator is created)."""

    def __init__(self):
        self._restored: dict | None = None

    def state_dict(self) -> dict:
        return random_states()

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._restored is not None:
            set_random_states(self._restored)
            self._restored = None
