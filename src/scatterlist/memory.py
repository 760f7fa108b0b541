"""Emulated physical memory and the pages allocated from it."""

from __future__ import annotations

import errno
import functools
import threading
import weakref
from array import array
from typing import Any, Callable, Iterator, List, Optional, Tuple

from . import debug as dma_debug
from ._engine import LAYOUTS, Engine, get_engine
from ._util import Lifetime, after_leaving, allocating, reinit_after_fork, require_range
from .constants import PAGE_SIZE, U32_MAX, U64_MAX
from .errors import BusyError, InvalidArgument, OutOfMemory, Reason, error_for


class PhysicalMemory:
    """Sparse emulated RAM of ``size`` bytes in pages of ``page_size`` bytes.

    Nothing is allocated for a page until it is written or handed out, so a 1 TiB memory is
    cheap.  Pages come from :meth:`alloc_pages` as owned :class:`Pages`; bytes are read and
    written by physical address with :meth:`read` and :meth:`write`.  ``close()`` is refused
    (``BusyError``) while any ``Pages``, ``Iommu`` or ``Device`` on this memory is still open;
    it waits for calls in flight on other threads.
    """

    def __init__(
        self, size: int, page_size: int = PAGE_SIZE, *, engine: Optional[str] = None
    ) -> None:
        eng: Engine = get_engine(engine)
        size_bytes = require_range("size", size, 0, U64_MAX, Reason.MEMORY_SIZE)
        page_size = require_range("page_size", page_size, 0, U32_MAX, Reason.PAGE_SIZE)
        handle = eng.memory_create(size_bytes, page_size)
        self._engine = eng
        self._page_size = page_size
        self._size_bytes = size_bytes
        self._life = Lifetime(
            "PhysicalMemory", handle, lambda handle, by_owner: eng.memory_destroy(handle)
        )
        self._finalizer = weakref.finalize(self, self._life.release)

    # -- state --------------------------------------------------------------------------
    @property
    def engine(self) -> str:
        """Name of the engine holding this memory (``native`` or ``model``)."""
        return self._engine.name

    @property
    def closed(self) -> bool:
        return self._life.closed

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def size(self) -> int:
        """Size in bytes."""
        return self._size_bytes

    @property
    def n_pages(self) -> int:
        return self._size_bytes // self._page_size

    @property
    def free_pages(self) -> int:
        """Pages the allocator can still hand out."""
        with self._life as handle:
            return int(self._engine.memory_info(handle)[1])

    @property
    def resident_pages(self) -> int:
        """Pages that hold written bytes (and so cost host memory)."""
        with self._life as handle:
            return int(self._engine.memory_info(handle)[2])

    # -- pages --------------------------------------------------------------------------
    def alloc_pages(self, n_pages: int, layout: str = "scattered", *, seed: int = 0) -> "Pages":
        """Allocate ``n_pages`` pages; all of them or none (``OutOfMemory``).

        ``layout``: ``"contiguous"`` (one run of consecutive pfns), ``"scattered"`` (no two
        neighbouring pfns, so no two pages merge in a table) or ``"random"`` (runs of 1 to 16
        consecutive pages, reproducible from ``seed``)."""
        n_pages = require_range("n_pages", n_pages, 1, (1 << 63) - 1, Reason.ZERO_PAGES)
        if layout not in LAYOUTS:
            raise InvalidArgument(f"layout={layout!r} is not one of {sorted(LAYOUTS)}")
        seed = require_range("seed", seed, 0, U64_MAX)
        with self._life as handle:
            try:
                # The list of pfns alone must fit in host memory: find out before the engine
                # starts choosing pages.
                bytearray(8 * n_pages)
                pfns = self._engine.memory_alloc_pages(handle, n_pages, LAYOUTS[layout], seed)
            except MemoryError as exc:
                if isinstance(exc, OutOfMemory):
                    raise
                raise error_for(errno.ENOMEM, Reason.NO_MEMORY) from None
            return Pages._allocated(self, pfns, n_pages * self._page_size)

    def vmalloc(self, size_bytes: int) -> "Pages":
        """The analogue of the kernel's ``VVec``/vmalloc: ``ceil(size_bytes / page_size)``
        scattered pages listed in ascending virtual order; ``Pages.size`` is ``size_bytes``."""
        size_bytes = require_range("size_bytes", size_bytes, 1, (1 << 63) - 1)
        pages = self.alloc_pages(-(-size_bytes // self._page_size), "scattered")
        pages._size_bytes = size_bytes
        return pages

    # -- bytes --------------------------------------------------------------------------
    def read(self, phys: int, n_bytes: int) -> bytes:
        """``n_bytes`` bytes at physical address ``phys``; unwritten bytes read as zero."""
        phys = require_range("phys", phys, 0, U64_MAX, Reason.PHYS_RANGE)
        n_bytes = require_range("n_bytes", n_bytes, 0, (1 << 63) - 1)
        with self._life as handle:
            return allocating(lambda: self._engine.memory_read(handle, phys, n_bytes))

    def write(self, phys: int, data: Any) -> None:
        """Write the bytes-like ``data`` at physical address ``phys``."""
        phys = require_range("phys", phys, 0, U64_MAX, Reason.PHYS_RANGE)
        view = memoryview(data).cast("B")
        with self._life as handle:
            self._engine.memory_write(handle, phys, view)

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        """Release the memory.  Idempotent; ``BusyError`` while pages, IOMMUs or devices on
        it are still open; waits for calls in flight on other threads."""
        self._life.close()

    def __enter__(self) -> "PhysicalMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.n_pages} pages of {self._page_size} B"
        return f"<PhysicalMemory {state}, engine={self.engine}>"


def _being_taken() -> None:
    """The owner of pages an SGTable.new is taking (a dead weakref's stand-in)."""
    return None


#: A dma-debug finding of ``free-mapped``, with the device it is reported against.
FreeFinding = Tuple[Any, Any]


def _pages_teardown(memory: PhysicalMemory) -> Callable[[Any, bool], None]:
    """Give the pages back to the memory, which they keep pinned until then.  A safety net
    (the Pages, or the SGTable owning them, dropped without close()) keeps pages that a
    mapping recorded by dma-debug still maps allocated, and reports them: freed, they would
    go to a new owner the device reaches.  An owner's close checked them in its prepare."""
    engine, memory_life = memory._engine, memory._life
    memory_key, page_size = id(memory), memory._page_size

    def teardown(pfns: "array[int]", by_owner: bool) -> None:
        findings = [] if by_owner else dma_debug.check_free(memory_key, pfns, page_size)
        if not findings:
            # If this fails the pages stay allocated, and keep the memory pinned: closing it
            # would free what these Pages still hold.
            engine.memory_free_pages(memory_life.handle, memoryview(pfns))
        memory_life.unpin("Pages")
        for target, finding in findings:
            # Not here: the caller may hold a table's mutex, and a warning filter runs code.
            after_leaving(functools.partial(dma_debug.deliver, target, [finding]))

    return teardown


class Pages:
    """Pages owned by the caller, allocated from a :class:`PhysicalMemory`.

    ``pfns`` lists the page frame numbers (a read-only ``memoryview`` of uint64), ``size`` is
    the size in bytes, ``n_pages`` the page count.  ``close()`` gives the pages back (their
    contents are dropped); it is idempotent and also runs when the object is collected.  While
    an ``SGTable`` owns the pages, closing them is the table's job."""

    _memory: PhysicalMemory
    _pfns: "array[int]"
    _size_bytes: int
    _owning_table: "Optional[Callable[[], Any]]"  # a weakref, or _being_taken
    _claimer: Optional[int]  # the thread of the SGTable.new taking them
    _claim_lock: "threading.RLock"
    _life: Lifetime
    _finalizer: "weakref.finalize[Any, Any]"

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError("Pages objects come from PhysicalMemory.alloc_pages or vmalloc")

    @classmethod
    def _allocated(cls, memory: PhysicalMemory, pfns: "array[int]", size_bytes: int) -> "Pages":
        """Pages just allocated by a call on ``memory`` (which they pin)."""
        self = object.__new__(cls)
        memory._life.pin("Pages")
        self._memory = memory
        self._pfns = pfns
        self._size_bytes = size_bytes
        # The SGTable that owns these pages (held weakly: it holds the pages).
        self._owning_table = None
        self._claimer = None
        self._claim_lock = threading.RLock()
        reinit_after_fork(self)
        self._life = Lifetime("Pages", pfns, _pages_teardown(memory))
        self._finalizer = weakref.finalize(self, self._life.release)
        return self

    @property
    def closed(self) -> bool:
        return self._life.closed

    @property
    def memory(self) -> PhysicalMemory:
        return self._memory

    @property
    def pfns(self) -> memoryview:
        """Page frame numbers, a read-only uint64 ``memoryview``."""
        with self._life as pfns:
            return memoryview(pfns).toreadonly()

    @property
    def size(self) -> int:
        """Size in bytes (for ``vmalloc`` pages, the requested size)."""
        return self._size_bytes

    @property
    def n_pages(self) -> int:
        return len(self._pfns)

    @property
    def page_size(self) -> int:
        return self._memory.page_size

    def __len__(self) -> int:
        return len(self._pfns)

    def __iter__(self) -> Iterator[int]:
        with self._life as pfns:
            return iter(pfns.tolist())

    # -- ownership by an SGTable (see sgtable.py) -------------------------------------------
    @property
    def owned(self) -> bool:
        """True while an ``SGTable`` owns these pages."""
        return self._owning_table is not None and not self._life.closed

    def _reinit_after_fork(self) -> None:
        self._claim_lock = threading.RLock()
        if self._owning_table is _being_taken and self._claimer != threading.get_ident():
            # An SGTable.new of another thread of the parent was taking them (the fork did
            # not wait for it to end): their table, mapped or not, is lost in this child.
            self._life.mark_forked()

    def _settle_after_fork(self) -> None:
        # Pages reach their memory's allocator without entering the memory (their close):
        # where the memory is unusable in the child, so are they.
        if self._memory._life.forked:
            self._life.mark_forked()

    def _claim(self) -> None:
        """SGTable.new starts taking the pages (the caller is in a call on them): a second
        taker, on another thread or from a callback, gets BusyError from here on."""
        with self._claim_lock:
            if self._owning_table is not None:
                raise BusyError("SGTable.new: the pages already belong to another SGTable")
            self._owning_table = _being_taken
            self._claimer = threading.get_ident()

    def _unclaim(self) -> None:
        """The SGTable.new that claimed the pages failed: they stay the caller's."""
        with self._claim_lock:
            self._owning_table = None
            self._claimer = None

    def _give_to(self, table: object) -> None:
        """The claiming SGTable exists: from now on its teardown frees the pages, after its
        unmap, whatever order the collector runs the safety nets in."""
        with self._claim_lock:
            self._owning_table = weakref.ref(table)
            self._claimer = None
            self._finalizer.detach()

    def _still_mapped(self, pfns: "array[int]", ignore: object = None) -> List[FreeFinding]:
        """dma-debug's ``free-mapped`` findings for freeing these pages now, leaving out the
        mapping recorded as ``ignore`` (an owning SGTable's own, which goes first)."""
        findings = dma_debug.check_free(id(self._memory), pfns, self._memory._page_size)
        return [(target, finding) for target, finding in findings if finding.entry is not ignore]

    @staticmethod
    def _refuse_in_raise_mode(findings: List[FreeFinding]) -> None:
        for target, finding in findings:
            if dma_debug.mode_of(target) == "raise":
                dma_debug.deliver(target, [finding])  # raises: the close is refused

    def _check_free_for_table(self, own_mapping: object) -> None:
        """The owning SGTable's close, before it changes anything: DmaApiError (raise mode)
        when a table mapped by hand still maps the pages."""
        with self._life as pfns:
            self._refuse_in_raise_mode(self._still_mapped(pfns, own_mapping))

    def _close_for_table(self) -> List[FreeFinding]:
        """The owning SGTable's close gives the pages back, once its own mapping is undone;
        returns the findings it delivers (warn mode) once closed."""
        reports: List[FreeFinding] = []
        self._life.close(lambda pfns: reports.extend(self._still_mapped(pfns)))
        return reports

    def _refuse_if_owned(self, pfns: object) -> None:
        if self._owning_table is not None:
            raise BusyError("Pages.close: an SGTable owns these pages; close the SGTable")

    def close(self) -> None:
        """Give the pages back to the memory.  Idempotent; ``BusyError`` while an ``SGTable``
        owns them (close the table instead).  With dma-debug on, freeing pages a table mapped
        by hand still maps is reported (rule ``free-mapped``; refused in ``raise`` mode)."""
        reports: List[FreeFinding] = []

        def prepare(pfns: "array[int]") -> None:
            self._refuse_if_owned(pfns)
            findings = self._still_mapped(pfns)
            self._refuse_in_raise_mode(findings)
            reports.extend(findings)

        self._life.close(prepare)
        for target, finding in reports:  # warn mode, once closed
            dma_debug.deliver(target, [finding])

    def __enter__(self) -> "Pages":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._pfns)} pages, {self._size_bytes} B"
        return f"<Pages {state}>"


__all__ = ["PAGE_SIZE", "PhysicalMemory", "Pages"]
