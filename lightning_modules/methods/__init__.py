"""Incremental learning methods, one file each.

Every module in this package that defines `METHOD = <a Method subclass>` is registered under
`METHOD.name`: adding a method is adding a file.
"""
from __future__ import annotations

import importlib
import pkgutil

from lightning_modules.methods.base import Method

METHODS: dict[str, type[Method]] = {}
for _info in pkgutil.iter_modules(__path__):
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    if hasattr(_module, "METHOD"):
        METHODS[_module.METHOD.name] = _module.METHOD


def build_method(name: str, **hparams) -> Method:
    """The method `name` with its hyper-parameters; unknown names and keys are one-line errors."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name].from_hparams(hparams)
