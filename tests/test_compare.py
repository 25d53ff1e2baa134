"""The seed-averaged comparison table (experiments/compare.py) on hand-made results files.

The numbers are chosen so that every cell can be worked out by hand: mib has three seeds with
old = 0.30 / 0.32 / 0.34 -> mean 32.0, sample std 2.0; ft and wilson have one seed (no std).
"""
import csv
import glob
import json
import os
import time

import pytest

from experiments import compare

EXPERIMENT = "toy_15_5_disjoint"
STEP0_CLASSES, STEP1_CLASSES = list(range(16)), list(range(16, 21))
EXPECTED = {
    "source": "Paper A Table 1",
    "convention": "old = 1-15, new = 16-20, all = 1-20 without background",
    "methods": {
        "mib": {"old": 71.8, "new": 43.3, "all": 64.7},                     # MiB convention
        "wilson": {"old": 30.0, "new": 10.0, "all": 25.0, "all_includes_background": True,
                   "source": "Paper B Table 2"},                            # WILSON's All (+bg)
    },
}
FINAL_HEADER = "| Method | network | sup. | n | old 1-15 | new 16-20 | all | all+bg | hIoU | avg | paper o/n/a | Δ o/n/a |"


def summary(old, new, all_no_bg, all_with_bg, hiou, old_with_bg):
    return {"bg": 0.9, "old_no_bg": old, "old_with_bg": old_with_bg, "new_no_bg": new, "new_with_bg": new,
            "all_no_bg": all_no_bg, "all_with_bg": all_with_bg, "past_no_bg": old, "past_with_bg": old_with_bg,
            "current_no_bg": new, "current_with_bg": new, "hiou_no_bg": hiou, "hiou_with_bg": hiou}


DEEPLAB = {"arch": "deeplabv3", "encoder": "tu-resnet10t", "output_stride": 8}
SEGMENTER = {"kind": "segmenter", "encoder": "vit_base_patch16_384", "patch_size": 16}


def results(method, seed, step0, step1, avg, complete=True, experiment=EXPERIMENT):
    """A results.json as experiments/run.py writes it (NaN written as null); ft on a Segmenter."""
    steps = [{"step": 0, "classes": STEP0_CLASSES, "summary": summary(*step0), "iou": {}},
             {"step": 1, "classes": STEP1_CLASSES, "summary": summary(*step1), "iou": {}}]
    data = {"experiment": experiment, "method": method, "hparams": {}, "complete": complete,
            "steps": steps if complete else steps[:1],
            "config": {"name": experiment, "seed": seed, "expected": EXPECTED,
                       "data": {"dataset": "synthetic", "task": "15-5", "mode": "disjoint"},
                       "network": SEGMENTER if method == "ft" else DEEPLAB,
                       "methods": {"joint": {}, "ft": {}, "mib": {}, "wilson": {}}}}
    if complete:
        data["final"] = dict(summary(*step1), avg_no_bg=avg[0], avg_with_bg=avg[1])
    return data


def write(path, data, mtime):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    os.utime(path, (mtime, mtime))
    return path


# step 0 = (old, new, all, all+bg, hIoU, old+bg); new and hIoU do not exist after step 0
MIB = {  # seed: (step 0, step 1, avg)
    0: ((0.40, None, 0.40, 0.45, None, 0.45), (0.30, 0.10, 0.25, 0.28, 0.15, 0.35), (0.33, 0.36)),
    1: ((0.42, None, 0.42, 0.45, None, 0.45), (0.32, 0.12, 0.27, 0.31, 0.15, 0.35), (0.35, 0.38)),
    2: ((0.44, None, 0.44, 0.45, None, 0.45), (0.34, 0.14, 0.29, 0.34, 0.15, 0.35), (0.37, 0.40)),
}
FT = ((0.40, None, 0.40, 0.45, None, 0.45), (0.0, 0.274, 0.069, 0.108, 0.0, 0.05), (0.202, 0.25))
WILSON = ((0.41, None, 0.41, 0.46, None, 0.46), (0.331, 0.102, 0.250, 0.284, 0.160, 0.35), (0.300, 0.33))


