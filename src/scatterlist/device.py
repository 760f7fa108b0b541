"""Devices, DMA mapping of tables, and device-side memory access.

A :class:`Device` is what a driver sees: its memory, its IOMMU (or none: direct mapping, DMA
address = physical address) and its limits.  It starts bound, as after a driver's probe.
Resources registered against it (the mappings of owned ``SGTable`` objects) are released at
:meth:`Device.unbind`, in reverse order, exactly once: the kernel's Devres.
"""

from __future__ import annotations

import errno
import threading
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional, Union

from . import debug
from . import debug as debug_module
from ._util import locked, require_range
from .errors import BusyError, ClosedError, DmaApiError, InvalidArgument, Reason, error_for
from .iommu import Iommu
from .memory import PhysicalMemory
from .table import DataDirection, RawTable, _Mapping

_U64_MAX = (1 << 64) - 1


def DMA_BIT_MASK(bits: int) -> int:
    """The kernel's ``DMA_BIT_MASK(n)``: the highest address an n-bit device can generate."""
    bits = require_range("bits", bits, 1, 64)
    return (1 << bits) - 1


def _low_bits_mask(name: str, value: int, minimum: int) -> int:
    value = require_range(name, value, 0, _U64_MAX)
    if value & (value + 1) or value < minimum:
        raise InvalidArgument(f"{name}={value:#x} must be 2**n - 1 and at least {minimum:#x}")
    return value


class _Devres:
    """A resource released when its device unbinds, or earlier by its owner: exactly once."""

    __slots__ = ("_release", "_done", "_lock", "_anchor", "__weakref__")

    def __init__(self, release: Callable[[], bool], anchor: Optional[object] = None) -> None:
        self._release = release
        self._done = False
        self._lock = threading.Lock()
        # The resource itself, held weakly: once it is gone the entry can be dropped.
        self._anchor = None if anchor is None else weakref.ref(anchor)

    @property
    def stale(self) -> bool:
        return self._done or (self._anchor is not None and self._anchor() is None)

    def revoke(self) -> bool:
        """Release now unless already released; True if this call released something (the
        owner may have released the resource itself a moment before)."""
        with self._lock:
            if self._done:
                return False
            self._done = True
        return self._release()

    def disarm(self) -> None:
        """The owner released the resource itself: unbind must not run the release."""
        with self._lock:
            self._done = True

    @property
    def revoked(self) -> bool:
        return self._done


