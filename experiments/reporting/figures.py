"""Figures of an experiment, as PNG files (and, optionally, wandb images).

Plain functions of the saved results (runs/<experiment>/<method>/results.json, the layout
`experiments.run._write_results` writes) and of arrays; each returns the path it saved.

- `plot_steps`: old / new / all mIoU after each step, one line per method;
- `plot_per_class_iou`: per-class IoU after the last step of one run;
- `plot_qualitative`: image | ground truth | each method's prediction (| pseudo-labels);
- `log_figures_to_wandb`: the PNGs as `wandb.Image`s of a run;
- `write_experiment_figures`: the first two for every method of an experiment.

Figures are drawn on `matplotlib.figure.Figure` objects, never through pyplot: no global
backend switch, no open-figure registry to leak, safe in a headless training process.
Colours: Okabe & Ito's colour-blind-safe palette; a method keeps its colour, marker and line
style in every figure (`method_styles`), and markers differ too, so lines stay apart in grey.
"""
from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from datamodules.datasets.voc import voc_palette
from datamodules.tasks import class_span

DPI = 150
FONT = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9,
        "ytick.labelsize": 9, "legend.fontsize": 9, "figure.titlesize": 12}

# Okabe & Ito (2008), "Color Universal Design": distinguishable under the common colour-vision
# deficiencies. Yellow (#F0E442) is left out: unreadable as a thin line on white.
BLACK, ORANGE, SKY_BLUE, GREEN, BLUE, VERMILLION, PURPLE = (
    "#000000", "#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7")
GREY = "#7F7F7F"

# Known methods: bounds in black/grey and broken lines (references, not competitors).
KNOWN_METHOD_STYLES = {
    "joint": (BLACK, "s", "--"),
    "ft": (GREY, "v", ":"),
    "mib": (BLUE, "o", "-"),
    "wilson": (VERMILLION, "D", "-"),
    "plop": (GREEN, "^", "-"),
    "ilt": (PURPLE, "P", "-"),
    "lwf": (ORANGE, "X", "-"),
    "sdr": (SKY_BLUE, "h", "-"),
}
_FALLBACK_STYLES = [(SKY_BLUE, "o", "-"), (ORANGE, "^", "-"), (PURPLE, "s", "-"), (GREEN, "D", "-"),
                    (BLUE, "v", "-"), (VERMILLION, "P", "-"), (SKY_BLUE, "X", "--"), (ORANGE, "h", "--"),
                    (PURPLE, "*", "--"), (GREEN, "<", "--"), (BLUE, ">", "--"), (VERMILLION, "d", "--")]

CONVENTIONS = {
    "no_bg": "background excluded from old, new and all (MiB convention)",
    "with_bg": "background included in old and all (WILSON's All)",
}

# plot_per_class_iou
OLD_COLOUR, NEW_COLOUR, BACKGROUND_COLOUR = BLUE, ORANGE, "#4D4D4D"
NA_FACE, NA_EDGE = "#EEEEEE", "#AAAAAA"


@dataclass(frozen=True)
class MethodStyle:
    colour: str
    marker: str
    linestyle: str


def method_styles(names: Sequence[str]) -> dict[str, MethodStyle]:
    """A style per method name: fixed for known methods; for others, a slot of the fallback list
    chosen from a hash of the name (stable across processes), moving to the next free slot when
    two names of `names` collide. The same set of names always gets the same styles."""
    styles, taken = {}, set()
    for name in names:
        known = KNOWN_METHOD_STYLES.get(name.lower())
        if known:
            styles[name] = MethodStyle(*known)
            taken.add(known)
    for name in sorted(n for n in names if n not in styles):
        slot = zlib.crc32(name.encode()) % len(_FALLBACK_STYLES)
        candidates = _FALLBACK_STYLES[slot:] + _FALLBACK_STYLES[:slot]
        # Prefer a colour and a marker both unused (apart in grey print too), then any unused pair.
        fresh = [c for c in candidates if all(c[0] != t[0] and c[1] != t[1] for t in taken)]
        style = (fresh or [c for c in candidates if c not in taken] or candidates)[0]
        taken.add(style)
        styles[name] = MethodStyle(*style)
    return styles


