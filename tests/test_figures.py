"""Figures: valid PNGs of sane size from hand-made results; the qualitative grid puts each mask
in its cell in palette colours; bad input is a one-line ValueError; wandb logging is optional."""
import numpy as np
import pytest
from PIL import Image

from experiments.reporting import figures
from datamodules.datasets.voc import voc_palette

PALETTE = np.array(voc_palette()).reshape(-1, 3)
STEPS = [list(range(11)), [11, 12, 13, 14, 15], [16, 17, 18, 19, 20]]  # 10-5-5
NAMES = [f"class{c}" if c else "background" for c in range(21)]


def _run(method: str, final_old: float, nulls=()) -> dict:
    records = []
    for step, classes in enumerate(STEPS):
        seen = [c for s in STEPS[: step + 1] for c in s]
        iou = {NAMES[c]: (None if c in nulls else round(0.1 + 0.04 * c, 3)) for c in seen}
        old = 0.6 - (0.6 - final_old) * step / 2
        summary = {"bg": 0.9, "old_no_bg": old, "old_with_bg": old + 0.03, "new_no_bg": None if step == 0 else 0.3,
                   "new_with_bg": None if step == 0 else 0.3, "all_no_bg": old - 0.05 * step,
                   "all_with_bg": old - 0.05 * step + 0.02, "hiou_no_bg": None}
        records.append({"step": step, "classes": classes, "iou": iou, "summary": summary})
    return {"experiment": "toy_10_5_5", "method": method, "steps": records, "complete": True,
            "config": {"data": {"dataset": "voc", "task": "10-5-5", "mode": "overlap"}}}


@pytest.fixture
def results():
    return {"ft": _run("ft", 0.05), "mib": _run("mib", 0.4, nulls=(4,)), "wilson": _run("wilson", 0.5, nulls=(4, 18))}


@pytest.fixture
def captured(monkeypatch):
    """The Figure each plot function saves (and still saves it)."""
    seen = []
    save = figures._save

    def capture(figure, path):
        seen.append(figure)
        return save(figure, path)

    monkeypatch.setattr(figures, "_save", capture)
    return seen


def _check_png(path, min_width=600, max_width=4000):
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.mode in ("RGB", "RGBA")
        assert min_width <= image.width <= max_width
        assert 300 <= image.height <= 4000
        return np.asarray(image.convert("RGB"))


def _one_line_value_error(call, match):
    with pytest.raises(ValueError, match=match) as error:
        call()
    assert "\n" not in str(error.value)


# --- plot_steps -------------------------------------------------------------------------------
@pytest.mark.parametrize("convention", ["no_bg", "with_bg"])
def test_plot_steps_writes_a_png(results, tmp_path, convention):
    path = figures.plot_steps(results, tmp_path / f"steps_{convention}.png", convention)
    assert path == tmp_path / f"steps_{convention}.png"
    _check_png(path)


def test_plot_steps_panels_lines_and_titles(results, tmp_path, captured):
    figures.plot_steps(results, tmp_path / "steps.png")
    figure = captured[0]
    old, new, all_ = figure.axes[:3]
    assert [ax.get_title() for ax in (old, new, all_)] == ["old classes (1-10)", "new classes (11-20)", "all classes"]
    assert old.get_ylabel() == "mIoU (%)"
    assert [t.get_text() for t in old.get_xticklabels()] == ["0 (1-10)", "1 (11-15)", "2 (16-20)"]
    assert "MiB convention" in figure.get_suptitle() and "toy_10_5_5" in figure.get_suptitle()
    assert len(old.lines) == len(new.lines) == 3
    # new is undefined at step 0: that point is left out (x near 0 only by the small dodge).
    for line in new.lines:
        assert len(line.get_xdata()) == 2 and min(line.get_xdata()) > 0.5
    for line in old.lines:
        assert len(line.get_xdata()) == 3
    mib = old.lines[1]
    np.testing.assert_allclose(mib.get_ydata(), [60.0, 50.0, 40.0])
    # one colour per method, the same in every panel
    colours = [line.get_color() for line in old.lines]
    assert len(set(colours)) == 3 and colours == [line.get_color() for line in all_.lines]


def test_plot_steps_with_bg_names_wilsons_convention(results, tmp_path, captured):
    figures.plot_steps(results, tmp_path / "steps.png", "with_bg")
    assert "WILSON" in captured[0].get_suptitle()
    np.testing.assert_allclose(captured[0].axes[0].lines[1].get_ydata(), [63.0, 53.0, 43.0])


