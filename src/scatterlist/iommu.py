"""The emulated IOMMU: a page table from IOVAs to physical pages, an IOVA allocator, a fault log.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any, List, NamedTuple, Optional, Tuple

from ._util import locked, require_range
from .errors import ACCESS_NAMES, BusyError, ClosedError, InvalidArgument, Reason
from .memory import PhysicalMemory

if TYPE_CHECKING:
    from .device import Device

#: Permission bits of an IOMMU mapping (the kernel's values): the device may read memory
#: (``IOMMU_READ``, DMA to the device) and/or write it (``IOMMU_WRITE``).
IOMMU_READ = 1
IOMMU_WRITE = 2
_ACCESS_CODES = {"read": IOMMU_READ, "write": IOMMU_WRITE}
_FAULT_REASON_NAMES = {1: "not mapped", 2: "no permission", 3: "outside the aperture"}
_STATE_NAMES = {0: "live", 1: "reserved", 2: "cached"}
_U64_MAX = (1 << 64) - 1


class FaultRecord(NamedTuple):
    """One entry of the IOMMU's fault log."""

    seq: int      #: numbering that keeps counting across clears and log wrap-around
    iova: int     #: first byte of the access that faulted
    access: str   #: "read" or "write" (the device reading or writing memory)
    reason: str   #: "not mapped", "no permission" or "outside the aperture"
    prot: int     #: the page's permission bits for "no permission", else 0


class IovaRange(NamedTuple):
    start: int       #: IOVA of the first byte
    size_bytes: int
    state: str       #: "live", "reserved" or "cached" (freed but kept for reuse)


def access_code(access: str) -> int:
    try:
        return _ACCESS_CODES[access]
    except (KeyError, TypeError):
        raise InvalidArgument(f"access={access!r} is neither 'read' nor 'write'") from None