class Device:
    """An emulated DMA-capable device on ``memory``, behind ``iommu`` or mapped directly.

    Limits (bytes; the kernel's defaults):

    - ``dma_mask``: highest address the device can generate, ``DMA_BIT_MASK(32)`` (the kernel's
      default when a driver sets none);
    - ``max_segment_size``: longest DMA segment, 64 KiB;
    - ``seg_boundary_mask``: segments may not cross multiples of ``mask + 1``, all ones;
    - ``max_mapping_size``: largest mapping, all ones (``SIZE_MAX``).
    """

    def __init__(self, memory: PhysicalMemory, iommu: Optional[Iommu] = None, *,
                 name: str = "device", dma_mask: int = DMA_BIT_MASK(32),
                 max_segment_size: int = 65536, seg_boundary_mask: int = _U64_MAX,
                 max_mapping_size: int = _U64_MAX, debug: Optional[str] = None) -> None:
        if not isinstance(memory, PhysicalMemory):
            raise TypeError(f"memory must be a PhysicalMemory, not {type(memory).__name__}")
        mem_handle = memory._require_open()
        iommu_handle = None
        if iommu is not None:
            if not isinstance(iommu, Iommu):
                raise TypeError(f"iommu must be an Iommu or None, not {type(iommu).__name__}")
            iommu_handle = iommu._require_open()
            if iommu.memory is not memory:
                raise error_for(errno.EINVAL, Reason.FOREIGN)
        # Every argument is checked before anything is created or registered.
        limits = {
            "dma_mask": _low_bits_mask("dma_mask", dma_mask, memory.page_size - 1),
            "max_segment_size": require_range("max_segment_size", max_segment_size, 1,
                                              0xFFFFFFFF),
            "seg_boundary_mask": _low_bits_mask("seg_boundary_mask", seg_boundary_mask,
                                                memory.page_size - 1),
            "max_mapping_size": require_range("max_mapping_size", max_mapping_size, 0,
                                              _U64_MAX),
        }
        debug_mode = None if debug is None else debug_module.check_mode(debug)
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, not {type(name).__name__}")
        self._engine = memory._engine
        self._memory = memory
        self._iommu = iommu
        self._name = name
        self._handle: Any = self._engine.device_create(mem_handle, iommu_handle)
        self._closed = False
        self._debug_mode: Optional[str] = debug_mode
        self._lock = threading.RLock()
        self._devres: List[_Devres] = []
        self._mappings: "weakref.WeakSet[_Mapping]" = weakref.WeakSet()
        for field, value in limits.items():
            self._engine.device_set(self._handle, field, value)
        memory._dependents.add(self)
        if iommu is not None:
            iommu._devices.add(self)

    # -- state --------------------------------------------------------------------------
    def _require_open(self) -> Any:
        if self._closed:
            raise ClosedError(f"Device {self._name!r} is closed")
        return self._handle

    @property
    def closed(self) -> bool:
        return self._closed

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
    @locked
    def bound(self) -> bool:
        return bool(self._engine.device_get(self._require_open(), "bound"))

    @property
    @locked
    def live_mappings(self) -> int:
        """Tables mapped for this device and not yet unmapped."""
        return int(self._engine.device_get(self._require_open(), "live_mappings"))

    @locked
    def _get(self, field: str) -> int:
        return int(self._engine.device_get(self._require_open(), field))

    @locked
    def _set(self, field: str, value: int) -> None:
        self._engine.device_set(self._require_open(), field, value)

    @property
    def dma_mask(self) -> int:
        return self._get("dma_mask")

    @dma_mask.setter
    def dma_mask(self, value: int) -> None:
        self._set("dma_mask",
                                _low_bits_mask("dma_mask", value, self._memory.page_size - 1))

    @property
    def max_segment_size(self) -> int:
        return self._get("max_segment_size")

    @max_segment_size.setter
    def max_segment_size(self, value: int) -> None:
        self._set("max_segment_size",
                                require_range("max_segment_size", value, 1, 0xFFFFFFFF))

    @property
    def seg_boundary_mask(self) -> int:
        return self._get("seg_boundary_mask")

    @seg_boundary_mask.setter
    def seg_boundary_mask(self, value: int) -> None:
        self._set("seg_boundary_mask",
                                _low_bits_mask("seg_boundary_mask", value,
                                               self._memory.page_size - 1))

    @property
    def max_mapping_size(self) -> int:
        return self._get("max_mapping_size")

    @max_mapping_size.setter
    def max_mapping_size(self, value: int) -> None:
        self._set("max_mapping_size",
                                require_range("max_mapping_size", value, 0, _U64_MAX))

    @property
    def debug(self) -> Optional[str]:
        """This device's DMA-API debug mode (``off``, ``warn``, ``raise``), or None to follow
        ``scatterlist.debug.set_mode``."""
        return self._debug_mode

    @debug.setter
    def debug(self, mode: Optional[str]) -> None:
        self._require_open()
        self._debug_mode = None if mode is None else debug_module.check_mode(mode)

    @property
    def debug_error_count(self) -> int:
        """DMA-API debug reports made against this device."""
        return debug.device_error_count(self)

    # -- fault injection ----------------------------------------------------------------
    @locked
    def fail_maps(self, *, nth: Optional[int] = None, probability: Optional[float] = None,
                  seed: int = 0, errno_value: int = errno.ENOMEM) -> None:
        """Make a map call fail: the ``nth`` one from now, or each with ``probability``
        (reproducible from ``seed``).  The failure comes late, after the IOVA block and the
        page-table entries exist, so the rollback that leaves nothing behind is exercised.
        ``errno_value``: ENOMEM, EINVAL or EIO.  ``fail_maps()`` with neither turns it off."""
        handle = self._require_open()
        if isinstance(errno_value, bool) or not isinstance(errno_value, int):
            raise TypeError(f"errno_value must be an int, not {type(errno_value).__name__}")
        if probability is not None and (isinstance(probability, bool) or
                                        not isinstance(probability, (int, float))):
            raise TypeError(f"probability must be a number, not {type(probability).__name__}")
        if errno_value not in (errno.ENOMEM, errno.EINVAL, errno.EIO):
            raise InvalidArgument(f"errno_value={errno_value} is not ENOMEM, EINVAL or EIO")
        if nth is not None and probability is not None:
            raise InvalidArgument("fail_maps takes nth or probability, not both")
        countdown = 0 if nth is None else require_range("nth", nth, 1, _U64_MAX)
        if probability is not None and not 0.0 <= probability <= 1.0:
            raise InvalidArgument(f"probability={probability} is not between 0 and 1")
        ppm = 0 if probability is None else round(probability * 1_000_000)
        seed = require_range("seed", seed, 0, _U64_MAX)
        # Everything is checked: now arm it.
        self._engine.device_set(handle, "inject_countdown", countdown)
        self._engine.device_set(handle, "inject_ppm", ppm)
        self._engine.device_set(handle, "inject_errno", errno_value)
        self._engine.device_set(handle, "inject_rng_state", seed)

    @property
    def injected_failures(self) -> int:
        """Map calls failed by :meth:`fail_maps` so far."""
        return self._get("injected_failures")

    # -- binding ------------------------------------------------------------------------
    def bind(self) -> None:
        """Bind the device (as a driver's probe does).  Harmless when already bound."""
        self._set("bound", 1)

    def unbind(self) -> int:
        """Unbind: refuse new mappings, then release every resource registered against the
        device (owned SGTable mappings), newest first, each exactly once.  Returns how many
        were released."""
        handle = self._require_open()
        with self._lock:
            self._engine.device_set(handle, "bound", 0)
            pending, self._devres = self._devres, []
        released = sum(1 for devres in reversed(pending) if devres.revoke())
        # As in the kernel, dma-debug looks for leaks after the Devres releases ran.
        if debug.mode_of(self) != "off":
            debug.check_unbind(self)
        return released

    def _register(self, release: Callable[[], bool],
                  anchor: Optional[object] = None) -> _Devres:
        """Devres: run ``release`` at unbind unless revoked first.  ``DeviceUnbound`` if the
        device is not bound (nothing is registered then).  ``anchor``, held weakly, is the
        resource: when it is gone, the entry is dropped."""
        handle = self._require_open()
        with self._lock:
            if not self._engine.device_get(handle, "bound"):
                raise error_for(errno.ENODEV, Reason.DEVICE_UNBOUND)
            devres = _Devres(release, anchor)
            self._devres = [entry for entry in self._devres if not entry.stale]
            self._devres.append(devres)
        return devres

    def _forget(self, devres: _Devres) -> None:
        with self._lock:
            if devres in self._devres:
                self._devres.remove(devres)

    # -- device-side access -------------------------------------------------------------
    @locked
    def dma_read(self, dma_addr: int, n: int) -> bytes:
        """The device reads ``n`` bytes at DMA address ``dma_addr``: through the IOMMU, or
        straight from memory without one.  ``IommuFault`` (nothing read) on a bad access."""
        handle = self._require_open()
        return self._engine.dma_read(handle, require_range("dma_addr", dma_addr, 0, _U64_MAX),
                                     require_range("n", n, 0, self._memory.size))

    @locked
    def dma_write(self, dma_addr: int, data: Any) -> None:
        """The device writes ``data`` at DMA address ``dma_addr``; ``IommuFault`` (nothing
        written) on a bad access."""
        handle = self._require_open()
        self._engine.dma_write(handle, require_range("dma_addr", dma_addr, 0, _U64_MAX),
                               memoryview(data).cast("B"))

    @locked
    def dma_read_table(self, table: Union[RawTable, "Any"], n_bytes: Optional[int] = None
                       ) -> bytes:
        """The device reads the table's ``nents`` DMA segments in order into one buffer (the
        first ``n_bytes``, default all)."""
        handle = self._require_open()
        raw = _raw_of(table, self)
        table_handle = raw._require_open()
        if n_bytes is None:
            n_bytes = sum(raw.export_dma()[1::2])
        n_bytes = require_range("n_bytes", n_bytes, 0, self._memory.size)
        with _mapping_held(raw), _revocation_as_closed(table):
            return self._engine.dma_read_sg(handle, table_handle, n_bytes)

    @locked
    def dma_write_table(self, table: Union[RawTable, "Any"], data: Any) -> int:
        """The device writes ``data`` across the table's DMA segments in order; returns the
        byte count."""
        handle = self._require_open()
        raw = _raw_of(table, self)
        view = memoryview(data).cast("B")
        with _mapping_held(raw), _revocation_as_closed(table):
            self._engine.dma_write_sg(handle, raw._require_open(), view)
        return len(view)

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        """Unbind and release the device.  Idempotent; ``BusyError`` while tables mapped by
        hand (``dma_map_sgtable``) are still mapped for it."""
        if self._closed:
            return
        with self._lock:
            # Refuse before unbinding: a refused close changes nothing.
            owned = {id(devres._anchor()) for devres in self._devres
                     if devres._anchor is not None and not devres.revoked}
            by_hand = [m for m in list(self._mappings) if m.live and id(m) not in owned]
            if by_hand:
                raise BusyError(f"Device.close: {len(by_hand)} table(s) are still mapped for "
                                f"{self._name!r}; dma_unmap_sgtable them first")
            try:
                self.unbind()
            except DmaApiError:
                pass  # reported in the device's debug mode; closing goes on
            self._closed = True
        self._memory._dependents.discard(self)
        self._engine.device_destroy(self._handle)

    def __enter__(self) -> "Device":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            return f"<Device {self._name!r} closed>"
        mode = "direct" if self._iommu is None else f"iommu granule={self._iommu.granule}"
        return (f"<Device {self._name!r} {mode}, {'bound' if self.bound else 'unbound'}, "
                f"{self.live_mappings} live mappings, engine={self.engine}>")