@pytest.fixture
def runs(tmp_path):
    """runs/<EXPERIMENT>/ with: mib in the new layout (seeds 0, 1, 2) plus an older old-layout file
    that duplicates seed 2 (with other numbers: must be ignored); ft in the old layout (one seed,
    42); wilson seed 0 complete and seed 1 incomplete (new layout); a step-0 cache directory."""
    root = tmp_path / "runs"
    exp = root / EXPERIMENT
    now = time.time()
    for seed, (step0, step1, avg) in MIB.items():
        write(exp / "mib" / f"seed{seed}" / "results.json", results("mib", seed, step0, step1, avg), now)
    duplicate = ((0.99, None, 0.99, 0.99, None, 0.99), (0.99,) * 6, (0.99, 0.99))
    write(exp / "mib" / "results.json", results("mib", 2, *duplicate), now - 3600)
    write(exp / "ft" / "results.json", results("ft", 42, *FT), now)
    write(exp / "wilson" / "seed0" / "results.json", results("wilson", 0, *WILSON), now)
    write(exp / "wilson" / "seed1" / "results.json", results("wilson", 1, *WILSON, complete=False), now)
    (root / ".step0_cache").mkdir()
    return root


def test_collect_results_groups_by_method_and_seed(runs):
    collected = compare.collect_results(runs / EXPERIMENT)
    assert collected["experiment"] == EXPERIMENT
    assert list(collected["methods"]) == ["ft", "mib", "wilson"]  # the experiment file's order
    seeds = {m: [r["config"]["seed"] for r in rs] for m, rs in collected["methods"].items()}
    assert seeds == {"ft": [42], "mib": [0, 1, 2], "wilson": [0]}
    assert collected["paths"]["mib"][2] == str(runs / EXPERIMENT / "mib" / "seed2" / "results.json")
    assert collected["methods"]["mib"][2]["final"]["old_no_bg"] == 0.34  # the newer file of seed 2
    assert {m: rs[0]["supervision"] for m, rs in collected["methods"].items()} == {
        "ft": "pixel", "mib": "pixel", "wilson": "image"}
    assert collected["expected"] == EXPECTED
    incomplete = [w for w in collected["warnings"] if w.startswith("incomplete")]
    assert incomplete == [f"incomplete (1 steps done), skipped: {runs / EXPERIMENT / 'wilson' / 'seed1' / 'results.json'}"]
    duplicates = [w for w in collected["warnings"] if "two results files" in w]
    assert duplicates == [f"mib seed 2: two results files; kept the newest {runs / EXPERIMENT / 'mib' / 'seed2' / 'results.json'}, "
                          f"ignored {runs / EXPERIMENT / 'mib' / 'results.json'}"]
    assert len(collected["warnings"]) == 2


def test_the_newest_duplicate_wins_whatever_its_layout(tmp_path):
    exp = tmp_path / EXPERIMENT
    write(exp / "mib" / "seed0" / "results.json", results("mib", 0, *MIB[0]), 1_000)
    write(exp / "mib" / "results.json", results("mib", 0, *MIB[2]), 2_000)  # newer, old layout
    collected = compare.collect_results(exp)
    assert [r["final"]["old_no_bg"] for r in collected["methods"]["mib"]] == [0.34]
    assert collected["paths"]["mib"] == [str(exp / "mib" / "results.json")]


