"""A whole 2-step experiment on tiny generated data, through the real step loop."""
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from datamodules import datasets
from datamodules.datasets.voc import load_image, load_mask
from experiments import run, step0_cache
from experiments.config import apply_overrides
from experiments.reporting.qualitative import load_examples
from experiments.store import run_directory

SUMMARY_KEYS = {"bg", "old_no_bg", "old_with_bg", "new_no_bg", "new_with_bg", "all_no_bg", "all_with_bg",
                "past_no_bg", "past_with_bg", "current_no_bg", "current_with_bg", "hiou_no_bg", "hiou_with_bg"}


def test_two_step_experiment_writes_results_and_reuses_step_zero(tiny_config, tmp_path):
    results = run.run_experiment(tiny_config)
    assert set(results) == {"joint", "ft", "mib", "wilson"}
    out = tmp_path / "runs" / tiny_config.name
    for method in ("joint", "ft", "mib", "wilson"):
        directory = run_directory(tiny_config.run_config(method))
        assert directory.parent.parent == out / method and directory.name == "seed42"
        assert (out / method / "latest").resolve() == directory.parent.resolve()
        saved = json.loads((directory / "results.json").read_text())
        assert saved["complete"] is True and saved["method"] == method
        assert [s["step"] for s in saved["steps"]] == [0, 1]
        for record in saved["steps"]:
            assert set(record["summary"]) == SUMMARY_KEYS
            assert len(record["iou"]) == (16 if record["step"] == 0 else 21)
            assert len(record["confusion"]) == len(record["iou"])
        assert {"avg_no_bg", "avg_with_bg", "all_no_bg", "hiou_no_bg"} <= set(saved["final"])
        config = yaml.safe_load((directory / "config.yaml").read_text())
        assert config["data"]["task"] == "15-5" and config["data"]["root"] == tiny_config.data.root
        assert config["method"] == method and config["seed"] == 42
        header = (directory / "metrics.csv").read_text().splitlines()[0].split(",")
        assert header[0] == "step" and "old_no_bg" in header
        assert len((directory / "per_class_iou.csv").read_text().splitlines()) == 3
    # the CE step 0 was trained once (by the first method) and shared by the others; WILSON's
    # step 0 is trained with BCE, so it has its own
    trained = {m: results[m]["steps"][0]["trained"] for m in results}
    assert trained == {"joint": True, "ft": False, "mib": False, "wilson": True}
    assert len({json.dumps(results[m]["steps"][0]["summary"]) for m in ("joint", "ft", "mib")}) == 1
    table = (out / "comparison.md").read_text()
    assert all(f"| {m} |" in table for m in ("joint", "ft", "mib", "wilson"))

    check_qualitative_examples(tiny_config, out, {m: run_directory(tiny_config.run_config(m)) for m in results})

    # A second run reuses the cached step-0 model for every method.
    again = run.run_experiment(apply_overrides(tiny_config, ["methods=[mib]"]))
    assert again["mib"]["steps"][0]["trained"] is False
    assert json.dumps(again["mib"]["steps"][0]["summary"]) == json.dumps(results["mib"]["steps"][0]["summary"])


def check_qualitative_examples(config, out, directories):
    """Every method shows the same 4 test images; the saved image and ground truth are the test
    files through the evaluation geometry (short side 40 -> 32, so a plain resize), worked out
    here with PIL, as the official pipelines resize; WILSON alone has pseudo-labels; the figures exist."""
    examples = {m: load_examples(directories[m] / "qualitative.npz") for m in ("joint", "ft", "mib", "wilson")}
    rows = examples["joint"]["rows"]
    assert len(rows) == 4 and len(set(rows)) == 4 and all(e["rows"] == rows for e in examples.values())
    test = datasets.locate("synthetic", config.data.root, config.data.options).test
    masks = [load_mask(test.masks[row]) for row in rows]
    # A new class (16-20) is in each chosen image whenever the test set has 4 such images.
    if sum(bool(set(np.unique(load_mask(m)).tolist()) & set(range(16, 21))) for m in test.masks) >= 4:
        assert all(set(np.unique(m).tolist()) & set(range(16, 21)) for m in masks)
    for i, row in enumerate(rows):
        expected_mask = np.asarray(Image.fromarray(masks[i]).resize((32, 32), Image.NEAREST))
        assert (examples["mib"]["ground_truths"][i] == expected_mask).all()
        expected_image = np.asarray(Image.fromarray(load_image(test.images[row])).resize((32, 32), Image.BILINEAR))
        # normalised and back: at most one grey level of rounding
        assert np.abs(examples["mib"]["images"][i].astype(int) - expected_image.astype(int)).max() <= 1
        for method, saved in examples.items():
            assert saved["predictions"][i].shape == (32, 32)
            assert set(np.unique(saved["predictions"][i]).tolist()) <= set(range(21))
    assert examples["wilson"]["pseudo_labels"] is not None and len(examples["wilson"]["pseudo_labels"]) == 4
    assert all(examples[m]["pseudo_labels"] is None for m in ("joint", "ft", "mib"))
    for path in [out / "qualitative.png", *(directories[m] / "qualitative.png" for m in examples)]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_step_zero_cache_key_separates_what_changes_the_model(tiny_config):
    from lightning_modules.methods import build_method

    steps = [list(range(16)), [16, 17, 18, 19, 20]]
    mib = build_method("mib")

    def path(config, name, method, task=steps):
        return step0_cache.model_path(config.run_config(name), method, task)

    key = path(tiny_config, "mib", mib)
    assert path(tiny_config, "ft", build_method("ft")) == key  # same CE step 0
    assert path(tiny_config, "mib", mib, [list(range(16)), [16], [17], [18], [19], [20]]) == key  # 15-1
    # What happens after step 0 does not change the step-0 model.
    for change in ("schedule.incremental.epochs=3", "methods.mib.kd_weight=5", "data.num_workers=1"):
        assert path(apply_overrides(tiny_config, [change]), "mib", mib) == key, change
    other_precision = "32-true" if tiny_config.run_config("mib").trainer.precision == "bf16-mixed" else "bf16-mixed"
    for change in ("seed=1", "data.mode=overlap", "schedule.step0.epochs=2", "network.decoder_channels=8",
                   "data.crop_size=24", "data.void_as_background=false", f"trainer.precision={other_precision}",
                   "optimizer.weight_decay=0.001", "data.batch_size=2", "trainer.limit_train_batches=3"):
        assert path(apply_overrides(tiny_config, [change]), "mib", mib) != key, change
    # a method's own step-0 settings (an entry's data/schedule/trainer sections) give its own model
    for change in ("methods.mib.schedule.step0={epochs: 2, lr: 0.01}", "methods.mib.data.batch_size=2",
                   f"methods.mib.trainer.precision={other_precision}"):
        assert path(apply_overrides(tiny_config, [change]), "mib", mib) != key, change
    # the data pipeline's version is in the key: a cached model trained on other pixels is not reused
    assert step0_cache.step0_key(tiny_config.run_config("mib"), mib, steps)["pipeline"] == 2


