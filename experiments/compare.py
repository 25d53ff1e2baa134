"""The paper-style comparison of an experiment over seeds:
`python -m experiments.compare [EXP ...] [--runs runs] [--out DIR] [--no-wandb]` (what `make compare` calls).

Reads every complete `results.json` under `runs/<experiment>/` (runs/<experiment>/<method>/<config
id>/seed<k>/, or the older layouts runs/<experiment>/<method>/seed<k>/ and runs/<experiment>/<method>/),
one row per method and configuration: old / new / all without background (MiB), all with background
(WILSON's All), hIoU, after every step and after the last one, as mean ± sample std over the seeds of
that configuration, beside the experiment file's expected numbers and the difference to them. When a
method was run with several configurations, each is its own row, named `method [config id]` and
described by the settings in which it differs from the method's other configurations. Runs kept by
`resume=false` (seed<k>.<date-time>/) are not read.
Writes `compare.md` and `compare.csv` to runs/<experiment>/ (or --out), prints the table and logs it
to wandb as a table (one run of job_type "compare", grouped by experiment).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from pathlib import Path

from datamodules.tasks import class_span
from experiments.config import network_label
from experiments.reporting.table import _paper_cell

# The per-step quantities of lightning_modules.metrics.summarize_step that the table carries
# (new_with_bg is always new_no_bg: background never belongs to the new classes).
STEP_METRICS = ("old_no_bg", "new_no_bg", "all_no_bg", "old_with_bg", "all_with_bg", "hiou_no_bg", "hiou_with_bg")
# summarize_run adds PLOP's avg (mean of "all" over the steps) to the last step's summary.
FINAL_METRICS = STEP_METRICS + ("avg_no_bg", "avg_with_bg")
# What a paper's old/new/all is compared with: old/new never include background in the papers'
# main tables; "all" does when the expected row says all_includes_background (WILSON's All).
PAPER_KEYS = ("old", "new", "all")


# --- reading ----------------------------------------------------------------------------------
def _is_run_directory(path: Path, run_dir: Path) -> bool:
    """results.json of a run (…/seed<k>/) or of the oldest layout (runs/<experiment>/<method>/), not of
    a run kept aside by resume=false (seed<k>.<date-time>/)."""
    parent = path.parent
    return bool(re.fullmatch(r"seed\d+", parent.name)) or parent.parent == run_dir


def _flat(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in (config or {}).items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# What may differ between the results of one configuration (the seed), or says nothing about it.
_NOT_A_SETTING = ("seed", "output_dir", "cache_dir", "resume", "logger.", "figures.", "data.root", "data.num_workers",
                  "data.cache_decoded", "trainer.progress", "trainer.log_every_n_steps", "expected.", "description",
                  "name", "based_on", "experiment", "methods.")


def describe_differences(configs: dict[str, dict]) -> dict[str, str]:
    """For configurations of one method ({config id: config}), the settings in which each differs
    from the others, as "key=value, ..." (empty when there is only one)."""
    if len(configs) < 2:
        return {cid: "" for cid in configs}
    flats = {cid: {k: v for k, v in _flat(c).items() if not k.startswith(_NOT_A_SETTING)} for cid, c in configs.items()}
    keys = sorted({k for f in flats.values() for k in f})
    differing = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats.values()}) > 1]
    return {cid: ", ".join(f"{k}={f.get(k)}" for k in differing) for cid, f in flats.items()}


def collect_results(run_dir) -> dict:
    """Every complete results.json under `run_dir` (= runs/<experiment>), grouped by method and
    configuration.

    Returns {"experiment", "config" (of the newest complete file), "expected" (its
    config["expected"], {} when none), "methods": {row label: [results, ...] sorted by seed},
    "paths": {row label: [path, ...]} (same order), "rows": {row label: {"method", "config_id",
    "differs"}}, "warnings": [one line each]}. The row label is the method's name, or
    "<method> [<config id>]" when the method has results of several configurations. Incomplete
    files are left out with a warning; of two files with the same method, configuration and seed
    the newest (mtime) is kept, with a warning. Each kept result gets "supervision"
    ("pixel"/"image", from the file or the method registry; None for an unknown method)."""
    run_dir = Path(run_dir)
    experiment = run_dir.name
    warnings: list[str] = []
    kept: dict[tuple[str, str, object], tuple[float, Path, dict]] = {}
    for path in sorted(run_dir.rglob("results.json")):
        if not _is_run_directory(path, run_dir):
            continue
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            warnings.append(f"unreadable, skipped: {path} ({error})")
            continue
        if not result.get("complete") or "final" not in result:
            warnings.append(f"incomplete ({len(result.get('steps') or [])} steps done), skipped: {path}")
            continue
        if result.get("experiment", experiment) != experiment:
            warnings.append(f"results of experiment {result['experiment']!r}, not {experiment!r}, skipped: {path}")
            continue
        method = result.get("method") or path.parent.name
        config_id = result.get("config_id") or "earlier"  # files of the layout before config ids
        seed = (result.get("config") or {}).get("seed")
        mtime = path.stat().st_mtime
        previous = kept.get((method, config_id, seed))
        if previous is not None:
            this_is_newer = mtime > previous[0]
            newer, older = (path, previous[1]) if this_is_newer else (previous[1], path)
            warnings.append(f"{method} seed {seed}: two results files; kept the newest {newer}, ignored {older}")
            if not this_is_newer:
                continue
        kept[(method, config_id, seed)] = (mtime, path, result)

    newest = max(kept.values(), key=lambda entry: entry[0])[2] if kept else None
    config = (newest or {}).get("config") or {}
    expected = _expected_of(newest or {})
    if any(_expected_of(r) != expected for _, _, r in kept.values()):
        warnings.append("the results files disagree on the expected numbers; using those of the newest file")

    configs_of: dict[str, dict[str, dict]] = {}
    for (method, config_id, _), (_, _, result) in kept.items():
        configs_of.setdefault(method, {})[config_id] = result.get("config") or {}
    differences = {method: describe_differences(configs) for method, configs in configs_of.items()}
    # The experiment's method order, from the run that listed the most methods (a run of a subset,
    # METHODS=mib, would otherwise put its method first).
    orders = [r.get("experiment_methods") or list((r.get("config") or {}).get("methods") or []) for _, _, r in
              sorted(kept.values(), key=lambda entry: -entry[0])]
    order = max(orders, key=len, default=[])
    rank = {name: i for i, name in enumerate(order)}
    methods: dict[str, list[dict]] = {}
    paths: dict[str, list[str]] = {}
    rows: dict[str, dict] = {}
    for (method, config_id, seed), (_, path, result) in sorted(
            kept.items(), key=lambda item: (rank.get(item[0][0], len(rank)), item[0][0], item[0][1],
                                            _seed_key(item[0][2]))):
        label = method if len(configs_of[method]) == 1 else f"{method} [{config_id}]"
        result.setdefault("supervision", _registered_supervision(method))
        methods.setdefault(label, []).append(result)
        paths.setdefault(label, []).append(str(path))
        rows[label] = {"method": method, "config_id": config_id, "differs": differences[method][config_id]}
    return {"experiment": experiment, "config": config, "expected": expected, "methods": methods,
            "paths": paths, "rows": rows, "warnings": warnings}


def _expected_of(result: dict) -> dict:
    """The experiment's expected numbers as a results file records them (beside its run
    configuration; in the config itself in the earlier layout)."""
    return result.get("expected") or (result.get("config") or {}).get("expected") or {}


def _seed_key(seed) -> tuple:
    return (0, seed, "") if isinstance(seed, (int, float)) else (1, 0, str(seed))


def _registered_supervision(method: str) -> str | None:
    """The method's supervision at steps >= 1 from its class (results files do not record it).
    Imported here: the registry imports torch, which nothing else in this module needs."""
    try:
        from lightning_modules.methods import METHODS
    except ImportError:
        return None
    cls = METHODS.get(method)
    return cls.supervision if cls is not None else None


# --- the table ----------------------------------------------------------------------------------
def _percent_stats(values) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1) in % of the finite values; std None with fewer than two."""
    finite = [100 * v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not finite:
        return None, None
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else None)