def test_comparison_table_mean_std_and_paper_differences(runs):
    collected = compare.collect_results(runs / EXPERIMENT)
    rows = {r["method"]: r for r in compare.comparison_table(collected["methods"], collected["expected"])}
    mib, ft, wilson = rows["mib"], rows["ft"], rows["wilson"]
    assert (mib["n_seeds"], mib["seeds"], ft["n_seeds"], ft["seeds"]) == (3, "0 1 2", 1, "42")
    assert mib["final_old_no_bg_mean"] == pytest.approx(32.0) and mib["final_old_no_bg_std"] == pytest.approx(2.0)
    assert mib["final_all_with_bg_mean"] == pytest.approx(31.0) and mib["final_all_with_bg_std"] == pytest.approx(3.0)
    assert mib["step0_old_no_bg_mean"] == pytest.approx(42.0)
    assert mib["step0_new_no_bg_mean"] is None and mib["step0_hiou_no_bg_mean"] is None  # no new classes yet
    assert ft["final_new_no_bg_mean"] == pytest.approx(27.4) and ft["final_new_no_bg_std"] is None  # one seed
    # MiB's row: all compared without background (32.0 - 71.8, 12.0 - 43.3, 27.0 - 64.7)
    assert mib["diff_old_no_bg"] == pytest.approx(-39.8)
    assert mib["diff_new_no_bg"] == pytest.approx(-31.3)
    assert mib["diff_all_no_bg"] == pytest.approx(-37.7) and mib["diff_all_with_bg"] is None
    # WILSON's row: its All includes background -> compared with all+bg (28.4 - 25.0)
    assert wilson["paper_all_with_bg"] == 25.0 and wilson["paper_all_no_bg"] is None
    assert wilson["diff_all_with_bg"] == pytest.approx(3.4) and wilson["diff_all_no_bg"] is None
    assert wilson["diff_old_no_bg"] == pytest.approx(3.1) and wilson["diff_new_no_bg"] == pytest.approx(0.2)
    assert wilson["paper_source"] == "Paper B Table 2" and mib["paper_source"] == "Paper A Table 1"
    assert ft["paper_source"] is None and ft["diff_old_no_bg"] is None and ft["paper_old_new_all"] == "-"


def test_markdown_cells(runs):
    collected = compare.collect_results(runs / EXPERIMENT)
    rows = compare.comparison_table(collected["methods"], collected["expected"])
    text = compare.to_markdown(rows, "toy", compare.caption_for(collected))
    lines = text.splitlines()
    assert lines[0] == "# toy"
    assert "Paper numbers: Paper A Table 1" in lines[2] and "wilson: Paper B Table 2" in lines[2]
    assert FINAL_HEADER in lines
    assert "| mib | DeepLabV3 R-10t | pixel | 3 | 32.0 ± 2.0 | 12.0 ± 2.0 | 27.0 ± 2.0 | 31.0 ± 3.0 | 15.0 ± 0.0 | 35.0 ± 2.0 " \
           "| 71.8/43.3/64.7 | -39.8/-31.3/-37.7 |" in lines
    assert "| ft | Segmenter ViT-B/16 | pixel | 1 | 0.0 | 27.4 | 6.9 | 10.8 | 0.0 | 20.2 | - | - |" in lines
    assert "| wilson | DeepLabV3 R-10t | image | 1 | 33.1 | 10.2 | 25.0 | 28.4 | 16.0 | 30.0 " \
           "| 30.0/10.0/25.0 (All+bg) | +3.1/+0.2/+3.4 (All+bg) |" in lines
    # after each step
    assert "| Method | after step | old | new | all | all+bg | hIoU |" in lines
    assert "| mib | 0 | 42.0 ± 2.0 | - | 42.0 ± 2.0 | 45.0 ± 0.0 | - |" in lines
    assert "| mib | 1 | 32.0 ± 2.0 | 12.0 ± 2.0 | 27.0 ± 2.0 | 31.0 ± 3.0 | 15.0 ± 0.0 |" in lines
    assert "| wilson | 0 | 41.0 | - | 41.0 | 46.0 | - |" in lines
    # rows in the experiment file's method order
    final_rows = [line for line in lines if " | pixel | " in line or " | image | " in line]
    assert [line.split(" | ")[0] for line in final_rows] == ["| ft", "| mib", "| wilson"]


