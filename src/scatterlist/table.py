"""Scatter-gather tables: ``alloc_table_from_pages``, ``RawTable`` and ``SGEntry``.

A ``RawTable`` is the kernel's ``struct sg_append_table`` built by
``sg_alloc_table_from_pages_segment`` / ``sg_alloc_append_table_from_pages``: owned, not
mapped for DMA.  Entries handed out (``SGEntry``) are views: they raise ``ClosedError`` once the
table is closed or changed, instead of showing stale or freed data.
"""

from __future__ import annotations

import threading
import weakref
from array import array
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional

from ._engine import Engine, get_engine
from ._util import PfnsLike, as_pfn_view, locked, require_range
from .errors import BusyError, ClosedError, InvalidArgument, Reason
from .memory import PAGE_SIZE, PhysicalMemory

if TYPE_CHECKING:
    from .device import Device

#: The kernel's ``UINT_MAX`` segment limit: no limit.
MAX_SEGMENT_UNLIMITED = 0xFFFFFFFF
_U64_MAX = (1 << 64) - 1


class DataDirection(IntEnum):
    """The kernel's ``enum dma_data_direction``."""

    BIDIRECTIONAL = 0
    TO_DEVICE = 1    #: the device reads memory
    FROM_DEVICE = 2  #: the device writes memory
    NONE = 3         #: for debugging only: map, unmap and sync refuse it


class _Mapping:
    """One live DMA mapping of a table: what it takes to unmap it, and whether that happened.

    Shared by the table (which unmaps before it frees its entries) and, for owned SGTables,
    the device's Devres list (which unmaps at unbind): whichever comes first unmaps, once.
    It holds the device object, so the device (and its IOMMU and memory) outlives it."""

    __slots__ = ("device", "dev_handle", "table_handle", "direction", "live", "revoked",
                 "lock", "debug_entry", "__weakref__")

    def __init__(self, device: "Device", dev_handle: Any, table_handle: Any,
                 direction: int) -> None:
        self.device = device
        self.dev_handle = dev_handle
        self.table_handle = table_handle
        self.direction = direction
        self.live = True
        self.revoked = False  # unmapped by device unbind rather than by its owner
        self.lock = threading.Lock()
        self.debug_entry: Any = None  # the dma-debug record, when debugging was on at map

    def unmap(self, *, by_unbind: bool = False) -> bool:
        """Unmap unless already unmapped; True if this call did."""
        with self.lock:
            if not self.live:
                return False
            self.device._engine.dma_unmap(self.dev_handle, self.table_handle, self.direction)
            self.finished(revoked=by_unbind)
            return True

    def finished(self, *, revoked: bool = False) -> None:
        """Bookkeeping once the engine has unmapped (the caller holds ``lock``)."""
        from . import debug
        self.live = False
        self.revoked = revoked
        self.device._mappings.discard(self)
        debug.forget(self.device, self.debug_entry)
        self.debug_entry = None


class _TableResources:
    """What a table's finalizer needs: no reference back to the RawTable object."""

    __slots__ = ("engine", "handle", "mapping")

    def __init__(self, engine: Engine, handle: Any) -> None:
        self.engine = engine
        self.handle = handle
        self.mapping: Optional[_Mapping] = None


def _release_table(resources: _TableResources) -> None:
    """Drop order: the DMA mapping first, then the entries."""
    mapping = resources.mapping
    if mapping is not None:
        try:
            mapping.unmap()
        except Exception:  # pragma: no cover - teardown must go on
            pass
    resources.engine.table_destroy(resources.handle)


#: Native table pointers (and model handles) to their live RawTable, for SGTable.from_raw.
_live_tables: "weakref.WeakValueDictionary[int, RawTable]" = weakref.WeakValueDictionary()


