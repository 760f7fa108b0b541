"""How an engine is chosen: explicitly, by argument or by ``SCATTERLIST_ENGINE``.

A missing native extension is an ImportError, never a silent switch to the model.  This
module sits above both engines (it imports them); the contract they implement is in
:mod:`scatterlist._contract`.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

from ._contract import LAYOUTS, DeviceLimits, Engine, TableCounts, TableMapping
from .errors import InvalidArgument

ENGINE_NAMES = ("native", "model")

_cache: Dict[str, Engine] = {}


def default_engine_name() -> str:
    name = os.environ.get("SCATTERLIST_ENGINE", "native").strip().lower() or "native"
    if name not in ENGINE_NAMES:
        raise InvalidArgument(
            f"SCATTERLIST_ENGINE={name!r} is not an engine: choose one of {ENGINE_NAMES}"
        )
    return name


def get_engine(name: Optional[str] = None) -> Engine:
    """The engine called ``name`` (default: SCATTERLIST_ENGINE, else ``native``)."""
    if name is None:
        name = default_engine_name()
    if name not in ENGINE_NAMES:
        raise InvalidArgument(f"engine={name!r} is not an engine: choose one of {ENGINE_NAMES}")
    engine = _cache.get(name)
    if engine is None:
        if name == "native":
            from ._native import NativeEngine

            engine = NativeEngine()
        else:
            from .model import ModelEngine

            engine = ModelEngine()
        _cache[name] = engine
    return engine


__all__ = [
    "ENGINE_NAMES",
    "LAYOUTS",
    "DeviceLimits",
    "Engine",
    "TableCounts",
    "TableMapping",
    "default_engine_name",
    "get_engine",
]