def test_csv_cells(runs, tmp_path):
    collected = compare.collect_results(runs / EXPERIMENT)
    rows = compare.comparison_table(collected["methods"], collected["expected"])
    path = compare.to_csv(rows, tmp_path / "out" / "compare.csv")
    with open(path, newline="") as f:
        table = {row["method"]: row for row in csv.DictReader(f)}
    assert list(table) == ["ft", "mib", "wilson"]
    mib, ft, wilson = table["mib"], table["ft"], table["wilson"]
    assert (mib["n_seeds"], mib["seeds"], mib["supervision"], mib["old_classes"], mib["new_classes"]) == \
        ("3", "0 1 2", "pixel", "1-15", "16-20")
    assert (mib["final_old_no_bg_mean"], mib["final_old_no_bg_std"]) == ("32.0", "2.0")
    assert (mib["final_all_with_bg_mean"], mib["final_all_with_bg_std"]) == ("31.0", "3.0")
    assert (mib["final_avg_no_bg_mean"], mib["final_avg_with_bg_mean"]) == ("35.0", "38.0")
    assert (mib["step0_new_no_bg_mean"], mib["step0_new_no_bg_std"]) == ("", "")
    assert (mib["paper_all_no_bg"], mib["diff_all_no_bg"], mib["paper_all_with_bg"]) == ("64.7", "-37.7", "")
    assert (wilson["paper_all_no_bg"], wilson["paper_all_with_bg"], wilson["diff_all_with_bg"]) == ("", "25.0", "3.4")
    assert (wilson["diff_old_no_bg"], wilson["diff_new_no_bg"]) == ("3.1", "0.2")
    assert (ft["final_new_no_bg_mean"], ft["final_new_no_bg_std"], ft["paper_old_no_bg"]) == ("27.4", "", "")
    assert wilson["paper_old_new_all"] == "30.0/10.0/25.0 (All+bg)"


def test_cli_writes_markdown_and_csv(runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert compare.main([EXPERIMENT, "--runs", str(runs), "--out", str(out), "--no-wandb"]) == 0
    assert FINAL_HEADER in (out / "compare.md").read_text()
    assert (out / "compare.csv").read_text().startswith("method,network,config_id,differs,supervision,n_seeds,seeds,")
    printed = capsys.readouterr().out
    assert "warning:" in printed and "incomplete" in printed and "32.0 ± 2.0" in printed


def test_cli_without_experiments_compares_every_experiment_directory(runs):
    other = runs / "toy_10_10_overlap"
    write(other / "ft" / "seed0" / "results.json", results("ft", 0, *FT, experiment="toy_10_10_overlap"), time.time())
    assert compare.main(["--runs", str(runs), "--no-wandb"]) == 0
    assert "| mib | DeepLabV3 R-10t | pixel | 3 |" in (runs / EXPERIMENT / "compare.md").read_text()
    assert "| ft | Segmenter ViT-B/16 | pixel | 1 |" in (other / "compare.md").read_text()
    assert (other / "compare.csv").is_file() and not (runs / ".step0_cache" / "compare.md").exists()


def test_cli_fails_for_an_experiment_without_complete_results(runs):
    assert compare.main(["nothing_here", "--runs", str(runs), "--no-wandb"]) == 1
    empty = runs / "only_incomplete"
    write(empty / "mib" / "seed0" / "results.json", results("mib", 0, *MIB[0], complete=False,
                                                            experiment="only_incomplete"), time.time())
    assert compare.main(["only_incomplete", "--runs", str(runs), "--no-wandb"]) == 1
    assert not (empty / "compare.md").exists()


def test_log_comparison_to_wandb_offline_writes_a_table(runs, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "30")
    collected = compare.collect_results(runs / EXPERIMENT)
    rows = compare.comparison_table(collected["methods"], collected["expected"])
    started = time.time()
    try:
        run_dir = compare.log_comparison_to_wandb(rows, EXPERIMENT, save_dir=tmp_path / "wb")
    except wandb.errors.Error as error:  # e.g. the service did not start within the timeout
        if time.time() - started > 30:
            pytest.skip(f"wandb init took more than 30 s: {error}")
        raise
    assert run_dir is not None and run_dir.name.startswith("offline-run-")
    tables = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "files" / "media" / "table" / "comparison_*.table.json"))
    assert len(tables) == 1
    table = json.loads(open(tables[0]).read())
    columns = table["columns"]
    assert columns[:7] == ["method", "network", "config_id", "differs", "supervision", "n_seeds", "seeds"]
    assert [row[0] for row in table["data"]] == ["ft", "mib", "wilson"]
    mib = dict(zip(columns, table["data"][1]))
    assert mib["final_old_no_bg_mean"] == pytest.approx(32.0) and mib["diff_all_no_bg"] == pytest.approx(-37.7)