@contextmanager
def _mapping_held(raw: RawTable) -> Iterator[None]:
    """Hold the table's mapping for the length of a whole-table transfer: an unmap or an
    unbind revocation on another thread waits, so the transfer never follows addresses that
    were freed (and perhaps handed to another table) halfway through."""
    mapping = raw._resources.mapping
    if mapping is None:
        yield
        return
    with mapping.lock:
        yield


@contextmanager
def _revocation_as_closed(table: Any) -> Iterator[None]:
    """An SGTable whose mapping an unbind revoked between our check and the engine's: report
    it as the revocation (ClosedError) it is, not as an unmapped table."""
    try:
        yield
    except InvalidArgument as exc:
        if exc.reason is Reason.NOT_MAPPED and not isinstance(table, RawTable):
            raise ClosedError("SGTable's DMA mapping was revoked by device unbind") from None
        raise


def _raw_of(table: Any, device: "Device") -> RawTable:
    from .sgtable import SGTable
    if isinstance(table, SGTable):
        table = table._raw_table()
    if not isinstance(table, RawTable):
        raise TypeError(f"table must be a RawTable or SGTable, not {type(table).__name__}")
    if table.engine != device.engine:
        raise InvalidArgument(f"the table belongs to the {table.engine} engine, the device to "
                              f"the {device.engine} engine")
    return table


