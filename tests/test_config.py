"""Experiment files and key=value overrides."""
import pytest

from experiments.config import ConfigError, apply_overrides, load_experiment


def test_overrides_parse_yaml_values_and_select_methods():
    config = apply_overrides(load_experiment("synthetic_15_5_disjoint"),
                             ["data.batch_size=8", "schedule.step0.lr=1e-3", "methods=[mib]", "methods.mib.kd_weight=5",
                              "--seed=3"])
    assert config["data"]["batch_size"] == 8 and config["schedule"]["step0"]["lr"] == pytest.approx(1e-3)
    assert list(config["methods"]) == ["mib"] and config["methods"]["mib"]["kd_weight"] == 5
    assert config["seed"] == 3


def test_a_misspelt_key_is_an_error():
    with pytest.raises(ConfigError, match="unknown config key 'schedule.step0.epoch'"):
        apply_overrides(load_experiment("synthetic_15_5_disjoint"), ["schedule.step0.epoch=3"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        apply_overrides(load_experiment("synthetic_15_5_disjoint"), ["seed"])


def test_a_based_file_changes_only_what_differs_and_keeps_no_foreign_expectations():
    base, overlap = load_experiment("voc_15_5_disjoint"), load_experiment("voc_15_5_overlap")
    assert overlap["data"]["mode"] == "overlap" and overlap["data"]["crop_size"] == base["data"]["crop_size"]
    assert overlap["expected"]["methods"]["mib"]["old"] == 75.5  # its own numbers, not the base's 71.8
    assert overlap["based_on"] == "voc_15_5_disjoint" and overlap["name"] == "voc_15_5_overlap"


def test_defaults_live_in_the_schema_and_every_method_gets_a_typed_run_config():
    from experiments.config import resolve

    experiment = resolve(load_experiment("synthetic_15_5_disjoint"))
    assert experiment.trainer.num_nodes == 1 and experiment.checkpoint.every_n_epochs == 1  # not in the file
    config = experiment.run_config("joint")
    assert config.schedule.incremental.epochs == 8  # the entry's own schedule
    assert config.schedule.step0.epochs == experiment.schedule.step0.epochs
    assert config.hparams == {} and experiment.run_config("mib").hparams == {"kd_weight": 10.0, "kd_alpha": 1.0,
                                                                           "init_balanced": True}
    with pytest.raises(Exception):  # frozen: the code reads configurations, never edits them
        config.data.batch_size = 3


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=-3", "data.batch_size: input should be greater than or equal to 1 (got -3)"),
    ("data.batch_size=8.5", "data.batch_size: input should be a valid integer (got 8.5)"),
    ("data.batch_size=[1,", "override data.batch_size=[1,: the value is not valid YAML"),
    ("data.mode=overlapped", "data.mode: input should be 'disjoint' or 'overlap' (got 'overlapped')"),
    ("data.validation_fraction=1.0", "data.validation_fraction: input should be less than 1"),
    ("trainer.devices=0", "trainer.devices"),
    ("network.output_stride=12", "network.output_stride: input should be 8, 16 or 32"),
    ("schedule.step0=3", "schedule.step0: input should be a valid dictionary"),
    ("data.batch_size.x=1", "data.batch_size is a value, not a section"),
    ("methods.wilson.alpha=high", "methods.wilson.alpha: input should be a valid number (got 'high')"),
    ("methods.wilson.schedule.incremental.epoch=3", "unknown config key 'methods.wilson.schedule.incremental.epoch'"),
    ("methods.mib.data=3", "methods.mib.data must be a mapping"),
    ("methods.mib.data.batch_size=0", "methods.mib.data.batch_size: input should be greater than or equal to 1"),
])
def test_bad_values_fail_at_load_with_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as raised:
        apply_overrides(load_experiment("synthetic_15_5_disjoint"), [override])
    text = str(raised.value)
    assert message in text and "\n" not in text, text


def test_a_method_brings_its_own_settings_and_the_precision_is_resolved_for_this_machine(monkeypatch):
    from experiments import config as config_module
    from experiments.config import resolve, resolve_precision

    experiment = resolve(apply_overrides(load_experiment("voc_15_5_disjoint"), []))
    assert experiment.run_config("wilson").schedule.incremental.epochs == 40
    assert experiment.run_config("mib").schedule.incremental.epochs == 30
    # precision auto / 16-mixed on a CPU: bf16 where the CPU has bfloat16 hardware, else fp32
    monkeypatch.setattr(config_module, "on_gpu", lambda accelerator: False)
    monkeypatch.setattr(config_module, "cpu_has_bfloat16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16-mixed" == resolve_precision("16-mixed", "cpu")
    monkeypatch.setattr(config_module, "cpu_has_bfloat16", lambda: False)
    assert resolve_precision("auto", "cpu") == "32-true" == resolve_precision("16-mixed", "cpu")
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    monkeypatch.setattr(config_module, "on_gpu", lambda accelerator: True)
    assert resolve_precision("auto", "gpu") == "32-true" and resolve_precision("16-mixed", "gpu") == "16-mixed"


def test_cpu_bfloat16_detection_reads_the_cpu_flags(tmp_path, monkeypatch):
    from experiments import config as config_module

    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(config_module, "Path", lambda path: cpuinfo if path == "/proc/cpuinfo" else __import__("pathlib").Path(path))
    cpuinfo.write_text("processor : 0\nflags : fpu sse avx2 avx512f\n")
    assert config_module.cpu_has_bfloat16() is False
    cpuinfo.write_text("processor : 0\nflags : fpu avx512f avx512_bf16 amx_tile\n")
    assert config_module.cpu_has_bfloat16() is True
    cpuinfo.write_text("processor : 0\nFeatures : fp asimd bf16\n")  # ARM
    assert config_module.cpu_has_bfloat16() is True
