"""The shared vocabulary of scatterlist: directions, sizes, limits and permission bits.

A leaf module: it imports nothing from the package but :mod:`scatterlist.errors`, so every other
module (both engines included) can use it without an import cycle.  The values are the kernel's.
"""

from __future__ import annotations

import errno
from enum import IntEnum

from .errors import ACCESS_NAMES, InvalidArgument

#: The page size (bytes) of the kernel's common configuration, and the default everywhere.
PAGE_SIZE = 4096

#: Largest value of a C ``unsigned int`` / ``uint32_t``.
U32_MAX = 0xFFFFFFFF
#: Largest value of a C ``uint64_t`` (``dma_addr_t``, ``phys_addr_t`` and sizes here).
U64_MAX = (1 << 64) - 1

#: The kernel's ``UINT_MAX`` segment limit for table building: no limit.
MAX_SEGMENT_UNLIMITED = U32_MAX

#: ``DMA_MAPPING_ERROR``: the DMA address of an entry no mapping defines.
DMA_MAPPING_ERROR = U64_MAX

#: Permission bits of an IOMMU mapping (the kernel's values): the device may read memory
#: (``IOMMU_READ``, DMA to the device) and/or write it (``IOMMU_WRITE``).  A device access is
#: named by the same bits: 1 is a read, 2 a write.
IOMMU_READ = 1
IOMMU_WRITE = 2

#: The device access codes as words (``ACCESS_NAMES``, defined beside the errors that name
#: them), and back.
ACCESS_CODES = {name: code for code, name in ACCESS_NAMES.items()}


class DataDirection(IntEnum):
    """The kernel's ``enum dma_data_direction``."""

    BIDIRECTIONAL = 0
    TO_DEVICE = 1  #: the device reads memory
    FROM_DEVICE = 2  #: the device writes memory
    NONE = 3  #: for debugging only: map, unmap and sync refuse it


def DMA_BIT_MASK(bits: int) -> int:
    """The kernel's ``DMA_BIT_MASK(n)``: the highest address an n-bit device can generate."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int, not {type(bits).__name__}")
    if not 1 <= bits <= 64:
        raise InvalidArgument(f"bits={bits} is out of range [1, 64]", errno=errno.EINVAL)
    return (1 << bits) - 1


__all__ = [
    "PAGE_SIZE",
    "U32_MAX",
    "U64_MAX",
    "MAX_SEGMENT_UNLIMITED",
    "DMA_MAPPING_ERROR",
    "IOMMU_READ",
    "IOMMU_WRITE",
    "ACCESS_NAMES",
    "ACCESS_CODES",
    "DataDirection",
    "DMA_BIT_MASK",
]