def _compared_key(name: str, paper: dict) -> str:
    """The measured quantity a paper number is read against (see PAPER_KEYS)."""
    with_bg = paper.get(f"{name}_includes_background", False) and name != "new"
    return f"{name}_{'with_bg' if with_bg else 'no_bg'}"


def comparison_table(results_by_method: dict[str, list[dict]], expected: dict | None,
                     rows_info: dict[str, dict] | None = None) -> list[dict]:
    """One row per method from its results (one per seed) and the experiment's `expected` block
    (config["expected"]: {"methods": {method: {old, new, all, all_includes_background?}}, ...}).

    Column names say the convention: `step<t>_<metric>_mean/_std` after step t and
    `final_<metric>_mean/_std` after the last step (+ avg), metric in STEP_METRICS (FINAL_METRICS),
    in %; `paper_<old|new|all>_no_bg` / `paper_<old|all>_with_bg`: the paper's number in the column
    of its convention (with_bg when the expected row says all_includes_background, or
    old_includes_background), None in the other; `diff_*` = measured final mean - paper, in points; `paper_old_new_all` = the comparison table's paper cell (experiments/reporting/table.py).
    std is None with one seed; a mean is None where no seed has a value (e.g. new after step 0)."""
    expected_methods = (expected or {}).get("methods") or {}
    rows = []
    for label, results in results_by_method.items():
        info = (rows_info or {}).get(label) or {"method": results[0].get("method") or label}
        method = info["method"]
        n_steps = min(len(r["steps"]) for r in results)
        first = results[0]["steps"]
        new_classes = [c for s in first[1:n_steps] for c in s["classes"]]
        supervision = {r.get("supervision") for r in results} - {None}
        networks = sorted({network_label((r.get("config") or {}).get("network") or {}) for r in results})
        row = {"method": label, "network": ", ".join(networks), "config_id": info.get("config_id"),
               "differs": info.get("differs") or "",
               "supervision": ", ".join(sorted(supervision)) or None,
               "n_seeds": len(results), "seeds": " ".join(str(r["config"].get("seed")) for r in results),
               "old_classes": class_span(first[0]["classes"]), "new_classes": class_span(new_classes), "n_steps": n_steps}
        for metric in FINAL_METRICS:
            row[f"final_{metric}_mean"], row[f"final_{metric}_std"] = _percent_stats(
                [r["final"].get(metric) for r in results])
        paper = expected_methods.get(method) or {}
        row["paper_source"] = paper.get("source") or ((expected or {}).get("source") if paper else None)
        for name in PAPER_KEYS:
            for convention in ("no_bg", "with_bg"):
                if name == "new" and convention == "with_bg":
                    continue
                key = f"{name}_{convention}"
                compared = name in paper and _compared_key(name, paper) == key
                measured = row[f"final_{key}_mean"]
                row[f"paper_{key}"] = paper[name] if compared else None
                row[f"diff_{key}"] = measured - paper[name] if compared and measured is not None else None
        row["paper_old_new_all"] = _paper_cell(paper)  # as reporting/table.py writes it: "(All+bg)" when All has background
        for step in range(n_steps):
            for metric in STEP_METRICS:
                mean, std = _percent_stats([r["steps"][step]["summary"].get(metric) for r in results])
                row[f"step{step}_{metric}_mean"], row[f"step{step}_{metric}_std"] = mean, std
        rows.append(row)
    return rows


