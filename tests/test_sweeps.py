"""Sweep files (experiments/sweeps/*.yaml) and the sweep runner (experiments/sweep.py).

Every sweep file is a valid wandb sweep whose command becomes a run that experiments.run accepts,
with every swept value at its dotted key; grid and random enumeration by hand; one local sweep of
two tiny runs end to end, through the same subprocess command a user's sweep runs.
"""
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from experiments import sweep
from experiments.config import ConfigError, apply_overrides, load_experiment
from lightning_modules.methods import build_method
from tests.conftest import TINY_OVERRIDES

SWEEP_NAMES = sweep.sweep_names()
VALIDATION_KEY = "data.validation_fraction=0.1"


def _validation_fraction_accepted() -> bool:
    try:
        apply_overrides(load_experiment("synthetic_15_5_disjoint"), [VALIDATION_KEY])
        return True
    except ConfigError:
        return False


VALIDATION_FRACTION = _validation_fraction_accepted()


def _without_validation_fraction(command):
    """The command as the tests can run it before the lead's data.validation_fraction exists."""
    return command if VALIDATION_FRACTION else [c for c in command if c != VALIDATION_KEY]


def _get(config, dotted):
    node = config
    for key in dotted.split("."):
        node = node[key]
    return node


def test_the_three_sweeps_exist():
    assert {"mib_kd", "wilson", "lr_epochs"} <= set(SWEEP_NAMES)


@pytest.mark.parametrize("name", SWEEP_NAMES)
def test_a_sweep_file_is_a_valid_sweep(name):
    config = sweep.load_sweep(name)
    assert sweep.validate_sweep(config) == []  # wandb's schema where `sweeps` imports, and ours
    package = sweep.sweeps_package()
    if package is not None:
        assert package.schema_violations_from_proposed_config(config) == []
    command = config["command"]
    assert command[:4] == ["${env}", "${interpreter}", "-m", "experiments.run"]
    assert "${args_no_hyphens}" in command or "${args}" in command
    assert VALIDATION_KEY in command  # the metric needs held-out training images
    assert config["metric"]["name"] in ("final/val/all_no_bg", "final/val/hiou_no_bg")
    assert config["metric"]["goal"] == "maximize"
    assert config["method"] in ("grid", "random")
    experiment = load_experiment(command[4])
    fixed = [c for c in command[5:] if "=" in c and c != VALIDATION_KEY]
    for key, spec in config["parameters"].items():
        example = spec["values"][0] if "values" in spec else spec.get("value", spec.get("min"))
        # a real key of the experiment (a misspelt one is a ConfigError)...
        changed = apply_overrides(experiment, fixed + [f"{key}={example}"])
        if key.startswith("methods."):
            # ...and, under methods.<name>, a hyper-parameter the method accepts
            method, hparam = key.split(".")[1:3]
            assert list(changed["methods"]) == [method]
            build_method(method, **{hparam: example})


@pytest.mark.parametrize("name", SWEEP_NAMES)
def test_a_sweep_command_makes_a_run_with_every_swept_value(name):
    """Without training: the expanded argv, parsed as experiments.run parses it, holds every
    value of a parameter set at its dotted key, for one method the registry builds."""
    config = sweep.load_sweep(name)
    command = _without_validation_fraction(config["command"])
    for params in sweep.parameter_sets(config, count=3, seed=1):
        argv = sweep.expand_command(command, params)
        assert argv[:3] == [sys.executable, "-m", "experiments.run"]
        experiment = sweep.run_config(argv)
        resolved = experiment.to_dict()
        assert len(resolved["methods"]) == 1  # one method per sweep run
        for key, value in params.items():
            if key == "methods":
                assert list(resolved["methods"]) == [value]
            else:
                assert _get(resolved, key) == value, key
        for method in experiment.methods:
            build_method(method, **experiment.run_config(method).hparams)