def test_log_comparison_to_wandb_disabled_logs_nothing(tmp_path):
    assert compare.log_comparison_to_wandb([], EXPERIMENT, mode="disabled", save_dir=tmp_path / "wb") is None
    assert not (tmp_path / "wb").exists()


def test_log_comparison_to_wandb_run_settings(runs, tmp_path, monkeypatch):
    """One run of job_type "compare", grouped and tagged by experiment, mode from WANDB_MODE
    (wandb.init replaced by a recorder: no service started)."""
    wandb = pytest.importorskip("wandb")
    calls = {}

    class FakeRun:
        dir = str(tmp_path / "wb" / "wandb" / "offline-run-x" / "files")

        def log(self, data):
            calls["logged"] = data

        def finish(self):
            calls["finished"] = True

    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.update(init=kwargs) or FakeRun())
    monkeypatch.setenv("WANDB_MODE", "offline")
    collected = compare.collect_results(runs / EXPERIMENT)
    rows = compare.comparison_table(collected["methods"], collected["expected"])
    compare.log_comparison_to_wandb(rows, EXPERIMENT, save_dir=tmp_path / "wb")
    init = calls["init"]
    assert (init["project"], init["job_type"], init["group"], init["mode"]) == ("ciss", "compare", EXPERIMENT, "offline")
    assert init["tags"] == [EXPERIMENT, "compare"] and init["dir"] == str(tmp_path / "wb")
    table = calls["logged"]["comparison"]
    assert isinstance(table, wandb.Table) and len(table.data) == 3 and calls["finished"]


def test_configurations_of_a_method_are_told_apart_and_kept_runs_are_not_read(tmp_path, capsys):
    """The layout of experiments.store: runs/<exp>/<method>/<config id>/seed<k>/. Two
    configurations of mib are two rows, each described by the settings in which it differs; the
    seeds of one configuration are averaged; a run kept aside by resume=false is not read."""
    exp = tmp_path / EXPERIMENT
    now = time.time()

    def new_layout(config_id, seed, numbers, lr, name=None):
        data = results("mib", seed, *numbers)
        data.update(config_id=config_id, expected=data["config"].pop("expected"),
                    experiment_methods=["mib", "ft"])
        data["config"].pop("methods")
        data["config"].update(method="mib", schedule={"incremental": {"epochs": 10, "lr": lr}})
        return write(exp / "mib" / config_id / (name or f"seed{seed}") / "results.json", data, now)

    new_layout("aaaa1111", 0, MIB[0], 0.005)
    new_layout("aaaa1111", 1, MIB[1], 0.005)
    new_layout("bbbb2222", 0, MIB[2], 0.002)
    new_layout("aaaa1111", 0, ((0.99, None, 0.99, 0.99, None, 0.99), (0.99,) * 6, (0.99, 0.99)), 0.005,
               name="seed0.20261201-101010")  # kept by resume=false: not read
    collected = compare.collect_results(exp)
    assert list(collected["methods"]) == ["mib [aaaa1111]", "mib [bbbb2222]"]
    assert [r["config"]["seed"] for r in collected["methods"]["mib [aaaa1111]"]] == [0, 1]
    assert collected["rows"]["mib [aaaa1111]"] == {"method": "mib", "config_id": "aaaa1111",
                                                   "differs": "schedule.incremental.lr=0.005"}
    assert collected["rows"]["mib [bbbb2222]"]["differs"] == "schedule.incremental.lr=0.002"
    assert collected["expected"] == EXPECTED and not collected["warnings"]
    rows = compare.comparison_table(collected["methods"], collected["expected"], collected["rows"])
    assert rows[0]["final_old_no_bg_mean"] == pytest.approx(31.0) and rows[0]["n_seeds"] == 2
    assert rows[0]["paper_old_no_bg"] == 71.8  # the paper's MiB row for both configurations
    markdown = compare.to_markdown(rows, "t", "c")
    assert "| configuration (where it differs) |" in markdown.replace(" |\n", " |\n")
    assert "schedule.incremental.lr=0.002" in markdown and "mib [bbbb2222]" in markdown
