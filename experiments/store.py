"""Where one method's run of one configuration keeps its results, and how a run resumes.

    runs/<experiment>/<method>/<config id>/seed<k>/   one run: results.json, metrics.csv,
                                                     per_class_iou.csv, config.yaml, figures,
                                                     checkpoints/
    runs/<experiment>/<method>/<config id>/config.yaml   the configuration (without the seed)
    runs/<experiment>/<method>/latest -> <config id>     the configuration run most recently

The config id is a digest of the run's configuration without the seed and without what cannot
change a result (logging, figures, paths, loader workers, the progress display): every
configuration keeps its own directory, so a run with a changed override never touches an
earlier one, and the seeds of one configuration sit side by side for `make compare`.

Resume: started again with the same configuration, a complete run is reused, and an incomplete
one continues after its last finished step (checkpoints/step<t>.pt: the network and the method's
carried state) and inside the step in progress (checkpoints/fit-step<t>.ckpt, Lightning's
checkpoint of the last finished epoch). `resume: false` starts the same configuration again
without losing the earlier run: its directory is kept as seed<k>.<date-time>/.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
import yaml

from callbacks.checkpointing import save_atomically
from experiments.distributed import agree, is_global_zero

# Keys of the run configuration that cannot change a result.
NOT_IN_CONFIG_ID = {"seed", "resume", "logger", "figures", "output_dir", "cache_dir"}
NOT_IN_CONFIG_ID_DATA = {"num_workers", "cache_decoded", "root"}
NOT_IN_CONFIG_ID_TRAINER = {"progress", "log_every_n_steps"}


def identity(config) -> dict:
    """What makes two runs the same run, apart from the seed (see the module docstring). The data
    root counts for real datasets (two copies of VOC may differ) and not for the generated one."""
    values = config.to_dict()
    kept = {k: v for k, v in values.items() if k not in NOT_IN_CONFIG_ID}
    kept["data"] = {k: v for k, v in values["data"].items() if k not in NOT_IN_CONFIG_ID_DATA}
    # Likewise for a step length in iterations and a batch of the steps >= 1's own, when unset.
    unset = [k for k in ("iterations", "batch_size") if values["schedule"]["incremental"].get(k) is None]
    if unset:
        kept["schedule"] = {**values["schedule"], "incremental": {k: v for k, v in values["schedule"]["incremental"].items()
                                                                  if k not in unset}}
    if kept["data"].get("fewshot") is None:   # absent from the ids of runs without few-shot steps, as before it existed
        kept["data"].pop("fewshot", None)
    if config.data.dataset != "synthetic":
        kept["data"]["root"] = str(Path(config.data.root).resolve())
    kept["trainer"] = {k: v for k, v in values["trainer"].items() if k not in NOT_IN_CONFIG_ID_TRAINER}
    kept["network"] = config.network.identity()
    kept["optimizer"] = config.optimizer.identity()
    kept["checkpoint"] = config.checkpoint.identity()
    # A hyper-parameter a method gained later is left out at its default, so earlier runs keep their ids.
    from lightning_modules.methods import METHODS

    later = getattr(METHODS.get(config.method), "later_defaults", {})
    kept["hparams"] = {k: v for k, v in values["hparams"].items() if not (k in later and later[k] == v)}
    return kept


def config_id(config) -> str:
    return hashlib.sha1(json.dumps(identity(config), sort_keys=True, default=str).encode()).hexdigest()[:8]


def _json_safe(value):
    """NaN (a class or group without ground truth) becomes null: standard JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _nan_for_null(summary: dict) -> dict:
    """A summary read back from results.json: the null means-of-nothing become NaN again."""
    return {k: (math.nan if v is None else v) for k, v in summary.items()}


def restore_nans(results: dict) -> dict:
    steps = []
    for record in results.get("steps", []):
        record = dict(record, summary=_nan_for_null(record["summary"]))
        if record.get("validation"):
            record["validation"] = dict(record["validation"], summary=_nan_for_null(record["validation"]["summary"]))
        steps.append(record)
    results["steps"] = steps
    for key in ("final", "final_validation"):
        if results.get(key):
            results[key] = _nan_for_null(results[key])
    return results


def run_directory(config) -> Path:
    """runs/<experiment>/<method>/<config id>/seed<k>/ of a run configuration."""
    return Path(config.output_dir) / config.experiment / config.method / config_id(config) / f"seed{config.seed}"


