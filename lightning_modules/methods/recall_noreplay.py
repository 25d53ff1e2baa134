"""RECALL's inpainting-only ablation (the official code's FINE_TUNING configs, `interleave_ratio_old
= 0`): the step's images with their background inpainted by the previous model, encoder and batch
norm frozen, and no replay pool. Not RECALL: named as such (lightning_modules/methods/recall.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lightning_modules.methods.recall import RECALL


@dataclass
class RECALLNoReplay(RECALL):
    name = "recall_noreplay"
    replay: ClassVar[bool] = False


METHOD = RECALLNoReplay