def _direction(direction: Any) -> int:
    if isinstance(direction, bool) or not isinstance(direction, int):
        raise TypeError(f"direction must be a DataDirection, not {type(direction).__name__}")
    try:
        value = DataDirection(direction)
    except ValueError:
        raise InvalidArgument(f"direction={direction!r} is not a DataDirection") from None
    if value is DataDirection.NONE:
        raise error_for(errno.EINVAL, Reason.DMA_DIRECTION, 0, int(value))
    return int(value)


def _check_pair(dev: Device, table: RawTable) -> Any:
    if not isinstance(dev, Device):
        raise TypeError(f"dev must be a Device, not {type(dev).__name__}")
    if not isinstance(table, RawTable):
        raise TypeError(f"table must be a RawTable, not {type(table).__name__}")
    if table.engine != dev.engine:
        raise InvalidArgument(f"the table belongs to the {table.engine} engine, the device to "
                              f"the {dev.engine} engine")
    return dev._require_open()


def _dma_rows(table: RawTable, count: int) -> "list[tuple[int, int]]":
    rows = table.export_dma(count)
    return [(rows[2 * i], rows[2 * i + 1]) for i in range(count)]


def _cpu_rows(table: RawTable, count: int) -> "list[tuple[int, int, int]]":
    rows = table.export_cpu()
    return [(rows[3 * i], rows[3 * i + 1], rows[3 * i + 2]) for i in range(count)]


