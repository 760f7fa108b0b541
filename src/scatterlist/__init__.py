"""scatterlist: Linux scatter-gather tables and DMA mapping, emulated in userspace.

Two engines sit under one API: ``native`` (a C core through cffi) and ``model`` (pure Python).
The default comes from the ``SCATTERLIST_ENGINE`` environment variable (``native`` if unset);
constructors also take ``engine=``.  ``scatterlist.engine`` names the default in use.
"""

from __future__ import annotations

from enum import IntEnum

from . import _engine
from .errors import (BusyError, ClosedError, InvalidArgument, OutOfMemory, Reason,
                     ScatterlistError)
from .memory import PAGE_SIZE, Pages, PhysicalMemory
from .table import MAX_SEGMENT_UNLIMITED, RawTable, SGEntry, alloc_table_from_pages

__version__ = "0.1.0"

#: Name of the default engine (``native`` or ``model``), from SCATTERLIST_ENGINE.
engine: str = _engine.default_engine_name()
# Load the default engine now: a missing native build is an ImportError here, not a silent
# fallback later.
_engine.get_engine(engine)


class DataDirection(IntEnum):
    """The kernel's ``enum dma_data_direction``."""

    BIDIRECTIONAL = 0
    TO_DEVICE = 1
    FROM_DEVICE = 2
    NONE = 3


__all__ = [
    "PAGE_SIZE", "MAX_SEGMENT_UNLIMITED", "DataDirection", "engine",
    "PhysicalMemory", "Pages", "RawTable", "SGEntry", "alloc_table_from_pages",
    "ScatterlistError", "InvalidArgument", "OutOfMemory", "BusyError", "ClosedError", "Reason",
]
