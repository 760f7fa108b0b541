"""Devices, their DMA mappings (the mapping record and Devres), and device-side memory access.

A :class:`Device` is what a driver sees: its memory, its IOMMU (or none: direct mapping, DMA
address = physical address) and its limits.  It starts bound, as after a driver's probe.  The
mappings of owned ``SGTable`` objects are registered against it (the kernel's Devres) and
released at :meth:`Device.unbind`, newest first, exactly once.  The ``dma_*`` functions that
make and undo mappings are in :mod:`scatterlist.dma`.
"""

from __future__ import annotations

import errno
import threading
import warnings
import weakref
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Dict, List, Optional, Protocol, Tuple, Union

from . import debug as dma_debug
from ._engine import DeviceLimits, Engine
from ._util import Lifetime, allocating, reinit_after_fork, require_range, require_str
from .constants import DMA_BIT_MASK, IOMMU_READ, U32_MAX, U64_MAX
from .errors import BusyError, ClosedError, InvalidArgument, Reason, error_for
from .iommu import Iommu, PageTableEdits
from .memory import PhysicalMemory
from .table import RawTable, TableState

#: Reads larger than this are checked against the mapping before their buffer is allocated.
_CHECK_BEFORE_ALLOCATING = 1 << 20


def check_limits(
    page_size: int,
    dma_mask: object,
    max_segment_size: object,
    seg_boundary_mask: object,
    max_mapping_size: object,
) -> DeviceLimits:
    """The device limits as ints, checked as the engines check them (same reasons)."""
    smallest = page_size - 1
    mask = require_range("dma_mask", dma_mask, 0, U64_MAX)
    if mask & (mask + 1) or mask < smallest:
        raise error_for(errno.EINVAL, Reason.DEVICE_DMA_MASK, value=mask, limit=smallest)
    max_segment = require_range("max_segment_size", max_segment_size, 0, U64_MAX)
    if not 1 <= max_segment <= U32_MAX:
        raise error_for(errno.EINVAL, Reason.DEVICE_MAX_SEGMENT, value=max_segment)
    boundary = require_range("seg_boundary_mask", seg_boundary_mask, 0, U64_MAX)
    if boundary & (boundary + 1) or boundary < smallest:
        raise error_for(errno.EINVAL, Reason.DEVICE_SEG_BOUNDARY, value=boundary, limit=smallest)
    max_mapping = require_range("max_mapping_size", max_mapping_size, 0, U64_MAX)
    return DeviceLimits(mask, max_segment, boundary, max_mapping)


class Mapping:
    """One live DMA mapping of a table for a device: what undoing it takes, and whether that
    happened.  It is attached to its table (which undoes it before freeing its entries) and
    registered with its device (which undoes the owned ones at unbind and close); whichever
    comes first undoes it, once, under the table's mutex.  While live it pins the device, so
    the device is destroyed only after it."""

    __slots__ = (
        "device",
        "table",
        "direction",
        "map_nents",
        "devres",
        "live",
        "revoked",
        "debug_entry",
        "__weakref__",
    )

    def __init__(
        self, device: "Device", table: TableState, direction: int, map_nents: int, devres: bool
    ) -> None:
        self.device = device
        self.table = table
        self.direction = direction
        self.map_nents = map_nents
        self.devres = devres  # an owned SGTable's: revoked at unbind
        self.live = True
        self.revoked = False  # undone by device unbind rather than by its owner
        self.debug_entry: Optional[dma_debug.DebugEntry] = None

    @property
    def device_name(self) -> str:
        return self.device._name

    def finish(self, *, revoked: bool = False) -> Optional[dma_debug.DebugEntry]:
        """Bookkeeping once the engine has unmapped (the caller holds the table's mutex):
        the table's entries and iterators go stale; returns the forgotten debug record."""
        self.live = False
        self.revoked = revoked
        self.table.mapping = None
        self.table.changed(
            "its DMA mapping was revoked by device unbind" if revoked else "it was DMA-unmapped"
        )
        self.device._state.forget(self)
        entry, self.debug_entry = self.debug_entry, None
        dma_debug.forget(self.device, entry)
        return entry

    def end(
        self, table_handle: Any, *, revoked: bool = False, leaked: Optional[str] = None
    ) -> Optional[Callable[[], None]]:
        """Unmap with the map's own arguments, unless already done (the caller holds the
        table's mutex).  ``leaked`` names the owner dropped without closing; the returned
        report then warns (ResourceWarning) and, with dma-debug on, reports the leak."""
        if not self.live:
            return None
        device = self.device
        with device._state.in_iommu(), device._state.unmapping():
            device._engine.dma_unmap(
                device._state.life.handle, table_handle, self.direction, self.map_nents
            )
        entry = self.finish(revoked=revoked)
        if leaked is None:
            return None

        def report() -> None:
            warnings.warn(
                f"{leaked} dropped while DMA-mapped for device {device._name!r}: "
                f"its safety net unmapped it; unmap or close it yourself",
                ResourceWarning,
                stacklevel=2,
            )
            if entry is not None and dma_debug.mode_of(device) != "off":
                dma_debug.deliver(device, [dma_debug.leak(leaked, entry)])

        return report


