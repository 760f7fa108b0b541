"""scatterlist: Linux scatter-gather tables and DMA mapping, emulated in userspace.

Two engines sit under one API: ``native`` (a C core through cffi) and ``model`` (pure Python).
The default comes from the ``SCATTERLIST_ENGINE`` environment variable (``native`` if unset);
constructors also take ``engine=``.  ``scatterlist.engine`` names the default in use.
"""

from __future__ import annotations

from . import _engine, debug, faults
from .constants import (
    DMA_BIT_MASK,
    IOMMU_READ,
    IOMMU_WRITE,
    MAX_SEGMENT_UNLIMITED,
    PAGE_SIZE,
    DataDirection,
)
from .device import Device
from .dma import (
    dma_map_sg,
    dma_map_sgtable,
    dma_sync_sg_for_cpu,
    dma_sync_sg_for_device,
    dma_sync_sgtable_for_cpu,
    dma_sync_sgtable_for_device,
    dma_sync_single_for_cpu,
    dma_sync_single_for_device,
    dma_unmap_sg,
    dma_unmap_sgtable,
)
from .errors import (
    BusyError,
    ClosedError,
    DeviceUnbound,
    DmaApiError,
    DmaApiWarning,
    InvalidArgument,
    IommuFault,
    MappingError,
    OutOfMemory,
    Reason,
    ScatterlistError,
)
from .iommu import FaultRecord, Iommu, IovaRange
from .memory import Pages, PhysicalMemory
from .sgtable import Borrowed, Owned, SGTable
from .table import RawTable, SGEntry, alloc_table_from_entries, alloc_table_from_pages

__version__ = "0.1.0"

#: Name of the default engine (``native`` or ``model``), from SCATTERLIST_ENGINE.
engine: str = _engine.default_engine_name()
# Load the default engine now: a missing native build is an ImportError here, not a silent
# fallback later.
_engine.get_engine(engine)


__all__ = [
    "PAGE_SIZE",
    "MAX_SEGMENT_UNLIMITED",
    "DataDirection",
    "engine",
    "PhysicalMemory",
    "Pages",
    "RawTable",
    "SGEntry",
    "alloc_table_from_pages",
    "alloc_table_from_entries",
    "Iommu",
    "IOMMU_READ",
    "IOMMU_WRITE",
    "FaultRecord",
    "IovaRange",
    "Device",
    "DMA_BIT_MASK",
    "dma_map_sgtable",
    "dma_unmap_sgtable",
    "dma_sync_sgtable_for_cpu",
    "dma_sync_sgtable_for_device",
    "dma_map_sg",
    "dma_unmap_sg",
    "dma_sync_sg_for_cpu",
    "dma_sync_sg_for_device",
    "dma_sync_single_for_cpu",
    "dma_sync_single_for_device",
    "debug",
    "faults",
    "DmaApiError",
    "DmaApiWarning",
    "SGTable",
    "Owned",
    "Borrowed",
    "ScatterlistError",
    "InvalidArgument",
    "OutOfMemory",
    "BusyError",
    "ClosedError",
    "DeviceUnbound",
    "MappingError",
    "IommuFault",
    "Reason",
]
