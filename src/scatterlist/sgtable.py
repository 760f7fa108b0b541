"""``SGTable``: the Rust-for-Linux type-state scatter-gather table, as Pythonic RAII.

``SGTable[Owned[P]]`` owns its pages ``P``, its entries and its DMA mapping; closing it (or
leaving its ``with`` block) unmaps, then frees the entries, then releases the pages, the drop
order of the Rust abstraction.  The mapping is registered against the device (Devres): a device
unbind unmaps it once, and closing the table later frees the entries and pages without a
second unmap.  ``SGTable[Borrowed]`` is a view that iterates the DMA segments and never
dangles: used after its owner closed or its mapping was revoked, it raises ``ClosedError``.
"""

from __future__ import annotations

import errno
import weakref

from typing import Any, Callable, Generic, Iterator, List, Optional, TypeVar, Union

from .device import Device, _Devres, _direction, dma_map_sgtable
from .errors import BusyError, ClosedError, InvalidArgument, Reason, error_for
from .memory import Pages
from .table import (MAX_SEGMENT_UNLIMITED, DataDirection, RawTable, SGEntry, _live_tables,
                    alloc_table_from_pages)

P = TypeVar("P", bound=Pages)
S = TypeVar("S", covariant=True)


class Owned(Generic[P]):
    """Type-state: the table owns its pages ``P``, its entries and its DMA mapping."""


class Borrowed:
    """Type-state: a view of a table someone else owns."""


def _revoker(raw: RawTable) -> Callable[[], bool]:
    """The Devres release of an owned table: unmap at unbind (once; see _Mapping.unmap).
    It holds the mapping weakly: a table dropped without close() unmaps through its own
    safety net, and its Devres entry then has nothing left to release."""
    mapping = raw._resources.mapping
    assert mapping is not None
    mapping_ref = weakref.ref(mapping)

    def revoke() -> bool:
        live = mapping_ref()
        return live is not None and live.unmap(by_unbind=True)

    return revoke


