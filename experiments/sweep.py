"""Hyper-parameter sweeps (what `make sweep SWEEP=<name> [LOCAL=1] [COUNT=n]` calls):

    python -m experiments.sweep <name> [--local] [--count N] [--seed S] [--project ciss]
                                [--experiment EXP] [--dry-run] [-- key=value ...]

A sweep is a wandb sweep file, experiments/sweeps/<name>.yaml (or a path): `method` (grid,
random, bayes), `metric` (a final/val/... summary key: a held-out part of the training images,
never the test set), `parameters` (dotted config keys) and a `command` that calls
`experiments.run` for one method, the swept values as `key=value` overrides on the command line
(`${args_no_hyphens}`, or `${args}` for `--key=value`): every DDP rank reads them from there,
never from wandb.config.

Online (logged in to wandb): wandb creates the sweep and `wandb.agent` runs the command, with
the venv's python first on PATH (the agent runs `/usr/bin/env python`), output_dir
<output_dir>/sweeps/<name>-<time> and logger.project=<project> appended, and the overrides
after `--`.
--local: no server. The parameter sets are enumerated here and the SAME command is run for each,
one after another, with WANDB_MODE=offline unless set (upload later with `wandb sync`); then a
table of parameter values and metric, read back from each run's results.json
(results["final_validation"]), best first. Each run writes under
<output_dir>/sweeps/<name>-<time>/run-NN/ (output_dir: the experiment's, or an `output_dir=`
given after `--`); the step-0 cache is shared as usual.

Local search methods:
  grid    every combination of the `values` lists (a `value` is constant), in file order;
          --count N keeps the first N.
  random  N seeded draws (--count, default the file's run_cap, else 10) per parameter from
          `value`, `values` (optionally with `probabilities`), or `min`/`max` with
          `distribution`: uniform, log_uniform_values (min/max are values), log_uniform
          (min/max are natural logs), int_uniform (both ends included), q_uniform (q, default 1).
          Without `distribution`, int min/max mean int_uniform and others uniform (as wandb).
  bayes   one proposal at a time from the `sweeps` package (`sweeps.next_run`, Gaussian
          process; needs scikit-learn), fed with the metric of the runs so far.
Not supported locally: nested `parameters`, the normal/beta distributions; early_terminate is ignored.

Extra `key=value` overrides after `--` are appended to every run's command (tests use them to
shrink the experiment), after the swept values, so they win over them.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import random
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from experiments.config import ConfigError, apply_overrides, load_experiment, resolve

SWEEPS_DIR = Path(__file__).resolve().parent / "sweeps"
ENTRY_POINT = "experiments.run"
ARGS_MACROS = ("${args_no_hyphens}", "${args}")
METHODS = ("grid", "random", "bayes")
DISTRIBUTIONS = ("uniform", "log_uniform_values", "log_uniform", "int_uniform", "q_uniform")
DEFAULT_RANDOM_COUNT = 10
console = Console()


class SweepError(ValueError):
    """A bad sweep file or an impossible request; the message is one line for the user."""


# --- the sweep file -------------------------------------------------------------------------
def sweep_names() -> list[str]:
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))


def load_sweep(name: str) -> dict:
    """The sweep configuration `name` (experiments/sweeps/<name>.yaml) or the file at path `name`
    (ending in .yaml/.yml), as a plain dict in file order, comments dropped."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else SWEEPS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise SweepError(f"unknown sweep {name!r}; available: {', '.join(sweep_names())}")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict):
        raise SweepError(f"{path}: not a sweep configuration (a YAML mapping)")
    return config