@pytest.mark.xfail(not VALIDATION_FRACTION, reason="lead adds data.validation_fraction", strict=True)
@pytest.mark.parametrize("name", SWEEP_NAMES)
def test_the_run_gets_the_held_out_fraction(name):
    config = sweep.load_sweep(name)
    params = sweep.parameter_sets(config, count=1)[0]
    assert sweep.run_config(sweep.expand_command(config["command"], params)).data.validation_fraction == 0.1


def test_expand_command_follows_the_wandb_agent():
    params = {"methods.mib.kd_weight": 5, "schedule.incremental.lr": 0.001, "flag": True}
    command = ["${env}", "${interpreter}", "-m", "experiments.run", "exp", "methods=[mib]"]
    assert sweep.expand_command(command + ["${args_no_hyphens}"], params) == [
        sys.executable, "-m", "experiments.run", "exp", "methods=[mib]",
        "methods.mib.kd_weight=5", "schedule.incremental.lr=0.001", "flag=True"]
    assert sweep.expand_command(command + ["${args}"], params)[-3:] == [
        "--methods.mib.kd_weight=5", "--schedule.incremental.lr=0.001", "--flag=True"]
    with pytest.raises(sweep.SweepError, match="program"):
        sweep.expand_command(["${program}"], params)


def test_a_grid_is_every_combination_in_file_order():
    config = {"method": "grid", "parameters": {
        "a": {"values": [1, 2]}, "fixed": {"value": "x"}, "b": {"values": [0.1, 0.2, 0.3]}}}
    assert sweep.parameter_sets(config) == [
        {"a": 1, "fixed": "x", "b": 0.1}, {"a": 1, "fixed": "x", "b": 0.2}, {"a": 1, "fixed": "x", "b": 0.3},
        {"a": 2, "fixed": "x", "b": 0.1}, {"a": 2, "fixed": "x", "b": 0.2}, {"a": 2, "fixed": "x", "b": 0.3}]
    assert sweep.parameter_sets(config, count=2) == sweep.parameter_sets(config)[:2]


def test_random_draws_stay_in_bounds_and_repeat_with_the_seed():
    config = {"method": "random", "parameters": {
        "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1},
        "weight": {"distribution": "uniform", "min": 0.5, "max": 2.0},
        "epoch": {"distribution": "int_uniform", "min": 1, "max": 6},
        "inferred_int": {"min": 2, "max": 4},
        "step": {"distribution": "q_uniform", "min": 0.0, "max": 1.0, "q": 0.25},
        "alpha": {"values": [0.5, 0.9]}, "fixed": {"value": 3}}}
    sets = sweep.parameter_sets(config, count=200, seed=7)
    assert len(sets) == 200
    for s in sets:
        assert 1e-4 <= s["lr"] <= 1e-1 and 0.5 <= s["weight"] <= 2.0
        assert s["epoch"] in range(1, 7) and isinstance(s["epoch"], int) and s["inferred_int"] in (2, 3, 4)
        assert s["step"] in (0.0, 0.25, 0.5, 0.75, 1.0) and s["alpha"] in (0.5, 0.9) and s["fixed"] == 3
    assert {s["epoch"] for s in sets} == set(range(1, 7))  # both ends drawn
    small = [s["lr"] < 1e-3 for s in sets]  # log-uniform: about a third of the draws per decade
    assert 0.2 < sum(small) / len(small) < 0.5
    assert sweep.parameter_sets(config, count=5, seed=7) == sets[:5]
    assert sweep.parameter_sets(config, count=5, seed=8) != sets[:5]
    assert len(sweep.parameter_sets({**config, "run_cap": 4})) == 4  # the file's run_cap by default


