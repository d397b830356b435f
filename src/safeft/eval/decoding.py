"""Decoding-time interventions: a registry of logits-processor factories.

A method that steers decoding (NADO's token reweighting, DExperts, ...) registers
``factory(model, tokenizer, spec: str) -> transformers.LogitsProcessor`` under a name;
``safeft eval --decoding name:spec`` (and ``evaluate(decoding="name:spec")``) builds the
processor and passes it to every ``model.generate`` call. ``spec`` is the factory's own
argument string (e.g. a path to a trained constraint model).

Factories registered at import of a module under :mod:`safeft.methods` are found without
any import by the caller: an unknown name triggers method discovery once.
"""

from __future__ import annotations

from typing import Callable

from ..errors import ConfigError

DECODINGS: dict[str, Callable] = {}


def register_decoding(name: str, factory: Callable | None = None):
    """``register_decoding("nado", factory)`` or as a decorator ``@register_decoding("nado")``."""
    def deco(fn):
        DECODINGS[name] = fn
        return fn

    return deco(factory) if factory is not None else deco


def list_decodings() -> list[str]:
    _discover()
    return sorted(DECODINGS)


def _discover() -> None:
    from ..methods import list_methods

    list_methods()


def build_logits_processor(model, tokenizer, decoding: str | None):
    """``"name:spec"`` -> the registered factory's ``LogitsProcessor`` (None for no decoding)."""
    if not decoding:
        return None
    name, _, spec = decoding.partition(":")
    if name not in DECODINGS:
        _discover()
    if name not in DECODINGS:
        known = ", ".join(sorted(DECODINGS)) or "none registered"
        raise ConfigError(f"unknown decoding {name!r} ({known})", field="--decoding")
    return DECODINGS[name](model, tokenizer, spec)


__all__ = ["DECODINGS", "build_logits_processor", "list_decodings", "register_decoding"]