def _map(dev: Device, table: RawTable, direction: Any, nents: Optional[int]) -> int:
    dev_handle = _check_pair(dev, table)
    dir_value = _direction(direction)
    if nents is not None:
        nents = require_range("nents", nents, 0, 0xFFFFFFFF)
    mapping, count = table._map(dev, dev_handle, dir_value, nents)
    if debug.mode_of(dev) != "off":
        call_ents = table.orig_nents if nents is None else nents
        cpu, dma = _cpu_rows(table, call_ents), _dma_rows(table, count)
        try:
            debug.check_map(dev, cpu, dma, table.page_size, dir_value, call_ents, count)
        except DmaApiError:
            mapping.unmap()  # raise mode: the call changes nothing
            raise
        mapping.debug_entry = debug.record_map(dev, cpu, dma, table.page_size, dir_value,
                                               call_ents, count)
    return count


def _unmap(dev: Device, table: RawTable, direction: Any, nents: Optional[int]) -> None:
    dev_handle = _check_pair(dev, table)
    dir_value = _direction(direction)
    if nents is not None:
        nents = require_range("nents", nents, 0, 0xFFFFFFFF)
    mapping = table._resources.mapping
    tracked = mapping is None or mapping.debug_entry is not None
    if debug.mode_of(dev) != "off" and tracked and not table.closed:
        call_ents = table.orig_nents if nents is None else nents
        count = max(1, min(call_ents, table.orig_nents))
        debug.check_unmap(dev, _dma_rows(table, count), dir_value, call_ents,
                          [other for other in list(debug._records) if other is not dev])
    table._unmap(dev, dev_handle, dir_value, nents)


def _sync(dev: Device, table: RawTable, direction: Any, for_cpu: bool,
          nents: Optional[int]) -> None:
    dev_handle = _check_pair(dev, table)
    dir_value = _direction(direction)
    if nents is not None:
        nents = require_range("nents", nents, 0, 0xFFFFFFFF)
    mapping = table._resources.mapping
    tracked = mapping is None or mapping.debug_entry is not None
    if debug.mode_of(dev) != "off" and tracked:
        call_ents = table.orig_nents if nents is None else nents
        entry = mapping.debug_entry if mapping is not None else None
        count = entry.sg_mapped_ents if entry is not None else 1
        debug.check_sync(dev, _dma_rows(table, min(count, table.orig_nents)), dir_value,
                         call_ents, for_cpu)
    dev._engine.dma_sync(dev_handle, table._require_open(), dir_value, for_cpu, nents)


