"""`make dashboard` (experiments.dashboard): the wandb workspace built offline, without a server,
with the panels and filters of the suite's runs; without a login, one line and nothing saved."""
import json
from pathlib import Path

import pytest

from experiments import dashboard
from experiments.reporting.tracking import TASK_STEP_METRIC


def _panels(workspace, section_word: str):
    (section,) = [s for s in workspace.sections if section_word in s.name]
    return section.panels


def test_the_workspace_groups_by_method_and_shows_curves_bars_media_and_tables():
    import wandb_workspaces.reports.v2 as wr

    workspace = dashboard.build_workspace("my-team", "ciss", ["synthetic_15_5_disjoint", "voc_15_5_disjoint"])
    assert (workspace.entity, workspace.project) == ("my-team", "ciss")
    assert workspace.name == "CISS: synthetic_15_5_disjoint, voc_15_5_disjoint"
    # runs table: one group per method (job_type), the final numbers pinned; only these experiments
    runset = workspace.runset_settings
    assert [g.name for g in runset.groupby] == ["JobType"]
    assert "summary:final/all_with_bg" in runset.pinned_columns and "summary:final/old_no_bg" in runset.pinned_columns
    # (the library keeps filters as its expression string)
    assert runset.filters == "Metric(\"Group\") in ['synthetic_15_5_disjoint', 'voc_15_5_disjoint']"
    assert not dashboard.build_workspace("my-team", "ciss").runset_settings.filters   # every experiment
    # forgetting curves: task/* against task_step, mean and min-max over seeds
    curves = _panels(workspace, "Forgetting")
    assert all(isinstance(p, wr.LinePlot) and p.x == TASK_STEP_METRIC for p in curves)
    assert [p.y for p in curves] == [["task/old_no_bg"], ["task/new_no_bg"], ["task/all_no_bg"], ["task/all_with_bg"]]
    assert {(p.groupby_aggfunc, p.groupby_rangefunc) for p in curves} == {("mean", "minmax")}
    # bars per method and per supervision
    bars = _panels(workspace, "per method and per supervision")
    assert all(isinstance(p, wr.BarPlot) for p in bars)
    assert [p.groupby for p in bars][0] == "JobType" and repr(bars[1].groupby) == repr(wr.Config("supervision"))
    assert "final/new_no_bg" in bars[1].metrics and bars[2].metrics == ["final/hiou_no_bg"]
    # qualitative media and the comparison table of the summary / compare runs
    (media,) = _panels(workspace, "Qualitative")
    assert isinstance(media, wr.MediaBrowser) and "figures/qualitative" in media.media_keys
    (comparison,) = _panels(workspace, "Comparison")
    assert isinstance(comparison, wr.WeavePanelSummaryTable) and comparison.table_name == "comparison"

    # what save() would send, built offline: the x-axis, the group filter and the grouping are in it
    wire = json.loads(dashboard.wire_json(workspace))
    text = json.dumps(wire)
    assert '"xAxis": "task_step"' in text and "synthetic_15_5_disjoint" in text and "jobType" in text
    assert wire["displayName"] == workspace.name


def test_the_panels_read_keys_the_suite_logs(tmp_path):
    """The keys the panels plot are those a step's summary has (logged as task/<key> and final/<key>)
    and the figures the experiment writes (logged as figures/<name>)."""
    import numpy as np

    from experiments.reporting.figures import write_experiment_figures
    from lightning_modules.metrics import summarize_step

    summary = summarize_step(np.linspace(0.1, 0.9, 21), [list(range(16)), list(range(16, 21))], 1)
    assert {key for key, _ in dashboard.CURVES} | set(dashboard.FINAL_METRICS) <= set(summary)
    step = {"step": 1, "classes": list(range(16, 21)), "summary": summary}
    result = {"experiment": "e", "steps": [{**step, "step": 0, "classes": list(range(16))}, step], "config": {}}
    written = write_experiment_figures(tmp_path, {"mib": result}, per_class=False)
    assert {"figures/steps_no_bg", "figures/steps_with_bg"} <= set(written) <= set(dashboard.MEDIA)
    source = (Path(__file__).resolve().parent.parent / "experiments" / "reporting" / "__init__.py").read_text()
    assert '"figures/qualitative"' in source and '"figures/per_class_iou"' in source


def test_without_a_login_it_says_so_in_one_line_and_saves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert dashboard.main(["synthetic_15_5_disjoint"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "wandb login" in err and "nothing was saved" in err


def test_print_shows_the_workspace_without_a_login(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert dashboard.main(["--print", "synthetic_15_5_disjoint"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["displayName"] == "CISS: synthetic_15_5_disjoint" and shown["project"] == "ciss"


@pytest.mark.parametrize("netrc, expected", [("machine api.wandb.ai\n  login user\n  password k\n", True),
                                             ("machine example.org\n  login user\n", False)])
def test_a_login_is_wandb_logins_netrc_entry(tmp_path, monkeypatch, netrc, expected):
    from experiments.reporting.tracking import has_wandb_login

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    (tmp_path / ".netrc").write_text(netrc)
    assert has_wandb_login() is expected