class RunStore:
    """One run's directory (see the module docstring). Rank 0 writes; every rank reads."""

    def __init__(self, config, method):
        self.config, self.method = config, method
        self.config_id = config_id(config)
        self.directory = run_directory(config)
        self.config_dir = self.directory.parent
        self.method_dir = self.config_dir.parent
        self.checkpoints = self.directory / "checkpoints"
        self.results = {"experiment": config.experiment, "method": config.method, "config_id": self.config_id,
                        "supervision": method.supervision, "hparams": method.hparams(), "complete": False,
                        "steps": [], "config": config.to_dict(), "wandb_id": None}

    # --- opening: resume, or a fresh start ----------------------------------------------------------
    def open(self) -> dict | None:
        """The saved results of this configuration and seed when the run resumes (None for a fresh
        start), after archiving an earlier run that `resume: false` starts again. Points `latest`
        at this configuration."""
        saved = agree(self._saved() if self.config.resume else None)
        if is_global_zero():
            if saved is None and self.directory.exists():
                self._archive()
            self._point_latest()
        if saved is not None:
            self.results = saved
        return saved

    def _saved(self) -> dict | None:
        try:
            saved = json.loads((self.directory / "results.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return restore_nans(saved) if saved.get("config_id") == self.config_id else None

    def _archive(self) -> None:
        """Keep an earlier run of this configuration (resume: false, or an unreadable results.json)
        under a dated name: never deleted, never resumed from, not read by make compare."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.directory.stat().st_mtime))
        target = self.directory.with_name(f"{self.directory.name}.{stamp}")
        suffix = 1
        while target.exists():
            suffix += 1
            target = self.directory.with_name(f"{self.directory.name}.{stamp}-{suffix}")
        os.replace(self.directory, target)
        print(f"  the earlier run of this configuration is kept in {target}")

    def _point_latest(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        config = dict(self.config.to_dict())
        config.pop("seed")
        (self.config_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        link = self.method_dir / "latest"
        temporary = self.method_dir / f".latest.{os.getpid()}"
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(self.config_id, target_is_directory=True)
        os.replace(temporary, link)

    def saved_steps(self) -> int:
        """How many steps of this configuration and seed are saved already (read only; 0 with
        resume: false, which starts again)."""
        saved = self._saved() if self.config.resume else None
        return len(saved["steps"]) if saved else 0

    @property
    def complete(self) -> bool:
        return bool(self.results.get("complete"))

    @property
    def next_step(self) -> int:
        return len(self.results["steps"])

    # --- checkpoints ------------------------------------------------------------------------------
    def network_file(self, step: int) -> Path:
        return self.checkpoints / f"step{step}.pt"

    def fit_checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"fit-step{step}.ckpt"

    def resumed_network(self):
        """The network after the last finished step, with the method's carried state restored, or
        None (a fresh start, or a run whose step file is missing)."""
        if not self.results["steps"]:
            return None
        path = self.network_file(self.results["steps"][-1]["step"])
        if not agree(path.exists()):
            self.results["steps"] = []
            return None
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self.method.load_state_dict(saved.get("method_state") or {})
        return self.method.load_network(self.config.network, saved["network"])

    def finish_step(self, record: dict, network) -> None:
        """After step t: its network and the method's carried state to checkpoints/step<t>.pt (one
        atomic file), then the record to results.json, then the step's training checkpoint and the
        previous step's network are removed. A kill between any two of these leaves a state the
        next start resumes from correctly."""
        step = record["step"]
        main = is_global_zero()
        if main:
            save_atomically({"network": network.state(), "method_state": self.method.state_dict()},
                            self.network_file(step))
        self.results["steps"].append(record)
        self.write()
        if main:
            for stale in (self.fit_checkpoint(step), self.network_file(step - 1)):
                stale.unlink(missing_ok=True)

    # --- results ------------------------------------------------------------------------------
    def write(self) -> None:
        """results.json (everything), metrics.csv (one row per step), per_class_iou.csv, config.yaml."""
        if not is_global_zero():
            return
        directory = self.directory
        directory.mkdir(parents=True, exist_ok=True)
        temporary = directory / "results.json.tmp"
        temporary.write_text(json.dumps(_json_safe(self.results), indent=1, default=float, allow_nan=False))
        temporary.replace(directory / "results.json")
        (directory / "config.yaml").write_text(yaml.safe_dump(self.results["config"], sort_keys=False))
        steps = self.results["steps"]
        if not steps:
            return
        with open(directory / "metrics.csv", "w", newline="") as f:
            keys = list(steps[0]["summary"])
            writer = csv.writer(f)
            writer.writerow(["step", *keys])
            for record in steps:
                writer.writerow([record["step"], *(record["summary"][k] for k in keys)])
        with open(directory / "per_class_iou.csv", "w", newline="") as f:
            columns = list(steps[-1]["iou"])
            writer = csv.writer(f)
            writer.writerow(["step", *columns])
            for record in steps:
                writer.writerow([record["step"], *(record["iou"].get(c) for c in columns)])