_NOTHING_TO_ENTER = nullcontext()


class _DeviceState:
    """What a device's calls and its teardown share, without a reference to the ``Device``
    (so that a dropped device can be collected): its lifetime, the lifetimes it pins, and its
    live mappings (``lock`` guards them and the bound state's changes).  Each live mapping pins
    the device ("mapping"): the device is destroyed only after its last mapping is undone,
    whatever order the garbage collector runs the safety nets in."""

    def __init__(
        self,
        engine: Engine,
        name: str,
        handle: Any,
        memory_life: Lifetime,
        iommu_life: Optional[Lifetime],
        iommu_edits: Optional[PageTableEdits],
    ) -> None:
        self.engine = engine
        self.memory_life = memory_life
        self.iommu_life = iommu_life
        self.iommu_edits = iommu_edits
        # Re-entrant: a safety net the collector runs while this thread holds it (a mapping
        # being forgotten) takes it again.
        self.lock = threading.RLock()
        self.limits_lock = threading.RLock()
        reinit_after_fork(self)
        self.mappings: Dict[int, Mapping] = {}  # id -> mapping, oldest first
        self.life = Lifetime(f"Device {name!r}", handle, self._teardown)

    def _reinit_after_fork(self) -> None:
        self.lock = threading.RLock()
        self.limits_lock = threading.RLock()

    def _settle_after_fork(self) -> None:
        """A device reaches its memory and IOMMU without entering them: in a child where
        either is unusable (half changed at the fork), the device is unusable too."""
        if self.memory_life.forked or (self.iommu_life is not None and self.iommu_life.forked):
            self.life.mark_forked()

    def in_iommu(self) -> ContextManager[Any]:
        """Enter the device's IOMMU, if it has one, for a call that changes it through the
        device (a map or an unmap): a fork meanwhile then finds the IOMMU in use, and a
        child cannot use it half changed (the model engine's; the C core's IOMMU is
        consistent in a child, so it need not be entered).  Never waits, whatever locks the
        caller holds: the device pins the IOMMU, so no close of it gets as far as deciding."""
        if self.iommu_life is None or self.engine.consistent_across_fork:
            return _NOTHING_TO_ENTER
        return self.iommu_life.use()

    def unmapping(self) -> ContextManager[Any]:
        """Held around an unmap through the device's IOMMU (see PageTableEdits)."""
        edits = self.iommu_edits
        return _NOTHING_TO_ENTER if edits is None else edits.lock

    def register(self, mapping: Mapping) -> None:
        """Record a new mapping.  An owned (Devres) one needs the device bound, checked
        against unbind under the lock: DeviceUnbound (the caller undoes the map)."""
        with self.lock:
            if mapping.devres and not self.engine.device_bound(self.life.handle):
                raise error_for(errno.ENODEV, Reason.DEVICE_UNBOUND)
            self.life.pin("mapping")  # (the caller is in a call on the device)
            self.mappings[id(mapping)] = mapping

    def forget(self, mapping: Mapping) -> None:
        with self.lock:
            registered = self.mappings.pop(id(mapping), None) is not None
        if registered:
            self.life.unpin("mapping")

    def live(self, *, devres: Optional[bool] = None) -> List[Mapping]:
        with self.lock:
            return [
                m
                for m in self.mappings.values()
                if m.live and (devres is None or m.devres == devres)
            ]

    def set_bound(self, bound: bool) -> List[Mapping]:
        """Bind or unbind; unbinding returns the owned mappings to revoke, newest first, and
        the mappings another thread is ending right now (not live, not yet forgotten): revoke
        waits for those under their table's mutex, so that their pins are gone after it."""
        with self.lock:
            self.engine.device_set_bound(self.life.handle, bound)
            if bound:
                return []
            return [m for m in reversed(list(self.mappings.values())) if m.devres or not m.live]

    @staticmethod
    def revoke(mappings: List[Mapping]) -> int:
        """Undo each owned mapping under its table's mutex (the others are being undone:
        taking the mutex waits for that); returns how many this call undid."""
        released = 0
        for mapping in mappings:
            with mapping.table.life.hold() as table_handle:
                if mapping.live and mapping.devres:
                    mapping.end(table_handle, revoked=True)
                    released += 1
        return released

    def _teardown(self, handle: Any, by_owner: bool) -> None:
        """The device goes, its last mapping undone (close() revoked the owned ones and
        refused hand-made ones; a collected device waits for its mappings' safety nets)."""
        try:
            self.engine.device_destroy(handle)
        finally:
            self.memory_life.unpin("Device")
            if self.iommu_life is not None:
                self.iommu_life.unpin("Device")