class Iommu:
    """An IOMMU translating device addresses (IOVAs) to physical addresses of ``memory``.

    ``granule`` (bytes) is its page size, at most the memory's page size; the aperture covers
    addresses below ``2**aperture_bits``.  DMA mapping takes IOVA blocks from its allocator
    (top-down under the device's DMA mask, IOVA 0 never used) and maps them in its page table;
    :meth:`map` and :meth:`unmap` work on the page table directly, e.g. to inject faults.
    """

    def __init__(self, memory: PhysicalMemory, granule: int = 4096, *,
                 aperture_bits: int = 48) -> None:
        if not isinstance(memory, PhysicalMemory):
            raise TypeError(f"memory must be a PhysicalMemory, not {type(memory).__name__}")
        memory._require_open()
        granule = require_range("granule", granule, 0, 0xFFFFFFFF, Reason.GRANULE)
        if granule > memory.page_size:
            raise InvalidArgument(f"granule={granule} is larger than the memory's page size "
                                  f"{memory.page_size}")
        aperture_bits = require_range("aperture_bits", aperture_bits, 0, 64,
                                      Reason.APERTURE_BITS)
        self._lock = threading.RLock()
        self._engine = memory._engine
        self._memory = memory
        self._handle: Any = self._engine.iommu_create(granule, aperture_bits)
        self._granule = granule
        self._aperture_bits = aperture_bits
        self._closed = False
        self._devices: "weakref.WeakSet[Device]" = weakref.WeakSet()
        memory._dependents.add(self)

    # -- state --------------------------------------------------------------------------
    def _require_open(self) -> Any:
        if self._closed:
            raise ClosedError("Iommu is closed")
        return self._handle

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def engine(self) -> str:
        return self._engine.name

    @property
    def memory(self) -> PhysicalMemory:
        return self._memory

    @property
    def granule(self) -> int:
        return self._granule

    @property
    def aperture_bits(self) -> int:
        return self._aperture_bits

    @property
    @locked
    def mapped_pages(self) -> int:
        """Granule-sized pages mapped in the page table."""
        return int(self._engine.iommu_info(self._require_open())[0])

    @property
    @locked
    def fault_total(self) -> int:
        """Faults ever logged (the log itself keeps the last 256)."""
        return int(self._engine.iommu_info(self._require_open())[1])

    # -- page table ---------------------------------------------------------------------
    @locked
    def map(self, iova: int, phys: int, size_bytes: int,
            prot: int = IOMMU_READ | IOMMU_WRITE) -> None:
        """Map ``size_bytes`` at ``iova`` to ``phys`` (all granule-aligned), all or nothing."""
        handle = self._require_open()
        self._engine.iommu_map(handle, require_range("iova", iova, 0, _U64_MAX),
                               require_range("phys", phys, 0, _U64_MAX),
                               require_range("size_bytes", size_bytes, 0, _U64_MAX),
                               require_range("prot", prot, 0, 63, Reason.IOMMU_PROT))

    @locked
    def unmap(self, iova: int, size_bytes: int) -> int:
        """Unmap from ``iova`` on, stopping at the first unmapped page; returns bytes unmapped.
        Unmapping a live DMA mapping's pages makes the device fault there (fault injection)."""
        handle = self._require_open()
        return self._engine.iommu_unmap(handle, require_range("iova", iova, 0, _U64_MAX),
                                        require_range("size_bytes", size_bytes, 0,
                                                      (1 << 63) - 1))

    @locked
    def translate(self, iova: int, access: str = "read") -> int:
        """Physical address of a one-byte device access, or ``IommuFault`` (logged)."""
        handle = self._require_open()
        return self._engine.iommu_translate(handle, require_range("iova", iova, 0, _U64_MAX),
                                            access_code(access))

    @locked
    def lookup(self, iova: int) -> Optional[Tuple[int, int]]:
        """``(phys, prot)`` of the page mapped at ``iova``, or None; never a fault."""
        handle = self._require_open()
        return self._engine.iommu_lookup(handle, require_range("iova", iova, 0, _U64_MAX))

    # -- fault log ----------------------------------------------------------------------
    @locked
    def faults(self) -> List[FaultRecord]:
        """The logged faults, oldest first."""
        return [FaultRecord(seq, iova, ACCESS_NAMES.get(access, str(access)),
                            _FAULT_REASON_NAMES.get(reason, str(reason)), prot)
                for seq, iova, access, reason, prot in
                self._engine.iommu_faults(self._require_open())]

    @locked
    def clear_faults(self) -> None:
        self._engine.iommu_clear_faults(self._require_open())

    # -- IOVA space ---------------------------------------------------------------------
    @locked
    def iova_ranges(self, *, live: bool = True, cached: bool = False,
                    reserved: bool = False) -> List[IovaRange]:
        """Allocated IOVA ranges, ascending: live ones (mapped blocks), and on request the
        freed ones the range cache keeps and the reserved ones."""
        mask = (1 if live else 0) | (2 if reserved else 0) | (4 if cached else 0)
        return [IovaRange(lo * self._granule, (hi - lo + 1) * self._granule,
                          _STATE_NAMES.get(state, str(state)))
                for lo, hi, state in self._engine.iommu_iova_ranges(self._require_open(), mask)]

    @locked
    def reserve_iova(self, start: int, size_bytes: int) -> None:
        """Keep ``[start, start + size_bytes)`` out of DMA mappings (a PCI window, say)."""
        handle = self._require_open()
        start = require_range("start", start, 0, _U64_MAX)
        size_bytes = require_range("size_bytes", size_bytes, 1, _U64_MAX)
        if start + size_bytes > 1 << 64:
            raise InvalidArgument(f"start={start:#x} + size_bytes={size_bytes:#x} runs past "
                                  f"2**64")
        if start % self._granule or size_bytes % self._granule:
            raise InvalidArgument(f"start={start:#x} and size_bytes={size_bytes:#x} must be "
                                  f"multiples of the granule {self._granule}")
        self._engine.iommu_reserve(handle, start // self._granule,
                                   (start + size_bytes) // self._granule - 1)

    # -- lifetime -----------------------------------------------------------------------
    @locked
    def close(self) -> None:
        """Release the IOMMU.  Idempotent; ``BusyError`` while devices using it are open."""
        if self._closed:
            return
        if any(not dev.closed for dev in self._devices):
            raise BusyError("Iommu.close: devices attached to this IOMMU are still open; "
                            "close them first")
        self._closed = True
        self._memory._dependents.discard(self)
        self._engine.iommu_destroy(self._handle)

    def __enter__(self) -> "Iommu":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            return "<Iommu closed>"
        return (f"<Iommu granule={self._granule} aperture={self._aperture_bits} bits, "
                f"{self.mapped_pages} pages mapped, engine={self.engine}>")
