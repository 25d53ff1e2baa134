"""Reporting: what a run and an experiment show once trained.

  table        the comparison table (WILSON's layout, both conventions, the paper's numbers)
  figures      PNG figures (steps, per-class IoU, qualitative sheets), drawn from saved results
  qualitative  the fixed test images and each method's predictions behind the qualitative figure
  tracking     wandb: one run per method and seed, grouped and tagged; one summary run per experiment

`finish_run` and `finish_experiment` are what the step loop calls (rank 0 only).
"""
from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console

from datamodules import datasets
from experiments.reporting.figures import log_figures_to_wandb, plot_per_class_iou, write_experiment_figures
from experiments.reporting.qualitative import EXAMPLES_FILE, load_examples, plot_experiment_qualitative
from experiments.reporting.table import comparison_rows, print_comparison, write_comparison
from experiments.reporting.tracking import log_summary_run, log_task_step, run_tags, wandb_mode


def class_names(data) -> dict[int, str]:
    return datasets.class_names(data.dataset, data.options)


def log_step(logger, record: dict) -> None:
    if logger:
        log_task_step(logger.experiment, record["step"], record["summary"])


def finish_run(config, results: dict, directory: Path, logger, is_main: bool) -> None:
    """A complete run: its per-class figure, its qualitative figure, its final numbers on wandb."""
    if is_main and config.figures.draw:
        figures = {"figures/per_class_iou": plot_per_class_iou(results, directory / "per_class_iou.png")}
        if (directory / EXAMPLES_FILE).exists():
            figures["figures/qualitative"] = plot_experiment_qualitative(
                directory / "qualitative.png", {config.method: load_examples(directory / EXAMPLES_FILE)},
                class_names(config.data))
        if logger:
            log_figures_to_wandb(figures, logger)
    if logger:
        summary = logger.experiment.summary
        summary.update({f"final/{k}": v for k, v in results["final"].items() if not math.isnan(v)})
        summary.update({f"final/val/{k}": v for k, v in results.get("final_validation", {}).items()
                        if not math.isnan(v)})
        logger.experiment.finish()


def finish_experiment(experiment, results: dict[str, dict], run_dirs: dict[str, Path], console: Console) -> None:
    """The experiment's table (runs/<experiment>/comparison.md, printed), and once every method is
    complete its figures (steps, qualitative) and its wandb summary run. These describe the latest
    invocation; each run's own results stay in its directory (make compare reads them all)."""
    out_dir = Path(experiment.output_dir) / experiment.name
    rows = comparison_rows(experiment, results)
    write_comparison(out_dir, experiment, rows)
    print_comparison(console, experiment, rows)
    if not all(r.get("complete") for r in results.values()):
        return
    figures = {}
    if experiment.figures.draw:
        figures = write_experiment_figures(out_dir, results, per_class=False)
        examples = {name: load_examples(path) for name in results
                    if (path := run_dirs[name] / EXAMPLES_FILE).exists()}
        if examples:
            figures["figures/qualitative"] = plot_experiment_qualitative(out_dir / "qualitative.png", examples,
                                                                         class_names(experiment.data))
    # The experiment's own wandb run (job_type "summary", in the experiment's group): the
    # comparison table and the figures that span methods.
    log_summary_run(experiment.name, "summary", run_tags(experiment.name, experiment.data, experiment.seed, "summary"),
                    table_rows=rows, figures=figures, config=dict(experiment.to_dict(), setting=str(experiment.data.task)),
                    project=experiment.logger.project, mode=wandb_mode(experiment.logger.wandb), save_dir=out_dir)