class MappedTableView(Protocol):
    """An object standing for a mapped ``RawTable`` (an ``SGTable``) in device transfers."""

    def _entered_table(self) -> ContextManager[Tuple[RawTable, bool]]:
        """Keeps the view's owner open while entered; yields the table and whether its
        mapping can be revoked by unbind (an owned table's)."""


class Device:
    """An emulated DMA-capable device on ``memory``, behind ``iommu`` or mapped directly.

    Limits (bytes; the kernel's defaults):

    - ``dma_mask``: highest address the device can generate, ``DMA_BIT_MASK(32)`` (the kernel's
      default when a driver sets none); enforced on every device access, with or without an
      IOMMU;
    - ``max_segment_size``: longest DMA segment, 64 KiB;
    - ``seg_boundary_mask``: segments may not cross multiples of ``mask + 1``, all ones;
    - ``max_mapping_size``: largest mapping, all ones (``SIZE_MAX``).

    Safe to share between threads: calls run concurrently (one table's calls run one at a
    time); ``close()`` waits for the calls in flight.
    """

    def __init__(
        self,
        memory: PhysicalMemory,
        iommu: Optional[Iommu] = None,
        *,
        name: str = "device",
        dma_mask: int = DMA_BIT_MASK(32),
        max_segment_size: int = 65536,
        seg_boundary_mask: int = U64_MAX,
        max_mapping_size: int = U64_MAX,
        debug: Optional[str] = None,
    ) -> None:
        if not isinstance(memory, PhysicalMemory):
            raise TypeError(f"memory must be a PhysicalMemory, not {type(memory).__name__}")
        if memory.closed:
            raise ClosedError("Device: the PhysicalMemory is closed")
        if iommu is not None:
            if not isinstance(iommu, Iommu):
                raise TypeError(f"iommu must be an Iommu or None, not {type(iommu).__name__}")
            if iommu.memory is not memory:
                raise error_for(errno.EINVAL, Reason.FOREIGN)
        name = require_str("name", name)  # a plain str: no user code in messages later
        # Every argument is converted and checked before anything is entered or created.
        limits = check_limits(
            memory.page_size, dma_mask, max_segment_size, seg_boundary_mask, max_mapping_size
        )
        debug_mode = None if debug is None else dma_debug.check_mode(debug)
        engine = memory._engine
        iommu_life = None if iommu is None else iommu._life
        with memory._life as mem_handle:  # memory, then IOMMU
            if iommu_life is None:
                handle = self._create(engine, mem_handle, None, limits)
            else:
                with iommu_life as iommu_handle:
                    handle = self._create(engine, mem_handle, iommu_handle, limits)
                    iommu_life.pin("Device")
            memory._life.pin("Device")
        self._engine = engine
        self._memory = memory
        self._iommu = iommu
        self._name = name
        self._debug_mode: Optional[str] = debug_mode
        self._state = _DeviceState(
            engine, name, handle, memory._life, iommu_life, None if iommu is None else iommu._edits
        )
        self._life = self._state.life
        self._finalizer = weakref.finalize(self, self._life.release)

    @staticmethod
    def _create(engine: Engine, mem_handle: Any, iommu_handle: Any, limits: DeviceLimits) -> Any:
        handle = engine.device_create(mem_handle, iommu_handle)
        try:
            engine.device_set_limits(handle, limits)
        except BaseException:
            engine.device_destroy(handle)
            raise
        return handle

    # -- state --------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._life.closed

    @property
    def name(self) -> str:
        return self._name

    @property
    def engine(self) -> str:
        return self._engine.name

    @property
    def memory(self) -> PhysicalMemory:
        return self._memory

    @property
    def iommu(self) -> Optional[Iommu]:
        return self._iommu

    @property
    def bound(self) -> bool:
        with self._life as handle:
            return self._engine.device_bound(handle)

    @property
    def live_mappings(self) -> int:
        """Tables mapped for this device and not yet unmapped."""
        with self._life as handle:
            return self._engine.device_live_mappings(handle)

    @property
    def limits(self) -> DeviceLimits:
        """All four limits, read together."""
        with self._life as handle:
            return self._engine.device_limits(handle)

    def _set_limit(self, field: str, value: object) -> None:
        number = require_range(field, value, 0, U64_MAX)  # user code (__index__) runs here
        with self._life as handle, self._state.limits_lock:
            current = self._engine.device_limits(handle)._asdict()
            current[field] = number
            self._engine.device_set_limits(handle, check_limits(self._memory._page_size, **current))

    @property
    def dma_mask(self) -> int:
        return self.limits.dma_mask

    @dma_mask.setter
    def dma_mask(self, value: int) -> None:
        self._set_limit("dma_mask", value)

    @property
    def max_segment_size(self) -> int:
        return self.limits.max_segment_size

    @max_segment_size.setter
    def max_segment_size(self, value: int) -> None:
        self._set_limit("max_segment_size", value)

    @property
    def seg_boundary_mask(self) -> int:
        return self.limits.seg_boundary_mask

    @seg_boundary_mask.setter
    def seg_boundary_mask(self, value: int) -> None:
        self._set_limit("seg_boundary_mask", value)

    @property
    def max_mapping_size(self) -> int:
        return self.limits.max_mapping_size

    @max_mapping_size.setter
    def max_mapping_size(self, value: int) -> None:
        self._set_limit("max_mapping_size", value)

    @property
    def debug(self) -> Optional[str]:
        """This device's DMA-API debug mode (``off``, ``warn``, ``raise``), or None to follow
        ``scatterlist.debug.set_mode``."""
        return self._debug_mode

    @debug.setter
    def debug(self, mode: Optional[str]) -> None:
        checked = None if mode is None else dma_debug.check_mode(mode)
        with self._life:
            self._debug_mode = checked

    @property
    def debug_error_count(self) -> int:
        """DMA-API debug reports made against this device."""
        return dma_debug.device_error_count(self)

    # -- fault injection ----------------------------------------------------------------
    def fail_maps(
        self,
        *,
        nth: Optional[int] = None,
        probability: Optional[float] = None,
        seed: int = 0,
        errno_value: int = errno.ENOMEM,
    ) -> None:
        """Make a map call fail: the ``nth`` one from now, or each with ``probability``
        (reproducible from ``seed``).  The failure comes late, after the IOVA block and the
        page-table entries exist, so the rollback that leaves nothing behind is exercised.
        ``errno_value``: ENOMEM, EINVAL or EIO.  ``fail_maps()`` with neither turns it off."""
        if isinstance(errno_value, bool) or not isinstance(errno_value, int):
            raise TypeError(f"errno_value must be an int, not {type(errno_value).__name__}")
        if probability is not None and (
            isinstance(probability, bool) or not isinstance(probability, (int, float))
        ):
            raise TypeError(f"probability must be a number, not {type(probability).__name__}")
        if errno_value not in (errno.ENOMEM, errno.EINVAL, errno.EIO):
            raise error_for(errno.EINVAL, Reason.INJECT_ERRNO, value=errno_value & U64_MAX)
        if nth is not None and probability is not None:
            raise InvalidArgument("fail_maps takes nth or probability, not both")
        countdown = 0 if nth is None else require_range("nth", nth, 1, U64_MAX)
        if probability is not None and not 0.0 <= probability <= 1.0:
            raise InvalidArgument(f"probability={probability} is not between 0 and 1")
        ppm = 0 if probability is None else round(probability * 1_000_000)
        seed = require_range("seed", seed, 0, U64_MAX)
        with self._life as handle:
            self._engine.device_inject_failures(handle, countdown, ppm, errno_value, seed)

    @property
    def injected_failures(self) -> int:
        """Map calls failed by :meth:`fail_maps` so far."""
        with self._life as handle:
            return self._engine.device_injected_failures(handle)

    # -- binding ------------------------------------------------------------------------
    def bind(self) -> None:
        """Bind the device (as a driver's probe does).  Harmless when already bound."""
        with self._life:
            self._state.set_bound(True)

    def unbind(self) -> int:
        """Unbind: refuse new mappings, then release every resource registered against the
        device (owned SGTable mappings), newest first, each exactly once.  Returns how many
        this call released (another thread's unbind or close may release some first)."""
        with self._life:
            released = self._state.revoke(self._state.set_bound(False))
            # As in the kernel, dma-debug looks for leaks after the Devres releases ran.
            mode = dma_debug.mode_of(self)
            findings = dma_debug.check_unbind(self) if mode != "off" else []
        dma_debug.deliver(self, findings, mode=mode)
        return released

    # -- device-side access -------------------------------------------------------------
    def dma_read(self, dma_addr: int, n_bytes: int) -> bytes:
        """The device reads ``n_bytes`` bytes at DMA address ``dma_addr``: through the IOMMU,
        or straight from memory without one.  ``IommuFault`` (nothing read) on a bad access,
        checked before the result is allocated."""
        dma_addr = require_range("dma_addr", dma_addr, 0, U64_MAX)
        n_bytes = require_range("n_bytes", n_bytes, 0, U64_MAX)
        with self._life as handle:
            if n_bytes > _CHECK_BEFORE_ALLOCATING:
                self._engine.dma_check_access(handle, dma_addr, n_bytes, IOMMU_READ)
            return allocating(lambda: self._engine.dma_read(handle, dma_addr, n_bytes))

    def dma_write(self, dma_addr: int, data: Any) -> None:
        """The device writes ``data`` at DMA address ``dma_addr``; ``IommuFault`` (nothing
        written) on a bad access."""
        dma_addr = require_range("dma_addr", dma_addr, 0, U64_MAX)
        view = memoryview(data).cast("B")
        with self._life as handle:
            self._engine.dma_write(handle, dma_addr, view)

    def _transfer(
        self,
        table: Union[RawTable, MappedTableView],
        n_bytes: Optional[int],
        body: Callable[[Any, Any, int], Any],
    ) -> Any:
        """A whole-table transfer: device, then the view's owner, then the table, held for
        the transfer, so that an unmap or a revocation waits for it."""
        if isinstance(table, RawTable):
            raw, revocable, view = table, False, None
        else:
            enter = getattr(table, "_entered_table", None)
            if enter is None:
                raise TypeError(f"table must be a RawTable or SGTable, not {type(table).__name__}")
            raw, revocable, view = None, True, enter
        with self._life as handle:
            if view is not None:
                with view() as (raw, revocable):
                    return self._transfer_locked(handle, raw, revocable, n_bytes, body)
            assert raw is not None
            return self._transfer_locked(handle, raw, revocable, n_bytes, body)

    def _transfer_locked(
        self,
        handle: Any,
        raw: RawTable,
        revocable: bool,
        n_bytes: Optional[int],
        body: Callable[[Any, Any, int], Any],
    ) -> Any:
        if raw.engine != self.engine:
            raise InvalidArgument(
                f"the table belongs to the {raw.engine} engine, the device to "
                f"the {self.engine} engine"
            )
        with raw._life as table_handle:
            mapping = raw._state.mapping
            if mapping is None or not mapping.live:
                if revocable:
                    raise ClosedError("SGTable's DMA mapping was revoked by device unbind")
                raise error_for(errno.EINVAL, Reason.NOT_MAPPED)
            if not isinstance(mapping, Mapping) or mapping.device is not self:
                raise error_for(errno.EINVAL, Reason.WRONG_DEVICE)
            info = self._engine.table_mapping(table_handle)
            assert info is not None
            rows = self._engine.table_export_dma(table_handle, info.mapped_count)
            available = sum(rows[1::2])
            wanted = available if n_bytes is None else n_bytes
            if wanted > available:  # refused before anything is allocated, on both engines
                raise error_for(errno.EINVAL, Reason.DMA_LENGTH, value=wanted, limit=available)
            return body(handle, table_handle, wanted)

    def dma_read_table(
        self, table: Union[RawTable, MappedTableView], n_bytes: Optional[int] = None
    ) -> bytes:
        """The device reads the table's mapped DMA segments in order into one buffer (the
        first ``n_bytes``, default all)."""
        wanted = None if n_bytes is None else require_range("n_bytes", n_bytes, 0, U64_MAX)
        data: bytes = self._transfer(
            table,
            wanted,
            lambda dev, tab, n: allocating(lambda: self._engine.dma_read_sg(dev, tab, n)),
        )
        return data

    def dma_write_table(self, table: Union[RawTable, MappedTableView], data: Any) -> int:
        """The device writes ``data`` across the table's mapped DMA segments in order;
        returns the byte count."""
        view = memoryview(data).cast("B")
        self._transfer(
            table, len(view), lambda dev, tab, n: self._engine.dma_write_sg(dev, tab, view)
        )
        return len(view)

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        """Unbind and release the device.  Idempotent; ``BusyError`` while tables mapped by
        hand (``dma_map_sgtable``) are still mapped for it; waits for calls in flight on
        other threads.  Mappings of owned ``SGTable`` objects are revoked."""
        findings: List[dma_debug.Finding] = []

        def prepare(handle: Any) -> None:
            by_hand = self._state.live(devres=False)
            if by_hand:
                raise BusyError(
                    f"Device.close: {len(by_hand)} table(s) are still mapped for "
                    f"{self._name!r}; dma_unmap_sgtable them first"
                )
            self._state.revoke(self._state.set_bound(False))
            if dma_debug.mode_of(self) != "off":
                findings.extend(dma_debug.check_unbind(self))

        if self._life.close(prepare, revocable=("mapping",)):
            try:
                dma_debug.deliver(self, findings)
            except dma_debug.DmaApiError:
                pass  # counted in the device's reports; closing is done

    def __enter__(self) -> "Device":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "direct" if self._iommu is None else f"iommu granule={self._iommu.granule}"
        try:
            state = ("bound" if self.bound else "unbound") + f", {self.live_mappings} live mappings"
        except ClosedError:
            return f"<Device {self._name!r} closed>"
        return f"<Device {self._name!r} {mode}, {state}, engine={self.engine}>"


__all__ = ["Device", "DMA_BIT_MASK", "Mapping", "MappedTableView", "check_limits"]
