"""The step loop: `python -m experiments.run <experiment> [key=value ...]` (what `make run` calls).

For every method of the experiment: take the step-0 model (trained once per step-0 setting and
cached, experiments.step0_cache), then for t >= 1 snapshot the old model, add and initialise the
classifier of the new classes, run the method's stage, train with the method's losses, and test
on the classes seen so far. Each run's results go to its own directory (experiments.store), the
experiment's table and figures to runs/<experiment>/ (experiments.reporting).
"""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations' import-time version check

import pytorch_lightning as pl
from rich.markup import escape

from datamodules import datasets
from datamodules.incremental import UnreadableSample
from datamodules.tasks import NUM_FOREGROUND, class_span, task_classes
from datamodules.validate import check_dataset
from experiments import reporting, step0_cache
from experiments.config import ConfigError, Experiment, apply_overrides, load_experiment, resolve
from experiments.distributed import agree, is_global_zero, world_size
from experiments.reporting.qualitative import EXAMPLES_FILE
from experiments.reporting.table import table_console
from experiments.reporting.tracking import build_logger, define_task_step_metrics
from experiments.store import RunStore, run_directory
from experiments.training import build_step, effective_batch, fit_and_test, lr_scale, uses_sync_batchnorm
from lightning_modules.methods import build_method
from lightning_modules.methods.base import MethodUnavailable
from lightning_modules.metrics import summarize_run
from lightning_modules.module import NonFiniteLoss
from lightning_modules.network import PretrainedWeightsUnavailable

console = table_console()


# --- the algorithm ---------------------------------------------------------------------------
def learn_task(config, method, steps, store: RunStore, logger, names, progress=None) -> None:
    """Every step of the task for one method, from where the run stands (store.next_step).
    `progress(method, step, seconds, how)`, when given, is told of each finished step."""
    network = store.resumed_network()
    for step in range(store.next_step, len(steps)):
        started = time.time()
        examples = store.directory / EXAMPLES_FILE if step == len(steps) - 1 else None
        span = class_span(steps[step])   # "16-20", or "15 classes" when not contiguous (a few-shot base step)
        console.print(f"[bold]{config.method}[/]: step {step} ({span if 'classes' in span else 'classes ' + span})")
        # Everything random of a step (new classifier weights, data order) from (seed, step), not
        # from what this process ran before: a run resumed between steps continues exactly.
        pl.seed_everything(config.seed + step, verbose=False)
        if step == 0:
            network, record, how = first_step(config, method, steps, store, logger, names, examples)
        else:
            # The old model f^{t-1}; the new classifier for the step's classes, initialised by the
            # method; then the method's stage, its training data, training and the test.
            old_network = network.frozen_copy() if method.uses_old_model else None
            network.add_classes(len(steps[step]))
            method.init_new_classifier(network, old_network)
            built = build_step(config, method, steps, step, network, old_network, names)
            record = fit_and_test(config, built, logger, checkpoint_file=store.fit_checkpoint(step),
                                  examples_path=examples)
            how = "trained"
        store.finish_step(record, network)
        reporting.log_step(logger, record)
        if progress is not None:
            progress(config.method, step, time.time() - started, how)


def first_step(config, method, steps, store, logger, names, examples):
    """Step 0: the cached model of this step-0 setting (tested again for this run), or train it
    (resumably) and cache it. Returns (network, the step's record, "tested" or "trained")."""
    cache = step0_cache.model_path(config, method, steps)
    if agree(cache.exists()):
        console.print(f"  step 0 from cache {cache}")
        network = step0_cache.load(cache, method, config)
        built = build_step(config, method, steps, 0, network, class_names=names)
        return network, fit_and_test(config, built, logger, train=False, examples_path=examples), "tested"
    network = method.build_network(config.network, [len(steps[0])])  # seeded: the same in every process
    built = build_step(config, method, steps, 0, network, class_names=names)
    record = fit_and_test(config, built, logger, checkpoint_file=store.fit_checkpoint(0), examples_path=examples)
    if is_global_zero():
        step0_cache.save(cache, network, method)
    return network, record, "trained"


# --- one method's run -------------------------------------------------------------------------
def run_method(experiment: Experiment, method_name: str, steps, progress=None) -> dict:
    """One method's run, resumable (experiments.store): a complete run of the same configuration
    is reused; an interrupted one continues. `progress`: see learn_task (steps done before are
    reported as "reused")."""
    config = experiment.run_config(method_name)
    method = build_method(method_name, **config.hparams)
    store = RunStore(config, method)
    saved = store.open()
    if store.complete:
        console.print(f"[bold]{method_name}[/]: complete results in {store.directory} reused "
                      "(resume=false runs it again)")
        _report_reused(progress, method_name, store.results["steps"])
        return store.results
    if saved and saved["steps"]:
        console.print(f"[bold]{method_name}[/]: resuming after step {saved['steps'][-1]['step']} ({store.directory})")
        _report_reused(progress, method_name, saved["steps"])
    # What make compare needs of the experiment beside this run: its paper numbers, its methods' order.
    store.results.update(expected=experiment.expected, experiment_methods=list(experiment.methods))
    names = reporting.class_names(config.data)
    logger = build_logger(config, method.supervision, store.directory, wandb_id=store.results.get("wandb_id"))
    if logger:
        define_task_step_metrics(logger.experiment)
        if is_global_zero():
            store.results["wandb_id"] = getattr(logger.experiment, "id", None)
    store.write()  # the configuration, before anything is trained
    learn_task(config, method, steps, store, logger, names, progress)

    results = store.results
    results["final"] = summarize_run([r["summary"] for r in results["steps"]])
    if all(r.get("validation") for r in results["steps"]):
        # What a hyper-parameter search optimises (final/val/...): held-out training images.
        results["final_validation"] = summarize_run([r["validation"]["summary"] for r in results["steps"]])
    results["complete"] = True
    store.write()
    reporting.finish_run(config, results, store.directory, logger, is_global_zero())
    return results


