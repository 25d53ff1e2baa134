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
import shutil
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations' import-time version check

import pytorch_lightning as pl
import torch
import yaml
from rich.console import Console

from callbacks.checkpointing import AtomicCheckpointIO, RandomStateCallback, save_atomically
from callbacks.figures import log_figures_to_wandb, plot_per_class_iou, write_experiment_figures
from callbacks.teacher import TeacherCallback
from datamodules import datasets
from datamodules.incremental import IncrementalSegmentationDataModule, UnreadableSample
from datamodules.tasks import NUM_FOREGROUND, channel_order, task_classes
from datamodules.validate import DatasetFileError, check_dataset
from experiments.config import apply_overrides, load_experiment, resolve
from experiments.qualitative import (EXAMPLES_FILE, choose_examples, load_examples, plot_experiment_qualitative,
                                      predict_examples, save_examples)
from experiments.report import comparison_rows, print_comparison, write_comparison
from experiments.tracking import (build_logger, define_task_step_metrics, log_summary_run, log_task_step, run_tags,
                                  wandb_mode, world_size)
from lightning_modules.methods import build_method
from lightning_modules.metrics import summarize_run
from lightning_modules.module import IncrementalSegmentationModule, NonFiniteLoss
from lightning_modules.network import PretrainedWeightsUnavailable, SegmentationNetwork

STEP0_CACHE_VERSION = 2  # 2: per-(epoch, image) augmentation seeds, batches independent of the process count
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
        eval_crop_size=data.get("eval_crop_size"), seed=config["seed"] + step,
        on_unreadable=data.get("on_unreadable", "stop"))


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


def effective_batch(config: dict) -> int:
    """Images per optimizer update: processes x per-process batch x gradient accumulation."""
    return world_size(config) * config["data"]["batch_size"] * int(config["trainer"]["accumulate_grad_batches"])


def lr_scale(config: dict) -> float:
    """Linear scaling of every lr from the experiment's reference batch (PROTOCOL.md §6), unless
    optimizer.scale_lr is false."""
    optimizer = config["optimizer"]
    reference = optimizer.get("reference_batch") or config["data"]["batch_size"]
    return effective_batch(config) / reference if optimizer.get("scale_lr", True) else 1.0


def build_trainer(config: dict, epochs: int, logger, callbacks: list, checkpoint_file: Path | None = None) -> pl.Trainer:
    """One Trainer per step. With `checkpoint_file`, a Lightning checkpoint of the step is written
    there (atomically) every checkpoint.every_n_epochs epochs, with the random states."""
    t = config["trainer"]
    processes = world_size(config)
    strategy = "ddp" if t["strategy"] == "auto" and processes > 1 else t["strategy"]
    callbacks = callbacks + [RandomStateCallback(), pl.callbacks.RichProgressBar(leave=False)]
    if checkpoint_file is not None:
        callbacks.append(pl.callbacks.ModelCheckpoint(
            dirpath=checkpoint_file.parent, filename=checkpoint_file.stem, save_top_k=1, save_last=False,
            every_n_epochs=config["checkpoint"]["every_n_epochs"], save_on_train_epoch_end=True,
            enable_version_counter=False))
    return pl.Trainer(
        max_epochs=epochs, logger=logger, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
        accelerator=t["accelerator"], devices=t["devices"], num_nodes=t["num_nodes"], strategy=strategy,
        precision=t["precision"], accumulate_grad_batches=t["accumulate_grad_batches"],
        sync_batchnorm=uses_sync_batchnorm(config),
        # The datamodule shards by itself (datamodules.sampling): the same global batches for any
        # number of processes, and no padded duplicates in the test set.
        use_distributed_sampler=False,
        enable_checkpointing=checkpoint_file is not None, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, log_every_n_steps=t["log_every_n_steps"], default_root_dir=config["output_dir"],
        deterministic=t["deterministic"],
        # A few batches per epoch and per test: the smoke test of every experiment file.
        limit_train_batches=t["limit_train_batches"], limit_test_batches=t["limit_test_batches"])


def uses_sync_batchnorm(config: dict) -> bool:
    """SyncBatchNorm under DDP (PROTOCOL.md §6) on GPUs. PyTorch implements it for GPUs only, so
    CPU processes keep per-process batch norm (and say so at the start)."""
    t = config["trainer"]
    on_gpu = t["accelerator"] in ("gpu", "cuda") or (t["accelerator"] == "auto" and torch.cuda.is_available())
    return bool(t["sync_batchnorm"]) and world_size(config) > 1 and on_gpu


