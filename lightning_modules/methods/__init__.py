"""Incremental learning methods, one file each.

Every module in this package that defines `METHOD = <a Method subclass>` is registered under
`METHOD.name`: adding a method is adding a file. A method defined elsewhere (a user's own file,
a test) registers itself with `register(cls)`.
"""
from __future__ import annotations

import importlib
import pkgutil

from lightning_modules.methods.base import Method, StepContext

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Add a Method subclass to the registry under cls.name (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or cls.name == Method.name:
        raise TypeError(f"{cls!r} is not a named Method subclass")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({METHODS[cls.name].__module__})")
    METHODS[cls.name] = cls
    return cls


for _info in pkgutil.iter_modules(__path__):
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    if hasattr(_module, "METHOD"):
        register(_module.METHOD)


def build_method(name: str, **hparams) -> Method:
    """The method `name` with its hyper-parameters, checked by name, type and range: unknown names
    and keys and wrong values are one-line errors (experiments.config.ConfigError)."""
    from experiments.config import ConfigError, validate_hparams

    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    return cls(**validate_hparams(cls, hparams, f"methods.{name}"))


__all__ = ["METHODS", "Method", "StepContext", "build_method", "register"]
