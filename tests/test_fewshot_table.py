"""make fewshot (experiments/fewshot_table.py): the iFSS table of one fold over shot counts, end to end
on a tiny generated dataset, every cell equal to its run's own results."""
import csv
import json
from pathlib import Path

import pytest

from experiments import fewshot_table
from tests.conftest import TINY_OVERRIDES


@pytest.fixture
def tiny_shots(tmp_path):
    overrides = TINY_OVERRIDES + [f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'runs'}",
                                  f"cache_dir={tmp_path / 'runs' / 'cache'}", "data.batch_size=8",
                                  "schedule.incremental={epochs: 1, lr: 0.001, iterations: 1, batch_size: 4}",
                                  "methods=[wi, ft]", "data.test_batch_size=8"]
    return fewshot_table.load_shot_experiments("synthetic_5_0_fewshot", overrides, shots=(1, 2))


def test_the_fewshot_table_runs_every_shot_count_shares_the_base_steps_and_tabulates_the_runs(tiny_shots, capsys):
    table = fewshot_table.run_fewshot_table(tiny_shots)
    units = table["units"]
    assert len(units) == 2 * 2 * 2   # (shots, method, step)
    # Two base models (COS for WI, FT's), each trained once and shared by the other shot count.
    assert sorted(u.kind for u in units if u.step == 0) == ["step0", "step0", "step0-cached", "step0-cached"]
    rows = {row["method"]: row for row in table["rows"]}
    for shots, experiment in tiny_shots.items():
        for method in ("wi", "ft"):
            runs = [json.loads(p.read_text()) for p in
                    Path(experiment.output_dir).glob(f"{experiment.name}/{method}/*/seed42/results.json")]
            results = next(r for r in runs if r["config"]["data"]["fewshot"]["nshot"] == experiment.data.fewshot.nshot)
            final = results["final"]
            cell = rows[method][shots]
            assert cell["base"] == pytest.approx(100 * final["old_with_bg"])
            assert cell["novel"] == pytest.approx(100 * final["new_with_bg"])
            assert cell["HM"] == pytest.approx(100 * final["hiou_with_bg"])
            assert results["steps"][1]["train_images"] == 5 * experiment.data.fewshot.nshot
    assert rows["wi"]["1-shot"]["seconds"] < rows["ft"]["1-shot"]["seconds"] + 5   # WI trains nothing
    markdown = table["paths"]["markdown"].read_text()
    assert "| WI |" in markdown and "| FT |" in markdown and "1-shot HM" in markdown
    lines = list(csv.DictReader(table["paths"]["csv"].open()))
    assert {(line["method"], line["nshot"]) for line in lines} == {(m, n) for m in ("wi", "ft") for n in ("1", "2")}
    assert table["paths"]["figure"].stat().st_size > 10_000
    # Run again: everything reused.
    again = fewshot_table.run_fewshot_table(tiny_shots)
    assert all(u.saved for u in again["units"]) and again["rows"] == table["rows"]


def test_a_usual_experiment_is_a_one_line_error(capsys):
    from experiments.config import ConfigError

    with pytest.raises(ConfigError, match="no few-shot steps"):
        fewshot_table.load_shot_experiments("synthetic_15_5_disjoint", [])
    assert fewshot_table.main(["synthetic_15_5_disjoint"]) == 1
    assert fewshot_table.main(["synthetic_5_0_fewshot", "data.fewshot.nshott=2"]) == 1
    out = capsys.readouterr().out
    assert "no few-shot steps" in out and "nshott" in out