# --- small helpers ----------------------------------------------------------------------------
def _percent(value) -> float:
    return float("nan") if value is None or (isinstance(value, float) and math.isnan(value)) else 100.0 * value


def _save(figure: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, facecolor="white")
    return path


def _new_figure(width: float, height: float, constrained: bool = True) -> Figure:
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained" if constrained else None)


def _styled(draw):
    """Run a drawing function under FONT: rcParams are read as each artist is created, so the
    whole drawing (not only the Figure's creation) happens inside the context."""
    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(FONT):
            return draw(*args, **kwargs)
    return wrapper


def _describe(result: dict) -> str:
    """ "synthetic_15_5_disjoint (synthetic 15-5 disjoint)" from a results dict."""
    data = (result.get("config") or {}).get("data") or {}
    setting = " ".join(str(data[k]) for k in ("dataset", "task", "mode") if data.get(k))
    name = result.get("experiment") or ""
    return f"{name} ({setting})" if name and setting else name or setting or "experiment"


def _step_label(record: dict) -> str:
    return f"{record['step']} ({class_span(record['classes'])})"


# --- 1. old / new / all after each step -----------------------------------------------------
@_styled
def plot_steps(results_by_method: Mapping[str, dict], path, convention: str = "no_bg") -> Path:
    """Three panels, old / new / all mIoU (%) after each step, one line with markers per method.

    x = step index with the classes it learned ("0 (1-15)", "1 (16-20)"). "new" is undefined at
    step 0 and left out there. `convention`: "no_bg" (MiB: background in no mean) or "with_bg"
    (background counted with the old classes and in all: WILSON's All); named in the title.
    Methods may have run a different number of steps (an unfinished run), not different tasks.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(CONVENTIONS)}, not {convention!r}")
    if not results_by_method:
        raise ValueError("plot_steps needs the results of at least one method")
    for name, result in results_by_method.items():
        if not result.get("steps"):
            raise ValueError(f"results of {name!r} have no steps")
    reference = max(results_by_method.values(), key=lambda r: len(r["steps"]))["steps"]
    for name, result in results_by_method.items():
        for record, expected in zip(result["steps"], reference):
            if list(record["classes"]) != list(expected["classes"]):
                raise ValueError(f"{name!r} learned classes {class_span(record['classes'])} at step {record['step']}, "
                                 f"other methods {class_span(expected['classes'])}: not the same task")

    old_span = class_span(reference[0]["classes"])
    new_span = class_span([c for record in reference[1:] for c in record["classes"]])
    bg = "bg + " if convention == "with_bg" else ""
    panels = [("old", f"old classes ({bg}{old_span})"), ("new", f"new classes ({new_span})"),
              ("all", "all classes" + (" (incl. background)" if convention == "with_bg" else ""))]
    styles = method_styles(list(results_by_method))
    num_steps = len(reference)

    figure = _new_figure(float(np.clip(3 * (0.5 * num_steps + 1.2), 10.0, 16.0)), 4.4)
    axes = figure.subplots(1, 3, sharey=True)
    highest = 0.0
    # Methods share step 0 (one cached model) and often end close together: each line is shifted
    # a little sideways so no marker hides another.
    dodge = {name: (i - (len(styles) - 1) / 2) * 0.04 for i, name in enumerate(results_by_method)}
    for ax, (group, title) in zip(axes, panels):
        for name, result in results_by_method.items():
            xs, ys = [], []
            for record in result["steps"]:
                value = _percent(record["summary"].get(f"{group}_{convention}"))
                if group == "new" and record["step"] == 0:
                    value = float("nan")  # no new classes yet
                if not math.isnan(value):
                    xs.append(record["step"] + dodge[name])
                    ys.append(value)
            style = styles[name]
            ax.plot(xs, ys, color=style.colour, marker=style.marker, linestyle=style.linestyle, linewidth=1.8,
                    markersize=6, label=name, clip_on=False, zorder=3)
            highest = max([highest, *ys])
        ax.set_title(title)
        ax.set_xticks(range(num_steps))
        rotation = 0 if num_steps <= 3 else 30 if num_steps <= 6 else 60
        ax.set_xticklabels([_step_label(r) for r in reference], rotation=rotation, ha="right" if rotation else "center",
                           rotation_mode="anchor" if rotation else "default")
        ax.set_xlim(-0.3, num_steps - 0.7)
        ax.set_xlabel("step (classes learned)")
        ax.grid(True, color="#DDDDDD", linewidth=0.8, zorder=0)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    axes[0].set_ylabel("mIoU (%)")
    axes[0].set_ylim(0, min(100.0, 10 * math.ceil((highest + 5) / 10)) if highest > 0 else 100.0)
    handles = [Line2D([], [], color=s.colour, marker=s.marker, linestyle=s.linestyle, linewidth=1.8, label=n)
               for n, s in styles.items()]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), frameon=False)
    experiment = _describe(next(iter(results_by_method.values())))
    figure.suptitle(f"{experiment}: mIoU after each step\n{CONVENTIONS[convention]}")
    return _save(figure, path)


# --- 2. per-class IoU after the last step ---------------------------------------------------
@_styled
def plot_per_class_iou(result: dict, path) -> Path:
    """Bars of the IoU (%) of every class after the last step of one run.

    Old classes (step 0's) and new classes (later steps) in two colours, background in a third;
    a class without ground truth in the test set (IoU null) as a hatched grey "n/a" band, not a
    zero bar; dashed lines at the old and new means (the last step's summary: background
    excluded, MiB convention); dotted separators between steps and a top axis with the step
    that learned each class.
    """
    steps = result.get("steps") or []
    if not steps:
        raise ValueError("plot_per_class_iou needs results with at least one step")
    last = steps[-1]
    names = list(last["iou"])
    sizes = [len(record["classes"]) for record in steps]
    if sum(sizes) != len(names):
        raise ValueError(f"{len(names)} IoU values after step {last['step']} but the steps list {sum(sizes)} classes")
    values = np.array([_percent(last["iou"][n]) for n in names])
    step_of = np.repeat(np.arange(len(steps)), sizes)
    has_background = list(steps[0]["classes"][:1]) == [0]  # channel 0 (ADE: "unlabeled")
    kinds = ["old" if s == 0 else "new" for s in step_of]
    if has_background:
        kinds[0] = "background"
    colours = {"old": OLD_COLOUR, "new": NEW_COLOUR, "background": BACKGROUND_COLOUR}

    n = len(names)
    width = float(np.clip(0.3 * n + 2.2, 7.0, 26.0))
    figure = _new_figure(width, 5.8)
    ax = figure.subplots()
    x = np.arange(n)
    known = ~np.isnan(values)
    ax.bar(x[known], values[known], width=0.75, color=[colours[kinds[i]] for i in x[known]], zorder=2)
    # No ground truth: a hatched band over the whole height, so it cannot be read as IoU 0.
    ax.bar(x[~known], np.full((~known).sum(), 100.0), width=0.75, color=NA_FACE, edgecolor=NA_EDGE, hatch="///",
           linewidth=0.6, zorder=1)
    for i in x[~known]:
        ax.text(i, 50, "n/a", ha="center", va="center", rotation=90, fontsize=8, color="#555555", zorder=3,
                bbox=dict(facecolor=NA_FACE, edgecolor="none", pad=1.0))

    handles = []
    summary = last.get("summary") or {}
    for group, colour in (("old", OLD_COLOUR), ("new", NEW_COLOUR)):
        members = [i for i in range(n) if kinds[i] == group]
        if not members:
            continue
        mean = _percent(summary.get(f"{group}_no_bg")) if f"{group}_no_bg" in summary else float("nan")
        if math.isnan(mean) and known[members].any():
            mean = float(np.nanmean(values[members]))
        if math.isnan(mean):
            continue
        ax.hlines(mean, members[0] - 0.45, members[-1] + 0.45, colors=colour, linestyles="--", linewidth=1.6,
                  zorder=4)
        # The number on the line, white-backed so bars behind it do not hide it.
        ax.text(members[-1] + 0.45, mean + 1.0, f"{mean:.1f}", ha="right", va="bottom", fontsize=8, color=colour,
                fontweight="bold", zorder=5, bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=0.5))
        handles.append(Line2D([], [], color=colour, linestyle="--", linewidth=1.6,
                              label=f"{group} mean {mean:.1f} (no bg)"))

    # Steps: dotted separators, and a top axis naming the step of each group of bars.
    bounds = np.cumsum([0] + sizes)
    for boundary in bounds[1:-1]:
        ax.axvline(boundary - 0.5, color="#999999", linestyle=":", linewidth=1.0, zorder=1)
    top = ax.secondary_xaxis("top")
    top.set_xticks((bounds[:-1] + bounds[1:] - 1) / 2)
    top.set_xticklabels([str(t) for t in range(len(steps))], fontsize=8, color="#555555")
    top.tick_params(length=0)
    top.set_xlabel("step that learned the class", fontsize=8, color="#555555")

    fontsize = 9 if n <= 40 else 7 if n <= 80 else 5.5
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=55 if n <= 40 else 90, ha="right" if n <= 40 else "center",
                       rotation_mode="anchor" if n <= 40 else "default", fontsize=fontsize)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(0, 100)
    ax.set_ylabel("IoU (%)")
    ax.set_xlabel("class")
    ax.grid(True, axis="y", color="#DDDDDD", linewidth=0.8, zorder=0)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)

    old_span = class_span(steps[0]["classes"])
    new_span = class_span([c for record in steps[1:] for c in record["classes"]])
    legend = [Patch(facecolor=OLD_COLOUR, label=f"old classes ({old_span})")]
    if len(steps) > 1:
        legend.append(Patch(facecolor=NEW_COLOUR, label=f"new classes ({new_span})"))
    if has_background:
        legend.append(Patch(facecolor=BACKGROUND_COLOUR, label=names[0]))
    if (~known).any():
        legend.append(Patch(facecolor=NA_FACE, edgecolor=NA_EDGE, hatch="///", label="n/a (no ground truth)"))
    legend += handles
    fits = max(1, int(width // 2.3))  # ~2.3 in per legend entry
    rows = math.ceil(len(legend) / fits)
    figure.legend(handles=legend, loc="outside lower center", ncols=math.ceil(len(legend) / rows), frameon=False)
    method = result.get("method") or "method"
    learned = class_span(last["classes"])
    learned = f"class {learned}" if learned.isdigit() else learned if "classes" in learned else f"classes {learned}"
    figure.suptitle(f"{_describe(result)}\n{method}: per-class IoU after step {last['step']} (learned {learned})")
    return _save(figure, path)


# --- 3. qualitative grid --------------------------------------------------------------------
CELL_WIDTH, GAP, TITLE_HEIGHT, MARGIN, LEGEND_ROW_HEIGHT, LEGEND_COLUMN_WIDTH = 1.9, 0.06, 0.34, 0.08, 0.24, 1.7


@dataclass(frozen=True)
class GridLayout:
    """Figure size (inches) and, per row and column, the cell rectangle (left, bottom, width,
    height) in figure fractions: the grid is placed by hand, so a cell's pixels are known
    (the tests check the colour at the centre of a cell)."""
    size: tuple[float, float]
    cells: list[list[tuple[float, float, float, float]]]
    legend_height: float

    def center_pixel(self, row: int, column: int, dpi: int = DPI) -> tuple[int, int]:
        """(x, y) pixel of the centre of a cell in the saved PNG (y from the top)."""
        left, bottom, width, height = self.cells[row][column]
        return (int((left + width / 2) * self.size[0] * dpi), int((1 - bottom - height / 2) * self.size[1] * dpi))


def grid_layout(shapes: Sequence[tuple[int, int]], num_columns: int, legend_rows: int = 0) -> GridLayout:
    """Cells CELL_WIDTH wide; each row as tall as its image's aspect asks (within 0.5-1.6x)."""
    heights = [CELL_WIDTH * float(np.clip(h / w, 0.5, 1.6)) for h, w in shapes]
    legend_height = legend_rows * LEGEND_ROW_HEIGHT + (0.1 if legend_rows else 0.0)
    width = 2 * MARGIN + num_columns * CELL_WIDTH + (num_columns - 1) * GAP
    height = MARGIN + TITLE_HEIGHT + sum(heights) + GAP * (len(heights) - 1) + legend_height + MARGIN
    cells, top = [], height - MARGIN - TITLE_HEIGHT
    for row_height in heights:
        bottom = top - row_height
        cells.append([((MARGIN + c * (CELL_WIDTH + GAP)) / width, bottom / height, CELL_WIDTH / width,
                       row_height / height) for c in range(num_columns)])
        top = bottom - GAP
    return GridLayout((width, height), cells, legend_height)


def _palette_array(palette) -> np.ndarray:
    array = np.asarray(palette, dtype=np.int64)
    if array.ndim == 1:
        if array.size % 3:
            raise ValueError(f"a flat palette has 3 values per class; got {array.size} values")
        array = array.reshape(-1, 3)
    if array.ndim != 2 or array.shape[1] != 3 or array.min() < 0 or array.max() > 255:
        raise ValueError("palette must be a flat [r, g, b, ...] list or an (N, 3) array of 0-255 values")
    return array.astype(np.uint8)


def colorize(mask: np.ndarray, palette) -> np.ndarray:
    """HxW class ids -> HxWx3 uint8 colours of `palette` (255 = void gets the palette's 255th)."""
    colours = _palette_array(palette)
    mask = np.asarray(mask)
    if mask.size and (mask.min() < 0 or mask.max() >= len(colours)):
        raise ValueError(f"mask ids {mask.min()}..{mask.max()} are outside the palette's {len(colours)} colours")
    return colours[mask.astype(np.int64)]


def _check_masks(kind: str, masks, images) -> list[np.ndarray]:
    masks = [np.asarray(m) for m in masks]
    if len(masks) != len(images):
        raise ValueError(f"{kind}: {len(masks)} masks for {len(images)} images")
    for i, (mask, image) in enumerate(zip(masks, images)):
        if mask.ndim != 2 or mask.shape != image.shape[:2]:
            raise ValueError(f"{kind}: mask {i} has shape {mask.shape}, its image is {image.shape[0]}x{image.shape[1]}")
        if not np.issubdtype(mask.dtype, np.integer):
            raise ValueError(f"{kind}: mask {i} has dtype {mask.dtype}; masks hold integer class ids")
    return masks


def _name_of(class_names, class_id: int) -> str:
    if class_id == 255:
        return "void"
    try:
        return str(class_names[class_id])
    except (KeyError, IndexError, TypeError):
        return str(class_id)


@_styled
def plot_qualitative(images: Sequence[np.ndarray], ground_truths: Sequence[np.ndarray],
                     predictions: Mapping[str, Sequence[np.ndarray]], path, palette=tuple(voc_palette()),
                     class_names=None, pseudo_labels: Mapping[str, Sequence[np.ndarray]] | None = None) -> Path:
    """A grid, one row per test image: image | ground truth | each method's prediction | the
    pseudo-label of each method in `pseudo_labels` (e.g. WILSON's localizer).

    images: uint8 HxWx3; masks: HxW integer class ids (dataset ids, 255 = void), coloured with
    `palette` (flat [r, g, b, ...] or (N, 3)). `class_names` (id -> name, a dict or a list):
    when given, a legend of the classes that appear in the grid.
    """
    images = [np.asarray(image) for image in images]
    if not images:
        raise ValueError("plot_qualitative needs at least one image")
    for i, image in enumerate(images):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image {i} must be a uint8 HxWx3 array, got {image.dtype} {image.shape}")
    columns = [("image", images), ("ground truth", _check_masks("ground truths", ground_truths, images))]
    if not predictions:
        raise ValueError("plot_qualitative needs the predictions of at least one method")
    columns += [(name, _check_masks(f"predictions of {name!r}", masks, images)) for name, masks in predictions.items()]
    columns += [(f"{name} pseudo-label", _check_masks(f"pseudo-labels of {name!r}", masks, images))
                for name, masks in (pseudo_labels or {}).items()]
    colours = _palette_array(palette)

    present = sorted(set().union(*(np.unique(m).tolist() for _, masks in columns[1:] for m in masks)))
    if present[0] < 0 or present[-1] >= len(colours):
        raise ValueError(f"mask ids {present[0]}..{present[-1]} are outside the palette's {len(colours)} colours")
    legend_columns = max(1, int((len(columns) * (CELL_WIDTH + GAP)) // LEGEND_COLUMN_WIDTH))
    legend_rows = math.ceil(len(present) / legend_columns) if class_names is not None and present else 0
    if legend_rows:  # balanced rows: 6 entries on 2 rows are 3 + 3, not 5 + 1
        legend_columns = math.ceil(len(present) / legend_rows)
    layout = grid_layout([image.shape[:2] for image in images], len(columns), legend_rows)

    figure = _new_figure(*layout.size, constrained=False)
    for row, image in enumerate(images):
        for column, (title, arrays) in enumerate(columns):
            ax = figure.add_axes(layout.cells[row][column])
            if column == 0:
                ax.imshow(arrays[row], interpolation="antialiased")
            else:  # nearest: a mask pixel keeps its palette colour exactly
                ax.imshow(colorize(arrays[row], colours), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_linewidth(0.5)
                spine.set_color("#888888")
            if row == 0:
                ax.set_title(title, fontsize=10, pad=4)
    if legend_rows:
        handles = [Patch(facecolor=colours[c] / 255, edgecolor="#888888", linewidth=0.5,
                         label=_name_of(class_names, c)) for c in present]
        figure.legend(handles=handles, loc="lower center", ncols=legend_columns, frameon=False, fontsize=8,
                      bbox_to_anchor=(0.5, MARGIN / layout.size[1]), handlelength=1.2, columnspacing=1.0,
                      borderaxespad=0.0)
    return _save(figure, path)


# --- 4. wandb ---------------------------------------------------------------------------------
def log_figures_to_wandb(paths: Mapping[str, Path], run=None) -> bool:
    """Log each PNG as a `wandb.Image` under its key to `run` (a wandb run or a Lightning
    WandbLogger), or to the active run when None. Nothing (False) when there is no run or wandb
    is not installed; only the main process should call it under DDP."""
    if run is not None and not hasattr(run, "log") and hasattr(run, "experiment"):
        run = run.experiment
    try:
        import wandb
    except ImportError:
        return False
    run = run if run is not None else wandb.run
    if run is None or not paths:
        return False
    run.log({key: wandb.Image(str(path)) for key, path in paths.items()})
    return True


# --- all figures of an experiment -------------------------------------------------------------
def write_experiment_figures(out_dir, results_by_method: Mapping[str, dict], per_class: bool = True) -> dict[str, Path]:
    """steps_no_bg.png, steps_with_bg.png and (per_class) per_class_iou_<method>.png under out_dir
    (the experiment's directory, beside comparison.md); the keys name the figures for wandb. The
    run loop passes per_class=False: it has drawn each run's per-class figure in the run's directory."""
    out_dir = Path(out_dir)
    paths = {f"figures/steps_{c}": plot_steps(results_by_method, out_dir / f"steps_{c}.png", c) for c in CONVENTIONS}
    for name, result in results_by_method.items() if per_class else ():
        paths[f"figures/per_class_iou/{name}"] = plot_per_class_iou(result, out_dir / f"per_class_iou_{name}.png")
    return paths
