"""A method's extra stage before a step's training (Method.stage_key / run_stage), run once.

The weakly-supervised baselines train a classifier on the step's images and write pseudo-masks
before the segmentation training; RECALL-like methods could build their replay labels here. The
stage's output goes to <cache_dir>/stages/<method>-step<t>-<digest of its key>/ and is reused by any
later run whose key is the same. Rank 0 runs it; a `COMPLETE` marker, written last, says it is
done; the other ranks wait for that marker (no collective call, so a stage may take as long as it
needs). A stage killed half-way is started again in the same directory, and may skip the files it
finds there.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from datamodules.transforms import PIPELINE_VERSION
from experiments.distributed import is_global_zero

MARKER = "COMPLETE"


def stage_directory(method, context, cache_dir) -> Path | None:
    key = method.stage_key(context)
    if key is None:
        return None
    full = {"method": method.name, "step": context.step, "pipeline": PIPELINE_VERSION, "key": key}
    digest = hashlib.sha1(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cache_dir) / "stages" / f"{method.name}-step{context.step}-{digest}"


def run_stage_once(method, context, cache_dir, poll_seconds: float = 2.0) -> Path | None:
    """The stage's directory once its output is complete (None when the method has no stage)."""
    directory = stage_directory(method, context, cache_dir)
    if directory is None:
        return None
    marker = directory / MARKER
    if is_global_zero():
        if not marker.exists():
            directory.mkdir(parents=True, exist_ok=True)
            print(f"  {method.name}: stage of step {context.step} -> {directory}")
            started = time.time()
            context.stage_directory = directory
            method.run_stage(context, directory)
            temporary = directory / f".{MARKER}.tmp"
            temporary.write_text(json.dumps({"seconds": round(time.time() - started, 1)}))
            temporary.replace(marker)
        else:
            print(f"  {method.name}: stage of step {context.step} from {directory}")
    else:
        while not marker.exists():
            time.sleep(poll_seconds)
    return directory
