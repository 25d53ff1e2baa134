"""Class orders of every dataset and task (shared/docs/PROTOCOL.md §1-2), as pure data.

A task is a list of steps; each step is the list of dataset class ids learned at that step.
Step 0 always starts with background 0. The model's output channels follow the concatenation
of the steps (`channel_order`), a contiguous re-indexing of the dataset ids.
"""
from __future__ import annotations

import re

from datamodules.fewshot import fewshot_tasks

# Number of foreground classes (ids 1..K) of each dataset. The embedded synthetic dataset has
# VOC's 20 classes so that every VOC task applies to it unchanged.
NUM_FOREGROUND = {"voc": 20, "synthetic": 20, "ade": 150, "coco-voc": 91, "coco": 91}

# COCO-to-VOC (WILSON): 91-id space in which these 11 ids never occur.
COCO_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)
# The 20 VOC classes in COCO ids, in COCO-id order (channels 61..80 follow this order).
COCO_VOC_CLASS_IDS = (1, 2, 3, 4, 5, 6, 7, 9, 16, 17, 18, 19, 20, 21, 44, 62, 63, 64, 67, 72)
# VOC id -> COCO id, used to relabel VOC masks in the COCO-to-VOC setting (0 and 255 unchanged).
VOC_TO_COCO = {1: 5, 2: 2, 3: 16, 4: 9, 5: 44, 6: 6, 7: 3, 8: 17, 9: 62, 10: 21, 11: 67, 12: 18,
               13: 19, 14: 4, 15: 1, 16: 64, 17: 20, 18: 63, 19: 7, 20: 72}


def _regular(num_foreground: int, first: int, increment: int) -> list[list[int]]:
    """0..first | then blocks of `increment` classes up to num_foreground."""
    steps = [list(range(0, first + 1))]
    for start in range(first + 1, num_foreground + 1, increment):
        steps.append(list(range(start, min(start + increment, num_foreground + 1))))
    return steps


_VOC_TASKS = {name: _regular(20, a, b) for name, (a, b) in {
    "19-1": (19, 1), "15-5": (15, 5), "15-1": (15, 1), "10-10": (10, 10), "10-5": (10, 5),
    "10-1": (10, 1), "10-2": (10, 2), "5-3": (5, 3), "2-2": (2, 2),
}.items()}
# PIFS's incremental few-shot folds (datamodules/fewshot.py): fss-5-0 .. fss-5-3, and fss-5-<i>m with
# one novel class per step. ("5-3" alone is MiB's 5 + 3 + ... task, hence the prefix.)
_VOC_TASKS.update(fewshot_tasks("voc"))
# Names the MiB code uses for the same tasks.
_VOC_ALIASES = {"15-5s": "15-1", "10-5-5": "10-5"}

_ADE_TASKS = {name: _regular(150, a, b) for name, (a, b) in {
    "100-50": (100, 50), "100-10": (100, 10), "100-5": (100, 5), "50-50": (50, 50),
}.items()}
_ADE_ALIASES = {"50": "50-50"}

_COCO_NON_VOC = [c for c in range(1, 92) if c not in COCO_UNUSED_IDS and c not in COCO_VOC_CLASS_IDS]
_COCO_TASKS = {"voc": [[0] + _COCO_NON_VOC, list(COCO_VOC_CLASS_IDS)]}

TASKS: dict[str, dict[str, list[list[int]]]] = {
    "voc": _VOC_TASKS, "synthetic": _VOC_TASKS, "ade": _ADE_TASKS, "coco-voc": _COCO_TASKS,
    # COCO's 80 categories: PIFS's folds fss-20-0 .. fss-20-3 (and the four-step fss-20-<i>m)
    "coco": fewshot_tasks("coco"),
}
ALIASES = {"voc": _VOC_ALIASES, "synthetic": _VOC_ALIASES, "ade": _ADE_ALIASES, "coco-voc": {}, "coco": {}}


def task_classes(dataset: str, task: str | list[list[int]]) -> list[list[int]]:
    """Classes learned at each step of `task` on `dataset` (step 0's list starts with 0).

    `task` is a registered name ("15-5", "100-50", MiB's aliases "15-5s"/"10-5-5"), or a
    user-given class order: a list of lists of ids, or its string form "[[0,1,2],[3,4]]"
    (e.g. the random ADE orders "100-50b" of MiB).
    """
    if dataset not in TASKS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(TASKS)}")
    if isinstance(task, str) and task.strip().startswith("["):
        task = [[int(c) for c in re.findall(r"\d+", group)] for group in re.findall(r"\[([^\[\]]*)\]", task)]
    if isinstance(task, str):
        name = ALIASES[dataset].get(task, task)
        if name not in TASKS[dataset]:
            raise ValueError(f"unknown task {task!r} for dataset {dataset!r}; known: "
                             f"{', '.join(TASKS[dataset])} (or give a class order like [[0,1,2],[3]])")
        return [list(step) for step in TASKS[dataset][name]]
    return _validated_order(dataset, [list(map(int, step)) for step in task])


def _validated_order(dataset: str, steps: list[list[int]]) -> list[list[int]]:
    if len(steps) < 1 or not steps[0] or steps[0][0] != 0:
        raise ValueError("a class order must start with background 0 in step 0, e.g. [[0,1,2],[3]]")
    flat = [c for step in steps for c in step]
    if len(set(flat)) != len(flat):
        raise ValueError(f"class order lists a class twice: {steps}")
    if any(not step for step in steps[1:]):
        raise ValueError(f"class order has an empty step: {steps}")
    bad = [c for c in flat if not 0 <= c <= NUM_FOREGROUND[dataset]]
    if bad:
        raise ValueError(f"class ids {bad} are outside dataset {dataset!r} (1..{NUM_FOREGROUND[dataset]})")
    return steps


def channel_order(steps: list[list[int]], step: int) -> list[int]:
    """Dataset ids of the model's output channels after `step`: [0] + step-0 classes + ..."""
    return [c for s in steps[: step + 1] for c in s]


def channels_per_step(steps: list[list[int]]) -> list[int]:
    """Number of output channels each step adds (step 0 counts background)."""
    return [len(s) for s in steps]


def class_span(classes) -> str:
    """A readable name for a group of class ids (background left out): "16-20" for contiguous ids,
    "16" for one, "12 classes" otherwise; "-" for none. Used in tables and figure labels."""
    classes = sorted(c for c in classes if c != 0)
    if not classes:
        return "-"
    if len(classes) == 1:
        return str(classes[0])
    contiguous = classes == list(range(classes[0], classes[-1] + 1))
    return f"{classes[0]}-{classes[-1]}" if contiguous else f"{len(classes)} classes"
