"""The WILSON table (its Table 1: VOC 15-5, disjoint and overlap) end to end, in one command:
`python -m experiments.table [--dataset synthetic|voc] [key=value ...]` (what `make table` calls).

Runs the table's methods (TABLE_METHODS: Joint, FT, MiB, PLOP, SDR, RECALL and MBS with pixel
labels; CAM, SEAM, SS, EPS and WILSON with image labels) in both protocols through the step loop
of experiments.run, so every step-0 model that can be shared is (experiments.step0_cache) and a
killed command continues where it stopped (experiments.store). One progress line per (protocol,
method, step), with the elapsed and the estimated remaining time. Then writes, under the
experiments' output directory (runs/):

  table.md / table-voc.md    the table in WILSON's layout (printed too): Pixel / Image groups, a row
                             per method naming its network, for each protocol old, new and All;
                             with --dataset voc the papers' numbers and the differences beside them
  table.csv / table-voc.csv  every number of the rows (both conventions), one line per (protocol, method)
  table.png / table-voc.png  grouped bars of old and new per method, pixel and image methods apart

key=value overrides apply to both experiments (seed=7, trainer.devices=2, ...).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from experiments import step0_cache
from experiments.compare import _diff_cell, _number, comparison_table, to_csv
from experiments.config import ConfigError, Experiment, apply_overrides, load_experiment, resolve
from experiments.reporting.table import _paper_cell, table_console
from experiments.store import RunStore

# The rows of WILSON's Table 1 and MBS, in the table's order within each supervision.
TABLE_METHODS = ("joint", "ft", "mib", "plop", "sdr", "recall", "mbs", "cam", "seam", "ss", "eps", "wilson")
SUPERVISION_TITLES = {"pixel": "Pixel", "image": "Image"}
DISPLAY_NAMES = {"joint": "Joint", "ft": "FT", "mib": "MiB", "plop": "PLOP", "sdr": "SDR", "recall": "RECALL",
                 "mbs": "MBS", "cam": "CAM", "seam": "SEAM", "ss": "SS", "eps": "EPS", "wilson": "WILSON"}
# (protocol, experiment) per dataset: the embedded dataset in the cheaper `*_all` setting, or VOC's paper files.
PROTOCOL_EXPERIMENTS = {
    "synthetic": (("disjoint", "synthetic_15_5_disjoint_all"), ("overlap", "synthetic_15_5_overlap_all")),
    "voc": (("disjoint", "voc_15_5_disjoint"), ("overlap", "voc_15_5_overlap")),
}
# The table's convention (WILSON's): old and new without background, All over every class with it.
CONVENTION = ("old = the step-0 classes, new = the added classes, both without background; All = mean IoU over "
              "every class including background (WILSON's Table 1 convention)")
MEASURED_KEYS = (("old", "final_old_no_bg_mean"), ("new", "final_new_no_bg_mean"), ("all", "final_all_with_bg_mean"))
WILSON_TABLE_SOURCE = "WILSON (CVPR 2022) Table 1"


def output_name(dataset: str) -> str:
    return "table" if dataset == "synthetic" else f"table-{dataset}"


# --- the papers' numbers -----------------------------------------------------------------------
def wilson_table_numbers(expected: dict) -> dict[str, dict]:
    """The numbers of WILSON's Table 1 for each method, each in its own source's convention: the
    experiment's expected rows, replaced by those of the `other_tables` entry that is WILSON's Table 1
    itself (its Joint and FT rows are RECALL's, not MiB's). PLOP's row keeps PLOP's own convention
    (old and All with background): WILSON pastes PLOP's "0-15" into its "1-15" column."""
    numbers = {name: dict(row) for name, row in (expected.get("methods") or {}).items()}
    for table in expected.get("other_tables") or []:
        if str(table.get("source", "")).startswith(WILSON_TABLE_SOURCE + ";"):
            for name, row in (table.get("methods") or {}).items():
                numbers[name] = {**row, "source": table["source"]}
    return numbers


# --- progress ------------------------------------------------------------------------------------
@dataclass
class Unit:
    """One (protocol, method, step) of the table; kind "step0" (a step-0 model to train), "step0-cached"
    (a shared step-0 model, tested only) or "step" (a step >= 1). `saved`: by an earlier invocation;
    `done`: reported by this one."""
    protocol: str
    method: str
    step: int
    kind: str
    saved: bool = False
    done: bool = False
    cached_before: bool = False   # a step-0 model found in the cache before this invocation