def test_bad_sweeps_are_refused_in_one_line():
    good = sweep.load_sweep("mib_kd")
    assert "method 'grd'" in " ".join(sweep.validate_sweep({**good, "method": "grd"}))
    assert "final/val" in " ".join(sweep.validate_sweep({**good, "metric": {"name": "final/test/all_no_bg",
                                                                          "goal": "maximize"}}))
    assert "args" in " ".join(sweep.validate_sweep({**good, "command": good["command"][:-1]}))
    assert "a grid needs" in " ".join(sweep.validate_sweep({**good, "parameters": {"x": {"min": 0, "max": 1}}}))
    random_sweep = {**good, "method": "random", "parameters": {"x": {"distribution": "normal", "min": 0, "max": 1}}}
    assert "normal" in " ".join(sweep.validate_sweep(random_sweep))
    with pytest.raises(sweep.SweepError, match="unknown sweep 'nope'; available: .*mib_kd"):
        sweep.load_sweep("nope")


def test_a_misspelt_key_stops_a_local_sweep_before_any_run(tmp_path, capsys):
    assert sweep.main(["mib_kd", "--local", "--", "data.bacth_size=4", f"output_dir={tmp_path}"]) == 1
    assert "unknown config key 'data.bacth_size'" in capsys.readouterr().out
    assert not (tmp_path / "sweeps").exists()


def test_online_needs_a_login(monkeypatch, tmp_path, capsys):
    for variable in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert sweep.main(["mib_kd"]) == 1
    out = capsys.readouterr().out
    assert "wandb login" in out and "LOCAL=1" in out and len(out.strip().splitlines()) <= 3


