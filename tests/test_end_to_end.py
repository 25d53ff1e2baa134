"""A whole 2-step experiment on tiny generated data, through the real step loop."""
import json

import cv2
import numpy as np
import pytest
import yaml

from datamodules import datasets
from datamodules.datasets.voc import load_image, load_mask
from experiments import run
from experiments.config import apply_overrides
from experiments.qualitative import load_examples

SUMMARY_KEYS = {"bg", "old_no_bg", "old_with_bg", "new_no_bg", "new_with_bg", "all_no_bg", "all_with_bg",
                "past_no_bg", "past_with_bg", "current_no_bg", "current_with_bg", "hiou_no_bg", "hiou_with_bg"}


def test_two_step_experiment_writes_results_and_reuses_step_zero(tiny_config, tmp_path):
    results = run.run_experiment(tiny_config)
    assert set(results) == {"joint", "ft", "mib", "wilson"}
    out = tmp_path / "runs" / tiny_config["name"]
    for method in ("joint", "ft", "mib", "wilson"):
        saved = json.loads((out / method / "seed42" / "results.json").read_text())
        assert saved["complete"] is True and saved["method"] == method
        assert [s["step"] for s in saved["steps"]] == [0, 1]
        for record in saved["steps"]:
            assert set(record["summary"]) == SUMMARY_KEYS
            assert len(record["iou"]) == (16 if record["step"] == 0 else 21)
            assert len(record["confusion"]) == len(record["iou"])
        assert {"avg_no_bg", "avg_with_bg", "all_no_bg", "hiou_no_bg"} <= set(saved["final"])
        config = yaml.safe_load((out / method / "seed42" / "config.yaml").read_text())
        assert config["data"]["task"] == "15-5" and config["data"]["root"] == tiny_config["data"]["root"]
        header = (out / method / "seed42" / "metrics.csv").read_text().splitlines()[0].split(",")
        assert header[0] == "step" and "old_no_bg" in header
        assert len((out / method / "seed42" / "per_class_iou.csv").read_text().splitlines()) == 3
    # the CE step 0 was trained once (by the first method) and shared by the others; WILSON's
    # step 0 is trained with BCE, so it has its own
    trained = {m: results[m]["steps"][0]["trained"] for m in results}
    assert trained == {"joint": True, "ft": False, "mib": False, "wilson": True}
    assert len({json.dumps(results[m]["steps"][0]["summary"]) for m in ("joint", "ft", "mib")}) == 1
    table = (out / "comparison.md").read_text()
    assert all(f"| {m} |" in table for m in ("joint", "ft", "mib", "wilson"))

    check_qualitative_examples(tiny_config, out)

    # A second run reuses the cached step-0 model for every method.
    again = run.run_experiment(apply_overrides(tiny_config, ["methods=[mib]"]))
    assert again["mib"]["steps"][0]["trained"] is False
    assert json.dumps(again["mib"]["steps"][0]["summary"]) == json.dumps(results["mib"]["steps"][0]["summary"])


