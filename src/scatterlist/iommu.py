"""The emulated IOMMU: a page table from IOVAs to physical pages, an IOVA allocator, a fault log."""

from __future__ import annotations

import threading
import weakref
from typing import Any, List, NamedTuple, Optional, Tuple

from ._util import Lifetime, reinit_after_fork, require_range
from .constants import ACCESS_CODES, IOMMU_READ, IOMMU_WRITE, U32_MAX, U64_MAX
from .errors import ACCESS_NAMES, ClosedError, InvalidArgument, Reason
from .memory import PhysicalMemory

_FAULT_REASON_NAMES = {1: "not mapped", 2: "no permission", 3: "outside the aperture"}
_STATE_NAMES = {0: "live", 1: "reserved", 2: "cached"}


class FaultRecord(NamedTuple):
    """One entry of the IOMMU's fault log."""

    seq: int  #: numbering that keeps counting across clears and log wrap-around
    iova: int  #: first byte of the access that faulted
    access: str  #: "read" or "write" (the device reading or writing memory)
    reason: str  #: "not mapped", "no permission" or "outside the aperture"
    prot: int  #: the page's permission bits for "no permission", else 0


class IovaRange(NamedTuple):
    start: int  #: IOVA of the first byte
    size_bytes: int
    state: str  #: "live", "reserved" or "cached" (freed but kept for reuse)


def access_code(access: str) -> int:
    try:
        return ACCESS_CODES[access]
    except (KeyError, TypeError):
        raise InvalidArgument(f"access={access!r} is neither 'read' nor 'write'") from None


class PageTableEdits:
    """Keeps a compound edit of an IOMMU's page table whole: the fault helpers look a page up,
    unmap it and map it again with other permissions, and an unmap of the DMA mapping that
    page belongs to (on another thread) must not come in between -- it would free the pages
    and the IOVA, and the re-map would then give the device a page of their next owner."""

    __slots__ = ("lock", "__weakref__")

    def __init__(self) -> None:
        self.lock = threading.RLock()
        reinit_after_fork(self)

    def _reinit_after_fork(self) -> None:
        self.lock = threading.RLock()


