"""Scatter-gather tables: ``alloc_table_from_pages``, ``RawTable`` and ``SGEntry``.

A ``RawTable`` is the kernel's ``struct sg_append_table`` built by
``sg_alloc_table_from_pages_segment`` / ``sg_alloc_append_table_from_pages``: owned, not
mapped for DMA by itself.  Entries handed out (``SGEntry``) are views: they raise
``ClosedError`` once the table is closed or changed (appended to, mapped, unmapped, its
mapping revoked), instead of showing stale or freed data.

This module knows nothing of devices: a DMA mapping attaches itself to a table through the
small :class:`TableAttachment` protocol, and the table undoes it before freeing its entries.
"""

from __future__ import annotations

import threading
import weakref
from array import array
from typing import Any, Callable, Iterator, List, Optional, Protocol

from ._engine import Engine, TableCounts, get_engine
from ._util import (
    Lifetime,
    PfnsLike,
    after_leaving,
    allocating,
    as_pfn_view,
    reinit_after_fork,
    require_range,
)
from .constants import MAX_SEGMENT_UNLIMITED, PAGE_SIZE, U32_MAX, U64_MAX, DataDirection
from .errors import BusyError, ClosedError, InvalidArgument, Reason
from .memory import PhysicalMemory


class TableAttachment(Protocol):
    """A DMA mapping as its table sees it (implemented in ``device.py``)."""

    @property
    def live(self) -> bool: ...

    @property
    def device_name(self) -> str: ...

    def end(
        self, table_handle: Any, *, revoked: bool = False, leaked: Optional[str] = None
    ) -> Optional[Callable[[], None]]:
        """Unmap, exactly once (the caller holds the table's mutex).  ``leaked`` names the
        owner dropped without closing, if it was; the result, if any, reports that leak and
        is called once the teardown is done."""


class TableState:
    """What a table's calls and its teardown share, without a reference to the ``RawTable``
    object (so that a dropped table can be collected): its lifetime, the epoch that entries
    and iterators check, and the DMA mapping attached to it.  ``epoch`` and ``mapping`` change
    only under the table's mutex."""

    __slots__ = (
        "engine",
        "page_size",
        "epoch",
        "last_change",
        "mapping",
        "life",
        "owner",
        "_after",
        "_after_lock",
        "__weakref__",
    )

    def __init__(self, engine: Engine, page_size: int, handle: Any) -> None:
        self.engine = engine
        self.page_size = page_size
        self.epoch = 0
        self.last_change = ""
        self.owner = "RawTable"  # what owns the table, for leak reports ("SGTable")
        self.mapping: Optional[TableAttachment] = None
        self.life = Lifetime("RawTable", handle, self._teardown, exclusive=True)
        self._after: Optional[List[Callable[[], None]]] = []  # None once torn down
        self._after_lock = threading.RLock()
        reinit_after_fork(self)

    def _reinit_after_fork(self) -> None:
        self._after_lock = threading.RLock()

    def changed(self, why: str) -> None:
        """Entries and iterators read before now are stale (``why`` tells them how)."""
        self.epoch += 1
        self.last_change = why

    def after_teardown(self, release: Callable[[], None]) -> None:
        """Run ``release`` once the table is torn down (at once if it is): an owner's safety
        net frees what must go after the entries (the pages) this way, without waiting."""
        with self._after_lock:
            waiting = self._after
            if waiting is not None:
                waiting.append(release)
                return
        release()

    def _teardown(self, handle: Any, by_owner: bool) -> None:
        """The drop order: the DMA mapping first, then the entries, then what waits on them."""
        report = None
        mapping = self.mapping
        if mapping is not None and mapping.live:
            # If the unmap fails (its IOMMU is unusable in a forked child), nothing is freed:
            # a close is refused as it stands, a safety net leaves table and pages allocated.
            report = mapping.end(handle, leaked=None if by_owner else self.owner)
        self.changed("it was closed")
        try:
            self.engine.table_destroy(handle)
        finally:
            with self._after_lock:
                after, self._after = self._after or [], None
            for release in after:
                release()
        if report is not None:
            # A warning filter may run any code: not under this table's mutex, which the
            # caller holds (a device closing on another thread may be waiting for it).
            after_leaving(report)


