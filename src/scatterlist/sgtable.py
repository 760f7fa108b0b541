"""``SGTable``: the Rust-for-Linux type-state scatter-gather table, as Pythonic RAII.

``SGTable[Owned[P]]`` owns its pages ``P``, its entries and its DMA mapping; closing it (or
leaving its ``with`` block) unmaps, then frees the entries, then releases the pages, the drop
order of the Rust abstraction.  The same order holds when the table is dropped without
``close()`` (its safety net runs it, and warns with ``ResourceWarning``), whatever order the
garbage collector finds things in.  The mapping is registered against the device (Devres): a
device unbind unmaps it once, and closing the table later frees the entries and pages without a
second unmap.  ``SGTable[Borrowed]`` is a view that iterates the DMA segments and never
dangles: used after its owner closed or its mapping was revoked, it raises ``ClosedError``.
"""

from __future__ import annotations

import errno
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Generic, Iterator, List, Optional, Tuple, TypeVar, Union

from . import debug as dma_debug
from ._engine import get_engine
from ._util import Lifetime, in_package, require_range
from .constants import MAX_SEGMENT_UNLIMITED, U64_MAX, DataDirection
from .device import Device, Mapping
from .dma import direction_value, dma_sync_sgtable_for_cpu, dma_sync_sgtable_for_device, map_table
from .errors import ClosedError, InvalidArgument, Reason, error_for
from .memory import Pages
from .table import RawTable, SGEntry, TableState, _live_tables, build_table

P = TypeVar("P", bound=Pages)
S = TypeVar("S", covariant=True)


class Owned(Generic[P]):
    """Type-state: the table owns its pages ``P``, its entries and its DMA mapping."""


class Borrowed:
    """Type-state: a view of a table someone else owns."""


def _require_live_mapping(state: TableState) -> None:
    mapping = state.mapping
    if mapping is None or not mapping.live:
        raise ClosedError("SGTable's DMA mapping was revoked by device unbind")


class _OwnedTeardown:
    """The drop order of ``SGTable<Owned<P>>``: unmap (unless unbind did), free the entries,
    give the pages back.  It holds what it releases, not the SGTable."""

    __slots__ = ("mapping", "raw_life", "raw_state", "pages", "pages_life", "reports")

    def __init__(self, mapping: Mapping, raw: RawTable, pages: Pages) -> None:
        self.mapping = mapping
        self.raw_life = raw._life
        self.raw_state = raw._state
        self.pages = pages
        self.pages_life = pages._life
        # dma-debug findings of the close (free-mapped, warn mode), delivered once closed.
        self.reports: List[Tuple[Any, Any]] = []

    def prepare(self, _: Any) -> None:
        """Before the close changes anything: refused (DmaApiError, raise mode) when a table
        mapped by hand still maps the pages, which the close would hand to a next owner."""
        self.pages._check_free_for_table(self.mapping.debug_entry)

    def __call__(self, handle: Any, by_owner: bool) -> None:
        if not by_owner:
            # The safety net never waits: the table's own teardown unmaps (reporting the
            # leak) and frees the entries, now or when the last user of the table leaves;
            # the pages go after it.
            self.raw_state.after_teardown(self.pages_life.release)
            self.raw_life.release()
            return
        # One step after the other, each done once: a step that fails (the unmap, when the
        # IOMMU is unusable in a forked child) refuses the close, with nothing after it done.
        with self.raw_life.hold() as table_handle:
            self.mapping.end(table_handle)
        self.raw_life.close()
        self.reports.extend(self.pages._close_for_table())