class SGTable(Generic[S]):
    """A DMA-mapped scatter-gather table; iterating yields its ``nents`` DMA segments
    (``SGEntry.dma_address``, ``SGEntry.dma_len``).  Build one with :meth:`new`; view one
    with :meth:`borrow` or :meth:`from_raw`."""

    def __init__(self, raw: RawTable, *, owner: Optional["SGTable[Any]"] = None,
                 pages: Optional[Pages] = None, device: Optional[Device] = None,
                 direction: Optional[DataDirection] = None,
                 devres: Optional[_Devres] = None) -> None:
        if not isinstance(raw, RawTable):
            raise TypeError("SGTable objects come from SGTable.new, borrow() or from_raw()")
        self._raw = raw
        self._owner = owner  # None for an owner itself
        self._pages = pages
        self._device = device
        self._direction = direction
        self._devres = devres
        self._closed = False

    # -- construction -------------------------------------------------------------------
    @staticmethod
    def new(dev: Device, pages: P, direction: DataDirection) -> "SGTable[Owned[P]]":
        """Build a table from ``pages``, map it for ``dev`` in ``direction`` and take
        ownership of the pages.

        The longest CPU entry is the smaller of the device's ``max_mapping_size`` and
        ``max_segment_size``.  The Rust abstraction uses ``max_mapping_size`` alone (usually
        unlimited), so physically contiguous pages can form entries longer than the device
        accepts, which dma-debug then reports; bounding entries by ``max_segment_size`` too
        builds only segments the device can take.

        On failure nothing is mapped or kept, and the pages stay the caller's."""
        if not isinstance(dev, Device):
            raise TypeError(f"dev must be a Device, not {type(dev).__name__}")
        if not isinstance(pages, Pages):
            raise TypeError(f"pages must be Pages, not {type(pages).__name__}")
        dev._require_open()
        if pages.closed:
            raise ClosedError("SGTable.new: the pages are closed")
        if pages._owner is not None:
            raise BusyError("SGTable.new: the pages already belong to another SGTable")
        if pages.memory is not dev.memory:
            raise error_for(errno.EINVAL, Reason.FOREIGN)
        dir_value = _direction(direction)
        if pages.n_pages == 0:
            raise error_for(errno.EINVAL, Reason.ZERO_PAGES)
        limit = min(dev.max_mapping_size or MAX_SEGMENT_UNLIMITED, dev.max_segment_size,
                    MAX_SEGMENT_UNLIMITED)
        raw = alloc_table_from_pages(pages.pfns, size=pages.size, max_segment=limit,
                                     page_size=pages.page_size, engine=dev.engine)
        try:
            dma_map_sgtable(dev, raw, DataDirection(dir_value))
            devres = dev._register(_revoker(raw), anchor=raw._resources.mapping)
        except BaseException:
            mapping = raw._resources.mapping
            if mapping is not None:
                mapping.unmap()
            raw.close()
            raise
        table: SGTable[Owned[P]] = SGTable(raw, pages=pages, device=dev,
                                           direction=DataDirection(dir_value), devres=devres)
        pages._owner = table
        return table

    @staticmethod
    def from_raw(raw: Union[RawTable, Any]) -> "SGTable[Borrowed]":
        """A borrowed view of a table mapped by hand: a ``RawTable``, or a native
        ``struct sl_table *`` of a live table (as handed to C device models).  Unknown or
        freed pointers are refused rather than trusted."""
        if isinstance(raw, RawTable):
            raw._require_open()
            return SGTable(raw, owner=raw)  # type: ignore[arg-type]
        from ._engine import get_engine
        try:
            address = get_engine("native").table_address(raw)
        except Exception:
            raise TypeError(f"from_raw needs a RawTable or a native table pointer, not "
                            f"{type(raw).__name__}") from None
        found = _live_tables.get(address)
        if found is None or found.closed:
            raise InvalidArgument(f"from_raw: {raw!r} is not a live scatterlist table")
        return SGTable(found, owner=found)  # type: ignore[arg-type]

    # -- guards -------------------------------------------------------------------------
    def _raw_table(self) -> RawTable:
        """The underlying RawTable, after checking the view is still usable."""
        owner = self._owner
        if isinstance(owner, RawTable):  # a from_raw view: lives as long as the RawTable
            owner._require_open()
            return self._raw
        if owner is not None:  # a borrowed view: usable while what it borrows from is
            return owner._raw_table()
        if self._closed:
            raise ClosedError("SGTable used after its owner closed it")
        mapping = self._raw._resources.mapping
        if mapping is None or not mapping.live:
            raise ClosedError("SGTable's DMA mapping was revoked by device unbind")
        return self._raw

    # -- the borrowed interface (also available on owners) ---------------------------------
    def __iter__(self) -> Iterator[SGEntry]:
        entries = self._raw_table().dma_entries()
        for entry in entries:
            self._raw_table()
            yield entry

    def entries(self) -> List[SGEntry]:
        """The ``nents`` DMA segments."""
        return self._raw_table().dma_entries()

    @property
    def nents(self) -> int:
        return self._raw_table().nents

    @property
    def orig_nents(self) -> int:
        return self._raw_table().orig_nents

    def borrow(self) -> "SGTable[Borrowed]":
        """A view that raises ``ClosedError`` once this table is closed or revoked."""
        self._raw_table()
        return SGTable(self._raw, owner=self)

    @property
    def closed(self) -> bool:
        """True once this table (or, for a view, what it borrows from) was closed."""
        owner = self._owner
        if owner is None:
            return self._closed
        return owner.closed

    # -- the owned interface ------------------------------------------------------------
    def _owner_only(self) -> None:
        """Owned-only members on a borrowed view: a clear error, not an assertion."""
        if self._owner is not None or self._device is None:
            raise InvalidArgument("this is for the owning SGTable; a borrowed view only "
                                  "iterates the DMA segments")
    @property
    def device(self: "SGTable[Owned[Any]]") -> Device:
        self._owner_only()
        assert self._device is not None
        return self._device

    @property
    def direction(self: "SGTable[Owned[Any]]") -> DataDirection:
        self._owner_only()
        assert self._direction is not None
        return self._direction

    @property
    def pages(self: "SGTable[Owned[P]]") -> P:
        """The owned pages (use them; closing them is the table's job)."""
        if self._closed:
            raise ClosedError("SGTable is closed")
        self._owner_only()
        assert self._pages is not None
        return self._pages  # type: ignore[return-value]

    @property
    def revoked(self: "SGTable[Owned[Any]]") -> bool:
        """True once a device unbind unmapped the table."""
        return self._devres is not None and self._devres.revoked and \
            self._raw._resources.mapping is not None and \
            self._raw._resources.mapping.revoked

    def copy_from_buffer(self: "SGTable[Owned[Any]]", data: Any, skip: int = 0) -> int:
        """The CPU writes ``data`` into the table's pages (``sg_pcopy_from_buffer``), starting
        ``skip`` bytes in; returns the bytes written."""
        self._owner_only()
        assert self._device is not None
        return self._raw_table().copy_from_buffer(self._device.memory, data, skip)

    def copy_to_buffer(self: "SGTable[Owned[Any]]", n_bytes: Optional[int] = None,
                       skip: int = 0) -> bytes:
        """The CPU reads the table's data (``sg_pcopy_to_buffer``)."""
        self._owner_only()
        assert self._device is not None
        return self._raw_table().copy_to_buffer(self._device.memory, n_bytes, skip)

    def sync_for_cpu(self: "SGTable[Owned[Any]]") -> None:
        """``dma_sync_sgtable_for_cpu`` with the table's device and direction."""
        from .device import dma_sync_sgtable_for_cpu
        self._owner_only()
        assert self._device is not None and self._direction is not None
        dma_sync_sgtable_for_cpu(self._device, self._raw_table(), self._direction)

    def sync_for_device(self: "SGTable[Owned[Any]]") -> None:
        """``dma_sync_sgtable_for_device`` with the table's device and direction."""
        from .device import dma_sync_sgtable_for_device
        self._owner_only()
        assert self._device is not None and self._direction is not None
        dma_sync_sgtable_for_device(self._device, self._raw_table(), self._direction)

    def close(self: "SGTable[Owned[Any]]") -> None:
        """Unmap (unless unbind already did), free the entries, release the pages: the Rust
        drop order.  Idempotent."""
        if self._owner is not None:
            raise InvalidArgument("close() is for the owner; a borrowed view has nothing "
                                  "to release")
        if self._closed:
            return
        self._closed = True
        if self._devres is not None and self._device is not None:
            # Unmap unless unbind got there first (the mapping's lock makes it exactly once),
            # then take the Devres entry off the device.
            mapping = self._raw._resources.mapping
            if mapping is not None:
                mapping.unmap()
            self._devres.disarm()
            self._device._forget(self._devres)
        self._raw.close()
        if self._pages is not None:
            self._pages._owner = None
            self._pages.close()

    def __enter__(self: "SGTable[Owned[P]]") -> "SGTable[Owned[P]]":
        return self

    def __exit__(self: "SGTable[Owned[Any]]", *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "Borrowed" if self._owner is not None else "Owned"
        try:
            raw = self._raw_table()
            return f"<SGTable[{kind}] nents={raw.nents} orig_nents={raw.orig_nents}>"
        except ClosedError as exc:
            return f"<SGTable[{kind}] unusable: {exc}>"