# --- output ---------------------------------------------------------------------------------------
def _number(value, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    value = round(value, 1) + 0.0  # + 0.0: no "-0.0"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def _mean_std(row: dict, key: str) -> str:
    mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
    return _number(mean) if std is None or mean is None else f"{_number(mean)} ± {_number(std)}"


def _diff_cell(row: dict) -> str:
    """measured - paper for old/new/all, in the convention of the paper's number (see PAPER_KEYS)."""
    diffs = []
    for name in PAPER_KEYS:
        key = next((f"{name}_{c}" for c in ("no_bg", "with_bg") if row.get(f"paper_{name}_{c}") is not None), None)
        if key is not None:
            diffs.append(_number(row[f"diff_{key}"], signed=True))
    if not diffs:
        return "-"
    return "/".join(diffs) + (" (All+bg)" if row.get("paper_all_with_bg") is not None else "")


def _table(header: list[str], align: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "".join(f"{a}|" for a in align),
            *("| " + " | ".join(cells) + " |" for cells in lines)]


def to_markdown(rows: list[dict], title: str, caption: str) -> str:
    """Two tables: after the last step (with the paper's numbers and the differences), and after
    every step (one line per method and step)."""
    if not rows:
        return f"# {title}\n\n{caption}\n\nNo complete results.\n"
    old, new = rows[0]["old_classes"], rows[0]["new_classes"]
    final_header = ["Method", "network", "sup.", "n", f"old {old}", f"new {new}", "all", "all+bg", "hIoU", "avg",
                    "paper o/n/a", "Δ o/n/a"]
    final_lines = [[row["method"], row.get("network") or "-", row["supervision"] or "-", str(row["n_seeds"]),
                    *(_mean_std(row, f"final_{m}") for m in ("old_no_bg", "new_no_bg", "all_no_bg", "all_with_bg",
                                                             "hiou_no_bg", "avg_no_bg")),
                    row["paper_old_new_all"], _diff_cell(row)] for row in rows]
    final_align = ["---", "---", "---", "--:", *["--:"] * 6, "---", "---"]
    if any(row.get("differs") for row in rows):  # a method run with several configurations
        final_header.append("configuration (where it differs)")
        final_align.append("---")
        for cells, row in zip(final_lines, rows):
            cells.append(row.get("differs") or "-")
    step_header = ["Method", "after step", "old", "new", "all", "all+bg", "hIoU"]
    step_lines = [[row["method"], str(step),
                   *(_mean_std(row, f"step{step}_{m}") for m in ("old_no_bg", "new_no_bg", "all_no_bg",
                                                                 "all_with_bg", "hiou_no_bg"))]
                  for row in rows for step in range(row["n_steps"])]
    lines = [f"# {title}", "", caption, "", "## After the last step", "",
             *_table(final_header, final_align, final_lines), "",
             "## After each step", "",
             *_table(step_header, ["---", "--:", *["--:"] * 5], step_lines)]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict], path) -> Path:
    """Every column of the rows (their union, in order); numbers in % (differences in points)
    with one decimal, empty where there is none."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_value(row.get(key)) for key in columns])
    return path


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else _number(value)
    return str(value)


def caption_for(collected: dict) -> str:
    config, expected = collected["config"], collected["expected"]
    data = config.get("data") or {}
    setting = " ".join(str(data[k]) for k in ("dataset", "task", "mode") if data.get(k))
    text = (f"{collected['experiment']}" + (f" ({setting})" if setting else "") + ": mIoU in %, mean ± sample std "
            "(ddof=1) over n seeds (no std with one seed). old/new/all exclude background (MiB convention); "
            "all+bg includes it (WILSON's All); hIoU = harmonic mean of old and new; avg = mean of all over the "
            "steps (PLOP); hIoU and avg without background. sup. = supervision of the new classes; network = each "
            "row's network (a paper number in [ ] names the network it was measured with).")
    if expected.get("source"):
        text += f" Paper numbers: {expected['source']}"
        text += f" ({expected['convention']})." if expected.get("convention") else "."
        sources = {m: e["source"] for m, e in (expected.get("methods") or {}).items() if (e or {}).get("source")}
        if sources:
            text += " " + "; ".join(f"{m}: {s}" for m, s in sources.items()) + "."
    text += (" Δ = measured − paper in points (after the last step); a paper All marked (All+bg) includes "
             "background and is compared with all+bg.")
    return text


# --- wandb --------------------------------------------------------------------------------------
def log_comparison_to_wandb(rows: list[dict], experiment: str, project: str = "ciss", mode: str | None = None,
                            save_dir=None):
    """The rows as a wandb.Table ("comparison") in one run of job_type "compare", grouped by
    experiment. mode: WANDB_MODE, else online when logged in, else offline (tracking.wandb_mode);
    "disabled" logs nothing. Returns the run's local directory (None when disabled)."""
    from experiments.reporting.tracking import log_summary_run

    return log_summary_run(experiment, "compare", [experiment, "compare"], table_rows=rows,
                           config={"experiment": experiment}, project=project, mode=mode, save_dir=save_dir)


