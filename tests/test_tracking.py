"""wandb organisation: groups, job types, tags and config keys a dashboard filters on; the
experiment's summary run; the per-step curves. wandb.init is replaced by a recorder (no service)."""
import math

import pytest

from experiments.reporting import tracking
from experiments.config import apply_overrides, load_experiment, resolve


@pytest.fixture
def config():
    return resolve(apply_overrides(load_experiment("synthetic_15_5_overlap"), ["seed=7", "trainer.devices=2"]))


def test_run_tags_name_experiment_method_setting_supervision_and_seed(config):
    assert tracking.run_tags(config.name, config.data, config.seed, "wilson", "image") == [
        "synthetic_15_5_overlap", "wilson", "synthetic", "15-5", "overlap", "image-labels", "seed7"]
    assert tracking.run_tags(config.name, config.data, config.seed, "summary") == [
        "synthetic_15_5_overlap", "summary", "synthetic", "15-5", "overlap", "seed7"]
    assert all(len(tag) <= 64 for tag in tracking.run_tags("x" * 80, config.data, 1, "mib", "pixel"))


def test_build_logger_groups_by_experiment_and_records_what_panels_group_by(config, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = tracking.build_logger(config.run_config("mib"), "pixel", tmp_path / "run")
    init = logger._wandb_init  # what WandbLogger will pass to wandb.init (not started here)
    assert (init["group"], init["job_type"], init["name"], init["mode"]) == (
        "synthetic_15_5_overlap", "mib", "synthetic_15_5_overlap-mib-seed7", "offline")
    assert "pixel-labels" in init["tags"] and "seed7" in init["tags"]
    run_config = init["config"]
    assert (run_config["method"], run_config["setting"], run_config["supervision"], run_config["seed"]) == (
        "mib", "15-5", "pixel", 7)
    assert run_config["world_size"] == 2 and run_config["effective_batch"] == 2 * config.data.batch_size
    # no system-metrics sampling or console capture competing with training on a small machine
    settings = init["settings"]
    assert settings.x_disable_stats is True and settings.console == "off"


def test_build_logger_disabled(config, tmp_path, monkeypatch):
    config = apply_overrides(config, ["logger.wandb=disabled"])
    assert tracking.build_logger(config.run_config("mib"), "pixel", tmp_path / "run") is False


class Recorder:
    def __init__(self):
        self.logged, self.defined, self.finished = [], [], False
        self.dir = "/tmp/wandb/offline-run-x/files"

    def log(self, data):
        self.logged.append(data)

    def define_metric(self, name, step_metric=None):
        self.defined.append((name, step_metric))

    def finish(self):
        self.finished = True


def test_task_step_curves_use_the_incremental_step_as_x_axis():
    run = Recorder()
    tracking.define_task_step_metrics(run)
    tracking.log_task_step(run, 1, {"old_no_bg": 0.5, "new_no_bg": float("nan"), "all_no_bg": 0.4})
    assert run.defined == [("task_step", None), ("task/*", "task_step")]
    assert run.logged == [{"task_step": 1, "task/old_no_bg": 0.5, "task/all_no_bg": 0.4}]  # NaN left out


def test_summary_run_logs_the_table_and_the_figures(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    run, calls = Recorder(), {}
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.update(kwargs) or run)
    figure = tmp_path / "steps.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(figure)
    rows = [{"method": "mib", "old": 0.5, "new": math.nan}, {"method": "ft", "old": 0.0, "hiou": 0.1}]
    tracking.log_summary_run("exp", "summary", ["exp", "summary", "exp"], table_rows=rows,
                             figures={"figures/steps_no_bg": figure}, mode="offline", save_dir=tmp_path / "wb")
    assert (calls["job_type"], calls["group"], calls["name"], calls["mode"]) == ("summary", "exp", "exp-summary",
                                                                                 "offline")
    assert calls["tags"] == ["exp", "summary"]  # duplicates dropped
    (logged,) = run.logged
    table = logged["comparison"]
    assert table.columns == ["method", "old", "new", "hiou"]
    assert table.data == [["mib", 0.5, None, None], ["ft", 0.0, None, 0.1]]  # NaN and missing -> None
    assert isinstance(logged["figures/steps_no_bg"], wandb.Image) and run.finished


def test_summary_run_disabled_logs_nothing(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setattr(wandb, "init", lambda **kwargs: pytest.fail("wandb.init called"))
    assert tracking.log_summary_run("exp", "summary", [], mode="disabled") is None