def dma_map_sgtable(dev: Device, table: RawTable, direction: DataDirection) -> None:
    """``dma_map_sgtable``: map the table's ``orig_nents`` entries for ``dev``; ``nents``
    becomes the DMA segment count (smaller than ``orig_nents`` where the IOMMU merged).
    Raises (``InvalidArgument``, ``OutOfMemory``, ``MappingError``, ``DeviceUnbound``) having
    mapped nothing."""
    _map(dev, table, direction, None)


def dma_unmap_sgtable(dev: Device, table: RawTable, direction: DataDirection) -> None:
    """``dma_unmap_sgtable``: release the table's mapping (the whole IOVA block) with the
    device it was mapped for."""
    _unmap(dev, table, direction, None)


def dma_sync_sgtable_for_cpu(dev: Device, table: RawTable, direction: DataDirection) -> None:
    """Hand the buffer to the CPU (memory here is coherent: this checks the call)."""
    _sync(dev, table, direction, True, None)


def dma_sync_sgtable_for_device(dev: Device, table: RawTable, direction: DataDirection
                                ) -> None:
    """Hand the buffer back to the device (checks the call; no bytes move)."""
    _sync(dev, table, direction, False, None)


def dma_map_sg(dev: Device, table: RawTable, nents: int, direction: DataDirection) -> int:
    """``dma_map_sg``: map the first ``nents`` entries and return the DMA segment count.
    Unlike ``dma_map_sgtable`` it does not store the count in the table; pass the same
    ``nents`` (not the returned count) to :func:`dma_unmap_sg` and the syncs."""
    return _map(dev, table, direction, require_range("nents", nents, 0, 0xFFFFFFFF))


def dma_unmap_sg(dev: Device, table: RawTable, nents: int, direction: DataDirection) -> None:
    """``dma_unmap_sg``: ``nents`` must be the count passed to ``dma_map_sg``; dma-debug
    reports the classic bug of passing the mapped count instead."""
    _unmap(dev, table, direction, require_range("nents", nents, 0, 0xFFFFFFFF))


def dma_sync_sg_for_cpu(dev: Device, table: RawTable, nents: int,
                        direction: DataDirection) -> None:
    _sync(dev, table, direction, True, require_range("nents", nents, 0, 0xFFFFFFFF))


def dma_sync_sg_for_device(dev: Device, table: RawTable, nents: int,
                           direction: DataDirection) -> None:
    _sync(dev, table, direction, False, require_range("nents", nents, 0, 0xFFFFFFFF))


def dma_sync_single_for_cpu(dev: Device, dma_addr: int, size: int,
                            direction: DataDirection) -> None:
    """Sync part of a mapping by DMA address: dma-debug checks it lies inside one mapping,
    in the mapped direction."""
    _sync_single(dev, dma_addr, size, direction, True)


def dma_sync_single_for_device(dev: Device, dma_addr: int, size: int,
                               direction: DataDirection) -> None:
    _sync_single(dev, dma_addr, size, direction, False)


def _sync_single(dev: Device, dma_addr: int, size: int, direction: Any, for_cpu: bool) -> None:
    if not isinstance(dev, Device):
        raise TypeError(f"dev must be a Device, not {type(dev).__name__}")
    dev._require_open()
    dir_value = _direction(direction)
    dma_addr = require_range("dma_addr", dma_addr, 0, _U64_MAX)
    size = require_range("size", size, 1, _U64_MAX)
    if debug.mode_of(dev) != "off":
        debug.check_sync(dev, [(dma_addr, size)], dir_value, None, for_cpu)