# --- CLI ----------------------------------------------------------------------------------------
def compare_experiment(run_dir: Path, out_dir: Path, console, use_wandb: bool = True) -> list[dict] | None:
    collected = collect_results(run_dir)
    for warning in collected["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)
    if not collected["methods"]:
        console.print(f"[red]{collected['experiment']}: no complete results under {run_dir}[/]", soft_wrap=True)
        return None
    rows = comparison_table(collected["methods"], collected["expected"], collected["rows"])
    markdown = to_markdown(rows, f"{collected['experiment']}: mean ± std over seeds", caption_for(collected))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.md").write_text(markdown)
    to_csv(rows, out_dir / "compare.csv")
    from rich.markdown import Markdown

    console.print(Markdown(markdown))
    console.print(f"written: {out_dir / 'compare.md'}, {out_dir / 'compare.csv'}", soft_wrap=True)
    if use_wandb:
        log_comparison_to_wandb(rows, collected["experiment"], save_dir=out_dir)
    return rows


def experiment_dirs(runs: Path) -> list[str]:
    """The directories under `runs` that hold at least one results.json (not the step-0 cache,
    not runs/sweeps/: a sweep's runs vary hyper-parameters, not seeds)."""
    if not runs.is_dir():
        return []
    return sorted(p.name for p in runs.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.name != "sweeps"
                  and next(p.rglob("results.json"), None))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiments", nargs="*", metavar="EXP",
                        help="experiment names (directories under --runs); default: all of them")
    parser.add_argument("--runs", default="runs", help="the runs directory (default: runs)")
    parser.add_argument("--out", default=None,
                        help="output directory (default: runs/<experiment>/; with several experiments DIR/<experiment>/)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the table to wandb")
    args = parser.parse_args(argv)
    from experiments.reporting.table import table_console

    console = table_console()
    runs = Path(args.runs)
    names = args.experiments or experiment_dirs(runs)
    if not names:
        console.print(f"[red]no experiment directories under {runs}/[/]")
        return 1
    failed = 0
    for name in names:
        run_dir = runs / name
        if not run_dir.is_dir():
            console.print(f"[red]{name}: no directory {run_dir}[/]")
            failed += 1
            continue
        out = run_dir if args.out is None else (Path(args.out) if len(names) == 1 else Path(args.out) / name)
        if compare_experiment(run_dir, out, console, use_wandb=not args.no_wandb) is None:
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