@pytest.mark.parametrize("argv, message", [
    (["no_such_experiment"], "unknown experiment 'no_such_experiment'"),
    (["synthetic_15_5_disjoint", "data.bacth_size=4"], "unknown config key 'data.bacth_size'"),
    (["synthetic_15_5_disjoint", "methods=[nope]"], "unknown method 'nope'"),
    (["synthetic_15_5_disjoint", "methods.mib.kd_wieght=3"], "unknown method 'mib' hyper-parameter 'methods.mib.kd_wieght'"),
    (["synthetic_15_5_disjoint", "methods.mib.kd_weight=strong"], "methods.mib.kd_weight: input should be a valid number"),
    (["synthetic_15_5_disjoint", "data.task=15-7"], "unknown task '15-7'"),
    # the two defects a new user met: a bad value and a malformed override, each one line naming the key
    (["synthetic_15_5_disjoint", "data.batch_size=-3"], "data.batch_size: input should be greater than or equal to 1 (got -3)"),
    (["synthetic_15_5_disjoint", "data.batch_size=[1,"], "override data.batch_size=[1,: the value is not valid YAML"),
    (["synthetic_15_5_disjoint", "schedule.step0.lr=0"], "schedule.step0.lr: input should be greater than 0"),
    (["synthetic_15_5_disjoint", "trainer.precision=fp8"], "trainer.precision: input should be"),
    (["synthetic_15_5_disjoint", "methods.mib.trainer.devices=2"], "methods.mib.trainer.devices: a method may set only trainer.precision"),
])
def test_bad_input_is_one_clear_line_before_any_training(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    assert run.main(argv + [f"output_dir={tmp_path}"] if argv[0] != "no_such_experiment" else argv) == 1
    out = capsys.readouterr().out
    assert message in out.replace("\n", "")
    assert len(out.strip().splitlines()) <= 3, out  # one line (soft-wrapped by the terminal at most), no traceback
    assert "Traceback" not in out
    assert not list(tmp_path.glob("**/results.json")) and not list(tmp_path.glob("**/*.ckpt"))


def test_voc_without_data_stops_at_once_saying_where_and_how(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    assert run.main(["voc_15_5_disjoint", f"output_dir={tmp_path / 'runs'}"]) == 1
    out = capsys.readouterr().out.replace("\n", "")
    assert f"{tmp_path}/VOCdevkit/VOC2012" in out and "DATA_ROOT" in out
    assert "make data DATASET=voc" in out and "prepare_voc_aug" not in out
    assert not (tmp_path / "runs").exists()


def test_every_experiment_file_loads_and_names_its_methods():
    from experiments.config import experiment_names, load_experiment, resolve
    from lightning_modules.methods import build_method

    names = experiment_names()
    assert {"synthetic_15_5_disjoint", "synthetic_15_5_overlap", "synthetic_15_1_overlap", "synthetic_10_10_disjoint",
            "voc_15_5_disjoint", "voc_15_5_overlap", "voc_10_10_disjoint", "voc_10_10_overlap"} <= set(names)
    for name in names:
        config = resolve(load_experiment(name))
        for method in config.methods:
            build_method(method, **config.run_config(method).hparams)
        for method, numbers in (config.expected.get("methods") or {}).items():
            # old/new/all; or "all" alone where only that is published (MBS's Papers-with-Code
            # values), with a source of its own saying so
            assert method in config.methods and "all" in numbers
            assert {"old", "new"} <= set(numbers) or numbers.get("source"), f"{name}: {method}"
            assert set(numbers) <= {"old", "new", "all", "all_includes_background", "old_includes_background",
                                    "source", "new_groups", "network"}