class SGEntry:
    """One entry of a table, as read at one moment.

    CPU side: ``pfn``, ``offset`` and ``length`` (bytes).  DMA side: ``dma_address`` and
    ``dma_len`` (bytes).  After DMA mapping, DMA entry *i* does not describe CPU entry *i*.
    Reading any field after the table was closed or changed raises ``ClosedError``."""

    __slots__ = ("_owner", "_epoch", "_index", "_pfn", "_offset", "_length",
                 "_dma_address", "_dma_len")

    def __init__(self, owner: "RawTable", epoch: int, index: int, pfn: int, offset: int,
                 length: int, dma_address: int, dma_len: int) -> None:
        if not isinstance(owner, RawTable):
            raise TypeError("SGEntry objects come from a table")
        self._owner = owner
        self._epoch = epoch
        self._index = index
        self._pfn = pfn
        self._offset = offset
        self._length = length
        self._dma_address = dma_address
        self._dma_len = dma_len

    def _check(self) -> None:
        self._owner._check_epoch(self._epoch, "SGEntry")

    @property
    def index(self) -> int:
        self._check()
        return self._index

    @property
    def pfn(self) -> int:
        self._check()
        return self._pfn

    @property
    def offset(self) -> int:
        """Bytes into the first page."""
        self._check()
        return self._offset

    @property
    def length(self) -> int:
        """CPU length in bytes."""
        self._check()
        return self._length

    @property
    def phys(self) -> int:
        """Physical address of the first byte: ``pfn * page_size + offset``."""
        self._check()
        return self._pfn * self._owner._page_size + self._offset

    @property
    def dma_address(self) -> int:
        self._check()
        return self._dma_address

    @property
    def dma_len(self) -> int:
        """DMA length in bytes (0 for an entry the DMA layer did not use)."""
        self._check()
        return self._dma_len

    def __repr__(self) -> str:
        return (f"SGEntry(index={self._index}, pfn={self._pfn}, offset={self._offset}, "
                f"length={self._length}, dma_address={self._dma_address:#x}, "
                f"dma_len={self._dma_len})")