#: Native table pointers (and model handles) to their live RawTable, for SGTable.from_raw.
_live_tables: "weakref.WeakValueDictionary[int, RawTable]" = weakref.WeakValueDictionary()


class SGEntry:
    """One entry of a table, as read at one moment.

    CPU side: ``pfn``, ``offset`` and ``length`` (bytes).  DMA side: ``dma_address`` and
    ``dma_len`` (bytes).  After DMA mapping, DMA entry *i* does not describe CPU entry *i*.
    Reading any field after the table was closed or changed raises ``ClosedError``."""

    __slots__ = (
        "_table",
        "_epoch",
        "_index",
        "_pfn",
        "_offset",
        "_length",
        "_dma_address",
        "_dma_len",
    )

    def __init__(
        self,
        table: "RawTable",
        epoch: int,
        index: int,
        pfn: int,
        offset: int,
        length: int,
        dma_address: int,
        dma_len: int,
    ) -> None:
        if not isinstance(table, RawTable):
            raise TypeError("SGEntry objects come from a table")
        self._table = table
        self._epoch = epoch
        self._index = index
        self._pfn = pfn
        self._offset = offset
        self._length = length
        self._dma_address = dma_address
        self._dma_len = dma_len

    def _check(self) -> None:
        self._table._check_epoch(self._epoch, "SGEntry")

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
        return self._pfn * self._table._page_size + self._offset

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
        return (
            f"SGEntry(index={self._index}, pfn={self._pfn}, offset={self._offset}, "
            f"length={self._length}, dma_address={self._dma_address:#x}, "
            f"dma_len={self._dma_len})"
        )