def sweeps_package():
    """The `sweeps` package (wandb's search algorithms), or None where it cannot be imported
    (not installed, or installed with --no-deps but without jsonschema/jsonref)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydantic's "allow_population_by_field_name" rename warning
        try:
            import sweeps
        except ImportError:
            return None
    return sweeps


def validate_sweep(config: dict) -> list[str]:
    """The problems of a sweep configuration, [] if none: wandb's schema (through the `sweeps`
    package, where it is importable) and this project's rules: a command that calls
    experiments.run with an args placeholder and no ${program}, a final/val/... metric with a
    goal, and parameters that this module's local runner can enumerate."""
    problems = []
    package = sweeps_package()
    if package is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            problems += [f"wandb schema: {p}" for p in package.schema_violations_from_proposed_config(config)]
    method = config.get("method")
    if method not in METHODS:
        problems.append(f"method {method!r} is not one of {', '.join(METHODS)}")
    metric = config.get("metric")
    if not isinstance(metric, dict) or not str(metric.get("name", "")).startswith("final/val/"):
        problems.append("metric.name must be a final/val/<key> summary (held-out training images, never the test set)")
    elif metric.get("goal") not in ("maximize", "minimize"):
        problems.append("metric.goal must be maximize or minimize")
    command = config.get("command")
    if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
        problems.append("command must be a list of strings")
    else:
        if ENTRY_POINT not in command or command[command.index(ENTRY_POINT) - 1] != "-m" \
                or command.index(ENTRY_POINT) + 1 >= len(command):
            problems.append(f"command must call `-m {ENTRY_POINT} <experiment>`")
        if sum(command.count(m) for m in ARGS_MACROS) != 1:
            problems.append(f"command must hold exactly one of {' '.join(ARGS_MACROS)}")
        if "${program}" in command or "program" in config:
            problems.append("the command calls the entry point itself: no `program`/${program}")
    parameters = config.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        problems.append("parameters must be a non-empty mapping of dotted config keys")
        return problems
    for key, spec in parameters.items():
        problems += [f"parameter {key}: {p}" for p in _parameter_problems(spec, method)]
    return problems


def _parameter_problems(spec, method) -> list[str]:
    if not isinstance(spec, dict):
        return ["must be a mapping (value, values, or min/max)"]
    if "parameters" in spec:
        return ["nested parameters are not supported"]
    if "value" in spec or "values" in spec:
        if "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
            return ["values must be a non-empty list"]
        return []
    if method == "grid":
        return ["a grid needs `values` (or a constant `value`)"]
    if "min" not in spec or "max" not in spec:
        return ["needs value, values, or min and max"]
    distribution = spec.get("distribution")
    if distribution is not None and distribution not in DISTRIBUTIONS:
        return [f"distribution {distribution!r} is not one of {', '.join(DISTRIBUTIONS)}"]
    if not spec["min"] < spec["max"]:
        return ["min must be below max"]
    if distribution == "log_uniform_values" and spec["min"] <= 0:
        return ["log_uniform_values needs min > 0"]
    return []


def check_sweep(config: dict) -> None:
    problems = validate_sweep(config)
    if problems:
        raise SweepError(f"sweep {config.get('name', '?')}: " + "; ".join(problems))


# --- parameter sets and commands ------------------------------------------------------------
def parameter_sets(config: dict, count: int | None = None, seed: int = 0) -> list[dict]:
    """The parameter sets a local grid or random sweep runs, each {dotted key: value} in file
    order. Grid: every combination, the last parameter varying fastest (itertools.product over
    the `values` lists in file order), the first `count` if given. Random: `count` draws
    (default: run_cap, else 10) from a random.Random(seed), so the same seed gives the same sets.
    Bayes sets depend on earlier results: see run_local."""
    method, parameters = config.get("method"), config["parameters"]
    if method == "grid":
        choices = [spec["values"] if "values" in spec else [spec["value"]] for spec in parameters.values()]
        sets = [dict(zip(parameters, combination)) for combination in itertools.product(*choices)]
        return sets if count is None else sets[:count]
    if method == "random":
        rng = random.Random(seed)
        count = count or config.get("run_cap") or DEFAULT_RANDOM_COUNT
        return [{key: draw(spec, rng) for key, spec in parameters.items()} for _ in range(count)]
    raise SweepError(f"{method!r} parameter sets are proposed one at a time from earlier results; "
                     "parameter_sets enumerates grid and random sweeps")