class RawTable:
    """An owned scatter-gather table that is not mapped for DMA (Rust's ``RawSGTable``).

    Build it with :func:`alloc_table_from_pages`.  Iterating yields the ``orig_nents`` CPU
    entries; ``close()`` frees the entries (the kernel's ``sg_free_table``) and the table.
    """

    def __init__(self, engine: Engine, handle: Any, page_size: int) -> None:
        from ._engine import _cache
        if not any(engine is known for known in _cache.values()):
            raise TypeError("RawTable objects come from alloc_table_from_pages or "
                            "alloc_table_from_entries")
        self._engine = engine
        self._handle = handle
        self._page_size = page_size
        self._closed = False
        self._epoch = 0
        self._lock = threading.RLock()
        self._resources = _TableResources(engine, handle)
        # Safety net for tables that are never closed (unmaps, then frees); close() runs it.
        self._finalizer = weakref.finalize(self, _release_table, self._resources)
        _live_tables[engine.table_address(handle)] = self

    # -- guards -------------------------------------------------------------------------
    def _require_open(self) -> Any:
        if self._closed:
            raise ClosedError("RawTable is closed")
        return self._handle

    def _check_epoch(self, epoch: int, what: str) -> None:
        if self._closed:
            raise ClosedError(f"{what} used after its table was closed")
        if epoch != self._epoch:
            raise ClosedError(f"{what} is stale: its table changed since it was read")

    def _changed(self) -> None:
        self._epoch += 1

    # -- counters -----------------------------------------------------------------------
    @property
    def engine(self) -> str:
        return self._engine.name

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    @locked
    def nents(self) -> int:
        """DMA entries once mapped; equal to ``orig_nents`` before."""
        return int(self._engine.table_counts(self._require_open())[0])

    @property
    @locked
    def orig_nents(self) -> int:
        """CPU entries holding pages (chain links not counted)."""
        return int(self._engine.table_counts(self._require_open())[1])

    @property
    @locked
    def total_nents(self) -> int:
        """Usable entry slots allocated, including slots reserved for pages still to come."""
        return int(self._engine.table_counts(self._require_open())[2])

    @property
    @locked
    def final(self) -> bool:
        """True once a call with ``left_pages=0`` closed the table to appends."""
        return bool(self._engine.table_counts(self._require_open())[3])

    def __len__(self) -> int:
        return self.orig_nents

    # -- building -----------------------------------------------------------------------
    @locked
    def append_pages(self, pfns: PfnsLike, size: Optional[int] = None,
                     left_pages: int = 0) -> None:
        """``sg_alloc_append_table_from_pages``: add pages, merging into the last entry where
        the pfns continue it.  ``size`` (bytes, default all of the pages) must end inside the
        last page; ``left_pages`` says how many pages later calls will add (0: final)."""
        handle = self._require_open()
        view = as_pfn_view(pfns)
        size_bytes, left = _size_and_left(view, 0, size, left_pages, self._page_size)
        with self._lock:
            self._engine.table_append(handle, view, 0, size_bytes, left)
            self._changed()

    # -- DMA mapping (device.dma_map_sgtable and friends) -----------------------------
    @property
    @locked
    def mapped(self) -> bool:
        """True while the table is DMA-mapped."""
        self._require_open()
        mapping = self._resources.mapping
        return mapping is not None and mapping.live

    @property
    @locked
    def direction(self) -> Optional[DataDirection]:
        """The direction of the live mapping, or None."""
        info = self._engine.table_mapping(self._require_open())
        return None if info is None else DataDirection(info[0])

    def _map(self, device: "Device", dev_handle: Any, direction: int,
             nents: Optional[int] = None) -> "tuple[_Mapping, int]":
        """Map (dma_map_sgtable, or dma_map_sg with nents); returns the mapping and the DMA
        segment count."""
        with self._lock:
            handle = self._require_open()
            count = self._engine.dma_map(dev_handle, handle, direction, nents)
            mapping = _Mapping(device, dev_handle, handle, direction)
            self._resources.mapping = mapping
            device._mappings.add(mapping)
            self._changed()
            return mapping, count

    def _unmap(self, device: "Device", dev_handle: Any, direction: int,
               nents: Optional[int] = None) -> None:
        with self._lock:
            handle = self._require_open()
            mapping = self._resources.mapping
            if mapping is not None and mapping.live and mapping.dev_handle is dev_handle:
                with mapping.lock:
                    self._engine.dma_unmap(dev_handle, handle, direction, nents)
                    mapping.finished()
                self._resources.mapping = None
            else:
                # Not mapped, or mapped for another device: the engine says which.
                self._engine.dma_unmap(dev_handle, handle, direction, nents)
            self._changed()

    # -- reading ------------------------------------------------------------------------
    @locked
    def export_cpu(self) -> "array[int]":
        """All CPU entries in one call: ``array('Q')`` of (pfn, offset, length) rows."""
        handle = self._require_open()
        return self._engine.table_export_cpu(handle, self._engine.table_counts(handle)[1])

    @locked
    def export_dma(self, n_entries: Optional[int] = None) -> "array[int]":
        """(dma_address, dma_len) rows of the first ``n_entries`` entries (default
        ``nents``)."""
        handle = self._require_open()
        nents, orig_nents = self._engine.table_counts(handle)[:2]
        count = nents if n_entries is None else require_range("n_entries", n_entries, 0,
                                                              orig_nents)
        return self._engine.table_export_dma(handle, count)

    @locked
    def _entries(self, count: int) -> List[SGEntry]:
        handle = self._require_open()
        cpu = self._engine.table_export_cpu(handle, count)
        dma = self._engine.table_export_dma(handle, count)
        epoch = self._epoch
        return [SGEntry(self, epoch, i, cpu[3 * i], cpu[3 * i + 1], cpu[3 * i + 2],
                        dma[2 * i], dma[2 * i + 1]) for i in range(count)]

    def entries(self) -> List[SGEntry]:
        """The ``orig_nents`` CPU entries (``for_each_sgtable_sg``)."""
        return self._entries(self.orig_nents)

    def dma_entries(self) -> List[SGEntry]:
        """The first ``nents`` entries, whose DMA fields are the mapped segments
        (``for_each_sgtable_dma_sg``)."""
        return self._entries(self.nents)

    def __iter__(self) -> Iterator[SGEntry]:
        epoch = self._epoch
        for entry in self.entries():
            self._check_epoch(epoch, "RawTable iterator")
            yield entry

    @locked
    def chunk_slots(self) -> List[int]:
        """Slots in each entry chunk in chain order; a full chunk has ``page_size // 32``
        slots and gives its last one to the chain link."""
        return self._engine.table_chunk_slots(self._require_open())

    @locked
    def sg_nents(self) -> int:
        """``sg_nents``: entries reachable with ``sg_next`` (an open append table also counts
        the unused slots up to its current chunk's end)."""
        return self._engine.table_sg_nents(self._require_open())

    @locked
    def nents_for_len(self, length: int) -> int:
        """``sg_nents_for_len``: how many entries cover ``length`` bytes (CPU lengths)."""
        handle = self._require_open()
        len_bytes = require_range("length", length, 0, _U64_MAX)
        return self._engine.table_nents_for_len(handle, len_bytes)

    @locked
    def pages(self, start: int = 0) -> "array[int]":
        """The pfns ``for_each_sgtable_page`` visits, beginning ``start`` pages in."""
        handle = self._require_open()
        start_pgoffset = require_range("start", start, 0, _U64_MAX)
        return self._engine.table_page_pfns(handle, start_pgoffset)

    # -- copying against memory ---------------------------------------------------------
    def _memory_handle(self, memory: PhysicalMemory) -> Any:
        if not isinstance(memory, PhysicalMemory):
            raise TypeError(f"memory must be a PhysicalMemory, not {type(memory).__name__}")
        if memory.engine != self._engine.name:
            raise InvalidArgument(f"memory belongs to the {memory.engine} engine, the table to "
                                  f"the {self._engine.name} engine")
        return memory._require_open()

    @locked
    def copy_to_buffer(self, memory: PhysicalMemory, n_bytes: Optional[int] = None,
                       skip: int = 0) -> bytes:
        """``sg_pcopy_to_buffer``: up to ``n_bytes`` (default: all) of the table's data,
        starting ``skip`` bytes in, read from ``memory``.  Short if the table ends first."""
        handle = self._require_open()
        mem = self._memory_handle(memory)
        skip = require_range("skip", skip, 0, _U64_MAX)
        wanted = None if n_bytes is None else require_range("n_bytes", n_bytes, 0, _U64_MAX)
        # Never more than the table holds after skip: size the buffer for what can come.
        rows = self._engine.table_export_cpu(handle, self._engine.table_counts(handle)[1])
        available = max(sum(rows[2::3]) - skip, 0)
        buf = bytearray(available if wanted is None else min(wanted, available))
        copied = self._engine.table_copy(handle, mem, memoryview(buf), skip, True)
        return bytes(buf[:copied])

    @locked
    def copy_from_buffer(self, memory: PhysicalMemory, data: Any, skip: int = 0) -> int:
        """``sg_pcopy_from_buffer``: write ``data`` into the table's pages in ``memory``,
        starting ``skip`` bytes in.  Returns the bytes written."""
        handle = self._require_open()
        mem = self._memory_handle(memory)
        skip = require_range("skip", skip, 0, _U64_MAX)
        return self._engine.table_copy(handle, mem, memoryview(data).cast("B"), skip, False)

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        """Free the entries (the kernel's ``sg_free_table``) and the table.  Idempotent;
        every entry and iterator taken from the table raises ``ClosedError`` afterwards."""
        with self._lock:
            if self._closed:
                return
            mapping = self._resources.mapping
            if mapping is not None and mapping.live:
                raise BusyError("RawTable.close: the table is DMA-mapped for device "
                                f"{mapping.device.name!r}; dma_unmap_sgtable it first")
            self._closed = True
            self._changed()
            self._finalizer()

    def __enter__(self) -> "RawTable":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            return "<RawTable closed>"
        nents, orig_nents, _, final = self._engine.table_counts(self._handle)
        return (f"<RawTable nents={nents} orig_nents={orig_nents} "
                f"{'final' if final else 'open for appends'}, engine={self.engine}>")


