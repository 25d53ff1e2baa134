"""PIFS's benchmark on one fold in one command: `python -m experiments.fewshot_table [EXP] [key=value ...]`
(what `make fewshot [EXP=...]` calls; EXP defaults to the embedded synthetic_5_0_fewshot).

Runs every method of the iFSS experiment with 1, 2 and 5 shots (data.fewshot.nshot; --shots to
choose) through the step loop of experiments.run: the base-step models are shared by every shot
count (and by the methods whose base step is the same: COS for PIFS and WI, FT for FT, LwF, ILT,
MiB), and a killed command continues where it stopped. One progress line per (shots, method,
step). Then writes, under the experiment's output directory:

  fewshot-<EXP>.md    a row per method, for each shot count PIFS's columns (base mIoU with
                      background, novel mIoU, their harmonic mean, as the official metrics) and the
                      time the incremental steps took (printed too)
  fewshot-<EXP>.csv   the same numbers, a line per (method, shots), with both conventions
  fewshot-<EXP>.png   the harmonic mean, base and novel per method and shot count
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from rich.table import Table

from experiments.config import ConfigError, Experiment, apply_overrides, load_experiment, resolve
from experiments.reporting.table import table_console
from experiments.table import _duration, run_command, run_experiments

DEFAULT_EXPERIMENT = "synthetic_5_0_fewshot"
SHOTS = (1, 2, 5)
DISPLAY_NAMES = {"pifs": "PIFS", "wi": "WI", "amp": "AMP", "ft": "FT", "mib": "MiB", "lwf": "LwF", "ilt": "ILT"}
# PIFS's columns (the official StreamSegMetrics: base classes with background, novel, their harmonic mean)
COLUMNS = (("base", "old_with_bg"), ("novel", "new_with_bg"), ("HM", "hiou_with_bg"))


def load_shot_experiments(name: str, overrides: list[str], shots=SHOTS) -> dict[str, Experiment]:
    """The experiment once per shot count ("1-shot", ...), with the overrides applied to each."""
    experiment = resolve(load_experiment(name))
    if experiment.data.fewshot is None:
        raise ConfigError(f"{name} has no few-shot steps (data.fewshot): the few-shot table needs an iFSS experiment, "
                          f"e.g. {DEFAULT_EXPERIMENT} or voc_fss_5_0")
    return {f"{n}-shot": resolve(apply_overrides(load_experiment(name), [*overrides, f"data.fewshot.nshot={n}"]))
            for n in shots}


def incremental_seconds(results: dict) -> float:
    """Training time of the steps >= 1 (the imprinting pass included)."""
    return sum(step["train_seconds"] for step in results["steps"] if step["step"] > 0)


def fewshot_rows(results_of: dict[str, dict[str, dict]], experiments: dict[str, Experiment]) -> list[dict]:
    """A row per method: for each shot count its final summary's PIFS columns (in %, None when the
    method did not run) and its incremental seconds."""
    methods = list(next(iter(experiments.values())).methods)
    rows = []
    for method in methods:
        row = {"method": method, "name": DISPLAY_NAMES.get(method, method)}
        for shots, results in results_of.items():
            run = results.get(method)
            if run is None:
                row[shots] = None
                continue
            final = run["final"]
            row[shots] = {column: (None if final.get(key) is None or math.isnan(final[key]) else 100 * final[key])
                          for column, key in COLUMNS}
            row[shots]["seconds"] = incremental_seconds(run)
            row[shots]["all_final"] = final
        rows.append(row)
    return rows


def _cell(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _time(seconds: float) -> str:
    return "< 1 s" if seconds < 1 else _duration(seconds)   # imprinting only: WI, AMP


def to_markdown(rows: list[dict], experiments: dict[str, Experiment], timing: str) -> str:
    shots = list(experiments)
    first = next(iter(experiments.values()))
    header = ["Method"] + [f"{s} {c}" for s in shots for c, _ in COLUMNS] + [f"{s} time" for s in shots]
    lines = [f"iFSS, {first.data.dataset} {first.data.task} ({first.name}), draw ishot={first.data.fewshot.ishot}: "
             "mIoU (%) of the base classes with background, of the novel classes, and their harmonic mean after "
             f"the last step, as PIFS reports them. Time: the incremental steps' training. {timing}", "",
             "| " + " | ".join(header) + " |", "|---|" + "--:|" * (len(header) - 1)]
    for row in rows:
        cells = [row["name"]]
        cells += [_cell(row[s][c]) if row[s] else "n/a" for s in shots for c, _ in COLUMNS]
        cells += [_time(row[s]["seconds"]) if row[s] else "n/a" for s in shots]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_table(console, rows: list[dict], experiments: dict[str, Experiment]) -> None:
    table = Table(title="iFSS: base (with bg) / novel / HM, mIoU %", title_justify="left")
    table.add_column("Method")
    for shots in experiments:
        table.add_column(shots, justify="right")
    for row in rows:
        table.add_row(row["name"], *[" / ".join(_cell(row[s][c]) for c, _ in COLUMNS) + f"  ({_time(row[s]['seconds'])})"
                                     if row[s] else "n/a" for s in experiments])
    console.print(table)


def write_csv(rows: list[dict], experiments: dict[str, Experiment], path: Path) -> Path:
    keys = ("old_with_bg", "new_with_bg", "hiou_with_bg", "old_no_bg", "new_no_bg", "hiou_no_bg", "all_with_bg")
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "nshot", *keys, "incremental_seconds"])
        for row in rows:
            for shots in experiments:
                if row[shots]:
                    final = row[shots]["all_final"]
                    writer.writerow([row["method"], experiments[shots].data.fewshot.nshot,
                                     *[final.get(k) for k in keys], round(row[shots]["seconds"], 1)])
    return path


def plot_fewshot(rows: list[dict], experiments: dict[str, Experiment], path) -> Path:
    """One panel per shot count: for each method its base, novel and HM bars."""
    from experiments.reporting.figures import BLUE, ORANGE, SKY_BLUE, _new_figure, _save, _styled

    @_styled
    def draw():
        from matplotlib.patches import Patch

        shots = list(experiments)
        figure = _new_figure(max(7.0, 1.1 * len(rows) * len(shots) / 2 + 2), 3.2)
        axes = figure.subplots(1, len(shots), squeeze=False, sharey=True)[0]
        colours = dict(zip((c for c, _ in COLUMNS), (BLUE, SKY_BLUE, ORANGE)))
        for axis, shot in zip(axes, shots):
            for position, row in enumerate(rows):
                for offset, (column, _) in zip((-0.27, 0.0, 0.27), COLUMNS):
                    value = row[shot][column] if row[shot] else None
                    if value is None:
                        continue
                    axis.bar(position + offset, value, width=0.26, color=colours[column], edgecolor="white", linewidth=0.5)
                    axis.text(position + offset, value + 0.5, f"{value:.0f}", ha="center", va="bottom", fontsize=6)
            axis.set_title(shot, loc="left")
            axis.set_xticks(range(len(rows)), [row["name"] for row in rows])
            axis.spines[["top", "right"]].set_visible(False)
            axis.grid(axis="y", alpha=0.3)
            axis.set_axisbelow(True)
        axes[0].set_ylabel("mIoU (%)")
        figure.legend(handles=[Patch(color=colours[c], label=label) for c, label in
                               zip(colours, ("base (with bg)", "novel", "harmonic mean"))],
                      loc="outside lower center", ncols=3, frameon=False)
        first = next(iter(experiments.values()))
        figure.suptitle(f"iFSS {first.data.dataset} {first.data.task}: after the few-shot step(s)", fontsize=10)
        return _save(figure, path)

    return draw()


def run_fewshot_table(experiments: dict[str, Experiment], console=None) -> dict:
    """Every shot count's methods (resumably), then the table, its CSV and its figure."""
    console = console or table_console()
    done = run_experiments(experiments, console, "few-shot table", "shots", "shot counts")
    units, seconds = done.units, done.seconds
    rows = fewshot_rows(done.results_of, experiments)
    timing = done.timing()
    first = next(iter(experiments.values()))
    out_dir = Path(first.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"fewshot-{first.name}"
    paths = {"markdown": out_dir / f"{stem}.md", "csv": out_dir / f"{stem}.csv"}
    markdown = to_markdown(rows, experiments, timing)
    paths["markdown"].write_text(markdown)
    write_csv(rows, experiments, paths["csv"])
    paths["figure"] = plot_fewshot(rows, experiments, out_dir / f"{stem}.png")
    print_table(console, rows, experiments)
    console.print(timing, highlight=False)
    console.print("written: " + ", ".join(str(p) for p in paths.values()), soft_wrap=True)
    return {"rows": rows, "markdown": markdown, "paths": paths, "seconds": seconds, "units": units}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.fewshot_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", nargs="?", default=DEFAULT_EXPERIMENT, help=f"an iFSS experiment (default {DEFAULT_EXPERIMENT})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every shot count's experiment")
    parser.add_argument("--shots", default=",".join(map(str, SHOTS)), help="shot counts, comma-separated (default 1,2,5)")
    args = parser.parse_args(argv)
    if "=" in args.experiment:   # only overrides were given
        args.overrides, args.experiment = [args.experiment, *args.overrides], DEFAULT_EXPERIMENT

    def action(console):
        shots = [int(s) for s in args.shots.split(",")]
        run_fewshot_table(load_shot_experiments(args.experiment, args.overrides, shots), console)

    return run_command(action)


if __name__ == "__main__":
    sys.exit(main())