def plan_units(experiments: dict[str, Experiment], steps_of: dict[str, list]) -> list[Unit]:
    """Every unit of the table, with those already saved by an earlier invocation marked saved, and
    each step-0 model counted once (the methods after the first that share it find it cached)."""
    from lightning_modules.methods import build_method

    units, step0_models = [], set()
    for protocol, experiment in experiments.items():
        steps = steps_of[protocol]
        for name in experiment.methods:
            config = experiment.run_config(name)
            method = build_method(name, **config.hparams)
            saved = RunStore(config, method).saved_steps()
            model = step0_cache.model_path(config, method, steps)
            kind = "step0-cached" if model.exists() or model in step0_models else "step0"
            cached_before = model.exists() and model not in step0_models
            step0_models.add(model)
            units += [Unit(protocol, name, step, kind if step == 0 else "step", saved=step < saved,
                           cached_before=cached_before and step == 0) for step in range(len(steps))]
    return units


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes} min {seconds:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class TableProgress:
    """Prints a line per finished unit: its time, the elapsed time and an estimate of the rest (the
    mean time of this invocation's units of each kind, times the units of that kind still to run; a
    kind not seen yet counts as the mean of every unit seen)."""

    def __init__(self, units: list[Unit], console, clock=time.time):
        self.units, self.console, self.clock = units, console, clock
        self.started = clock()
        self.seconds: dict[str, list[float]] = {}

    def reporter(self, protocol: str):
        def report(method: str, step: int, seconds: float, how: str) -> None:
            unit = next(u for u in self.units if (u.protocol, u.method, u.step) == (protocol, method, step))
            unit.done = True
            if how != "reused" and not unit.saved:
                self.seconds.setdefault(unit.kind, []).append(seconds)
            self.console.print(self.line(unit, seconds, how), highlight=False, markup=False)
        return report

    def to_run(self) -> list[Unit]:
        return [u for u in self.units if not (u.done or u.saved)]

    def remaining_seconds(self) -> float | None:
        seen = [s for values in self.seconds.values() for s in values]
        if not self.to_run():
            return 0.0
        if not seen:
            return None
        overall = sum(seen) / len(seen)
        mean = {kind: sum(values) / len(values) for kind, values in self.seconds.items()}
        return sum(mean.get(u.kind, overall) for u in self.to_run())

    def line(self, unit: Unit, seconds: float, how: str) -> str:
        done = sum(u.done for u in self.units)
        remaining = self.remaining_seconds()
        rest = ("estimate after the first trained step" if remaining is None else
                "nothing left to train" if not self.to_run() else f"about {_duration(remaining)} left")
        what = "reused from an earlier run" if how == "reused" else f"{how} in {_duration(seconds)}"
        return (f"[table {done}/{len(self.units)}] {unit.protocol} · {unit.method} · step {unit.step}: {what} · "
                f"elapsed {_duration(self.clock() - self.started)} · {rest}")


# --- the rows ------------------------------------------------------------------------------------
def table_rows(results_of: dict[str, dict[str, dict]], experiments: dict[str, Experiment],
               unavailable_of: dict[str, dict[str, str]], with_paper: bool) -> list[dict]:
    """One row per method of TABLE_METHODS that any protocol ran or tried: {"method", "name",
    "supervision", "network", and per protocol p: "<p>" (the compare row, experiments.compare,
    None when it did not run), "<p>_missing" (why not), "<p>_paper" (its paper numbers)}."""
    from lightning_modules.methods import METHODS

    papers_of = {protocol: wilson_table_numbers(experiment.expected) if with_paper else {}
                 for protocol, experiment in experiments.items()}
    rows = []
    for name in TABLE_METHODS:
        if not any(name in experiment.methods for experiment in experiments.values()):
            continue
        row = {"method": name, "name": DISPLAY_NAMES[name], "supervision": METHODS[name].supervision, "network": None}
        for protocol, experiment in experiments.items():
            papers = papers_of[protocol]
            result = results_of.get(protocol, {}).get(name)
            compared = comparison_table({name: [result]}, {"methods": papers})[0] if result else None
            row[protocol] = compared
            row[f"{protocol}_paper"] = papers.get(name) or {}
            row[f"{protocol}_missing"] = unavailable_of.get(protocol, {}).get(name) or ("not run" if not result else None)
            if compared and compared["network"]:
                row["network"] = row["network"] or compared["network"]
        rows.append(row)
    return rows


def _row_cells(row: dict, protocols, with_paper: bool) -> list[str]:
    cells = [row["name"], row["network"] or "-"]
    for protocol in protocols:
        compared = row[protocol]
        if compared is None:
            cells += ["-", "-", "-"]
        else:
            cells += [_number(compared[key]) for _, key in MEASURED_KEYS]
        if with_paper:
            cells += [_paper_cell(row[f"{protocol}_paper"]), _diff_cell(compared) if compared else "-"]
    return cells


def _spans(experiment: Experiment) -> tuple[str, str]:
    """The old and the new classes of the experiment's task, as the tables name them ("1-15", "16-20")."""
    from datamodules.tasks import class_span, task_classes

    steps = task_classes(experiment.data.dataset, experiment.data.task)
    return class_span(steps[0]), class_span([c for s in steps[1:] for c in s])


def _header(protocols, experiments: dict[str, Experiment], with_paper: bool) -> list[str]:
    header = ["Method", "network"]
    for protocol in protocols:
        old, new = _spans(experiments[protocol])
        title = protocol.capitalize()
        header += [f"{title} old {old}", f"new {new}", "All"]
        if with_paper:
            header += ["paper o/n/a", "Δ o/n/a"]
    return header


def caption(experiments: dict[str, Experiment], with_paper: bool, timing: str) -> str:
    first = next(iter(experiments.values()))
    names = ", ".join(f"{p}: {e.name}" for p, e in experiments.items())
    text = (f"{first.data.dataset} {first.data.task}, mIoU % after the last step; {CONVENTION}. Experiments: {names} "
            f"(seed {first.seed}). Pixel / Image = the supervision of the new classes.")
    if with_paper:
        text += (" paper = WILSON's Table 1 (MBS: its own source, on its ViT-B/16), each number in its own "
                 "source's convention: (old+bg, All+bg) marks PLOP's background-inclusive '0-15' that WILSON pastes "
                 "into its '1-15' column, (All+bg) an All with background, none a number without background; "
                 "Δ = measured − paper in points, each against the measured number of the paper's own convention.")
    return text + (f" {timing}" if timing else "")


def to_markdown(rows: list[dict], experiments: dict[str, Experiment], with_paper: bool, timing: str = "") -> str:
    protocols = list(experiments)
    header = _header(protocols, experiments, with_paper)
    first = next(iter(experiments.values()))
    lines = [f"# WILSON's table, {first.data.dataset} {first.data.task}", "", caption(experiments, with_paper, timing), "",
             "| | " + " | ".join(header) + " |", "|---|---|---|" + "--:|" * (len(header) - 2)]
    for supervision, title in SUPERVISION_TITLES.items():
        group = [row for row in rows if row["supervision"] == supervision]
        for index, row in enumerate(group):
            lines.append(f"| {'**' + title + '**' if index == 0 else ''} | " + " | ".join(_row_cells(row, protocols, with_paper)) + " |")
    missing = [f"{row['name']} ({p}): {row[f'{p}_missing']}" for row in rows for p in protocols if row[f"{p}_missing"]]
    if missing:
        lines += ["", "Not in the table: " + "; ".join(missing) + "."]
    return "\n".join(lines) + "\n"


def print_table(console, rows: list[dict], experiments: dict[str, Experiment], with_paper: bool, timing: str) -> None:
    protocols = list(experiments)
    first = next(iter(experiments.values()))
    table = Table(title=f"WILSON's table, {first.data.dataset} {first.data.task} — mIoU (%)",
                  caption=caption(experiments, with_paper, timing), caption_justify="left")
    table.add_column("")
    for index, title in enumerate(_header(protocols, experiments, with_paper)):
        table.add_column(title, justify="left" if index < 2 or "paper" in title or "Δ" in title else "right")
    for supervision, title in SUPERVISION_TITLES.items():
        group = [row for row in rows if row["supervision"] == supervision]
        for index, row in enumerate(group):
            table.add_row(title if index == 0 else "", *_row_cells(row, protocols, with_paper))
        if group:
            table.add_section()
    console.print(table)


def write_csv(rows: list[dict], protocols, path: Path) -> Path:
    """One line per (protocol, method) that ran: every column of its compare row."""
    flat = [{"protocol": protocol, "supervision": row["supervision"], **row[protocol]}
            for row in rows for protocol in protocols if row[protocol]]
    return to_csv(flat, path)


# --- the figure --------------------------------------------------------------------------------
def plot_table(rows: list[dict], experiments: dict[str, Experiment], path) -> Path:
    """One panel per protocol: for each method (pixel methods, then image ones) a bar of old and a bar
    of new (WILSON's convention, without background); pixel and image methods in two colour pairs."""
    from experiments.reporting.figures import BLUE, ORANGE, SKY_BLUE, VERMILLION, _new_figure, _save, _styled

    colours = {"pixel": (BLUE, SKY_BLUE), "image": (VERMILLION, ORANGE)}

    @_styled
    def draw():
        from matplotlib.patches import Patch

        protocols = list(experiments)
        ordered = [row for s in SUPERVISION_TITLES for row in rows if row["supervision"] == s]
        networks = [row["network"] for row in ordered if row["network"]]
        common = max(set(networks), key=networks.count) if networks else None
        figure = _new_figure(max(7.0, 0.62 * len(ordered) + 1.5), 2.9 * len(protocols))
        axes = figure.subplots(len(protocols), 1, squeeze=False)[:, 0]
        positions, x = [], 0.0
        for index, row in enumerate(ordered):
            if index and row["supervision"] != ordered[index - 1]["supervision"]:
                x += 0.6   # a gap between the two groups
            positions.append(x)
            x += 1.0
        labels = [row["name"] + (f"\n{row['network'].split()[0]}" if row["network"] and row["network"] != common else "")
                  for row in ordered]
        measured = [row[p][key] for row in ordered for p in protocols if row[p]
                    for key in ("final_old_no_bg_mean", "final_new_no_bg_mean") if row[p][key] is not None]
        top = max([v for v in measured if not math.isnan(v)] + [1.0]) * 1.18
        for axis, protocol in zip(axes, protocols):
            axis.set_ylim(0, top)
            for position, row in zip(positions, ordered):
                compared = row[protocol]
                old_colour, new_colour = colours[row["supervision"]]
                for offset, key, colour in ((-0.2, "final_old_no_bg_mean", old_colour),
                                            (0.2, "final_new_no_bg_mean", new_colour)):
                    value = compared[key] if compared and compared[key] is not None else float("nan")
                    if math.isnan(value):
                        axis.text(position + offset, 0.02 * top, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
                        continue
                    axis.bar(position + offset, value, width=0.38, color=colour, edgecolor="white", linewidth=0.5)
                    axis.text(position + offset, value + 0.01 * top, f"{value:.0f}", ha="center", va="bottom", fontsize=7)
            axis.set_title(f"{protocol} ({experiments[protocol].name})", loc="left")
            axis.set_ylabel("mIoU (%)")
            axis.set_xticks(positions, labels)
            axis.set_xlim(positions[0] - 0.6, positions[-1] + 0.6)
            axis.spines[["top", "right"]].set_visible(False)
            axis.grid(axis="y", alpha=0.3)
            axis.set_axisbelow(True)
        first = next(iter(experiments.values()))
        old, new = _spans(first)
        handles = [Patch(color=colours[s][k], label=f"{SUPERVISION_TITLES[s].lower()} labels: {part}")
                   for s in colours for k, part in enumerate((f"old {old}", f"new {new}"))]
        figure.legend(handles=handles, loc="outside lower center", ncols=4, frameon=False)
        figure.suptitle(f"WILSON's table, {first.data.dataset} {first.data.task}: old and new classes after the last "
                        "step (mIoU without background)", fontsize=10)
        return _save(figure, path)

    return draw()


# --- the command ---------------------------------------------------------------------------------
def load_table_experiments(dataset: str, overrides: list[str]) -> dict[str, Experiment]:
    """The two protocols' experiments, restricted to the table's methods (those they define)."""
    experiments = {}
    for protocol, name in PROTOCOL_EXPERIMENTS[dataset]:
        defined = list(resolve(load_experiment(name)).methods)
        methods = [m for m in TABLE_METHODS if m in defined]
        experiments[protocol] = resolve(apply_overrides(load_experiment(name), [*overrides, f"methods=[{','.join(methods)}]"]))
    return experiments


@dataclass
class Invocation:
    """What running a table's experiments gave: per group (protocol, shot count) the methods'
    results and the reasons of those that could not run, the units, and the time."""
    results_of: dict[str, dict[str, dict]]
    unavailable_of: dict[str, dict[str, str]]
    units: list[Unit]
    seconds: float
    saved_before: int

    def timing(self) -> str:
        """How this invocation's time is to be read: from scratch, or with what it reused."""
        cached = sum(u.cached_before for u in self.units)
        if self.saved_before or cached:
            return (f"This invocation: {_duration(self.seconds)} ({self.saved_before} of {len(self.units)} steps reused "
                    f"from earlier runs, {cached} step-0 model(s) from the cache).")
        return f"Measured from scratch in {_duration(self.seconds)} ({time.strftime('%Y-%m-%d')})."


def run_experiments(experiments: dict[str, Experiment], console, title: str, group: str, groups: str) -> Invocation:
    """Every group's experiment (resumably, through experiments.run), with a progress line per
    (group, method, step) after a header naming what is to run, what was saved and the step-0
    models to train. `group` / `groups` name a group and the groups in that header ("protocol" /
    "protocols", "shots" / "shot counts")."""
    from experiments import run

    started = time.time()
    steps_of = {name: run.prepare(experiment) for name, experiment in experiments.items()}
    units = plan_units(experiments, steps_of)
    progress = TableProgress(units, console)
    before = sum(u.saved for u in units)
    step0_models = sum(u.kind == "step0" for u in units)
    console.print(f"[bold]{title}[/]: {len({u.method for u in units})} methods × {len(experiments)} {groups}: "
                  f"{len(units)} ({group}, method, step); {before} saved by an earlier run; {step0_models} step-0 "
                  "model(s) to train, the others shared", highlight=False)
    results_of, unavailable_of = {}, {}
    for name, experiment in experiments.items():
        unavailable_of[name] = {}
        results_of[name] = run.run_experiment(experiment, steps_of[name], progress=progress.reporter(name),
                                              unavailable=unavailable_of[name])
    return Invocation(results_of, unavailable_of, units, time.time() - started, before)


def run_table(experiments: dict[str, Experiment], dataset: str, console=None) -> dict:
    """Every protocol's methods (resumably), then the table, its CSV and its figure. Returns
    {"rows", "markdown", "paths", "seconds", "units"}."""
    console = console or table_console()
    done = run_experiments(experiments, console, "table", "protocol", "protocols")
    results_of, unavailable_of, units, seconds = done.results_of, done.unavailable_of, done.units, done.seconds
    with_paper = any(e.expected.get("methods") for e in experiments.values())
    rows = table_rows(results_of, experiments, unavailable_of, with_paper)
    timing = done.timing()
    markdown = to_markdown(rows, experiments, with_paper, timing)
    out_dir = Path(next(iter(experiments.values())).output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_name(dataset)
    paths = {"markdown": out_dir / f"{stem}.md", "csv": out_dir / f"{stem}.csv"}
    paths["markdown"].write_text(markdown)
    write_csv(rows, list(experiments), paths["csv"])
    paths["figure"] = plot_table(rows, experiments, out_dir / f"{stem}.png")
    print_table(console, rows, experiments, with_paper, timing)
    console.print("written: " + ", ".join(str(p) for p in paths.values()), soft_wrap=True)
    return {"rows": rows, "markdown": markdown, "paths": paths, "seconds": seconds, "units": units}


def run_command(action) -> int:
    """A table command's body `action(console)`, its user-facing errors as one red line: 0 or 1."""
    from datamodules import datasets
    from datamodules.incremental import UnreadableSample
    from experiments import run
    from lightning_modules.module import NonFiniteLoss
    from lightning_modules.network import PretrainedWeightsUnavailable

    run.quiet_libraries()
    console = table_console()
    try:
        action(console)
    except (ConfigError, ValueError, datasets.DatasetMissing, PretrainedWeightsUnavailable, NonFiniteLoss,
            UnreadableSample) as error:
        console.print("[red]error:[/]", escape(str(error)), soft_wrap=True, highlight=False)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="synthetic", choices=sorted(PROTOCOL_EXPERIMENTS),
                        help="synthetic (the embedded dataset, default) or voc (Pascal VOC, the paper settings)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to both protocols' experiments")
    args = parser.parse_args(argv)
    return run_command(lambda console: run_table(load_table_experiments(args.dataset, args.overrides), args.dataset,
                                                 console))


if __name__ == "__main__":
    sys.exit(main())