def _size_and_left(view: memoryview, offset: int, size: Optional[int], left_pages: int,
                   page_size: int) -> "tuple[int, int]":
    if size is None:
        size_bytes = max(len(view) * page_size - offset, 0)
    else:
        size_bytes = require_range("size", size, 0, _U64_MAX, Reason.SIZE)
    # The kernel's left_pages is an unsigned int.
    left = require_range("left_pages", left_pages, 0, 0xFFFFFFFF)
    return size_bytes, left


def alloc_table_from_pages(pfns: PfnsLike, offset: int = 0, size: Optional[int] = None,
                           max_segment: Optional[int] = None, page_size: int = PAGE_SIZE,
                           left_pages: int = 0, *, engine: Optional[str] = None) -> RawTable:
    """Build a table from page frame numbers: ``sg_alloc_table_from_pages_segment`` (or, with
    ``left_pages > 0``, the first ``sg_alloc_append_table_from_pages`` call).

    - ``pfns``: a list, ``array('Q')``, ``memoryview`` or numpy array of page frame numbers;
      64-bit buffers are read in place.
    - ``offset``: bytes into the first page where the data starts.
    - ``size``: data length in bytes, ending inside the last page (default: all of the pages
      after ``offset``).
    - ``max_segment``: longest entry in bytes, rounded down to whole pages (default: no limit,
      the kernel's ``UINT_MAX``).
    - ``left_pages``: pages later ``append_pages`` calls will add; 0 makes the table final.

    Physically consecutive pfns merge into one entry, split at ``max_segment``; only the first
    entry carries ``offset``; ``size`` clips the last entry."""
    eng = get_engine(engine)
    page_size = require_range("page_size", page_size, 0, 0xFFFFFFFF, Reason.PAGE_SIZE)
    max_segment_bytes = (MAX_SEGMENT_UNLIMITED if max_segment is None else
                         require_range("max_segment", max_segment, 0, MAX_SEGMENT_UNLIMITED,
                                       Reason.MAX_SEGMENT))
    offset = require_range("offset", offset, 0, 0xFFFFFFFF, Reason.OFFSET)
    view = as_pfn_view(pfns)
    size_bytes, left = _size_and_left(view, offset, size, left_pages, page_size)
    handle = eng.table_create(page_size, max_segment_bytes)
    try:
        eng.table_append(handle, view, offset, size_bytes, left)
    except BaseException:
        eng.table_destroy(handle)
        raise
    return RawTable(eng, handle, page_size)