class RawTable:
    """An owned scatter-gather table (Rust's ``RawSGTable``), mapped for DMA only by hand.

    Build it with :func:`alloc_table_from_pages` or :func:`alloc_table_from_entries`.
    Iterating yields the ``orig_nents`` CPU entries; ``close()`` frees the entries (the
    kernel's ``sg_free_table``) and the table.  Calls on one table run one at a time; a
    ``close()`` on another thread waits for the call in flight.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError(
            "RawTable objects come from alloc_table_from_pages or alloc_table_from_entries"
        )

    @classmethod
    def _wrap(cls, engine: Engine, handle: Any, page_size: int) -> "RawTable":
        self = object.__new__(cls)
        self._engine = engine
        self._page_size = page_size
        self._state = TableState(engine, page_size, handle)
        self._life = self._state.life
        # Safety net for tables never closed: unmaps, then frees (close() does it itself).
        self._finalizer = weakref.finalize(self, self._life.release)
        _live_tables[engine.table_address(handle)] = self
        return self

    _engine: Engine
    _page_size: int
    _state: TableState
    _life: Lifetime
    _finalizer: "weakref.finalize[Any, Any]"

    # -- guards -------------------------------------------------------------------------
    def _check_epoch(self, epoch: int, what: str) -> None:
        if self._life.closed:
            raise ClosedError(f"{what} used after its table was closed")
        if epoch != self._state.epoch:
            raise ClosedError(
                f"{what} is stale: its table changed since it was read ({self._state.last_change})"
            )

    # -- counters -----------------------------------------------------------------------
    @property
    def engine(self) -> str:
        return self._engine.name

    @property
    def closed(self) -> bool:
        return self._life.closed

    @property
    def page_size(self) -> int:
        return self._page_size

    def counts(self) -> TableCounts:
        """``(nents, orig_nents, total_nents, final)`` read together."""
        return self._counts()

    def _counts(self, check: Optional[Callable[[TableState], None]] = None) -> TableCounts:
        """The counters; ``check`` runs first, under the table's mutex."""
        with self._life as handle:
            if check is not None:
                check(self._state)
            return self._engine.table_counts(handle)

    @property
    def nents(self) -> int:
        """DMA entries once mapped with ``dma_map_sgtable``; ``orig_nents`` otherwise."""
        return self.counts().nents

    @property
    def orig_nents(self) -> int:
        """CPU entries holding pages (chain links not counted)."""
        return self.counts().orig_nents

    @property
    def total_nents(self) -> int:
        """Usable entry slots allocated, including slots reserved for pages still to come."""
        return self.counts().total_nents

    @property
    def final(self) -> bool:
        """True once a call with ``left_pages=0`` closed the table to appends."""
        return self.counts().final

    def __len__(self) -> int:
        return self.orig_nents

    # -- building -----------------------------------------------------------------------
    def append_pages(self, pfns: PfnsLike, size: Optional[int] = None, left_pages: int = 0) -> None:
        """``sg_alloc_append_table_from_pages``: add pages, merging into the last entry where
        the pfns continue it.  ``size`` (bytes, default all of the pages) must end inside the
        last page; ``left_pages`` says how many pages later calls will add (0: final)."""
        view = as_pfn_view(pfns)
        size_bytes, left = _size_and_left(view, 0, size, left_pages, self._page_size)
        with self._life as handle:
            self._engine.table_append(handle, view, 0, size_bytes, left)
            self._state.changed("pages were appended")

    # -- DMA mapping (done by scatterlist.dma) ------------------------------------------
    @property
    def mapped(self) -> bool:
        """True while the table is DMA-mapped."""
        with self._life:
            mapping = self._state.mapping
            return mapping is not None and mapping.live

    @property
    def direction(self) -> Optional[DataDirection]:
        """The direction of the live mapping, or None."""
        with self._life as handle:
            info = self._engine.table_mapping(handle)
            return None if info is None else DataDirection(info.direction)

    # -- reading ------------------------------------------------------------------------
    def export_cpu(self) -> "array[int]":
        """All CPU entries in one call: ``array('Q')`` of (pfn, offset, length) rows."""
        with self._life as handle:
            return self._engine.table_export_cpu(
                handle, self._engine.table_counts(handle).orig_nents
            )

    def export_dma(self, n_entries: Optional[int] = None) -> "array[int]":
        """(dma_address, dma_len) rows of the first ``n_entries`` entries (default
        ``nents``)."""
        wanted = None if n_entries is None else require_range("n_entries", n_entries, 0, U32_MAX)
        with self._life as handle:
            counts = self._engine.table_counts(handle)
            if wanted is not None and wanted > counts.orig_nents:
                raise InvalidArgument(
                    f"n_entries={wanted} is out of range [0, {counts.orig_nents}]"
                )
            return self._engine.table_export_dma(handle, counts.nents if wanted is None else wanted)

    def _read_entries(
        self, dma_view: bool, check: Optional[Callable[[TableState], None]] = None
    ) -> List[SGEntry]:
        """The CPU entries (``orig_nents``) or the DMA view (``nents``), read in one call;
        ``check`` runs first, under the table's mutex."""
        with self._life as handle:
            if check is not None:
                check(self._state)
            counts = self._engine.table_counts(handle)
            count = counts.nents if dma_view else counts.orig_nents
            cpu = self._engine.table_export_cpu(handle, count)
            dma = self._engine.table_export_dma(handle, count)
            epoch = self._state.epoch
        return [
            SGEntry(
                self,
                epoch,
                i,
                cpu[3 * i],
                cpu[3 * i + 1],
                cpu[3 * i + 2],
                dma[2 * i],
                dma[2 * i + 1],
            )
            for i in range(count)
        ]

    def entries(self) -> List[SGEntry]:
        """The ``orig_nents`` CPU entries (``for_each_sgtable_sg``)."""
        return self._read_entries(False)

    def dma_entries(self) -> List[SGEntry]:
        """The first ``nents`` entries, whose DMA fields are the mapped segments
        (``for_each_sgtable_dma_sg``)."""
        return self._read_entries(True)

    def __iter__(self) -> Iterator[SGEntry]:
        entries = self.entries()
        for entry in entries:
            entry._check()  # stale once the table changed or closed
            yield entry

    def chunk_slots(self) -> List[int]:
        """Slots in each entry chunk in chain order; a full chunk has ``page_size // 32``
        slots and gives its last one to the chain link."""
        with self._life as handle:
            return self._engine.table_chunk_slots(handle)

    def sg_nents(self) -> int:
        """``sg_nents``: entries reachable with ``sg_next`` (an open append table also counts
        the unused slots up to its current chunk's end)."""
        with self._life as handle:
            return self._engine.table_sg_nents(handle)

    def nents_for_len(self, len_bytes: int) -> int:
        """``sg_nents_for_len``: how many entries cover ``len_bytes`` bytes (CPU lengths)."""
        len_bytes = require_range("len_bytes", len_bytes, 0, U64_MAX)
        with self._life as handle:
            return self._engine.table_nents_for_len(handle, len_bytes)

    def page_pfns(self, start: int = 0) -> "array[int]":
        """The pfns ``for_each_sgtable_page`` visits, beginning ``start`` pages in."""
        start_pgoffset = require_range("start", start, 0, U64_MAX)
        with self._life as handle:
            return self._engine.table_page_pfns(handle, start_pgoffset)

    # -- copying against memory ---------------------------------------------------------
    def _check_memory(self, memory: PhysicalMemory) -> None:
        if not isinstance(memory, PhysicalMemory):
            raise TypeError(f"memory must be a PhysicalMemory, not {type(memory).__name__}")
        if memory.engine != self._engine.name:
            raise InvalidArgument(
                f"memory belongs to the {memory.engine} engine, the table to "
                f"the {self._engine.name} engine"
            )

    def copy_to_buffer(
        self, memory: PhysicalMemory, n_bytes: Optional[int] = None, skip: int = 0
    ) -> bytes:
        """``sg_pcopy_to_buffer``: up to ``n_bytes`` (default: all) of the table's data,
        starting ``skip`` bytes in, read from ``memory``.  Short if the table ends first."""
        self._check_memory(memory)
        skip = require_range("skip", skip, 0, U64_MAX)
        wanted = None if n_bytes is None else require_range("n_bytes", n_bytes, 0, U64_MAX)
        with memory._life as mem, self._life as handle:  # memory, then table
            # Never more than the table holds after skip: size the buffer for what can come.
            orig_nents = self._engine.table_counts(handle).orig_nents
            rows = self._engine.table_export_cpu(handle, orig_nents)
            available = max(sum(rows[2::3]) - skip, 0)
            size = available if wanted is None else min(wanted, available)
            buf = allocating(lambda: bytearray(size))
            copied = self._engine.table_copy(handle, mem, memoryview(buf), skip, True)
        return bytes(buf[:copied])

    def copy_from_buffer(self, memory: PhysicalMemory, data: Any, skip: int = 0) -> int:
        """``sg_pcopy_from_buffer``: write ``data`` into the table's pages in ``memory``,
        starting ``skip`` bytes in.  Returns the bytes written."""
        self._check_memory(memory)
        skip = require_range("skip", skip, 0, U64_MAX)
        view = memoryview(data).cast("B")
        with memory._life as mem, self._life as handle:  # memory, then table
            return self._engine.table_copy(handle, mem, view, skip, False)

    # -- lifetime -----------------------------------------------------------------------
    def _refuse_if_mapped(self, handle: Any) -> None:
        mapping = self._state.mapping
        if mapping is not None and mapping.live:
            raise BusyError(
                "RawTable.close: the table is DMA-mapped for device "
                f"{mapping.device_name!r}; dma_unmap_sgtable it first"
            )

    def close(self) -> None:
        """Free the entries (the kernel's ``sg_free_table``) and the table.  Idempotent;
        ``BusyError`` while the table is DMA-mapped; waits for a call in flight on another
        thread.  Every entry and iterator taken from the table raises ``ClosedError``
        afterwards."""
        self._life.close(self._refuse_if_mapped)

    def __enter__(self) -> "RawTable":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        try:
            nents, orig_nents, _, final = self.counts()
        except ClosedError:
            return "<RawTable closed>"
        return (
            f"<RawTable nents={nents} orig_nents={orig_nents} "
            f"{'final' if final else 'open for appends'}, engine={self.engine}>"
        )


