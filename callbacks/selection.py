"""checkpoint.select=best_validation: the step hands on the epoch with the best validation score.

The module scores the held-out training images after every validation (its `selection_score`,
MBS's rule: the mean IoU of the step's own classes, background included at step 0). This
callback keeps a CPU copy of the network's state at the best score so far (the first of equal
scores), puts it back into the network when the fit ends, and travels in every Lightning
checkpoint (state_dict / load_state_dict), so a resumed step selects among all of its epochs. Every
process computes the same score (the confusion matrix is summed over them), so all keep the same
state.
"""
from __future__ import annotations

import math

import pytorch_lightning as pl
import torch


class BestValidationState(pl.Callback):
    def __init__(self):
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[tuple[int, float]] = []   # (epoch, score) of every validation

    @property
    def state_key(self) -> str:
        return "BestValidationState"

    def on_validation_end(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        score, epoch = pl_module.selection_score, trainer.current_epoch
        self.history.append((epoch, score))
        if not math.isnan(score) and (self.best_score is None or score > self.best_score):
            self.best_score, self.best_epoch = score, epoch
            self.best_state = {k: v.detach().cpu().clone() for k, v in pl_module.network.state_dict().items()}

    def on_fit_end(self, trainer: pl.Trainer, pl_module) -> None:
        if self.best_state is not None:
            pl_module.network.load_state_dict(self.best_state)

    def record(self) -> dict | None:
        """What the step's results record says about the selection."""
        if self.best_epoch is None:
            return None
        return {"rule": "best validation mIoU of the step's classes (background too at step 0)",
                "epoch": self.best_epoch + 1, "score": self.best_score,
                "history": [{"epoch": e + 1, "score": s} for e, s in self.history]}

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "best_state": self.best_state,
                "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.best_score, self.best_epoch = state.get("best_score"), state.get("best_epoch")
        self.best_state, self.history = state.get("best_state"), list(state.get("history") or [])