def test_plot_steps_unfinished_run_has_fewer_points(results, tmp_path, captured):
    results["wilson"]["steps"] = results["wilson"]["steps"][:2]
    figures.plot_steps(results, tmp_path / "steps.png")
    assert len(captured[0].axes[0].lines[2].get_xdata()) == 2


def test_plot_steps_bad_input(results, tmp_path):
    _one_line_value_error(lambda: figures.plot_steps(results, tmp_path / "x.png", "bg"), "convention")
    _one_line_value_error(lambda: figures.plot_steps({}, tmp_path / "x.png"), "at least one method")
    results["ft"]["steps"][1]["classes"] = [11, 12]
    _one_line_value_error(lambda: figures.plot_steps(results, tmp_path / "x.png"), "not the same task")


def test_method_colours_are_consistent_and_distinct():
    assert figures.method_styles(["mib", "wilson"])["mib"] == figures.method_styles(["ft", "mib"])["mib"]
    styles = figures.method_styles(["mib", "alpha", "beta", "gamma", "delta"])
    assert len({(s.colour, s.marker) for s in styles.values()}) == 5
    assert figures.method_styles(["delta", "alpha"]) == figures.method_styles(["delta", "alpha"])


# --- plot_per_class_iou -----------------------------------------------------------------------
def test_per_class_iou_writes_a_png(results, tmp_path):
    _check_png(figures.plot_per_class_iou(results["wilson"], tmp_path / "per_class.png"))


def test_per_class_iou_marks_nulls_groups_and_means(results, tmp_path, captured):
    figures.plot_per_class_iou(results["wilson"], tmp_path / "per_class.png")
    ax = captured[0].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == NAMES
    assert ax.get_ylabel() == "IoU (%)"
    assert [t.get_text() for t in ax.texts].count("n/a") == 2  # classes 4 and 18 have no ground truth
    bars = {round(p.get_x() + p.get_width() / 2): p for p in ax.patches}
    assert bars[4].get_hatch() == "///" and bars[18].get_hatch() == "///"
    colours = {i: bars[i].get_facecolor()[:3] for i in (0, 1, 11, 20)}
    assert colours[1] != colours[11] and colours[0] not in (colours[1], colours[11]) and colours[11] == colours[20]
    # the old/new means are drawn at the summary's values (no background)
    means = sorted(float(c.get_segments()[0][0][1]) for c in ax.collections)
    np.testing.assert_allclose(means, [30.0, 50.0])
    labels = [t.get_text() for t in captured[0].legends[0].get_texts()]
    assert "n/a (no ground truth)" in labels and "background" in labels
    assert "step 2" in captured[0].get_suptitle()


def test_per_class_iou_bad_input(results, tmp_path):
    del results["mib"]["steps"][-1]["iou"]["class20"]
    _one_line_value_error(lambda: figures.plot_per_class_iou(results["mib"], tmp_path / "x.png"), "20 IoU values")
    _one_line_value_error(lambda: figures.plot_per_class_iou({"steps": []}, tmp_path / "x.png"), "at least one step")


# --- plot_qualitative -------------------------------------------------------------------------
def _qualitative_inputs():
    """Two 48x64 images; ground truth: void border, a big square of class 3 (row 0) / 7 (row 1)."""
    images, truths = [], []
    for colour, cls in (((200, 30, 90), 3), ((20, 160, 220), 7)):
        images.append(np.full((48, 64, 3), colour, np.uint8))
        truth = np.full((48, 64), 255, np.uint8)
        truth[6:42, 8:56] = 0
        truth[12:36, 16:48] = cls
        truths.append(truth)
    predictions = {"mib": [np.full((48, 64), 5, np.uint8), np.full((48, 64), 6, np.uint8)],
                   "wilson": [np.full((48, 64), 9, np.uint8), np.full((48, 64), 10, np.uint8)]}
    pseudo = {"wilson": [np.full((48, 64), 12, np.uint8), np.full((48, 64), 13, np.uint8)]}
    return images, truths, predictions, pseudo


