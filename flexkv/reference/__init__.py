"""Eager reference implementations transcribing shared/METHODS.md (one module per policy).

`reference_for(policy)` returns the reference counterpart of a compiled policy object;
`flexkv.generate(..., reference=True)` runs it (slow, readable, dynamic shapes, float64).
"""
from __future__ import annotations

import importlib

from flexkv.reference.engine import Chunk, Head, RefCache, RefLayerCache, RefPolicy, Step

_REFS: dict[str, type] = {}


def register_reference(name: str):
    def deco(cls):
        _REFS[name] = cls
        return cls
    return deco


def reference_for(policy) -> RefPolicy:
    name = policy.name
    if "+" in name:  # "<base>+<modifier>": the modifier's reference wraps reference_for(base)
        name = name.rsplit("+", 1)[1]
    if name not in _REFS:
        try:
            importlib.import_module(f"flexkv.reference.{name}")
        except ModuleNotFoundError:
            pass
    if name not in _REFS:
        raise ValueError(f"policy {name!r} has no reference implementation")
    return _REFS[name](policy)


__all__ = ["Chunk", "Head", "RefCache", "RefLayerCache", "RefPolicy", "Step", "reference_for",
           "register_reference"]
