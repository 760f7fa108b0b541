"""Emulated physical memory and the pages allocated from it."""

from __future__ import annotations

import errno
import threading
import weakref
from array import array
from typing import Any, Iterator, Optional

from ._engine import LAYOUTS, Engine, get_engine
from ._util import locked, require_range
from .errors import BusyError, ClosedError, InvalidArgument, OutOfMemory, Reason, error_for

PAGE_SIZE = 4096


class PhysicalMemory:
    """Sparse emulated RAM of ``size`` bytes in pages of ``page_size`` bytes.

    Nothing is allocated for a page until it is written or handed out, so a 1 TiB memory is
    cheap.  Pages come from :meth:`alloc_pages` as owned :class:`Pages`; bytes are read and
    written by physical address with :meth:`read` and :meth:`write`.  ``close()`` is refused
    (``BusyError``) while any ``Pages`` from this memory are still open.
    """

    def __init__(self, size: int, page_size: int = PAGE_SIZE, *,
                 engine: Optional[str] = None) -> None:
        self._lock = threading.RLock()
        self._engine: Engine = get_engine(engine)
        size_bytes = require_range("size", size, 0, (1 << 64) - 1, Reason.MEMORY_SIZE)
        page_size = require_range("page_size", page_size, 0, (1 << 32) - 1, Reason.PAGE_SIZE)
        self._handle: Any = self._engine.memory_create(size_bytes, page_size)
        self._page_size = page_size
        self._size_bytes = size_bytes
        self._closed = False
        self._open_pages: "weakref.WeakSet[Pages]" = weakref.WeakSet()
        # Iommus and Devices built on this memory: it cannot close under them.
        self._dependents: "weakref.WeakSet[Any]" = weakref.WeakSet()

    # -- state --------------------------------------------------------------------------
    @property
    def engine(self) -> str:
        """Name of the engine holding this memory (``native`` or ``model``)."""
        return self._engine.name

    @property
    def closed(self) -> bool:
        return self._closed

    def _require_open(self) -> Any:
        if self._closed:
            raise ClosedError("PhysicalMemory is closed")
        return self._handle

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
    @locked
    def free_pages(self) -> int:
        """Pages the allocator can still hand out."""
        return int(self._engine.memory_info(self._require_open())[1])

    @property
    @locked
    def resident_pages(self) -> int:
        """Pages that hold written bytes (and so cost host memory)."""
        return int(self._engine.memory_info(self._require_open())[2])

    # -- pages --------------------------------------------------------------------------
    @locked
    def alloc_pages(self, n: int, layout: str = "scattered", *, seed: int = 0) -> "Pages":
        """Allocate ``n`` pages; all of them or none (``OutOfMemory``).

        ``layout``: ``"contiguous"`` (one run of consecutive pfns), ``"scattered"`` (no two
        neighbouring pfns, so no two pages merge in a table) or ``"random"`` (runs of 1 to 16
        consecutive pages, reproducible from ``seed``)."""
        handle = self._require_open()
        n_pages = require_range("n", n, 1, (1 << 63) - 1, Reason.ZERO_PAGES)
        if layout not in LAYOUTS:
            raise InvalidArgument(f"layout={layout!r} is not one of {sorted(LAYOUTS)}")
        seed = require_range("seed", seed, 0, (1 << 64) - 1)
        try:
            # The list of pfns alone must fit in host memory: find out before the engine
            # starts choosing pages.
            bytearray(8 * n_pages)
            pfns = self._engine.memory_alloc_pages(handle, n_pages, LAYOUTS[layout], seed)
        except MemoryError as exc:
            if isinstance(exc, OutOfMemory):
                raise
            raise error_for(errno.ENOMEM, Reason.NO_MEMORY) from None
        return Pages(self, pfns, n_pages * self._page_size)

    def vmalloc(self, size_bytes: int) -> "Pages":
        """The analogue of the kernel's ``VVec``/vmalloc: ``ceil(size_bytes / page_size)``
        scattered pages listed in ascending virtual order; ``Pages.size`` is ``size_bytes``."""
        size_bytes = require_range("size_bytes", size_bytes, 1, (1 << 63) - 1)
        n_pages = -(-size_bytes // self._page_size)
        pages = self.alloc_pages(n_pages, "scattered")
        pages._size_bytes = size_bytes
        return pages

    # -- bytes --------------------------------------------------------------------------
    @locked
    def read(self, phys: int, n: int) -> bytes:
        """``n`` bytes at physical address ``phys``; unwritten bytes read as zero."""
        handle = self._require_open()
        phys = require_range("phys", phys, 0, (1 << 64) - 1, Reason.PHYS_RANGE)
        n_bytes = require_range("n", n, 0, (1 << 63) - 1)
        return self._engine.memory_read(handle, phys, n_bytes)

    @locked
    def write(self, phys: int, data: Any) -> None:
        """Write the bytes-like ``data`` at physical address ``phys``."""
        handle = self._require_open()
        phys = require_range("phys", phys, 0, (1 << 64) - 1, Reason.PHYS_RANGE)
        view = memoryview(data).cast("B")
        self._engine.memory_write(handle, phys, view)

    # -- lifetime -----------------------------------------------------------------------
    @locked
    def close(self) -> None:
        """Release the memory.  Idempotent; ``BusyError`` while pages are still open."""
        if self._closed:
            return
        live = [p for p in self._open_pages if not p.closed]
        if live:
            raise BusyError(f"PhysicalMemory.close: {len(live)} Pages object(s) from this "
                            f"memory are still open; close them first")
        users = [user for user in self._dependents if not user.closed]
        if users:
            raise BusyError(f"PhysicalMemory.close: {len(users)} Iommu/Device object(s) on "
                            f"this memory are still open; close them first")
        self._closed = True
        self._engine.memory_destroy(self._handle)

    def __enter__(self) -> "PhysicalMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.n_pages} pages of {self._page_size} B"
        return f"<PhysicalMemory {state}, engine={self.engine}>"


class Pages:
    """Pages owned by the caller, allocated from a :class:`PhysicalMemory`.

    ``pfns`` lists the page frame numbers (a read-only ``memoryview`` of uint64), ``size`` is
    the size in bytes, ``n_pages`` the page count.  ``close()`` gives the pages back (their
    contents are dropped); it is idempotent and also runs when the object is collected."""

    def __init__(self, memory: PhysicalMemory, pfns: "array[int]", size_bytes: int) -> None:
        if not isinstance(memory, PhysicalMemory) or not isinstance(pfns, array):
            raise TypeError("Pages objects come from PhysicalMemory.alloc_pages or vmalloc")
        self._memory = memory
        self._pfns = pfns
        self._size_bytes = size_bytes
        self._closed = False
        self._owner: Optional[Any] = None  # the SGTable that owns these pages, if any
        memory._open_pages.add(self)
        # Safety net: the finalizer holds the memory handle, so the memory outlives it.
        self._finalizer = weakref.finalize(self, memory._engine.memory_free_pages,
                                           memory._handle, memoryview(pfns))

    def _require_open(self) -> None:
        if self._closed:
            raise ClosedError("Pages are closed")

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def memory(self) -> PhysicalMemory:
        return self._memory

    @property
    def pfns(self) -> memoryview:
        """Page frame numbers, a read-only uint64 ``memoryview``."""
        self._require_open()
        return memoryview(self._pfns).toreadonly()

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
        self._require_open()
        return iter(self._pfns.tolist())

    def close(self) -> None:
        """Give the pages back to the memory.  Idempotent; ``BusyError`` while an ``SGTable``
        owns them (close the table instead)."""
        if self._closed:
            return
        if self._owner is not None:
            raise BusyError("Pages.close: an SGTable owns these pages; close the SGTable")
        with self._memory._lock:  # the memory cannot close under the free
            self._closed = True
            self._finalizer()

    def __enter__(self) -> "Pages":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._pfns)} pages, {self._size_bytes} B"
        return f"<Pages {state}>"


__all__ = ["PAGE_SIZE", "PhysicalMemory", "Pages"]
