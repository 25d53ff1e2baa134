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