class Iommu:
    """An IOMMU translating device addresses (IOVAs) to physical addresses of ``memory``.

    ``granule`` (bytes) is its page size, at most the memory's page size; the aperture covers
    addresses below ``2**aperture_bits``.  DMA mapping takes IOVA blocks from its allocator
    (top-down under the device's DMA mask, IOVA 0 never used) and maps them in its page table;
    :meth:`map` and :meth:`unmap` work on the page table directly, e.g. to inject faults.
    """

    def __init__(
        self, memory: PhysicalMemory, granule: int = 4096, *, aperture_bits: int = 48
    ) -> None:
        if not isinstance(memory, PhysicalMemory):
            raise TypeError(f"memory must be a PhysicalMemory, not {type(memory).__name__}")
        granule = require_range("granule", granule, 0, U32_MAX, Reason.GRANULE)
        if granule > memory.page_size:
            raise InvalidArgument(
                f"granule={granule} is larger than the memory's page size {memory.page_size}"
            )
        aperture_bits = require_range("aperture_bits", aperture_bits, 0, 64, Reason.APERTURE_BITS)
        engine = memory._engine
        memory_life = memory._life
        with memory_life:
            handle = engine.iommu_create(granule, aperture_bits)
            memory_life.pin("Iommu")

        def teardown(handle: Any, by_owner: bool) -> None:
            try:
                engine.iommu_destroy(handle)
            finally:
                memory_life.unpin("Iommu")

        self._engine = engine
        self._memory = memory
        self._granule = granule
        self._aperture_bits = aperture_bits
        self._life = Lifetime("Iommu", handle, teardown)
        self._edits = PageTableEdits()
        self._finalizer = weakref.finalize(self, self._life.release)

    # -- state --------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._life.closed

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
    def mapped_pages(self) -> int:
        """Granule-sized pages mapped in the page table."""
        with self._life as handle:
            return int(self._engine.iommu_info(handle)[0])

    @property
    def fault_total(self) -> int:
        """Faults ever logged (the log itself keeps the last 256)."""
        with self._life as handle:
            return int(self._engine.iommu_info(handle)[1])

    # -- page table ---------------------------------------------------------------------
    def map(
        self, iova: int, phys: int, size_bytes: int, prot: int = IOMMU_READ | IOMMU_WRITE
    ) -> None:
        """Map ``size_bytes`` at ``iova`` to ``phys`` (all granule-aligned), all or nothing."""
        iova = require_range("iova", iova, 0, U64_MAX)
        phys = require_range("phys", phys, 0, U64_MAX)
        size_bytes = require_range("size_bytes", size_bytes, 0, U64_MAX)
        prot = require_range("prot", prot, 0, 63, Reason.IOMMU_PROT)
        with self._life as handle:
            self._engine.iommu_map(handle, iova, phys, size_bytes, prot)

    def unmap(self, iova: int, size_bytes: int) -> int:
        """Unmap from ``iova`` on, stopping at the first unmapped page; returns bytes unmapped.
        Unmapping a live DMA mapping's pages makes the device fault there (fault injection)."""
        iova = require_range("iova", iova, 0, U64_MAX)
        size_bytes = require_range("size_bytes", size_bytes, 0, (1 << 63) - 1)
        with self._life as handle:
            return self._engine.iommu_unmap(handle, iova, size_bytes)

    def translate(self, iova: int, access: str = "read") -> int:
        """Physical address of a one-byte device access, or ``IommuFault`` (logged)."""
        iova = require_range("iova", iova, 0, U64_MAX)
        code = access_code(access)
        with self._life as handle:
            return self._engine.iommu_translate(handle, iova, code)

    def lookup(self, iova: int) -> Optional[Tuple[int, int]]:
        """``(phys, prot)`` of the page mapped at ``iova``, or None; never a fault."""
        iova = require_range("iova", iova, 0, U64_MAX)
        with self._life as handle:
            return self._engine.iommu_lookup(handle, iova)

    # -- fault log ----------------------------------------------------------------------
    def faults(self) -> List[FaultRecord]:
        """The logged faults, oldest first."""
        with self._life as handle:
            records = self._engine.iommu_faults(handle)
        return [
            FaultRecord(
                seq,
                iova,
                ACCESS_NAMES.get(access, str(access)),
                _FAULT_REASON_NAMES.get(reason, str(reason)),
                prot,
            )
            for seq, iova, access, reason, prot in records
        ]

    def clear_faults(self) -> None:
        with self._life as handle:
            self._engine.iommu_clear_faults(handle)

    # -- IOVA space ---------------------------------------------------------------------
    def iova_ranges(
        self, *, live: bool = True, cached: bool = False, reserved: bool = False
    ) -> List[IovaRange]:
        """Allocated IOVA ranges, ascending: live ones (mapped blocks), and on request the
        freed ones the range cache keeps and the reserved ones."""
        mask = (1 if live else 0) | (2 if reserved else 0) | (4 if cached else 0)
        with self._life as handle:
            ranges = self._engine.iommu_iova_ranges(handle, mask)
        return [
            IovaRange(
                lo * self._granule,
                (hi - lo + 1) * self._granule,
                _STATE_NAMES.get(state, str(state)),
            )
            for lo, hi, state in ranges
        ]

    def reserve_iova(self, start: int, size_bytes: int) -> None:
        """Keep ``[start, start + size_bytes)`` out of DMA mappings (a PCI window, say)."""
        start = require_range("start", start, 0, U64_MAX)
        size_bytes = require_range("size_bytes", size_bytes, 1, U64_MAX)
        if start + size_bytes > 1 << 64:
            raise InvalidArgument(f"start={start:#x} + size_bytes={size_bytes:#x} runs past 2**64")
        if start % self._granule or size_bytes % self._granule:
            raise InvalidArgument(
                f"start={start:#x} and size_bytes={size_bytes:#x} must be "
                f"multiples of the granule {self._granule}"
            )
        with self._life as handle:
            self._engine.iommu_reserve(
                handle, start // self._granule, (start + size_bytes) // self._granule - 1
            )

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        """Release the IOMMU.  Idempotent; ``BusyError`` while devices using it are open;
        waits for calls in flight on other threads."""
        self._life.close()

    def __enter__(self) -> "Iommu":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        try:
            mapped = self.mapped_pages
        except ClosedError:
            return "<Iommu closed>"
        return (
            f"<Iommu granule={self._granule} aperture={self._aperture_bits} bits, "
            f"{mapped} pages mapped, engine={self.engine}>"
        )