class SGTable(Generic[S]):
    """A DMA-mapped scatter-gather table; iterating yields its ``nents`` DMA segments
    (``SGEntry.dma_address``, ``SGEntry.dma_len``).  Build one with :meth:`new`; view one
    with :meth:`borrow` or :meth:`from_raw`."""

    _raw: RawTable
    _borrowed_from: Union["SGTable[Any]", RawTable, None]  # None for an owner
    _pages: Optional[Pages]
    _device: Optional[Device]
    _direction: Optional[DataDirection]
    _mapping: Optional[Mapping]
    _life: Optional[Lifetime]  # an owner's
    _teardown: Optional[_OwnedTeardown]  # an owner's
    _finalizer: "Optional[weakref.finalize[Any, Any]]"

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError("SGTable objects come from SGTable.new, borrow() or from_raw()")

    @classmethod
    def _make(
        cls,
        raw: RawTable,
        borrowed_from: Union["SGTable[Any]", RawTable, None] = None,
    ) -> "SGTable[Any]":
        self: SGTable[Any] = object.__new__(cls)
        self._raw = raw
        self._borrowed_from = borrowed_from
        self._pages = self._device = self._direction = self._mapping = None
        self._life = self._finalizer = self._teardown = None
        return self

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

        On failure nothing is mapped or kept, and the pages stay the caller's (also when a
        dma-debug warning is turned into an exception)."""
        if not isinstance(dev, Device):
            raise TypeError(f"dev must be a Device, not {type(dev).__name__}")
        if not isinstance(pages, Pages):
            raise TypeError(f"pages must be Pages, not {type(pages).__name__}")
        dir_value = direction_value(direction)
        if pages._memory is not dev._memory:
            raise error_for(errno.EINVAL, Reason.FOREIGN)
        with in_package():  # from the claim to the handover: a fork waits for all of it
            return SGTable._new(dev, pages, dir_value)

    @staticmethod
    def _new(dev: Device, pages: P, dir_value: int) -> "SGTable[Owned[P]]":
        engine = dev._engine
        page_size = pages._memory._page_size
        with dev._life as dev_handle, pages._life as pfns:  # device, then pages, then table
            pages._claim()  # BusyError for a second taker, from now until the end
            try:
                limits = engine.device_limits(dev_handle)
                by_mapping = limits.max_mapping_size or MAX_SEGMENT_UNLIMITED
                limit = min(by_mapping, limits.max_segment_size, MAX_SEGMENT_UNLIMITED)
                if limit < page_size:
                    name = (
                        "max_segment_size"
                        if limits.max_segment_size <= by_mapping
                        else "max_mapping_size"
                    )
                    raise InvalidArgument(
                        f"SGTable.new: the device's {name}={limit} is below one "
                        f"page ({page_size} bytes): no table entry can fit it"
                    )
                # The pages' own array: private, so no other thread can change it under C.
                raw = build_table(engine, memoryview(pfns), 0, pages.size, limit, page_size, 0)
                raw._state.owner = "SGTable"
                try:
                    mapping, _, findings, mode = map_table(dev, raw, dir_value, None, devres=True)
                except BaseException:
                    raw.close()
                    raise
            except BaseException:
                pages._unclaim()
                raise
        try:
            # Outside every object: a warning filter may run any code (the pages stay claimed).
            dma_debug.deliver(dev, findings, stacklevel=3, mode=mode)
        except BaseException:
            with raw._life as table_handle:  # no table for the caller: undo it all
                mapping.end(table_handle)
            raw.close()
            pages._unclaim()
            raise
        table: SGTable[Owned[P]] = SGTable._make(raw)
        table._pages = pages
        table._device = dev
        table._direction = DataDirection(dir_value)
        table._mapping = mapping
        table._teardown = _OwnedTeardown(mapping, raw, pages)
        table._life = Lifetime("SGTable", None, table._teardown)
        table._finalizer = weakref.finalize(table, table._life.release)
        pages._give_to(table)
        return table

    @staticmethod
    def from_raw(raw: Union[RawTable, Any]) -> "SGTable[Borrowed]":
        """A borrowed view of a table mapped by hand: a ``RawTable``, or a native
        ``struct sl_table *`` of a live table (as handed to C device models).  Unknown or
        freed pointers are refused rather than trusted."""
        if isinstance(raw, RawTable):
            if raw.closed:
                raise ClosedError("SGTable.from_raw: the RawTable is closed")
            return SGTable._make(raw, raw)
        try:
            address = get_engine("native").table_address(raw)
        except Exception:
            raise TypeError(
                f"from_raw needs a RawTable or a native table pointer, not {type(raw).__name__}"
            ) from None
        found = _live_tables.get(address)
        if found is None or found.closed:
            raise InvalidArgument(f"from_raw: {raw!r} is not a live scatterlist table")
        return SGTable._make(found, found)

    # -- guards -------------------------------------------------------------------------
    def _root(self) -> "Optional[SGTable[Any]]":
        """The owning SGTable this object is or borrows from; None for a from_raw view."""
        node: Any = self
        while isinstance(node, SGTable):
            if node._borrowed_from is None:
                return node
            node = node._borrowed_from
        return None

    @contextmanager
    def _entered_table(self) -> Iterator[Tuple[RawTable, bool]]:
        """For device transfers (``Device.dma_read_table``): the owner stays open while
        entered; yields the table and whether its mapping can be revoked."""
        root = self._root()
        if root is None:
            yield self._raw, False
            return
        assert root._life is not None
        with root._life:
            yield root._raw, True

    def _call(self, read: Callable[[RawTable, Optional[Callable[[TableState], None]]], Any]) -> Any:
        with self._entered_table() as (raw, revocable):
            return read(raw, _require_live_mapping if revocable else None)

    # -- the borrowed interface (also available on owners) ---------------------------------
    def __iter__(self) -> Iterator[SGEntry]:
        for entry in self.entries():
            entry._check()  # stale once the table changed, closed or lost its mapping
            yield entry

    def entries(self) -> List[SGEntry]:
        """The ``nents`` DMA segments."""
        return self._call(lambda raw, check: raw._read_entries(True, check))  # type: ignore

    @property
    def nents(self) -> int:
        return self._call(lambda raw, check: raw._counts(check).nents)  # type: ignore

    @property
    def orig_nents(self) -> int:
        return self._call(lambda raw, check: raw._counts(check).orig_nents)  # type: ignore

    def borrow(self) -> "SGTable[Borrowed]":
        """A view that raises ``ClosedError`` once this table is closed or revoked."""
        self._call(lambda raw, check: raw._counts(check))
        return SGTable._make(self._raw, self)

    @property
    def closed(self) -> bool:
        """True once this table (or, for a view, what it borrows from) was closed."""
        if self._life is not None:
            return self._life.closed
        borrowed_from = self._borrowed_from
        return borrowed_from is None or borrowed_from.closed

    # -- the owned interface ------------------------------------------------------------
    def _owner_only(self) -> Lifetime:
        """Owned-only members on a borrowed view: a clear error, not an assertion."""
        if self._life is None:
            raise InvalidArgument(
                "this is for the owning SGTable; a borrowed view only iterates the DMA segments"
            )
        return self._life

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
        if self._owner_only().closed:
            raise ClosedError("SGTable is closed")
        assert self._pages is not None
        return self._pages  # type: ignore[return-value]

    @property
    def revoked(self: "SGTable[Owned[Any]]") -> bool:
        """True once a device unbind unmapped the table."""
        self._owner_only()
        return self._mapping is not None and self._mapping.revoked

    def copy_from_buffer(self: "SGTable[Owned[Any]]", data: Any, skip: int = 0) -> int:
        """The CPU writes ``data`` into the table's pages (``sg_pcopy_from_buffer``), starting
        ``skip`` bytes in; returns the bytes written."""
        skip = require_range("skip", skip, 0, U64_MAX)
        view = memoryview(data).cast("B")
        with self._owner_only():
            self._check_mapping()
            assert self._device is not None
            return self._raw.copy_from_buffer(self._device._memory, view, skip)

    def copy_to_buffer(
        self: "SGTable[Owned[Any]]", n_bytes: Optional[int] = None, skip: int = 0
    ) -> bytes:
        """The CPU reads the table's data (``sg_pcopy_to_buffer``)."""
        skip = require_range("skip", skip, 0, U64_MAX)
        wanted = None if n_bytes is None else require_range("n_bytes", n_bytes, 0, U64_MAX)
        with self._owner_only():
            self._check_mapping()
            assert self._device is not None
            return self._raw.copy_to_buffer(self._device._memory, wanted, skip)

    def _check_mapping(self) -> None:
        if self._mapping is None or not self._mapping.live:
            raise ClosedError("SGTable's DMA mapping was revoked by device unbind")

    def sync_for_cpu(self: "SGTable[Owned[Any]]") -> None:
        """``dma_sync_sgtable_for_cpu`` with the table's device and direction."""
        with self._owner_only():
            self._check_mapping()
            assert self._device is not None and self._direction is not None
            dma_sync_sgtable_for_cpu(self._device, self._raw, self._direction)

    def sync_for_device(self: "SGTable[Owned[Any]]") -> None:
        """``dma_sync_sgtable_for_device`` with the table's device and direction."""
        with self._owner_only():
            self._check_mapping()
            assert self._device is not None and self._direction is not None
            dma_sync_sgtable_for_device(self._device, self._raw, self._direction)

    def close(self: "SGTable[Owned[Any]]") -> None:
        """Unmap (unless unbind already did), free the entries, release the pages: the Rust
        drop order.  Idempotent, also when threads race on it; waits for calls in flight on
        the table."""
        if self._life is None:
            raise InvalidArgument(
                "close() is for the owner; a borrowed view has nothing to release"
            )
        teardown = self._teardown
        assert teardown is not None
        if self._life.close(teardown.prepare):
            reports, teardown.reports = teardown.reports, []
            for target, finding in reports:  # warn mode, once closed
                dma_debug.deliver(target, [finding])

    def __enter__(self: "SGTable[Owned[P]]") -> "SGTable[Owned[P]]":
        return self

    def __exit__(self: "SGTable[Owned[Any]]", *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "Borrowed" if self._life is None else "Owned"
        try:
            nents, orig_nents = self.nents, self.orig_nents
        except ClosedError as exc:
            return f"<SGTable[{kind}] unusable: {exc}>"
        return f"<SGTable[{kind}] nents={nents} orig_nents={orig_nents}>"


__all__ = ["SGTable", "Owned", "Borrowed"]
