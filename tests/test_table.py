"""`make table` (experiments.table): WILSON's Table 1 end to end, its layout and conventions, the
papers' numbers in their own conventions, the progress estimate, and resuming after a kill."""
import csv
import json

import pytest
from PIL import Image
from rich.console import Console

from experiments import table
from experiments.config import apply_overrides, load_experiment, resolve
from experiments.store import run_directory
from tests.test_experiment_files import smoke_config

PIXEL = ["joint", "ft", "mib", "plop", "sdr", "recall", "mbs"]
IMAGE = ["cam", "seam", "ss", "eps", "wilson"]


def _tiny_table_experiments(tmp_path) -> dict:
    """Both protocols' `*_all` experiments with the table's methods, shrunk to two batches per step
    on a tiny generated dataset (tests/test_experiment_files.smoke_config)."""
    experiments = {}
    for protocol, name in table.PROTOCOL_EXPERIMENTS["synthetic"]:
        shrunk = smoke_config(name, tmp_path / "data", tmp_path, every_method=True)
        experiments[protocol] = resolve(apply_overrides(shrunk, ["methods=[" + ",".join(table.TABLE_METHODS) + "]"]))
    return experiments


def _console():
    return Console(record=True, width=250, force_terminal=False)


def _progress_lines(console) -> list[str]:
    """The progress lines printed since the last call (export_text clears the record)."""
    return [line for line in console.export_text().splitlines() if line.startswith("[table ")]