def alloc_table_from_entries(entries: Any, page_size: int = PAGE_SIZE, *,
                             engine: Optional[str] = None) -> RawTable:
    """Build a table entry by entry, as drivers do with ``sg_alloc_table`` and one
    ``sg_set_page`` per entry: ``entries`` is a sequence of ``(pfn, offset, length)`` (bytes;
    ``offset`` may exceed a page, ``length`` is 1 to 2**32-1), or a flat buffer of such
    triples.  Nothing is merged.  The table is final."""
    eng = get_engine(engine)
    page_size = require_range("page_size", page_size, 0, 0xFFFFFFFF, Reason.PAGE_SIZE)
    if isinstance(entries, (str, bytes, bytearray)):
        raise TypeError(f"entries must be (pfn, offset, length) triples, not "
                        f"{type(entries).__name__}")
    try:
        rows = as_pfn_view(entries, "entries")
    except TypeError:
        flat = []
        for index, row in enumerate(entries):
            if len(row) != 3:
                raise InvalidArgument(f"entries[{index}] is not a (pfn, offset, length) "
                                      f"triple") from None
            flat.extend(row)
        rows = as_pfn_view(flat, "entries")
    if len(rows) % 3:
        raise InvalidArgument(f"entries holds {len(rows)} numbers, not whole "
                              f"(pfn, offset, length) triples")
    handle = eng.table_create(page_size, MAX_SEGMENT_UNLIMITED)
    try:
        eng.table_set_entries(handle, rows)
    except BaseException:
        eng.table_destroy(handle)
        raise
    return RawTable(eng, handle, page_size)