def _size_and_left(
    view: memoryview, offset: int, size: Optional[int], left_pages: int, page_size: int
) -> "tuple[int, int]":
    if size is None:
        size_bytes = max(len(view) * page_size - offset, 0)
    else:
        size_bytes = require_range("size", size, 0, U64_MAX, Reason.SIZE)
    # The kernel's left_pages is an unsigned int.
    left = require_range("left_pages", left_pages, 0, U32_MAX)
    return size_bytes, left


def build_table(
    engine: Engine,
    pfns: memoryview,
    offset: int,
    size_bytes: int,
    max_segment_bytes: int,
    page_size: int,
    left_pages: int,
) -> RawTable:
    """A table from converted arguments (``pfns`` a view no other thread can change)."""
    handle = engine.table_create(page_size, max_segment_bytes)
    try:
        engine.table_append(handle, pfns, offset, size_bytes, left_pages)
    except BaseException:
        engine.table_destroy(handle)
        raise
    return RawTable._wrap(engine, handle, page_size)


def alloc_table_from_pages(
    pfns: PfnsLike,
    offset: int = 0,
    size: Optional[int] = None,
    max_segment: Optional[int] = None,
    page_size: int = PAGE_SIZE,
    left_pages: int = 0,
    *,
    engine: Optional[str] = None,
) -> RawTable:
    """Build a table from page frame numbers: ``sg_alloc_table_from_pages_segment`` (or, with
    ``left_pages > 0``, the first ``sg_alloc_append_table_from_pages`` call).

    - ``pfns``: a list, ``array('Q')``, ``memoryview`` or numpy array of page frame numbers.
      A buffer is copied once (the C core reads the array twice with the GIL released, and
      another thread could change a caller's buffer in between).
    - ``offset``: bytes into the first page where the data starts.
    - ``size``: data length in bytes, ending inside the last page (default: all of the pages
      after ``offset``).
    - ``max_segment``: longest entry in bytes, rounded down to whole pages (default: no limit,
      the kernel's ``UINT_MAX``).
    - ``left_pages``: pages later ``append_pages`` calls will add; 0 makes the table final.

    Physically consecutive pfns merge into one entry, split at ``max_segment``; only the first
    entry carries ``offset``; ``size`` clips the last entry."""
    eng = get_engine(engine)
    page_size = require_range("page_size", page_size, 0, U32_MAX, Reason.PAGE_SIZE)
    max_segment_bytes = (
        MAX_SEGMENT_UNLIMITED
        if max_segment is None
        else require_range("max_segment", max_segment, 0, MAX_SEGMENT_UNLIMITED, Reason.MAX_SEGMENT)
    )
    offset = require_range("offset", offset, 0, U32_MAX, Reason.OFFSET)
    view = as_pfn_view(pfns)
    size_bytes, left = _size_and_left(view, offset, size, left_pages, page_size)
    return build_table(eng, view, offset, size_bytes, max_segment_bytes, page_size, left)


