"""The step loop: `python -m experiments.run <experiment> [key=value ...]` (what `make run` calls).

For every method of the experiment: take the shared step-0 model (trained once, cached), then
for t >= 1 snapshot the teacher, add and initialise the classifier of the new classes, train
with the method's losses, and test on the classes seen so far. Results per step go to
runs/<experiment>/<method>/, and a comparison table of all methods to runs/<experiment>/.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations' import-time version check

import pytorch_lightning as pl
import torch
import yaml
from rich.console import Console

from callbacks.figures import log_figures_to_wandb, plot_per_class_iou, write_experiment_figures
from callbacks.teacher import TeacherCallback
from datamodules import datasets
from datamodules.incremental import IncrementalSegmentationDataModule
from datamodules.tasks import channel_order, task_classes
from experiments.config import apply_overrides, load_experiment, resolve
from experiments.qualitative import (EXAMPLES_FILE, choose_examples, load_examples, plot_experiment_qualitative,
                                      predict_examples, save_examples)
from experiments.report import comparison_rows, print_comparison, write_comparison
from experiments.tracking import (build_logger, define_task_step_metrics, log_summary_run, log_task_step, run_tags,
                                  wandb_mode)
from lightning_modules.methods import build_method
from lightning_modules.metrics import summarize_run
from lightning_modules.module import IncrementalSegmentationModule
from lightning_modules.network import PretrainedWeightsUnavailable, SegmentationNetwork

STEP0_CACHE_VERSION = 1
console = Console()


# --- building blocks ------------------------------------------------------------------------
def build_network(config: dict, classes_per_step: list[int], pretrained: bool = True) -> SegmentationNetwork:
    """The configured network. pretrained=False skips the encoder weights: the network is about to
    receive a saved state (a cached step-0 model), so nothing should be downloaded for it."""
    settings = dict(config["network"])
    if not pretrained:
        settings["encoder_weights"] = None
    return SegmentationNetwork(classes_per_step, **settings)


def build_datamodule(config: dict, method, steps, step: int) -> IncrementalSegmentationDataModule:
    data = config["data"]
    return IncrementalSegmentationDataModule(
        dataset=data["dataset"], data_root=data["root"], task=steps, mode=data["mode"], step=step,
        supervision=method.supervision, training_images=method.training_images, old_labels=method.old_labels,
        batch_size=data["batch_size"], test_batch_size=data.get("test_batch_size"), crop_size=data["crop_size"],
        train_scale=data.get("train_scale", (0.5, 2.0)), eval_mode=data.get("eval_mode", "center_crop"),
        test_images=data.get("test_images", "seen"), void_as_background=data.get("void_as_background", True),
        future_classes_in_test=data.get("future_classes_in_test", "ignore"),
        size_divisor=config["network"].get("output_stride", 16), num_workers=loader_workers(data.get("num_workers", "auto")),
        dataset_options=data.get("options") or {}, validation_fraction=data.get("validation_fraction", 0.0),
        eval_crop_size=data.get("eval_crop_size"))


def loader_workers(setting) -> int:
    """"auto": cores minus two for the compute threads, at most 4. On a 2-core machine that is 0:
    measured here, 2 loader workers slow a training iteration of the default experiment by ~20 %
    (they take the cores the forward/backward runs on; loading is ~0.5 ms per image)."""
    if setting == "auto":
        return max(0, min(4, (os.cpu_count() or 1) - 2))
    return int(setting)


def schedule_for(config: dict, method_entry: dict, step: int) -> dict:
    schedule = dict(config["schedule"]["step0" if step == 0 else "incremental"])
    if step > 0:
        schedule.update((method_entry or {}).get("schedule") or {})
    return schedule


def build_trainer(config: dict, epochs: int, logger, callbacks: list) -> pl.Trainer:
    trainer_cfg = config.get("trainer") or {}
    return pl.Trainer(
        max_epochs=epochs, logger=logger, callbacks=callbacks + [pl.callbacks.RichProgressBar(leave=False)],
        accelerator=trainer_cfg.get("accelerator", "auto"), devices=trainer_cfg.get("devices", 1),
        precision=trainer_cfg.get("precision", "32-true"), enable_checkpointing=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        log_every_n_steps=trainer_cfg.get("log_every_n_steps", 10), default_root_dir=config["output_dir"],
        deterministic=trainer_cfg.get("deterministic", False),
        # A few batches per epoch and per test: the smoke test of every experiment file.
        limit_train_batches=trainer_cfg.get("limit_train_batches", 1.0),
        limit_test_batches=trainer_cfg.get("limit_test_batches", 1.0))


# --- step 0: shared by every method with the same step-0 setting ----------------------------
def step0_cache_path(config: dict, method, steps) -> Path:
    data = config["data"]
    key = {
        "version": STEP0_CACHE_VERSION, "dataset": data["dataset"], "dataset_options": data.get("options") or {},
        "data_root": str(Path(data["root"]).resolve()) if data["dataset"] != "synthetic" else None,
        "step0_classes": steps[0], "mode": data["mode"], "network": config["network"], "loss": method.step0_loss,
        "schedule": config["schedule"]["step0"], "optimizer": config["optimizer"], "batch_size": data["batch_size"],
        "crop_size": data["crop_size"], "train_scale": data.get("train_scale"),
        "void_as_background": data.get("void_as_background", True), "seed": config["seed"],
        "precision": (config.get("trainer") or {}).get("precision", "32-true"),
        "validation_fraction": data.get("validation_fraction", 0.0),
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(config["cache_dir"]) / f"step0-{digest}.pt"


def _save_atomically(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(obj, temporary)
    temporary.replace(path)


# --- one step -------------------------------------------------------------------------------
def run_step(config, method, method_entry, steps, step, network, logger, names, train=True, examples_path=None):
    """Train step `step` (unless `train` is False: a cached step-0 model) and test it; with
    `examples_path`, also save the qualitative examples (experiments.qualitative) there."""
    pl.seed_everything(config["seed"] + step, verbose=False)
    schedule = schedule_for(config, method_entry, step)
    datamodule = build_datamodule(config, method, steps, step)
    module = IncrementalSegmentationModule(
        network, method, steps, step, lr=schedule["lr"], momentum=config["optimizer"]["momentum"],
        nesterov=config["optimizer"]["nesterov"], weight_decay=config["optimizer"]["weight_decay"],
        poly_power=config["optimizer"]["poly_power"], class_names=[names.get(c, str(c)) for c in channel_order(steps, step)])
    trainer = build_trainer(config, schedule["epochs"], logger, [TeacherCallback(len(steps[step]))])
    started = time.time()
    if train:
        trainer.fit(module, datamodule=datamodule)
    train_seconds = time.time() - started
    validation = None
    datamodule.setup("test")  # idempotent; a cached step 0 has not been through fit's setup
    if datamodule.val_set is not None:
        module.evaluation_split = "val"
        trainer.test(module, dataloaders=datamodule.validation_dataloader(), verbose=False)
        validation = {"images": len(datamodule.val_set), "summary": module.test_summary}
        module.evaluation_split = "test"
    trainer.test(module, datamodule=datamodule, verbose=False)
    count = (config.get("figures") or {}).get("qualitative_images", 0)
    if examples_path is not None and count and trainer.is_global_zero:
        positions = choose_examples(datamodule.test_presence[datamodule.test_indices], steps[: step + 1], count)
        save_examples(examples_path, predict_examples(module, datamodule.test_set, positions, datamodule.test_presence))
    record = {
        "step": step, "classes": steps[step], "trained": train, "train_images": len(datamodule.train_set),
        "test_images": len(datamodule.test_set), "train_seconds": round(train_seconds, 1),
        "iou": {module.class_names[i]: (None if math.isnan(v) else float(v)) for i, v in enumerate(module.test_iou)},
        "summary": module.test_summary, "confusion": module.test_confusion.tolist(), "validation": validation,
    }
    return module.network, record, trainer.is_global_zero


def run_method(config: dict, method_name: str, steps) -> dict:
    entry = dict(config["methods"][method_name] or {})
    method = build_method(method_name, **{k: v for k, v in entry.items() if k != "schedule"})
    # One directory per seed, so that repeated runs are kept side by side for `make compare`.
    run_dir = Path(config["output_dir"]) / config["name"] / method_name / f"seed{config['seed']}"
    names = datasets.class_names(config["data"]["dataset"], config["data"].get("options"))
    logger = build_logger(config, method_name, method.supervision, run_dir)
    if logger:
        define_task_step_metrics(logger.experiment)
    results = {"experiment": config["name"], "method": method_name, "hparams": method.hparams(),
               "complete": False, "steps": [], "config": config}

    cache = step0_cache_path(config, method, steps)
    if cache.exists():
        console.print(f"[bold]{method_name}[/]: step 0 from cache {cache}")
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        network = build_network(config, saved["classes_per_step"], pretrained=False)
        network.load_state_dict(saved["state_dict"])
        network, record, is_main = run_step(config, method, entry, steps, 0, network, logger, names, train=False,
                                            examples_path=run_dir / EXAMPLES_FILE if len(steps) == 1 else None)
    else:
        console.print(f"[bold]{method_name}[/]: training step 0 ({len(steps[0]) - 1} classes)")
        pl.seed_everything(config["seed"], verbose=False)
        network = build_network(config, [len(steps[0])])
        network, record, is_main = run_step(config, method, entry, steps, 0, network, logger, names,
                                            examples_path=run_dir / EXAMPLES_FILE if len(steps) == 1 else None)
        if is_main:
            _save_atomically({"state_dict": network.state_dict(), "classes_per_step": [len(steps[0])]}, cache)
    results["steps"].append(record)
    _write_results(run_dir, results, is_main)
    if logger:
        log_task_step(logger.experiment, 0, record["summary"])
    for step in range(1, len(steps)):
        console.print(f"[bold]{method_name}[/]: step {step} (classes {steps[step][0]}-{steps[step][-1]})")
        last = step == len(steps) - 1
        network, record, is_main = run_step(config, method, entry, steps, step, network, logger, names,
                                            examples_path=run_dir / EXAMPLES_FILE if last else None)
        results["steps"].append(record)
        _write_results(run_dir, results, is_main)
        if logger:
            log_task_step(logger.experiment, step, record["summary"])
    results["final"] = summarize_run([r["summary"] for r in results["steps"]])
    if all(r.get("validation") for r in results["steps"]):
        # What a hyper-parameter search optimises (final/val/...): held-out training images.
        results["final_validation"] = summarize_run([r["validation"]["summary"] for r in results["steps"]])
    results["complete"] = True
    _write_results(run_dir, results, is_main)
    if is_main:
        figures = {"figures/per_class_iou": plot_per_class_iou(results, run_dir / "per_class_iou.png")}
        if (run_dir / EXAMPLES_FILE).exists():
            figures["figures/qualitative"] = plot_experiment_qualitative(
                run_dir / "qualitative.png", {method_name: load_examples(run_dir / EXAMPLES_FILE)}, names)
        if logger:
            log_figures_to_wandb(figures, logger)
    if logger:
        logger.experiment.summary.update({f"final/{k}": v for k, v in results["final"].items() if not math.isnan(v)})
        logger.experiment.summary.update({f"final/val/{k}": v for k, v in results.get("final_validation", {}).items()
                                          if not math.isnan(v)})
        logger.experiment.finish()
    return results


def _json_safe(value):
    """NaN (a class or group without ground truth) becomes null: standard JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _write_results(run_dir: Path, results: dict, is_main: bool) -> None:
    """results.json (everything), metrics.csv (one row per step), per_class_iou.csv, config.yaml."""
    if not is_main:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    temporary = run_dir / "results.json.tmp"
    temporary.write_text(json.dumps(_json_safe(results), indent=1, default=float, allow_nan=False))
    temporary.replace(run_dir / "results.json")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(results["config"], sort_keys=False))
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        keys = list(results["steps"][0]["summary"])
        writer = csv.writer(f)
        writer.writerow(["step", *keys])
        for record in results["steps"]:
            writer.writerow([record["step"], *(record["summary"][k] for k in keys)])
    with open(run_dir / "per_class_iou.csv", "w", newline="") as f:
        columns = list(results["steps"][-1]["iou"])
        writer = csv.writer(f)
        writer.writerow(["step", *columns])
        for record in results["steps"]:
            writer.writerow([record["step"], *(record["iou"].get(c) for c in columns)])


