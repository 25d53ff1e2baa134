"""How a step's training shows its progress (trainer.progress).

"bar":    a progress bar per epoch (tqdm), redrawn at most twice a second by the training thread
          itself. Lightning's rich bar runs a refresh thread that took ~4 % of a 2-core machine in
          a profile of `make run` (29 of 772 s).
"epochs": one line per epoch (loss, images/s), for log files and slow terminals.
"auto":   the bar on a terminal, epoch lines otherwise.
"none":   nothing (not "off", which YAML reads as false).
"""
from __future__ import annotations

import sys
import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.utilities import rank_zero_only


class EpochLines(pl.Callback):
    """One line per training epoch on rank 0: step, epoch, mean loss, images/s."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.started, self.images, self.loss_sum, self.batches = time.time(), 0, 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.images += len(batch["image"])
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.loss_sum += float(loss.detach())
        self.batches += 1

    @rank_zero_only
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        seconds = max(time.time() - self.started, 1e-9)
        print(f"  step {pl_module.step} epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: "
              f"loss {self.loss_sum / max(1, self.batches):.4f}, {self.images / seconds:.0f} images/s", flush=True)


class CalmProgressBar(TQDMProgressBar):
    """tqdm's bar, redrawn at most every `interval` seconds (and at the end of an epoch)."""

    def __init__(self, interval: float = 0.5):
        super().__init__(refresh_rate=1, leave=False)
        self.interval, self._drawn = interval, 0.0

    def _should_update(self, current: int, total) -> bool:
        now = time.monotonic()
        if self.is_enabled and (current == total or now - self._drawn >= self.interval):
            self._drawn = now
            return True
        return False


def progress_callbacks(mode: str) -> list[pl.Callback]:
    if mode == "auto":
        mode = "bar" if sys.stdout.isatty() else "epochs"
    if mode == "bar":
        return [CalmProgressBar()]
    if mode == "epochs":
        return [EpochLines()]
    return []


def shows_a_bar(mode: str) -> bool:
    return mode == "bar" or (mode == "auto" and sys.stdout.isatty())
