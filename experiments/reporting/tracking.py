"""wandb: the mode (online when the user has an account, offline otherwise), one run per method
and seed grouped and tagged for a dashboard, and one "summary" run per experiment that holds the
comparison table and the experiment's figures.

How runs are organised (docs/tracking.md and experiments/dashboard.py build on it):
  group     the experiment name (voc_15_5_disjoint); every method and seed of it
  job_type  the method (mib, wilson, ...) or "summary" / "compare"
  tags      experiment, method, dataset, setting (15-5), mode (disjoint), supervision
            (pixel-labels / image-labels), seed<k>
  config    the resolved experiment config plus method, setting, supervision, seed, world size
            and effective batch, so that panels can group by any of them
"""
from __future__ import annotations

import math
import os
from pathlib import Path

TASK_STEP_METRIC = "task_step"  # the x-axis of the per-step curves ("task/..." keys)


def wandb_mode(setting: str) -> str:
    """"auto": online when the user has configured wandb (WANDB_MODE, an API key or a login),
    offline otherwise; "online", "offline", "disabled" as given."""
    if setting != "auto":
        return setting
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if has_wandb_login() else "offline"


def has_wandb_login() -> bool:
    """Whether the user has a wandb account configured: WANDB_API_KEY, or `wandb login`'s entry in
    ~/.netrc (for the default host or the WANDB_BASE_URL one)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    return netrc.is_file() and host in netrc.read_text()


def run_tags(name: str, data, seed: int, job: str, supervision: str | None = None) -> list[str]:
    """What a dashboard filters on (job: the method, or "summary"); wandb tags are at most 64
    characters. `data`: the data section of the experiment."""
    tags = [name, job, data.dataset, str(data.task), data.mode,
            *([f"{supervision}-labels"] if supervision else []), f"seed{seed}"]
    return [tag[:64] for tag in dict.fromkeys(tags)]


def build_logger(config, supervision: str, run_dir: Path, wandb_id: str | None = None):
    """The Lightning WandbLogger of one method's run (a RunConfig; False when wandb is disabled); a
    resumed run passes its wandb_id and continues the same wandb run."""
    mode = wandb_mode(config.logger.wandb)
    if mode == "disabled":
        return False
    from pytorch_lightning.loggers import WandbLogger

    from experiments.distributed import world_size
    from experiments.training import effective_batch

    run_config = dict(config.to_dict(), setting=str(config.data.task), supervision=supervision,
                      world_size=world_size(config.trainer), effective_batch=effective_batch(config))
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(project=config.logger.project, group=config.experiment, job_type=config.method,
                       name=f"{config.experiment}-{config.method}-seed{config.seed}", save_dir=str(run_dir), mode=mode,
                       config=run_config, tags=run_tags(config.experiment, config.data, config.seed, config.method,
                                                        supervision),
                       log_model=False, id=wandb_id, resume="allow" if wandb_id else None,
                       # No system-metrics sampling or console capture: on a 2-core machine the
                       # service's sampling competes with training, and the console is in the log.
                       settings=_quiet_settings())


def _quiet_settings():
    import wandb

    return wandb.Settings(x_disable_stats=True, console="off", x_disable_meta=True, quiet=True)


def define_task_step_metrics(run) -> None:
    """Plot "task/*" against the incremental step, not wandb's internal step counter."""
    run.define_metric(TASK_STEP_METRIC)
    run.define_metric("task/*", step_metric=TASK_STEP_METRIC)


def log_task_step(run, step: int, summary: dict) -> None:
    """One point per incremental step: task/old_no_bg, task/all_with_bg, ... at task_step = t."""
    run.log({TASK_STEP_METRIC: step, **{f"task/{k}": v for k, v in summary.items() if not _missing(v)}})


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def log_summary_run(experiment: str, job_type: str, tags: list[str], table_rows: list[dict] | None = None,
                    figures: dict | None = None, config: dict | None = None, project: str = "ciss",
                    mode: str | None = None, save_dir=None):
    """One wandb run of `job_type` in the experiment's group: `table_rows` as the wandb.Table
    "comparison" and `figures` ({key: PNG path}) as images. mode: as wandb_mode, "disabled"
    logs nothing. Returns the run's local directory (None when disabled)."""
    mode = mode or wandb_mode("auto")
    if mode == "disabled":
        return None
    import wandb

    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, job_type=job_type, group=experiment, name=f"{experiment}-{job_type}",
                     tags=[tag[:64] for tag in dict.fromkeys(tags)], mode=mode,
                     dir=None if save_dir is None else str(save_dir), config=config or {"experiment": experiment},
                     reinit="finish_previous", settings=_quiet_settings())
    try:
        logged = {}
        if table_rows:
            columns = list(dict.fromkeys(key for row in table_rows for key in row))
            data = [[None if _missing(row.get(key)) else row.get(key) for key in columns] for row in table_rows]
            logged["comparison"] = wandb.Table(columns=columns, data=data)
        for key, path in (figures or {}).items():
            logged[key] = wandb.Image(str(path))
        if logged:
            run.log(logged)
        return Path(run.dir).parent
    finally:
        run.finish()