def test_table_command_end_to_end_on_a_tiny_dataset(tmp_path, monkeypatch):
    """Twelve methods x two protocols through every step; the table in WILSON's layout (Pixel then
    Image, a network per row, old / new / All per protocol in WILSON's convention, read from the runs'
    own results files), its CSV and figure; a progress line per (protocol, method, step); a killed
    command continues from the steps it saved, and a finished one reuses everything."""
    experiments = _tiny_table_experiments(tmp_path)

    # A kill after the 5th finished step: the 5 saved steps are not run again.
    killed = _console()
    original_line = table.TableProgress.line

    def line_then_kill(self, unit, seconds, how):
        text = original_line(self, unit, seconds, how)
        if sum(u.done for u in self.units) == 5:
            raise KeyboardInterrupt
        return text

    monkeypatch.setattr(table.TableProgress, "line", line_then_kill)
    with pytest.raises(KeyboardInterrupt):
        table.run_table(experiments, "synthetic", killed)
    monkeypatch.setattr(table.TableProgress, "line", original_line)

    console = _console()
    out = table.run_table(experiments, "synthetic", console)
    text = console.export_text()
    assert "48 (protocol, method, step); 5 saved by an earlier run" in text
    lines = [line for line in text.splitlines() if line.startswith("[table ")]
    assert len(lines) == 48 and lines[-1].startswith("[table 48/48] overlap · wilson · step 1")
    assert sum("reused from an earlier run" in line for line in lines) == 5
    assert all("elapsed" in line for line in lines) and "left" in lines[-2]
    assert [u.done for u in out["units"]] == [True] * 48 and sum(u.saved for u in out["units"]) == 5

    # the rows: every method of the table, pixel then image, each naming its network
    rows = out["rows"]
    assert [r["method"] for r in rows] == PIXEL + IMAGE
    assert [r["supervision"] for r in rows] == ["pixel"] * 7 + ["image"] * 5
    networks = {r["method"]: r["network"] for r in rows}
    assert networks["mbs"].startswith("Segmenter ViT") and {networks[m] for m in PIXEL + IMAGE if m != "mbs"} == {"DeepLabV3 R-10t"}

    # the markdown: groups in order, the header of both protocols, the convention named, numbers
    # = the results files' final old / new without background and All with background, in %
    markdown = (tmp_path / "runs" / "table.md").read_text()
    assert markdown == out["markdown"]
    body = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert body[0] == ("| | Method | network | Disjoint old 1-15 | new 16-20 | All | Overlap old 1-15 | new 16-20 | All |")
    assert body[1].startswith("| **Pixel** | Joint |") and body[8].startswith("| **Image** | CAM |")
    assert len(body) == 1 + 12 and "All = mean IoU over every class including background" in markdown
    for line, row in zip(body[1:], rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == table.DISPLAY_NAMES[row["method"]] and cells[2] == row["network"]
        for offset, (protocol, experiment) in zip((3, 6), experiments.items()):
            final = json.loads((run_directory(experiment.run_config(row["method"])) / "results.json").read_text())["final"]
            expected = [f"{100 * final[k]:.1f}" for k in ("old_no_bg", "new_no_bg", "all_with_bg")]
            assert cells[offset:offset + 3] == expected, (row["method"], protocol)

    # the CSV: one line per (protocol, method); the figure: a real PNG
    with open(tmp_path / "runs" / "table.csv") as f:
        records = list(csv.DictReader(f))
    assert [(r["protocol"], r["method"]) for r in records] == [(p, m) for m in PIXEL + IMAGE for p in ("disjoint", "overlap")]
    with Image.open(tmp_path / "runs" / "table.png") as figure:
        assert figure.format == "PNG" and figure.size[0] > 800

    # once complete, everything is reused and nothing trains again
    again = _console()
    table.run_table(experiments, "synthetic", again)
    text = again.export_text()
    assert sum("reused from an earlier run" in line for line in text.splitlines() if line.startswith("[table ")) == 48
    assert "48 saved by an earlier run; 0 step-0 model(s) to train" in text


def _fake_result(method: str, final: dict) -> dict:
    summary = {"old_no_bg": 0.5, "new_no_bg": float("nan"), "all_no_bg": 0.5, "old_with_bg": 0.55,
               "all_with_bg": 0.55, "hiou_no_bg": float("nan"), "hiou_with_bg": float("nan")}
    last = {**summary, **final}
    return {"method": method, "config": {"seed": 42, "network": {"encoder": "resnet101"}}, "supervision": "pixel",
            "steps": [{"step": 0, "classes": list(range(16)), "summary": summary},
                      {"step": 1, "classes": list(range(16, 21)), "summary": last}],
            "final": {**last, "avg_no_bg": 0.5, "avg_with_bg": 0.5}}


def test_voc_table_puts_wilsons_numbers_beside_each_in_its_own_convention():
    """WILSON's Table 1 numbers come from the VOC files: its own rows (Joint and FT from RECALL, with
    background in All), PLOP's background-inclusive '0-15' compared with old *with* background, an
    All with background compared with all+bg; Δ = measured - paper in points."""
    experiments = {p: resolve(load_experiment(name)) for p, name in table.PROTOCOL_EXPERIMENTS["voc"]}
    numbers = table.wilson_table_numbers(experiments["disjoint"].expected)
    assert (numbers["joint"]["old"], numbers["joint"]["new"], numbers["joint"]["all"]) == (75.5, 73.5, 75.4)
    assert numbers["joint"]["all_includes_background"] and numbers["ft"]["old"] == 8.4
    assert numbers["plop"]["old_includes_background"] and numbers["plop"]["old"] == 71.0
    assert numbers["wilson"]["all"] == 67.3 and numbers["cam"]["new"] == 26.1
    assert table.wilson_table_numbers(experiments["overlap"].expected)["ft"]["all"] == 18.3

    final = {"old_no_bg": 0.70, "old_with_bg": 0.72, "new_no_bg": 0.40, "all_no_bg": 0.62, "all_with_bg": 0.65}
    results = {p: {"plop": _fake_result("plop", final), "joint": _fake_result("joint", final)} for p in experiments}
    rows = table.table_rows(results, experiments, {}, with_paper=True)
    by_method = {row["method"]: row for row in rows}
    assert by_method["wilson"]["disjoint"] is None and by_method["wilson"]["disjoint_missing"] == "not run"
    plop, joint = by_method["plop"]["disjoint"], by_method["joint"]["disjoint"]
    # PLOP: old 72.0 (with bg) - 71.0 = +1.0; new 40.0 - 42.82; All 65.0 (with bg) - 64.29
    assert plop["diff_old_with_bg"] == pytest.approx(1.0) and plop["diff_old_no_bg"] is None
    assert plop["diff_new_no_bg"] == pytest.approx(40.0 - 42.82) and plop["diff_all_with_bg"] == pytest.approx(65.0 - 64.29)
    # Joint (WILSON's row, from RECALL): old without background 70.0 - 75.5; All with it 65.0 - 75.4
    assert joint["diff_old_no_bg"] == pytest.approx(-5.5) and joint["diff_all_with_bg"] == pytest.approx(65.0 - 75.4)
    markdown = table.to_markdown(rows, experiments, with_paper=True)
    plop_line = next(line for line in markdown.splitlines() if "| PLOP |" in line)
    assert "71.0/42.8/64.3 (old+bg, All+bg)" in plop_line and "+1.0/-2.8/+0.7 (All+bg)" in plop_line
    assert "| 70.0 | 40.0 | 65.0 |" in plop_line   # the measured cells stay in the table's convention
    assert "Disjoint old 1-15 | new 16-20 | All | paper o/n/a | Δ o/n/a" in markdown


def test_progress_estimate_is_the_mean_time_of_each_kind_times_what_is_left():
    units = [table.Unit("disjoint", "a", 0, "step0"), table.Unit("disjoint", "a", 1, "step"),
             table.Unit("disjoint", "b", 0, "step0-cached"), table.Unit("disjoint", "b", 1, "step"),
             table.Unit("overlap", "a", 0, "step0"), table.Unit("overlap", "a", 1, "step", saved=True)]
    now = [1000.0]
    console = _console()
    progress = table.TableProgress(units, console, clock=lambda: now[0])
    report = progress.reporter("disjoint")
    assert progress.remaining_seconds() is None
    now[0] += 100
    report("a", 0, 100.0, "trained")        # left: step, step0-cached, step, step0: 4 x 100 (unseen kinds: the mean of all)
    assert progress.remaining_seconds() == pytest.approx(400.0)
    now[0] += 40
    report("a", 1, 40.0, "trained")         # means: step0 100, step 40, others (70); left: cached, step, step0
    assert progress.remaining_seconds() == pytest.approx(70 + 40 + 100)
    line = _progress_lines(console)[-1]
    assert line == "[table 2/6] disjoint · a · step 1: trained in 40 s · elapsed 2 min 20 s · about 3 min 30 s left"
    for protocol, method, step in (("disjoint", "b", 0), ("disjoint", "b", 1), ("overlap", "a", 0)):
        progress.reporter(protocol)(method, step, 10.0, "trained")
    progress.reporter("overlap")("a", 1, 0.0, "reused")   # the unit an earlier invocation saved
    last = _progress_lines(console)[-1]
    assert last.startswith("[table 6/6]") and last.endswith("reused from an earlier run · elapsed 2 min 20 s · nothing left to train")