def draw(spec: dict, rng: random.Random):
    """One value of a random sweep's parameter (see the module docstring for what is supported)."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choices(spec["values"], weights=spec.get("probabilities"))[0]
    low, high = spec["min"], spec["max"]
    distribution = spec.get("distribution") or (
        "int_uniform" if isinstance(low, int) and isinstance(high, int) else "uniform")
    if distribution == "uniform":
        return rng.uniform(low, high)
    if distribution == "log_uniform_values":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if distribution == "log_uniform":
        return math.exp(rng.uniform(low, high))
    if distribution == "int_uniform":
        return rng.randint(int(low), int(high))
    if distribution == "q_uniform":
        q = spec.get("q", 1.0)
        return min(max(round(rng.uniform(low, high) / q) * q, low), high)
    raise SweepError(f"distribution {distribution!r} is not supported locally ({', '.join(DISTRIBUTIONS)})")


def expand_command(command: list[str], params: dict) -> list[str]:
    """The argv of one run, expanded as wandb's agent does it: ${env} -> nothing (the agent's
    /usr/bin/env only finds `python` on PATH), ${interpreter} -> this Python (sys.executable),
    ${args_no_hyphens} -> `key=value` per parameter, ${args} -> `--key=value`; values are
    formatted with str() as the agent does (so avoid None: it would arrive as the string "None")."""
    argv = []
    for chunk in command:
        if chunk == "${env}":
            continue
        if chunk == "${interpreter}":
            argv.append(sys.executable)
        elif chunk == "${args_no_hyphens}":
            argv += [f"{key}={value}" for key, value in params.items()]
        elif chunk == "${args}":
            argv += [f"--{key}={value}" for key, value in params.items()]
        elif chunk.startswith("${") and chunk.endswith("}"):
            raise SweepError(f"command macro {chunk} is not supported (use ${{env}}, ${{interpreter}}, ${{args}}, "
                             "${args_no_hyphens})")
        else:
            argv.append(chunk)
    return argv


def with_experiment(command: list[str], experiment: str) -> list[str]:
    """The command with another experiment after `-m experiments.run` (--experiment, EXP=)."""
    command = list(command)
    command[command.index(ENTRY_POINT) + 1] = experiment
    return command


def run_arguments(argv: list[str]) -> tuple[str, list[str]]:
    """(experiment, overrides): what `python -m experiments.run` receives from argv."""
    position = argv.index(ENTRY_POINT)
    return argv[position + 1], argv[position + 2:]


def run_config(argv: list[str]):
    """The resolved configuration a run's argv stands for (what experiments.run would train),
    without training: raises ConfigError for an unknown key or experiment."""
    experiment, overrides = run_arguments(argv)
    return resolve(apply_overrides(load_experiment(experiment), overrides))


def _plain(value):
    """numpy scalars (sweeps' proposals) as Python numbers, so argv and tables look as typed."""
    return value.item() if type(value).__module__ == "numpy" else value


# --- results ------------------------------------------------------------------------------
def read_metric(run_dir: Path, metric: str) -> float | None:
    """The sweep metric final/val/<key> of a finished run under run_dir: results.json's
    results["final_validation"][<key>] (one method per run); None when missing."""
    key = metric.removeprefix("final/val/")
    values = []
    for path in sorted(Path(run_dir).rglob("results.json")):
        try:
            value = (json.loads(path.read_text()).get("final_validation") or {}).get(key)
        except (OSError, ValueError):
            continue
        if isinstance(value, (int, float)) and not math.isnan(value):
            values.append(float(value))
    return values[0] if len(values) == 1 else None


def _short_names(keys: list[str]) -> dict[str, str]:
    """Column titles: the last part of each dotted key, or more where two would collide."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[-n:])
            if sum(k.endswith(name) for k in keys) == 1 or n == len(parts):
                names[key] = name
                break
    return names


def _format(value) -> str:
    """A value for a table cell: draws like 0.0031622776601683794 shortened to 4 digits."""
    if isinstance(value, float) and len(repr(value)) > 7:
        return f"{value:.4g}"
    return str(value)


def print_table(config: dict, records: list[dict]) -> None:
    metric, goal = config["metric"]["name"], config["metric"]["goal"]
    keys = list(dict.fromkeys(k for r in records for k in r["params"]))
    titles = _short_names(keys)
    table = Table(title=f"sweep {config.get('name', '')}: {metric} ({goal}, held-out training images)")
    table.add_column("run")
    for key in keys:
        table.add_column(titles[key], justify="right")
    table.add_column(metric, justify="right", style="bold")
    table.add_column("s", justify="right")
    for record in sort_records(records, goal):
        value = record["metric"]
        cell = "n/a" if value is None else f"{100 * value:.1f}"
        if record["returncode"] != 0:
            cell = f"failed (exit {record['returncode']})"
        table.add_row(record["run"], *(escape(_format(record["params"].get(k, ""))) for k in keys), cell,
                      f"{record['seconds']:.0f}")
    console.print(table)
    console.print("metric in % (n/a: no results[\"final_validation\"] in the run's results.json)")


def sort_records(records: list[dict], goal: str) -> list[dict]:
    """Best first by the metric (maximize: largest), runs without a metric last."""
    sign = -1 if goal == "maximize" else 1
    return sorted(records, key=lambda r: (r["metric"] is None, sign * (r["metric"] or 0.0)))


def write_summary(sweep_dir: Path, config: dict, records: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in records for k in r["params"]))
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", *keys, config["metric"]["name"], "returncode", "seconds", "dir"])
        for r in sort_records(records, config["metric"]["goal"]):
            writer.writerow([r["run"], *(r["params"].get(k) for k in keys), r["metric"], r["returncode"],
                             round(r["seconds"], 1), r["dir"]])


# --- running --------------------------------------------------------------------------------
def run_local(config: dict, count: int | None = None, seed: int = 0, extra: list[str] = (),
              dry_run: bool = False) -> int:
    """Run the sweep here, one run after another; 0 when every run exited 0."""
    check_sweep(config)
    name, method = config.get("name", "sweep"), config["method"]
    extra = list(extra)
    probe = expand_command(config["command"], {}) + extra
    base = Path(_checked_config(probe).output_dir)
    sweep_dir = base / "sweeps" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")

    if method == "bayes":
        try:
            from sweeps import bayes_search  # noqa: F401  (needs jsonschema, jsonref and scikit-learn)
        except ImportError:
            raise SweepError("a bayes sweep needs the `sweeps` package with scikit-learn here: "
                             "pip install --no-deps sweeps==0.3.0 && pip install jsonschema jsonref scikit-learn "
                             "(or run it online on wandb, or use grid/random locally)")
        total = count or config.get("run_cap") or DEFAULT_RANDOM_COUNT
        proposals = None
    else:
        proposals = parameter_sets(config, count, seed)
        total = len(proposals)
        for params in proposals:  # a misspelt key fails here, not after hours of runs
            _checked_config(expand_command(config["command"], params) + extra)

    records = []
    if not dry_run:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        console.print(f"[bold]sweep {escape(name)}[/] ({method}, {total} runs) in {escape(str(sweep_dir))}/, "
                      f"WANDB_MODE={env['WANDB_MODE']}", highlight=False)
    try:
        for index in range(total):
            if proposals is not None:
                params = proposals[index]
            else:
                params = _bayes_proposal(config, records, seed + index)  # dry run: no results to learn from
                if params is None:
                    break
            run = f"run-{index + 1:02d}"
            run_dir = sweep_dir / run
            argv = expand_command(config["command"], params) + extra + [f"output_dir={run_dir}"]
            if proposals is None:
                _checked_config(argv)
            shown = escape("  ".join(f"{k}={_format(v)}" for k, v in params.items()))
            if dry_run:
                console.print(escape(f"[{index + 1}/{total}] {shlex.join(argv)}"), soft_wrap=True, highlight=False)
                continue
            console.rule(f"[bold]{escape(name)}[/] run {index + 1}/{total}: {shown}")
            started = time.time()
            returncode = subprocess.call(argv, env=env)
            record = {"run": run, "params": params, "returncode": returncode, "seconds": time.time() - started,
                      "metric": read_metric(run_dir, config["metric"]["name"]), "dir": str(run_dir)}
            records.append(record)
            value = "n/a" if record["metric"] is None else f"{100 * record['metric']:.1f}"
            status = "[green]done[/]" if returncode == 0 else f"[red]failed (exit {returncode})[/]"
            console.print(f"[bold]{escape(name)}[/] run {index + 1}/{total} {status} in {record['seconds']:.0f} s: "
                          f"{config['metric']['name']} = {value}  ({shown})", highlight=False)
            write_summary(sweep_dir, config, records)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        if records:
            print_table(config, records)
        return 130
    if dry_run:
        return 0
    if records:
        print_table(config, records)
        console.print(f"table: {sweep_dir / 'summary.csv'}", highlight=False)
        if any(sweep_dir.rglob("offline-run-*")):
            console.print(f"upload the offline wandb runs: wandb sync $(find {sweep_dir} -type d -name 'offline-run-*')",
                          highlight=False, soft_wrap=True)
    return 0 if records and all(r["returncode"] == 0 for r in records) else 1


def _checked_config(argv: list[str]) -> dict:
    try:
        return run_config(argv)
    except ConfigError as error:
        raise SweepError(f"a run of this sweep would fail: {error} (command: {shlex.join(argv[1:])})") from error


def _bayes_proposal(config: dict, history: list[dict], seed: int) -> dict | None:
    """The next parameter set of a bayes sweep (sweeps.next_run over the finished runs)."""
    import numpy as np

    sweeps = sweeps_package()
    metric = config["metric"]["name"]
    runs = [sweeps.SweepRun(
        name=r["run"], config={k: {"value": v} for k, v in r["params"].items()},
        state=sweeps.RunState.finished if r["metric"] is not None else sweeps.RunState.failed,
        summary_metrics={metric: r["metric"]} if r["metric"] is not None else {}) for r in history]
    np.random.seed(seed)  # sweeps draws its candidates from numpy's global generator
    random.seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proposal = sweeps.next_run(config, runs, validate=False)
    if proposal is None:
        return None
    return {key: _plain(proposal.config[key]["value"]) for key in config["parameters"]}


def run_online(config: dict, project: str, count: int | None, extra: list[str]) -> int:
    """Create the sweep on wandb and run its agent here (the agent runs the command)."""
    check_sweep(config)
    import wandb

    base = Path(_checked_config(expand_command(config["command"], {}) + list(extra)).output_dir)
    online = dict(config)
    # Files go under <output_dir>/sweeps/ (the agent's runs would otherwise land among the
    # experiment's own results; they overwrite each other there, wandb keeps every run); the
    # extra overrides are part of every run's command; the runs log to the sweep's project.
    online["command"] = list(config["command"]) + [
        f"output_dir={base / 'sweeps' / (config.get('name', 'sweep') + time.strftime('-%Y%m%d-%H%M%S'))}",
        *extra, f"logger.project={project}"]
    # The agent runs `/usr/bin/env python ...`: make that python this one (the venv's).
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    try:
        sweep_id = wandb.sweep(online, project=project)
        wandb.agent(sweep_id, project=project, count=count)
    except wandb.errors.Error as error:
        console.print(f"[red]error:[/] wandb: {escape(str(error))}", soft_wrap=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = []
    if "--" in argv:
        position = argv.index("--")
        argv, extra = argv[:position], argv[position + 1:]
    parser = argparse.ArgumentParser(
        prog="python -m experiments.sweep", description=__doc__,
        epilog="sweeps: " + ", ".join(sweep_names()), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="a sweep in experiments/sweeps/ or a path to a sweep YAML file")
    parser.add_argument("--local", action="store_true", help="run here without a wandb server")
    parser.add_argument("--count", type=int, default=None,
                        help="runs at most (grid: all by default; random/bayes: run_cap, else 10 locally; "
                             "online: until the sweep ends or Ctrl-C)")
    parser.add_argument("--seed", type=int, default=0, help="of the local random/bayes proposals")
    parser.add_argument("--project", default="ciss", help="wandb project (online)")
    parser.add_argument("--experiment", default=None, help="another experiment for the command (e.g. voc_15_5_disjoint)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of a local sweep, run nothing")
    args = parser.parse_args(argv)
    bad = [o for o in extra if "=" not in o]
    if bad:
        parser.error(f"after --, overrides are key=value: {' '.join(bad)}")
    try:
        config = load_sweep(args.name)
        if args.experiment:
            config["command"] = with_experiment(config["command"], args.experiment)
        if args.local or args.dry_run:
            return run_local(config, args.count, args.seed, extra, dry_run=args.dry_run)
        from experiments.reporting.tracking import wandb_mode

        if wandb_mode("auto") != "online":
            console.print("[red]error:[/] wandb is not logged in (or WANDB_MODE is not online): run `wandb login` "
                          f"for an online sweep, or run it here with `make sweep SWEEP={args.name} LOCAL=1` "
                          "(python -m experiments.sweep ... --local)", soft_wrap=True)
            return 1
        return run_online(config, args.project, args.count, extra)
    except (SweepError, ConfigError) as error:
        console.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
