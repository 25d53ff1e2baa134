"""Accuracy tier (slow, ~4-6 min on 2 cores: bf16 or fp32): the default experiment shows the field's basic result.

Run by `make test-slow` / `make test-all` and by CI. If a change to the embedded data, the network
or a schedule breaks one of these, the default `make run` no longer shows what it promises.
"""
import pytest

from experiments import run
from experiments.config import load_experiment, resolve


@pytest.mark.slow
def test_ft_forgets_mib_remembers_joint_is_best_wilson_learns_from_image_labels(tmp_path):
    config = load_experiment("synthetic_15_5_disjoint")
    config.update(output_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"))
    config["logger"]["wandb"] = "disabled"
    results = run.run_experiment(resolve(config))
    step0_old = results["ft"]["steps"][0]["summary"]["old_no_bg"]
    final = {m: r["final"] for m, r in results.items()}
    assert step0_old > 0.25, "the step-0 model itself is too weak to show forgetting"
    assert final["ft"]["old_no_bg"] < 0.5 * step0_old, "FT should collapse on the old classes"
    assert final["mib"]["old_no_bg"] >= 0.75 * step0_old, "MiB should keep three quarters of the old classes"
    assert final["joint"]["all_no_bg"] > max(final["ft"]["all_no_bg"], final["mib"]["all_no_bg"])
    assert final["joint"]["all_with_bg"] > max(final["ft"]["all_with_bg"], final["mib"]["all_with_bg"])
    assert final["mib"]["new_no_bg"] > 0.05, "MiB should learn something of the new classes"
    # WILSON (image labels only for the new classes) keeps the old classes about as well as MiB,
    # learns at least half of what MiB (pixel labels) learns of the new ones, and beats FT on old.
    assert results["wilson"]["steps"][1]["train_images"] > 0
    assert final["wilson"]["old_no_bg"] >= final["mib"]["old_no_bg"] - 0.10
    assert final["wilson"]["new_no_bg"] >= 0.5 * final["mib"]["new_no_bg"]
    assert final["wilson"]["old_no_bg"] > final["ft"]["old_no_bg"] + 0.15
