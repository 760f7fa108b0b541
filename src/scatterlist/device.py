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
from typing import Any, Callable, List, Optional, Union

from ._util import require_range
from .errors import BusyError, ClosedError, InvalidArgument, Reason, error_for
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

    def __init__(self, release: Callable[[], None], anchor: Optional[object] = None) -> None:
        self._release = release
        self._done = False
        self._lock = threading.Lock()
        # The resource itself, held weakly: once it is gone the entry can be dropped.
        self._anchor = None if anchor is None else weakref.ref(anchor)

    @property
    def stale(self) -> bool:
        return self._done or (self._anchor is not None and self._anchor() is None)

    def revoke(self) -> bool:
        """Release now unless already released; True if this call released it."""
        with self._lock:
            if self._done:
                return False
            self._done = True
        self._release()
        return True

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
                 max_mapping_size: int = _U64_MAX) -> None:
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
        self._engine = memory._engine
        self._memory = memory
        self._iommu = iommu
        self._name = str(name)
        self._handle: Any = self._engine.device_create(mem_handle, iommu_handle)
        self._closed = False
        self._lock = threading.RLock()
        self._devres: List[_Devres] = []
        self._mappings: "weakref.WeakSet[_Mapping]" = weakref.WeakSet()
        memory._dependents.add(self)
        if iommu is not None:
            iommu._devices.add(self)
        self.dma_mask = dma_mask
        self.max_segment_size = max_segment_size
        self.seg_boundary_mask = seg_boundary_mask
        self.max_mapping_size = max_mapping_size

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
    def bound(self) -> bool:
        return bool(self._engine.device_get(self._require_open(), "bound"))

    @property
    def live_mappings(self) -> int:
        """Tables mapped for this device and not yet unmapped."""
        return int(self._engine.device_get(self._require_open(), "live_mappings"))

    def _get(self, field: str) -> int:
        return int(self._engine.device_get(self._require_open(), field))

    @property
    def dma_mask(self) -> int:
        return self._get("dma_mask")

    @dma_mask.setter
    def dma_mask(self, value: int) -> None:
        self._engine.device_set(self._require_open(), "dma_mask",
                                _low_bits_mask("dma_mask", value, self._memory.page_size - 1))

    @property
    def max_segment_size(self) -> int:
        return self._get("max_segment_size")

    @max_segment_size.setter
    def max_segment_size(self, value: int) -> None:
        self._engine.device_set(self._require_open(), "max_segment_size",
                                require_range("max_segment_size", value, 1, 0xFFFFFFFF))

    @property
    def seg_boundary_mask(self) -> int:
        return self._get("seg_boundary_mask")

    @seg_boundary_mask.setter
    def seg_boundary_mask(self, value: int) -> None:
        self._engine.device_set(self._require_open(), "seg_boundary_mask",
                                _low_bits_mask("seg_boundary_mask", value,
                                               self._memory.page_size - 1))

    @property
    def max_mapping_size(self) -> int:
        return self._get("max_mapping_size")

    @max_mapping_size.setter
    def max_mapping_size(self, value: int) -> None:
        self._engine.device_set(self._require_open(), "max_mapping_size",
                                require_range("max_mapping_size", value, 0, _U64_MAX))

    # -- binding ------------------------------------------------------------------------
    def bind(self) -> None:
        """Bind the device (as a driver's probe does).  Harmless when already bound."""
        self._engine.device_set(self._require_open(), "bound", 1)

    def unbind(self) -> int:
        """Unbind: refuse new mappings, then release every resource registered against the
        device (owned SGTable mappings), newest first, each exactly once.  Returns how many
        were released."""
        handle = self._require_open()
        with self._lock:
            self._engine.device_set(handle, "bound", 0)
            pending, self._devres = self._devres, []
        return sum(1 for devres in reversed(pending) if devres.revoke())

    def _register(self, release: Callable[[], None],
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
    def dma_read(self, dma_addr: int, n: int) -> bytes:
        """The device reads ``n`` bytes at DMA address ``dma_addr``: through the IOMMU, or
        straight from memory without one.  ``IommuFault`` (nothing read) on a bad access."""
        handle = self._require_open()
        return self._engine.dma_read(handle, require_range("dma_addr", dma_addr, 0, _U64_MAX),
                                     require_range("n", n, 0, (1 << 40)))

    def dma_write(self, dma_addr: int, data: Any) -> None:
        """The device writes ``data`` at DMA address ``dma_addr``; ``IommuFault`` (nothing
        written) on a bad access."""
        handle = self._require_open()
        self._engine.dma_write(handle, require_range("dma_addr", dma_addr, 0, _U64_MAX),
                               memoryview(data).cast("B"))

    def dma_read_table(self, table: Union[RawTable, "Any"], n_bytes: Optional[int] = None
                       ) -> bytes:
        """The device reads the table's ``nents`` DMA segments in order into one buffer (the
        first ``n_bytes``, default all)."""
        handle = self._require_open()
        raw = _raw_of(table)
        table_handle = raw._require_open()
        if n_bytes is None:
            n_bytes = sum(raw.export_dma()[1::2])
        return self._engine.dma_read_sg(handle, table_handle,
                                        require_range("n_bytes", n_bytes, 0, 1 << 40))

    def dma_write_table(self, table: Union[RawTable, "Any"], data: Any) -> int:
        """The device writes ``data`` across the table's DMA segments in order; returns the
        byte count."""
        handle = self._require_open()
        raw = _raw_of(table)
        view = memoryview(data).cast("B")
        self._engine.dma_write_sg(handle, raw._require_open(), view)
        return len(view)

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        """Unbind and release the device.  Idempotent; ``BusyError`` while tables mapped by
        hand (``dma_map_sgtable``) are still mapped for it."""
        if self._closed:
            return
        with self._lock:
            self.unbind()
            if self._engine.device_get(self._handle, "live_mappings"):
                raise BusyError(f"Device.close: {self.live_mappings} table(s) are still mapped "
                                f"for {self._name!r}; dma_unmap_sgtable them first")
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


def _raw_of(table: Any) -> RawTable:
    if isinstance(table, RawTable):
        return table
    raw = getattr(table, "_raw_table", None)
    if callable(raw):
        result = raw()
        if isinstance(result, RawTable):
            return result
    raise TypeError(f"table must be a RawTable or SGTable, not {type(table).__name__}")


def _direction(direction: Any) -> int:
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


def dma_map_sgtable(dev: Device, table: RawTable, direction: DataDirection) -> None:
    """``dma_map_sgtable``: map the table's ``orig_nents`` entries for ``dev``; ``nents``
    becomes the DMA segment count (smaller than ``orig_nents`` where the IOMMU merged).
    Raises (``InvalidArgument``, ``OutOfMemory``, ``MappingError``, ``DeviceUnbound``) having
    mapped nothing."""
    dev_handle = _check_pair(dev, table)
    dir_value = _direction(direction)
    table._map(dev, dev_handle, dir_value)


def dma_unmap_sgtable(dev: Device, table: RawTable, direction: DataDirection) -> None:
    """``dma_unmap_sgtable``: release the table's mapping (the whole IOVA block) with the
    device it was mapped for."""
    dev_handle = _check_pair(dev, table)
    table._unmap(dev, dev_handle, _direction(direction))


def dma_sync_sgtable_for_cpu(dev: Device, table: RawTable, direction: DataDirection) -> None:
    """Hand the buffer to the CPU (memory here is coherent: this checks the call)."""
    dev_handle = _check_pair(dev, table)
    dev._engine.dma_sync(dev_handle, table._require_open(), _direction(direction), True)


def dma_sync_sgtable_for_device(dev: Device, table: RawTable, direction: DataDirection
                                ) -> None:
    """Hand the buffer back to the device (checks the call; no bytes move)."""
    dev_handle = _check_pair(dev, table)
    dev._engine.dma_sync(dev_handle, table._require_open(), _direction(direction), False)