# --- the experiment -------------------------------------------------------------------------
def prepare(config: dict) -> list[list[int]]:
    """Everything that can be wrong with the experiment, checked before any training: the task,
    the methods and their hyper-parameters, the dataset (generated here if synthetic)."""
    data = config["data"]
    steps = task_classes(data["dataset"], data["task"])
    for name, entry in config["methods"].items():
        build_method(name, **{k: v for k, v in (entry or {}).items() if k != "schedule"})
    datasets.locate(data["dataset"], data["root"], data.get("options"))
    return steps


def run_experiment(config: dict) -> dict[str, dict]:
    steps = prepare(config)
    started = time.time()
    results = {name: run_method(config, name, steps) for name in config["methods"]}
    rows = comparison_rows(config, results)
    out_dir = Path(config["output_dir"]) / config["name"]
    write_comparison(out_dir, config, rows)
    print_comparison(console, config, rows)
    if all(r.get("complete") for r in results.values()):
        figures = write_experiment_figures(out_dir, results, per_class=False)
        examples = {name: load_examples(path) for name in results
                    if (path := out_dir / name / f"seed{config['seed']}" / EXAMPLES_FILE).exists()}
        if examples:
            names = datasets.class_names(config["data"]["dataset"], config["data"].get("options"))
            figures["figures/qualitative"] = plot_experiment_qualitative(out_dir / "qualitative.png", examples, names)
        # The experiment's own wandb run (job_type "summary", in the experiment's group): the
        # comparison table and the figures that span methods.
        log_summary_run(config["name"], "summary", run_tags(config, "summary"),
                        table_rows=rows, figures=figures, config=dict(config, setting=str(config["data"]["task"])),
                        project=(config.get("logger") or {}).get("project", "ciss"),
                        mode=wandb_mode((config.get("logger") or {}).get("wandb", "auto")),
                        save_dir=out_dir)
    console.print(f"total {time.time() - started:.0f} s; results in {out_dir}/")
    return results


def quiet_libraries() -> None:
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        from experiments.config import experiment_names
        print(__doc__ + "\nexperiments: " + ", ".join(experiment_names()))
        return 0 if argv else 2
    quiet_libraries()
    try:
        config = resolve(apply_overrides(load_experiment(argv[0]), argv[1:]))
        prepare(config)
    except (ValueError, datasets.DatasetMissing) as error:  # ConfigError is a ValueError
        console.print(f"[red]error:[/] {error}", soft_wrap=True)
        return 1
    try:
        run_experiment(config)
    except PretrainedWeightsUnavailable as error:
        console.print(f"[red]error:[/] {error}", soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