def _report_reused(progress, method_name: str, done_steps: list[dict]) -> None:
    for record in done_steps if progress is not None else ():
        progress(method_name, record["step"], 0.0, "reused")


# --- the experiment -------------------------------------------------------------------------
def prepare(experiment: Experiment) -> list[list[int]]:
    """Everything that can be wrong with the experiment beyond its configuration (checked at load),
    before any training: the task, the dataset (generated here if synthetic), every image and mask
    (decoded once, cached per file list: a broken file, a mask of another size or with a class the
    dataset does not have stops the run here, naming the file)."""
    data = experiment.data
    steps = task_classes(data.dataset, data.task)
    located = datasets.locate(data.dataset, data.root, data.options)
    check_dataset(located, NUM_FOREGROUND[data.dataset])
    return steps


def describe_processes(experiment: Experiment) -> None:
    """One line per distinct training setting: processes, batch, lr scaling, precision."""
    lines = {}
    for name in experiment.methods:
        config = experiment.run_config(name)
        t = config.trainer
        line = (f"effective batch {effective_batch(config)} = {world_size(t)} process(es) x {config.data.batch_size} "
                f"images x {t.accumulate_grad_batches} accumulation; lr x{lr_scale(config):g} (reference batch "
                f"{config.optimizer.reference_batch}{'' if config.optimizer.scale_lr else ', scaling off'}); "
                f"precision {t.precision}")
        lines.setdefault(line, []).append(name)
    for line, names in lines.items():
        console.print(f"{line}" + (f" [{', '.join(names)}]" if len(lines) > 1 else ""))
    if world_size(experiment.trainer) > 1:
        config = experiment.run_config(next(iter(experiment.methods)))
        console.print(f"{world_size(experiment.trainer)} processes; batch norm "
                      + ("synchronised (SyncBatchNorm)" if uses_sync_batchnorm(config) else
                         "per process (SyncBatchNorm needs GPUs)" if experiment.trainer.sync_batchnorm else
                         "per process (trainer.sync_batchnorm=false)"))


def run_experiment(experiment: Experiment, steps: list[list[int]] | None = None, progress=None,
                   unavailable: dict[str, str] | None = None) -> dict[str, dict]:
    """Every method of the experiment; `steps` when prepare(experiment) has already run. A method
    that cannot run here (MethodUnavailable) is reported in one line and left out (its reason put
    in `unavailable` when given); the others run. `progress`: see learn_task."""
    steps = steps if steps is not None else prepare(experiment)
    started = time.time()
    if is_global_zero():
        describe_processes(experiment)
    results = {}
    unavailable = {} if unavailable is None else unavailable
    for name in experiment.methods:
        try:
            results[name] = run_method(experiment, name, steps, progress)
        except MethodUnavailable as error:  # this method only: the others still run
            unavailable[name] = str(error)
            console.print(f"[red]error:[/] {name}:", escape(str(error)), soft_wrap=True, highlight=False)
    if unavailable and not results:
        raise MethodUnavailable("; ".join(f"{name}: {message}" for name, message in unavailable.items()))
    run_dirs = {name: run_directory(experiment.run_config(name)) for name in results}
    if is_global_zero():  # results, figures and logs: the main process only
        reporting.finish_experiment(experiment, results, run_dirs, console)
        console.print(f"total {time.time() - started:.0f} s; results in {experiment.output_dir}/{experiment.name}/")
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
        experiment = resolve(apply_overrides(load_experiment(argv[0]), argv[1:]))
        steps = prepare(experiment)
    except (ConfigError, ValueError, datasets.DatasetMissing) as error:
        console.print("[red]error:[/]", escape(str(error)), soft_wrap=True, highlight=False)
        return 1
    try:
        results = run_experiment(experiment, steps)
    except MethodUnavailable:
        return 1   # said in one line per method by run_experiment
    except (PretrainedWeightsUnavailable, NonFiniteLoss, UnreadableSample) as error:
        console.print("[red]error:[/]", escape(str(error)), soft_wrap=True, highlight=False)
        return 1
    return 0 if set(results) == set(experiment.methods) else 1


if __name__ == "__main__":
    sys.exit(main())
