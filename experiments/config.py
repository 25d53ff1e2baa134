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
DEFAULTS = {"data": {"validation_fraction": 0.0, "eval_crop_size": None},
            # Test images shown in the qualitative figure (image | ground truth | predictions); 0: none.
            "figures": {"qualitative_images": 4}}


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
    return _merge(DEFAULTS, config)


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
