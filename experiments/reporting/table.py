"""The comparison table of an experiment, in the layout of the WILSON paper's tables
(method | old | new | all), with both metric conventions and the paper's expected numbers."""
from __future__ import annotations

import math
from pathlib import Path

from rich.table import Table

from datamodules.tasks import class_span
from experiments.config import network_label


def table_console():
    """A rich console for the tables: the terminal's width, or 120 columns in a log file (rich's
    80 would wrap the network column)."""
    import os
    import sys

    from rich.console import Console

    wide = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 120
    return Console(width=wide)


def _pct(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def comparison_rows(experiment, results: dict[str, dict]) -> list[dict]:
    expected = experiment.expected.get("methods") or {}
    rows = []
    for name, result in results.items():
        first, final = result["steps"][0]["summary"], result["final"]
        paper = expected.get(name)
        rows.append({
            "method": name, "network": network_label((result.get("config") or {}).get("network") or {}),
            "step0_old": first["old_no_bg"],
            "old": final["old_no_bg"], "new": final["new_no_bg"], "all": final["all_no_bg"],
            "all_with_bg": final["all_with_bg"], "hiou": final["hiou_no_bg"],
            "old_kept": final["old_no_bg"] / first["old_no_bg"] if first["old_no_bg"] else float("nan"),
            "paper": _paper_cell(paper),
        })
    return rows


def _paper_cell(paper: dict | None) -> str:
    """old/new/all of the paper; "(All+bg)" when the paper's All includes background (WILSON's
    convention), "(old+bg, All+bg)" when its old does too (PLOP's "0-15"): to be read against the
    columns of that convention."""
    if not paper:
        return "-"
    text = "/".join(f"{paper[k]:.1f}" for k in ("old", "new", "all") if k in paper)
    with_bg = [name for name, key in (("old", "old_includes_background"), ("All", "all_includes_background"))
               if paper.get(key)]
    text = text + f" ({'+bg, '.join(with_bg)}+bg)" if with_bg else text
    return text + f" [{paper['network']}]" if paper.get("network") else text


def _columns(steps) -> list[tuple[str, str]]:
    old, new = class_span(steps[0]), class_span([c for s in steps[1:] for c in s])
    return [("method", "Method"), ("network", "network"), ("step0_old", f"step 0: {old}"), ("old", f"old {old}"),
            ("new", f"new {new}"), ("all", "all"), ("all_with_bg", "all+bg"),
            ("hiou", "hIoU"), ("old_kept", "kept"), ("paper", "paper o/n/a")]


def _cells(row: dict) -> list[str]:
    return [row["method"], row["network"], *(_pct(row[k]) for k in ("step0_old", "old", "new", "all", "all_with_bg", "hiou")),
            "-" if math.isnan(row["old_kept"]) else f"{100 * row['old_kept']:.0f}%", row["paper"]]


def _caption(experiment) -> str:
    data, expected = experiment.data, experiment.expected
    text = (f"{experiment.name}: {data.dataset} {data.task} {data.mode}, mIoU % after the last step. "
            "old/new/all exclude background (MiB convention); 'all+bg' includes it (WILSON's All). "
            "'step 0' = the shared step-0 model on the old classes; 'kept' = final old / step-0 old.")
    if expected.get("source"):
        text += f" Paper numbers: {expected['source']} ({expected.get('convention', '')})."
    return text


def write_comparison(out_dir: Path, experiment, rows: list[dict]) -> Path:
    columns = _columns(_steps(experiment))
    lines = [f"# {experiment.name}", "", _caption(experiment), "",
             "| " + " | ".join(title for _, title in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "comparison.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def print_comparison(console, experiment, rows: list[dict]) -> None:
    table = Table(title=f"{experiment.name} — mIoU (%) after the last step", caption=_caption(experiment),
                  caption_justify="left")
    for key, title in _columns(_steps(experiment)):
        table.add_column(title, justify="left" if key in ("method", "network", "paper") else "right")
    for row in rows:
        table.add_row(*_cells(row))
    console.print(table)


def _steps(experiment):
    from datamodules.tasks import task_classes

    return task_classes(experiment.data.dataset, experiment.data.task)
