"""Experiment files (`experiments/<name>.yaml`) and `key=value` overrides.

An override's key is a dotted path that must already exist in the experiment file, so a
misspelt key is an error, not a silently ignored setting. Exceptions: under `methods.<name>`
(checked by the method itself) and `data.options`. `methods=[a,b]` selects a subset of the
file's methods (a registered method not in the file runs with its defaults).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml

EXPERIMENTS_DIR = Path(__file__).resolve().parent
FREE_FORM = ("methods.", "data.options.", "expected.")


# Settings every experiment has, so that they can be overridden from any file: the held-out
# share of the training images for hyper-parameter searches (0: none, the papers' protocol); the
# test crop when it differs from the training crop (null: the same).
DEFAULTS = {
    # on_unreadable: an image that breaks during training stops the run ("stop") or is skipped and
    # counted ("skip"); every file is checked before training anyway (datamodules.validate).
    "data": {"validation_fraction": 0.0, "eval_crop_size": None, "on_unreadable": "stop"},
    # Test images shown in the qualitative figure (image | ground truth | predictions); 0: none.
    "figures": {"qualitative_images": 4},
    # Processes and speed (README "Multi-GPU"): devices x num_nodes processes, each with
    # data.batch_size images; precision 32-true | 16-mixed | bf16-mixed; compile: false, true
    # (inductor) or a torch.compile backend name.
    "trainer": {"accelerator": "auto", "devices": 1, "num_nodes": 1, "strategy": "auto", "precision": "32-true",
                "accumulate_grad_batches": 1, "sync_batchnorm": True, "channels_last": False, "compile": False,
                "deterministic": False, "log_every_n_steps": 10, "limit_train_batches": 1.0,
                "limit_test_batches": 1.0},
    # The lr of the schedule is for `reference_batch` images per update (the file's data.batch_size
    # unless given); with another effective batch it is scaled linearly (PROTOCOL.md §6).
    "optimizer": {"scale_lr": True, "reference_batch": None},
    # A Lightning checkpoint every n epochs of a step, and one per finished step; a run started
    # again with the same command continues from them (resume: false starts over).
    "checkpoint": {"every_n_epochs": 1},
    "resume": True,
}
# The keys an experiment file may hold (a misspelt key in a file is an error, as in an override).
KNOWN_KEYS = {
    "": {"name", "description", "base", "based_on", "data", "network", "schedule", "optimizer", "trainer", "logger",
         "methods", "expected", "seed", "output_dir", "cache_dir", "figures", "checkpoint", "resume"},
    "data": {"dataset", "root", "task", "mode", "batch_size", "test_batch_size", "crop_size", "eval_crop_size",
             "train_scale", "eval_mode", "test_images", "void_as_background", "future_classes_in_test", "num_workers",
             "options", "validation_fraction", "on_unreadable"},
    "optimizer": {"momentum", "nesterov", "weight_decay", "poly_power", "scale_lr", "reference_batch"},
    "schedule": {"step0", "incremental"},
    "logger": {"wandb", "project"},
    **{section: set(DEFAULTS[section]) for section in ("trainer", "figures", "checkpoint")},
}


class ConfigError(ValueError):
    """A bad experiment name, override or value; the message is one line for the user."""


def experiment_names() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))


def _merge(base: dict, changes: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_experiment(name: str) -> dict:
    """The experiment file `name`. A file may start from another with `base: <name>` (one
    level: the base may not have a base of its own) and change only what differs."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else EXPERIMENTS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown experiment {name!r}; available: {', '.join(experiment_names())}")
    config = yaml.safe_load(path.read_text()) or {}
    if "base" in config:
        base = load_experiment(config.pop("base"))
        if base.pop("based_on", None):
            raise ConfigError(f"{path.name}: its base has a base itself; keep experiment files one level deep")
        base.pop("expected", None)  # expected numbers belong to one setting, never inherited
        config = _merge(base, config)
        config["based_on"] = base["name"]
    config["name"] = path.stem
    config = _merge(DEFAULTS, config)
    check_keys(config, path.name)
    if config["optimizer"]["reference_batch"] is None:  # fixed here, before any override of the batch
        config["optimizer"]["reference_batch"] = (config.get("data") or {}).get("batch_size")
    return config


def check_keys(config: dict, where: str) -> None:
    """Every key of the sections with a fixed set of keys is known (KNOWN_KEYS)."""
    for section, known in KNOWN_KEYS.items():
        node = config if not section else config.get(section)
        if not isinstance(node, dict):
            continue
        unknown = sorted(set(node) - known)
        if unknown:
            where_in = f"{section}." if section else ""
            raise ConfigError(f"{where}: unknown config key {where_in}{unknown[0]!r}; known keys there: "
                              f"{', '.join(sorted(known))}")


def _set(config: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = config
    for depth, key in enumerate(keys[:-1]):
        if not isinstance(node.get(key), dict):
            if any((dotted + ".").startswith(prefix) for prefix in FREE_FORM) and key not in node:
                node[key] = {}
            else:
                raise ConfigError(f"unknown config key {'.'.join(keys[:depth + 1])!r} (in override {dotted}=...)")
        node = node[key]
    last = keys[-1]
    if last not in node and not any(dotted.startswith(prefix) for prefix in FREE_FORM):
        known = ", ".join(sorted(node)) if isinstance(node, dict) else ""
        raise ConfigError(f"unknown config key {dotted!r}; known keys there: {known}")
    node[last] = value


def _parse_value(raw: str):
    """YAML, except that numbers like 1e-3 (a string to YAML 1.1) are numbers."""
    if not raw.strip():
        return None
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """Return a copy of `config` with `key=value` overrides (values parsed as YAML)."""
    config = copy.deepcopy(config)
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not of the form key=value")
        key, raw = override.split("=", 1)
        key = key.strip().lstrip("-")  # accept --key=value as wandb's ${args} passes it
        value = _parse_value(raw)
        if key == "methods" and isinstance(value, (list, str)):
            value = [value] if isinstance(value, str) else value
            available = config.get("methods") or {}
            config["methods"] = {m: copy.deepcopy(available.get(m) or {}) for m in value}
            continue
        _set(config, key, value)
    return config


def resolve(config: dict) -> dict:
    """Fill in what depends on the environment (data root), so the saved config is complete."""
    config = copy.deepcopy(config)
    data = config.setdefault("data", {})
    if not data.get("root"):
        data["root"] = os.environ.get("DATA_ROOT", "data")
    if not config.get("methods"):
        raise ConfigError("the experiment lists no methods")
    return config