def test_online_creates_the_sweep_and_runs_the_agent(monkeypatch):
    """Logged in: wandb.sweep gets the file's configuration, the overrides after -- appended to
    the command, and wandb.agent runs it with the venv's python first on PATH."""
    import wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("PATH", "/usr/bin")
    calls = {}
    monkeypatch.setattr(wandb, "sweep", lambda config, project: calls.update(config=config, project=project) or "abc")
    monkeypatch.setattr(wandb, "agent", lambda sweep_id, project, count: calls.update(agent=(sweep_id, project, count)))
    assert sweep.main(["mib_kd", "--count", "3", "--project", "p", "--", "data.batch_size=8"]) == 0
    assert calls["project"] == "p" and calls["agent"] == ("abc", "p", 3)
    file_command = sweep.load_sweep("mib_kd")["command"]
    command = calls["config"]["command"]
    assert command[:len(file_command)] == file_command and command[-2:] == ["data.batch_size=8", "logger.project=p"]
    assert command[len(file_command)].startswith("output_dir=runs/sweeps/mib_kd-")  # not among plain runs
    assert calls["config"]["parameters"] == sweep.load_sweep("mib_kd")["parameters"]
    assert os.environ["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def test_dry_run_prints_every_command_and_runs_nothing(tmp_path, capsys):
    assert sweep.main(["lr_epochs", "--dry-run", "--experiment", "synthetic_15_5_overlap", "--",
                       f"output_dir={tmp_path}"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "experiments.run" in line]
    assert len(lines) == 15 and all("synthetic_15_5_overlap" in line and "methods=mib" in line for line in lines)
    assert not (tmp_path / "sweeps").exists()


def test_a_bayes_sweep_without_scikit_learn_says_what_to_install(tmp_path, capsys):
    try:
        import sklearn  # noqa: F401
        pytest.skip("scikit-learn is installed: bayes would run")
    except ImportError:
        pass
    config_path = tmp_path / "bayes.yaml"
    config = {**sweep.load_sweep("wilson"), "method": "bayes", "name": "bayes"}
    config_path.write_text(yaml.safe_dump(config))
    assert sweep.main([str(config_path), "--local", "--", f"output_dir={tmp_path}"]) == 1
    assert "scikit-learn" in capsys.readouterr().out


def test_a_local_bayes_sweep_feeds_each_result_back(tmp_path, monkeypatch):
    """With `sweeps` and scikit-learn installed (optional): proposals come from sweeps.next_run,
    which sees the metric of every earlier run. Runs are faked: no training."""
    if sweep.sweeps_package() is None:
        pytest.skip("the `sweeps` package (with jsonschema, jsonref) is not importable")
    pytest.importorskip("sklearn")
    config = {**sweep.load_sweep("mib_kd"), "method": "bayes", "name": "bayes", "parameters": {
        "methods.mib.kd_weight": {"distribution": "log_uniform_values", "min": 1.0, "max": 100.0},
        "methods.mib.kd_alpha": {"values": [0.5, 1.0, 2.0]}}}
    seen = []

    def fake_run(argv, env):
        params = dict(a.split("=", 1) for a in argv if a.startswith("methods.mib."))
        weight = float(params["methods.mib.kd_weight"])
        run_dir = [a.split("=", 1)[1] for a in argv if a.startswith("output_dir=")][-1]  # the runner's, last
        seen.append(weight)
        results = tmp_path / run_dir / "exp" / "mib" / "results.json"
        results.parent.mkdir(parents=True)
        results.write_text(json.dumps({"final_validation": {"hiou_no_bg": 1.0 / (1.0 + abs(weight - 10.0))}}))
        return 0

    monkeypatch.setattr(sweep.subprocess, "call", fake_run)
    monkeypatch.chdir(tmp_path)
    assert sweep.run_local(config, count=6, extra=["output_dir=runs"]) == 0
    assert len(seen) == 6 and all(1.0 <= w <= 100.0 for w in seen)
    (summary,) = (tmp_path / "runs" / "sweeps").glob("bayes-*/summary.csv")
    assert len(summary.read_text().splitlines()) == 7


def test_a_local_sweep_runs_each_set_and_tables_the_metric(tmp_path, monkeypatch, capsys):
    """Two tiny MiB runs (44 s for both on 2 idle cores, the second with the step-0 model from the
    cache) through the same subprocess command a user's sweep runs."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = sweep.load_sweep("mib_kd")
    config.update(name="tiny", command=_without_validation_fraction(config["command"]),
                  parameters={"methods.mib.kd_weight": {"values": [2, 7]}})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    tiny = [o for o in TINY_OVERRIDES if not o.startswith("logger.wandb")]  # wandb offline, as a user's
    overrides = tiny + [f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'runs'}",
                        f"cache_dir={tmp_path / 'cache'}"]

    assert sweep.main([str(path), "--local", "--", *overrides]) == 0

    (sweep_dir,) = (tmp_path / "runs" / "sweeps").iterdir()
    runs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [r.name for r in runs] == ["run-01", "run-02"]
    for run_dir, kd_weight in zip(runs, (2, 7)):
        (saved,) = run_dir.rglob("seed42/config.yaml")
        saved_config = yaml.safe_load(saved.read_text())
        assert saved_config["method"] == "mib" and saved_config["hparams"]["kd_weight"] == kd_weight
        assert saved_config["data"]["crop_size"] == 32  # the overrides after -- reached the run
        (results,) = run_dir.rglob("results.json")
        assert json.loads(results.read_text())["complete"] is True
        assert list(run_dir.rglob("offline-run-*"))  # a wandb offline run, uploadable with wandb sync
    out = capsys.readouterr().out
    assert "kd_weight" in out and "final/val/hiou_no_bg" in out
    summary = (sweep_dir / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("run,methods.mib.kd_weight,final/val/hiou_no_bg") and len(summary) == 3
    for run_dir in runs:  # the metric read back is results.json's final_validation value, or n/a
        (results,) = run_dir.rglob("results.json")
        expected = (json.loads(results.read_text()).get("final_validation") or {}).get("hiou_no_bg")
        assert sweep.read_metric(run_dir, "final/val/hiou_no_bg") == expected
        if VALIDATION_FRACTION:
            assert isinstance(expected, float) and 0.0 <= expected <= 1.0, (run_dir.name, expected)
