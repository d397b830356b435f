"""The method registry.

Every module in this package that defines a finished method registers it with
:func:`register`; modules are discovered automatically, so adding a method is adding a file.
``safeft methods`` lists what is registered.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import ConfigError
from .base import LossOutput, Method

REGISTRY: dict[str, type[Method]] = {}
_loaded = False


def register(cls: type[Method]) -> type[Method]:
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise RuntimeError(f"method {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base" and not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


def get_method_class(name: str) -> type[Method]:
    _discover()
    if name not in REGISTRY:
        raise ConfigError(f"unknown method {name!r}; registered: {', '.join(sorted(REGISTRY))}", field="method.name")
    return REGISTRY[name]


def list_methods() -> list[type[Method]]:
    _discover()
    return [REGISTRY[k] for k in sorted(REGISTRY)]


__all__ = ["LossOutput", "Method", "REGISTRY", "get_method_class", "list_methods", "register"]