def alloc_table_from_entries(
    entries: Any, page_size: int = PAGE_SIZE, *, engine: Optional[str] = None
) -> RawTable:
    """Build a table entry by entry, as drivers do with ``sg_alloc_table`` and one
    ``sg_set_page`` per entry: ``entries`` is a sequence of ``(pfn, offset, length)`` (bytes;
    ``offset`` may exceed a page, ``length`` is 1 to 2**32-1), or a flat buffer of such
    triples.  Nothing is merged.  The table is final."""
    eng = get_engine(engine)
    page_size = require_range("page_size", page_size, 0, U32_MAX, Reason.PAGE_SIZE)
    if isinstance(entries, (str, bytes, bytearray)):
        raise TypeError(
            f"entries must be (pfn, offset, length) triples, not {type(entries).__name__}"
        )
    try:
        rows = as_pfn_view(entries, "entries")
    except TypeError:
        flat = []
        for index, row in enumerate(entries):
            if len(row) != 3:
                raise InvalidArgument(
                    f"entries[{index}] is not a (pfn, offset, length) triple"
                ) from None
            flat.extend(row)
        rows = as_pfn_view(flat, "entries")
    if len(rows) % 3:
        raise InvalidArgument(
            f"entries holds {len(rows)} numbers, not whole (pfn, offset, length) triples"
        )
    handle = eng.table_create(page_size, MAX_SEGMENT_UNLIMITED)
    try:
        eng.table_set_entries(handle, rows)
    except BaseException:
        eng.table_destroy(handle)
        raise
    return RawTable._wrap(eng, handle, page_size)


__all__ = [
    "RawTable",
    "SGEntry",
    "TableAttachment",
    "TableState",
    "alloc_table_from_pages",
    "alloc_table_from_entries",
    "build_table",
]