def agree(value):
    """Rank 0's `value` on every process once the processes exist. Before (the first step of the
    first method), every process decides from the same files, so they agree anyway."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]
    return value


def is_global_zero() -> bool:
    from pytorch_lightning.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


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
        "precision": config["trainer"]["precision"], "effective_batch": effective_batch(config),
        "lr_scale": lr_scale(config), "sync_batchnorm": config["trainer"]["sync_batchnorm"],
        "validation_fraction": data.get("validation_fraction", 0.0),
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(config["cache_dir"]) / f"step0-{digest}.pt"


# --- one step -------------------------------------------------------------------------------
def run_step(config, method, method_entry, steps, step, network, logger, names, train=True, examples_path=None,
             checkpoint_file: Path | None = None, resume: bool = True):
    """Train step `step` (unless `train` is False: a cached step-0 model) and test it; with
    `examples_path`, also save the qualitative examples (experiments.qualitative) there. With
    `checkpoint_file`, the step's training is checkpointed there and (with `resume`) resumed from
    it if it exists."""
    pl.seed_everything(config["seed"] + step, verbose=False)
    schedule = schedule_for(config, method_entry, step)
    datamodule = build_datamodule(config, method, steps, step)
    trainer_cfg = config["trainer"]
    module = IncrementalSegmentationModule(
        network, method, steps, step, lr=schedule["lr"] * lr_scale(config), momentum=config["optimizer"]["momentum"],
        nesterov=config["optimizer"]["nesterov"], weight_decay=config["optimizer"]["weight_decay"],
        poly_power=config["optimizer"]["poly_power"], class_names=[names.get(c, str(c)) for c in channel_order(steps, step)],
        channels_last=trainer_cfg["channels_last"], compile_network=trainer_cfg["compile"])
    trainer = build_trainer(config, schedule["epochs"], logger, [TeacherCallback(len(steps[step]))],
                            checkpoint_file=checkpoint_file if train else None)
    started = time.time()
    if train:
        resume_from = agree(resume and checkpoint_file is not None and checkpoint_file.exists())
        if resume_from:
            console.print(f"  resuming step {step} from {checkpoint_file}")
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(checkpoint_file) if resume_from else None)
    train_seconds = time.time() - started
    validation = None
    datamodule.setup("test")  # idempotent; a cached step 0 has not been through fit's setup
    if datamodule.val_set is not None:
        module.evaluation_split = datamodule.evaluated_split = "val"
        trainer.test(module, datamodule=datamodule, verbose=False)
        validation = {"images": len(datamodule.val_set), "summary": module.test_summary}
        module.evaluation_split = datamodule.evaluated_split = "test"
    trainer.test(module, datamodule=datamodule, verbose=False)
    count = (config.get("figures") or {}).get("qualitative_images", 0)
    if examples_path is not None and count and trainer.is_global_zero:
        positions = choose_examples(datamodule.test_presence[datamodule.test_indices], steps[: step + 1], count)
        save_examples(examples_path, predict_examples(module, datamodule.test_set, positions, datamodule.test_presence))
    # The network leaves the step uncompiled (configure_model compiles it for fit and for test):
    # the next step deep-copies it as its teacher, and a compiled call would still point at this
    # (live) network.
    network._compiled_call_impl = None
    record = {
        "step": step, "classes": steps[step], "trained": train, "train_images": len(datamodule.train_set),
        "test_images": len(datamodule.test_set), "train_seconds": round(train_seconds, 1),
        "unreadable_skipped": len(module.unreadable),
        "iou": {module.class_names[i]: (None if math.isnan(v) else float(v)) for i, v in enumerate(module.test_iou)},
        "summary": module.test_summary, "confusion": module.test_confusion.tolist(), "validation": validation,
    }
    return module.network, record, trainer.is_global_zero


# --- one method: its steps, resumable --------------------------------------------------------
def run_fingerprint(config: dict, method_name: str) -> str:
    """What makes two runs the same run: the resolved config (without how it is logged or drawn)
    and the method. A saved run with another fingerprint is not resumed."""
    relevant = {k: v for k, v in config.items() if k not in ("logger", "figures", "resume")}
    text = json.dumps({"config": relevant, "method": method_name}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _nan_for_null(summary: dict) -> dict:
    """A summary read back from results.json: the null means-of-nothing become NaN again."""
    return {k: (math.nan if v is None else v) for k, v in summary.items()}


def _restore_record(record: dict) -> dict:
    record = dict(record, summary=_nan_for_null(record["summary"]))
    if record.get("validation"):
        record["validation"] = dict(record["validation"], summary=_nan_for_null(record["validation"]["summary"]))
    return record


def saved_run(run_dir: Path, fingerprint: str) -> dict | None:
    """The results saved by an earlier start of the same run (same fingerprint), or None."""
    path = run_dir / "results.json"
    try:
        saved = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if saved.get("fingerprint") != fingerprint:
        return None
    saved["steps"] = [_restore_record(r) for r in saved.get("steps", [])]
    for key in ("final", "final_validation"):
        if saved.get(key):
            saved[key] = _nan_for_null(saved[key])
    return saved


def _load_network(config: dict, path: Path) -> SegmentationNetwork:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    network = build_network(config, saved["classes_per_step"], pretrained=False)
    network.load_state_dict(saved["state_dict"])
    return network


def _network_state(network: SegmentationNetwork) -> dict:
    return {"state_dict": network.state_dict(), "classes_per_step": list(network.classifier.classes_per_step)}


def run_directory(config: dict, method_name: str) -> Path:
    """One directory per seed, so that repeated runs are kept side by side for `make compare`."""
    return Path(config["output_dir"]) / config["name"] / method_name / f"seed{config['seed']}"


def run_method(config: dict, method_name: str, steps) -> dict:
    """Every step of one method, resumable: results.json is rewritten after each step, the
    network after each step is kept in checkpoints/step<t>.pt and a step in progress is
    checkpointed in checkpoints/fit-step<t>.ckpt; started again with the same config
    (config.resume, default true), the run continues from there, and a complete run is reused."""
    entry = dict(config["methods"][method_name] or {})
    method = build_method(method_name, **{k: v for k, v in entry.items() if k != "schedule"})
    run_dir = run_directory(config, method_name)
    checkpoints = run_dir / "checkpoints"
    names = datasets.class_names(config["data"]["dataset"], config["data"].get("options"))
    fingerprint = run_fingerprint(config, method_name)
    previous = agree(saved_run(run_dir, fingerprint) if config.get("resume", True) else None)
    if previous and previous.get("complete"):
        console.print(f"[bold]{method_name}[/]: complete results in {run_dir} reused (resume=false runs it again)")
        return previous

    if previous is None and is_global_zero() and checkpoints.exists():
        shutil.rmtree(checkpoints)  # another config's (or resume=false): never resumed from
    # Training checkpoints are resumed only within the same run (same fingerprint): a fresh start
    # never reads one, whatever another process may not have deleted yet.
    fit_checkpoints = previous is not None
    done = (previous or {}).get("steps", [])
    network_file = checkpoints / f"step{done[-1]['step']}.pt" if done else None
    resumable = agree(network_file is not None and network_file.exists())
    logger = build_logger(config, method_name, method.supervision, run_dir, effective_batch=effective_batch(config),
                          wandb_id=(previous or {}).get("wandb_id"))
    if logger:
        define_task_step_metrics(logger.experiment)
    results = {"experiment": config["name"], "method": method_name, "hparams": method.hparams(),
               "complete": False, "fingerprint": fingerprint, "steps": [], "config": config,
               "wandb_id": getattr(logger.experiment, "id", None) if logger and is_global_zero() else None}
    if resumable:
        network = _load_network(config, network_file)
        results["steps"] = done
        console.print(f"[bold]{method_name}[/]: resuming after step {done[-1]['step']} ({network_file})")
    else:
        _write_results(run_dir, results, is_global_zero())  # the fingerprint, before anything is trained
        cache = step0_cache_path(config, method, steps)
        cached = agree(cache.exists())
        examples = run_dir / EXAMPLES_FILE if len(steps) == 1 else None
        if cached:
            console.print(f"[bold]{method_name}[/]: step 0 from cache {cache}")
            network = _load_network(config, cache)
            network, record, is_main = run_step(config, method, entry, steps, 0, network, logger, names,
                                                train=False, examples_path=examples)
        else:
            console.print(f"[bold]{method_name}[/]: training step 0 ({len(steps[0]) - 1} classes)")
            pl.seed_everything(config["seed"], verbose=False)
            network = build_network(config, [len(steps[0])])
            network, record, is_main = run_step(config, method, entry, steps, 0, network, logger, names,
                                                examples_path=examples, checkpoint_file=checkpoints / "fit-step0.ckpt",
                                                resume=fit_checkpoints)
            if is_main:
                save_atomically(_network_state(network), cache)
        _finish_step(run_dir, results, record, network, logger, is_main)

    for step in range(len(results["steps"]), len(steps)):
        console.print(f"[bold]{method_name}[/]: step {step} (classes {steps[step][0]}-{steps[step][-1]})")
        last = step == len(steps) - 1
        network, record, is_main = run_step(config, method, entry, steps, step, network, logger, names,
                                            examples_path=run_dir / EXAMPLES_FILE if last else None,
                                            checkpoint_file=checkpoints / f"fit-step{step}.ckpt",
                                            resume=fit_checkpoints)
        _finish_step(run_dir, results, record, network, logger, is_main)

    results["final"] = summarize_run([r["summary"] for r in results["steps"]])
    if all(r.get("validation") for r in results["steps"]):
        # What a hyper-parameter search optimises (final/val/...): held-out training images.
        results["final_validation"] = summarize_run([r["validation"]["summary"] for r in results["steps"]])
    results["complete"] = True
    is_main = is_global_zero()
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


def _finish_step(run_dir: Path, results: dict, record: dict, network, logger, is_main: bool) -> None:
    """After step t: its network to checkpoints/step<t>.pt, then the record to results.json, then
    the step's training checkpoint and the previous step's network are removed. A kill between
    any two of these leaves a state the next start resumes from correctly."""
    step = record["step"]
    checkpoints = run_dir / "checkpoints"
    if is_main:
        save_atomically(_network_state(network), checkpoints / f"step{step}.pt")
    results["steps"].append(record)
    _write_results(run_dir, results, is_main)
    if is_main:
        for stale in (checkpoints / f"fit-step{step}.ckpt", checkpoints / f"step{step - 1}.pt"):
            stale.unlink(missing_ok=True)
    if logger:
        log_task_step(logger.experiment, step, record["summary"])


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
    if not results["steps"]:
        return
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
    located = datasets.locate(data["dataset"], data["root"], data.get("options"))
    # Every image and mask decoded once (cached per file list): a broken file, a mask of another
    # size or with a class the dataset does not have stops the run here, naming the file.
    check_dataset(located, NUM_FOREGROUND[data["dataset"]])
    return steps


def run_experiment(config: dict, steps: list[list[int]] | None = None) -> dict[str, dict]:
    """Every method of the experiment; `steps` when prepare(config) has already run."""
    steps = steps if steps is not None else prepare(config)
    started = time.time()
    scale, batch = lr_scale(config), effective_batch(config)
    if is_global_zero():
            console.print(f"effective batch {batch} = {world_size(config)} process(es) x {config['data']['batch_size']} "
                      f"images x {config['trainer']['accumulate_grad_batches']} accumulation; lr x{scale:g} (reference "
                      f"batch {config['optimizer']['reference_batch']}"
                      f"{'' if config['optimizer']['scale_lr'] else ', scaling off'})")
    if world_size(config) > 1 and is_global_zero():
        console.print(f"{world_size(config)} processes; batch norm "
                      + ("synchronised (SyncBatchNorm)" if uses_sync_batchnorm(config) else
                         "per process (SyncBatchNorm needs GPUs)" if config["trainer"]["sync_batchnorm"] else
                         "per process (trainer.sync_batchnorm=false)"))
    results = {name: run_method(config, name, steps) for name in config["methods"]}
    out_dir = Path(config["output_dir"]) / config["name"]
    if not is_global_zero():  # results, figures and logs: the main process only
        return results
    rows = comparison_rows(config, results)
    write_comparison(out_dir, config, rows)
    print_comparison(console, config, rows)
    if all(r.get("complete") for r in results.values()):
        figures = write_experiment_figures(out_dir, results, per_class=False)
        examples = {name: load_examples(path) for name in results
                    if (path := run_directory(config, name) / EXAMPLES_FILE).exists()}
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
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        from experiments.config import experiment_names
        print(__doc__ + "\nexperiments: " + ", ".join(experiment_names()))
        return 0 if argv else 2
    quiet_libraries()
    try:
        config = resolve(apply_overrides(load_experiment(argv[0]), argv[1:]))
        steps = prepare(config)
    except (ValueError, datasets.DatasetMissing) as error:  # ConfigError is a ValueError
        console.print(f"[red]error:[/] {error}", soft_wrap=True)
        return 1
    try:
        run_experiment(config, steps)
    except (PretrainedWeightsUnavailable, NonFiniteLoss, UnreadableSample) as error:
        console.print(f"[red]error:[/] {error}", soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
