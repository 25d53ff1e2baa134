"""The comparison dashboard as code: `python -m experiments.dashboard [EXP ...] [--entity E]
[--project P] [--print]` (what `make dashboard` calls).

Builds a wandb workspace (wandb's own `wandb-workspaces` library) over the runs the suite logs
(experiments/reporting/tracking.py: group = experiment, job_type = method, config.supervision,
`task/*` against `task_step`, summary `final/*`, `figures/*`, the summary runs' `comparison`):

  runset     the runs of the experiments given (all of the project without EXP), grouped by
             job_type, i.e. one row per method (mean over seeds), the final/* columns pinned
  sections   the forgetting curves (task/old, new, all against task_step, mean with the min-max
             band over seeds); the final numbers per method and per supervision (bars); the
             qualitative figures; the comparison table of the summary and compare runs

and saves it to the user's entity and project after `wandb login` (its URL is printed). Without a
login it says so in one line and saves nothing; `--print` shows the workspace without saving.
"""
from __future__ import annotations

import argparse
import sys

from experiments.reporting.tracking import TASK_STEP_METRIC, has_wandb_login

METHOD_KEY = "JobType"          # the method of a run (tracking.build_logger: job_type = method)
FINAL_METRICS = ("old_no_bg", "new_no_bg", "all_no_bg", "all_with_bg", "hiou_no_bg")
CURVES = (("old_no_bg", "old classes (no background)"), ("new_no_bg", "new classes"),
          ("all_no_bg", "all classes (no background, MiB)"), ("all_with_bg", "all classes with background (WILSON's All)"))
MEDIA = ("figures/qualitative", "figures/per_class_iou", "figures/steps_no_bg", "figures/steps_with_bg")


def workspace_name(experiments: list[str]) -> str:
    return "CISS: " + (", ".join(experiments) if experiments else "every experiment")


def build_workspace(entity: str, project: str, experiments: list[str] | None = None):
    """The workspace object (nothing is sent anywhere): see the module docstring."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    experiments = list(experiments or [])
    filters = [ws.Metric("Group").isin(experiments)] if experiments else []
    curves = ws.Section(name="Forgetting: mIoU after each step (task/* against task_step)", is_open=True,
                        panel_settings=ws.SectionPanelSettings(x_axis=TASK_STEP_METRIC), panels=[
        wr.LinePlot(title=title, x=TASK_STEP_METRIC, y=[f"task/{key}"], groupby_aggfunc="mean",
                    groupby_rangefunc="minmax", title_x="incremental step", title_y="mIoU")
        for key, title in CURVES])
    finals = ws.Section(name="After the last step: per method and per supervision", is_open=True, panels=[
        wr.BarPlot(title="final mIoU per method", metrics=[f"final/{m}" for m in FINAL_METRICS[:4]],
                   orientation="v", groupby=METHOD_KEY, groupby_aggfunc="mean", groupby_rangefunc="minmax"),
        wr.BarPlot(title="final mIoU: pixel labels vs image labels", metrics=["final/old_no_bg", "final/new_no_bg",
                                                                               "final/all_with_bg"],
                   orientation="v", groupby=wr.Config("supervision"), groupby_aggfunc="mean",
                   groupby_rangefunc="minmax"),
        wr.BarPlot(title="hIoU of old and new per method", metrics=["final/hiou_no_bg"], orientation="v",
                   groupby=METHOD_KEY, groupby_aggfunc="mean", groupby_rangefunc="minmax"),
    ])
    media = ws.Section(name="Qualitative: images, ground truth, predictions", is_open=True, panels=[
        wr.MediaBrowser(title="figures", media_keys=list(MEDIA), num_columns=2)])
    tables = ws.Section(name="Comparison tables (summary runs: this seed; compare runs: over seeds)", is_open=True,
                        panels=[wr.WeavePanelSummaryTable(table_name="comparison")])
    return ws.Workspace(
        entity=entity, project=project, name=workspace_name(experiments),
        sections=[curves, finals, media, tables],
        settings=ws.WorkspaceSettings(x_axis=TASK_STEP_METRIC, max_runs=100),
        runset_settings=ws.RunsetSettings(
            filters=filters, groupby=[ws.Metric(METHOD_KEY)],
            pinned_columns=["run:displayName", *(f"summary:final/{m}" for m in FINAL_METRICS)]))


def wire_json(workspace) -> str:
    """The workspace as the JSON that `save()` sends (the library's own conversion, offline)."""
    return workspace._to_model().model_dump_json(by_alias=True, exclude_none=True, indent=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiments", nargs="*", metavar="EXP", help="experiment names (wandb groups); default: all")
    parser.add_argument("--entity", default=None, help="wandb entity (default: the login's default entity)")
    parser.add_argument("--project", default="ciss", help="wandb project (default: ciss, the experiments' logger.project)")
    parser.add_argument("--print", action="store_true", dest="print_only", help="print the workspace, save nothing")
    args = parser.parse_args(argv)
    if args.print_only:
        print(wire_json(build_workspace(args.entity or "<your entity>", args.project, args.experiments)))
        return 0
    if not has_wandb_login():
        print("error: make dashboard saves a wandb workspace and needs a wandb login (`wandb login`, or WANDB_API_KEY); "
              "nothing was saved (make dashboard ARGS=--print shows it)", file=sys.stderr)
        return 1
    import wandb

    entity = args.entity or wandb.Api().default_entity
    workspace = build_workspace(entity, args.project, args.experiments).save()
    print(f"workspace saved: {workspace.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