def check_qualitative_examples(config, out):
    """Every method shows the same 4 test images; the saved image and ground truth are the test
    files through the evaluation geometry (short side 40 -> 32, so a plain resize), worked out
    here with OpenCV; WILSON alone has pseudo-labels; the figures exist."""
    examples = {m: load_examples(out / m / "seed42" / "qualitative.npz") for m in ("joint", "ft", "mib", "wilson")}
    rows = examples["joint"]["rows"]
    assert len(rows) == 4 and len(set(rows)) == 4 and all(e["rows"] == rows for e in examples.values())
    test = datasets.locate("synthetic", config["data"]["root"], config["data"]["options"]).test
    masks = [load_mask(test.masks[row]) for row in rows]
    # A new class (16-20) is in each chosen image whenever the test set has 4 such images.
    if sum(bool(set(np.unique(load_mask(m)).tolist()) & set(range(16, 21))) for m in test.masks) >= 4:
        assert all(set(np.unique(m).tolist()) & set(range(16, 21)) for m in masks)
    for i, row in enumerate(rows):
        expected_mask = cv2.resize(masks[i], (32, 32), interpolation=cv2.INTER_NEAREST)
        assert (examples["mib"]["ground_truths"][i] == expected_mask).all()
        expected_image = cv2.resize(load_image(test.images[row]), (32, 32), interpolation=cv2.INTER_LINEAR)
        assert np.abs(examples["mib"]["images"][i].astype(int) - expected_image.astype(int)).max() <= 1
        for method, saved in examples.items():
            assert saved["predictions"][i].shape == (32, 32)
            assert set(np.unique(saved["predictions"][i]).tolist()) <= set(range(21))
    assert examples["wilson"]["pseudo_labels"] is not None and len(examples["wilson"]["pseudo_labels"]) == 4
    assert all(examples[m]["pseudo_labels"] is None for m in ("joint", "ft", "mib"))
    for path in [out / "qualitative.png", *(out / m / "seed42" / "qualitative.png" for m in examples)]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_step_zero_cache_key_separates_what_changes_the_model(tiny_config):
    from lightning_modules.methods import build_method

    steps = [list(range(16)), [16, 17, 18, 19, 20]]
    mib = build_method("mib")
    key = run.step0_cache_path(tiny_config, mib, steps)
    assert run.step0_cache_path(tiny_config, build_method("ft"), steps) == key  # same CE step 0
    assert run.step0_cache_path(tiny_config, mib, [list(range(16)), [16], [17], [18], [19], [20]]) == key  # 15-1
    for change in ("seed=1", "data.mode=overlap", "schedule.step0.epochs=2", "network.decoder_channels=8"):
        assert run.step0_cache_path(apply_overrides(tiny_config, [change]), mib, steps) != key, change


@pytest.mark.parametrize("argv, message", [
    (["no_such_experiment"], "unknown experiment 'no_such_experiment'"),
    (["synthetic_15_5_disjoint", "data.bacth_size=4"], "unknown config key 'data.bacth_size'"),
    (["synthetic_15_5_disjoint", "methods=[nope]"], "unknown method 'nope'"),
    (["synthetic_15_5_disjoint", "methods.mib.kd_wieght=3"], "no hyper-parameter 'kd_wieght'"),
    (["synthetic_15_5_disjoint", "data.task=15-7"], "unknown task '15-7'"),
])
def test_bad_input_is_one_clear_line_before_any_training(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    assert run.main(argv + [f"output_dir={tmp_path}"] if argv[0] != "no_such_experiment" else argv) == 1
    assert message in capsys.readouterr().out.replace("\n", "")
    assert not list(tmp_path.glob("**/results.json"))


def test_voc_without_data_stops_at_once_saying_where_and_how(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    assert run.main(["voc_15_5_disjoint", f"output_dir={tmp_path / 'runs'}"]) == 1
    out = capsys.readouterr().out.replace("\n", "")
    assert f"{tmp_path}/VOCdevkit/VOC2012" in out and "SegmentationClassAug" in out and "DATA_ROOT" in out
    assert not (tmp_path / "runs").exists()


def test_every_experiment_file_loads_and_names_its_methods():
    from experiments.config import experiment_names, load_experiment, resolve
    from lightning_modules.methods import build_method

    names = experiment_names()
    assert {"synthetic_15_5_disjoint", "synthetic_15_5_overlap", "synthetic_15_1_overlap", "synthetic_10_10_disjoint",
            "voc_15_5_disjoint", "voc_15_5_overlap", "voc_10_10_disjoint", "voc_10_10_overlap"} <= set(names)
    for name in names:
        config = resolve(load_experiment(name))
        for method, entry in config["methods"].items():
            build_method(method, **{k: v for k, v in (entry or {}).items() if k != "schedule"})
        for method, numbers in ((config.get("expected") or {}).get("methods") or {}).items():
            assert method in config["methods"] and {"old", "new", "all"} <= set(numbers)
            assert set(numbers) <= {"old", "new", "all", "all_includes_background", "source", "new_groups"}