def test_qualitative_grid_layout_and_colours(tmp_path):
    images, truths, predictions, pseudo = _qualitative_inputs()
    path = figures.plot_qualitative(images, truths, predictions, tmp_path / "qual.png", pseudo_labels=pseudo)
    pixels = _check_png(path)
    layout = figures.grid_layout([i.shape[:2] for i in images], num_columns=5)
    assert pixels.shape[:2] == (round(layout.size[1] * figures.DPI), round(layout.size[0] * figures.DPI))

    def at(row, column, dx=0.0, dy=0.0):
        """Colour at a cell's centre, or shifted by a fraction of the cell's size."""
        x, y = layout.center_pixel(row, column)
        _, _, width, height = layout.cells[row][column]
        return pixels[int(y + dy * height * pixels.shape[0]), int(x + dx * width * pixels.shape[1])]

    np.testing.assert_allclose(at(0, 0), [200, 30, 90], atol=2)  # the image
    np.testing.assert_array_equal(at(0, 1), PALETTE[3])  # ground truth: the square of class 3
    np.testing.assert_array_equal(at(0, 1, dx=0.46, dy=0.46), PALETTE[255])  # ... its void border
    np.testing.assert_array_equal(at(0, 1, dx=0.35, dy=0.0), PALETTE[0])  # ... background around it
    np.testing.assert_array_equal(at(0, 2), PALETTE[5])  # mib
    np.testing.assert_array_equal(at(0, 3), PALETTE[9])  # wilson
    np.testing.assert_array_equal(at(0, 4), PALETTE[12])  # wilson's pseudo-label
    np.testing.assert_allclose(at(1, 0), [20, 160, 220], atol=2)
    for column, cls in ((1, 7), (2, 6), (3, 10), (4, 13)):
        np.testing.assert_array_equal(at(1, column), PALETTE[cls])


def test_qualitative_with_class_names_adds_a_legend(tmp_path, captured):
    images, truths, predictions, _ = _qualitative_inputs()
    path = figures.plot_qualitative(images, truths, predictions, tmp_path / "qual.png",
                                    class_names={0: "background", 3: "bird", 7: "car"})
    _check_png(path)
    figure = captured[0]
    assert [ax.get_title() for ax in figure.axes[:4]] == ["image", "ground truth", "mib", "wilson"]
    assert all(not ax.get_xticks().size and not ax.get_yticks().size for ax in figure.axes)
    labels = [t.get_text() for t in figure.legends[0].get_texts()]
    assert labels == ["background", "bird", "5", "6", "car", "9", "10", "void"]


def test_qualitative_bad_input(tmp_path):
    images, truths, predictions, pseudo = _qualitative_inputs()
    out = tmp_path / "x.png"
    _one_line_value_error(lambda: figures.plot_qualitative(images, truths[:1], predictions, out),
                          "ground truths: 1 masks for 2 images")
    short = {"mib": predictions["mib"][:1]}
    _one_line_value_error(lambda: figures.plot_qualitative(images, truths, short, out), "'mib': 1 masks for 2 images")
    _one_line_value_error(lambda: figures.plot_qualitative(images, truths, predictions, out,
                                                           pseudo_labels={"wilson": pseudo["wilson"] * 2}),
                          "pseudo-labels of 'wilson': 4 masks")
    wrong_shape = {"mib": [predictions["mib"][0][:10], predictions["mib"][1]]}
    _one_line_value_error(lambda: figures.plot_qualitative(images, truths, wrong_shape, out), "shape")
    _one_line_value_error(lambda: figures.plot_qualitative([i.astype(float) for i in images], truths, predictions,
                                                           out), "uint8")
    _one_line_value_error(lambda: figures.plot_qualitative(images, truths, {}, out), "at least one method")
    _one_line_value_error(lambda: figures.plot_qualitative(images, truths, predictions, out, palette=[0, 0, 0] * 4),
                          "outside the palette")
    assert not out.exists()


# --- wandb and the experiment's set -----------------------------------------------------------
class _FakeRun:
    def __init__(self):
        self.logged = []

    def log(self, data):
        self.logged.append(data)


def test_log_figures_to_wandb(results, tmp_path, monkeypatch):
    import wandb

    path = figures.plot_per_class_iou(results["mib"], tmp_path / "per_class.png")
    run = _FakeRun()
    assert figures.log_figures_to_wandb({"figures/per_class": path}, run) is True
    assert list(run.logged[0]) == ["figures/per_class"] and isinstance(run.logged[0]["figures/per_class"], wandb.Image)

    class Logger:  # a Lightning WandbLogger: the run is its `experiment`
        experiment = _FakeRun()
    assert figures.log_figures_to_wandb({"a": path}, Logger()) and len(Logger.experiment.logged) == 1

    monkeypatch.setattr(wandb, "run", None)
    assert figures.log_figures_to_wandb({"a": path}) is False  # no run: nothing, no error


def test_write_experiment_figures(results, tmp_path):
    paths = figures.write_experiment_figures(tmp_path / "toy", results)
    assert set(paths) == {"figures/steps_no_bg", "figures/steps_with_bg", "figures/per_class_iou/ft",
                          "figures/per_class_iou/mib", "figures/per_class_iou/wilson"}
    for path in paths.values():
        _check_png(path)
