"""The DMA API on tables: ``dma_map_sgtable`` and friends, as a driver calls them.

Each call converts its arguments, enters the device and then the table (so a ``close()`` on
another thread waits for it, and the table's calls run one at a time), makes its state change
through the engine, runs the dma-debug checks, and delivers their findings only after leaving
both: in ``raise`` mode a refused unmap or sync is not done and a refused map is undone
before the error (see :mod:`scatterlist.debug`); in ``warn`` mode the state is what it would be
with warnings off, even when a warning filter turns the warning into an exception.
"""

from __future__ import annotations

import errno
from typing import Any, List, Optional, Tuple

from . import debug as dma_debug
from ._util import require_range
from .constants import U32_MAX, U64_MAX, DataDirection
from .device import Device, Mapping
from .errors import DmaApiError, InvalidArgument, Reason, error_for
from .table import RawTable


def direction_value(direction: Any) -> int:
    """``direction`` as the int of a DataDirection that map, unmap and sync accept."""
    if isinstance(direction, bool) or not isinstance(direction, int):
        raise TypeError(f"direction must be a DataDirection, not {type(direction).__name__}")
    try:
        value = DataDirection(direction)
    except ValueError:
        raise InvalidArgument(f"direction={direction!r} is not a DataDirection") from None
    if value is DataDirection.NONE:
        raise error_for(errno.EINVAL, Reason.DMA_DIRECTION, value=int(value))
    return int(value)


def _check_pair(dev: Device, table: RawTable) -> None:
    if not isinstance(dev, Device):
        raise TypeError(f"dev must be a Device, not {type(dev).__name__}")
    if not isinstance(table, RawTable):
        raise TypeError(f"table must be a RawTable, not {type(table).__name__}")
    if table.engine != dev.engine:
        raise InvalidArgument(
            f"the table belongs to the {table.engine} engine, the device to the {dev.engine} engine"
        )


def _cpu_rows(flat: Any) -> List[Tuple[int, int, int]]:
    return [(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]


def _dma_rows(flat: Any) -> List[Tuple[int, int]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def map_table(
    dev: Device, table: RawTable, direction: int, nents: Optional[int], *, devres: bool
) -> Tuple[Mapping, int, List[dma_debug.Finding], str]:
    """Map (``dma_map_sgtable``, or ``dma_map_sg`` with ``nents``) and record the mapping;
    ``devres`` registers it for revocation at unbind (an owned SGTable's).  Returns the mapping,
    the DMA segment count, the dma-debug findings, which the caller delivers (in ``raise``
    mode the mapping was undone already), and the debug mode it decided by (read once: the
    delivery must follow the same one).  Arguments are converted already."""
    engine = dev._engine
    findings: List[dma_debug.Finding] = []
    mode = dma_debug.mode_of(dev)
    debugging = mode != "off"
    iommu = dev._iommu
    # IOMMU, device, then table (the fixed order).
    with dev._state.in_iommu(), dev._life as dev_handle, table._life as table_handle:
        call_ents = engine.table_counts(table_handle).orig_nents if nents is None else nents
        count = engine.dma_map(dev_handle, table_handle, direction, nents)
        state = table._state
        mapping: Optional[Mapping] = None
        try:
            mapping = Mapping(dev, state, direction, call_ents, devres)
            state.mapping = mapping
            state.changed("it was DMA-mapped")
            dev._state.register(mapping)  # DeviceUnbound: an owned table's device was unbound
            if debugging:
                cpu = _cpu_rows(engine.table_export_cpu(table_handle, call_ents))
                dma = _dma_rows(engine.table_export_dma(table_handle, count))
                limits = engine.device_limits(dev_handle)
                findings = dma_debug.check_map(
                    cpu,
                    dma,
                    table.page_size,
                    direction,
                    count,
                    max_segment_size=limits.max_segment_size,
                    seg_boundary_mask=limits.seg_boundary_mask,
                    granule=None if iommu is None else iommu._granule,
                )
                if findings and mode == "raise":
                    mapping.end(table_handle)  # refused: nothing stays mapped or recorded
                else:
                    mapping.debug_entry = dma_debug.record_map(
                        dev, cpu, dma, table.page_size, direction, call_ents, count, id(dev._memory)
                    )
        except BaseException:
            # Whatever failed after the engine mapped (an unbind, the host out of memory, a
            # KeyboardInterrupt): the map is undone, so the caller gets a table as it was.
            if mapping is not None:
                mapping.end(table_handle)
            else:
                with dev._state.unmapping():
                    engine.dma_unmap(dev_handle, table_handle, direction, call_ents)
                state.mapping = None
                state.changed("its DMA map was undone")
            raise
    return mapping, count, findings, mode


def _unmap(dev: Device, table: RawTable, direction: Any, nents: Optional[int]) -> None:
    _check_pair(dev, table)
    dir_value = direction_value(direction)
    engine = dev._engine
    findings: List[dma_debug.Finding] = []
    mode = dma_debug.mode_of(dev)  # read once: the decision and the delivery follow it
    with dev._state.in_iommu(), dev._life as dev_handle, table._life as table_handle:
        mapping = table._state.mapping
        tracked = mapping is None or (
            isinstance(mapping, Mapping) and mapping.debug_entry is not None
        )
        if mode != "off" and tracked:
            orig_nents = engine.table_counts(table_handle).orig_nents
            call_ents = orig_nents if nents is None else nents
            count = max(1, min(call_ents, orig_nents))
            findings = dma_debug.check_unmap(
                dev, _dma_rows(engine.table_export_dma(table_handle, count)), dir_value, call_ents
            )
        if not (findings and mode == "raise"):
            # The engine checks the device, direction and count; then the record goes.
            with dev._state.unmapping():
                engine.dma_unmap(dev_handle, table_handle, dir_value, nents)
            if isinstance(mapping, Mapping) and mapping.live:
                mapping.finish()
            else:
                table._state.changed("it was DMA-unmapped")
    dma_debug.deliver(dev, findings, stacklevel=3, mode=mode)


def _sync(
    dev: Device, table: RawTable, direction: Any, for_cpu: bool, nents: Optional[int]
) -> None:
    _check_pair(dev, table)
    dir_value = direction_value(direction)
    engine = dev._engine
    findings: List[dma_debug.Finding] = []
    mode = dma_debug.mode_of(dev)  # read once (see _unmap)
    with dev._life as dev_handle, table._life as table_handle:
        mapping = table._state.mapping
        entry = mapping.debug_entry if isinstance(mapping, Mapping) else None
        tracked = mapping is None or entry is not None
        if mode != "off" and tracked:
            orig_nents = engine.table_counts(table_handle).orig_nents
            call_ents = orig_nents if nents is None else nents
            count = entry.sg_mapped_ents if entry is not None else 1
            rows = engine.table_export_dma(table_handle, min(count, orig_nents))
            findings = dma_debug.check_sync(dev, _dma_rows(rows), dir_value, call_ents, for_cpu)
        if not (findings and mode == "raise"):
            engine.dma_sync(dev_handle, table_handle, dir_value, for_cpu, nents)
    dma_debug.deliver(dev, findings, stacklevel=3, mode=mode)


def _nents(nents: int) -> int:
    return require_range("nents", nents, 0, U32_MAX)


def dma_map_sgtable(dev: Device, table: RawTable, direction: DataDirection) -> None:
    """``dma_map_sgtable``: map the table's ``orig_nents`` entries for ``dev``; ``nents``
    becomes the DMA segment count (smaller than ``orig_nents`` where the IOMMU merged).
    Raises (``InvalidArgument``, ``OutOfMemory``, ``MappingError``, ``DeviceUnbound``) having
    mapped nothing."""
    _check_pair(dev, table)
    _, _, findings, mode = map_table(dev, table, direction_value(direction), None, devres=False)
    dma_debug.deliver(dev, findings, stacklevel=2, mode=mode)


def dma_unmap_sgtable(dev: Device, table: RawTable, direction: DataDirection) -> None:
    """``dma_unmap_sgtable``: release the table's mapping (the whole IOVA block) with the
    device it was mapped for.  The table's DMA view is cleared: ``nents`` is ``orig_nents``
    again and every DMA field reads ``DMA_MAPPING_ERROR`` / 0."""
    _unmap(dev, table, direction, None)


def dma_sync_sgtable_for_cpu(dev: Device, table: RawTable, direction: DataDirection) -> None:
    """Hand the buffer to the CPU (memory here is coherent: this checks the call)."""
    _sync(dev, table, direction, True, None)


def dma_sync_sgtable_for_device(dev: Device, table: RawTable, direction: DataDirection) -> None:
    """Hand the buffer back to the device (checks the call; no bytes move)."""
    _sync(dev, table, direction, False, None)


def dma_map_sg(dev: Device, table: RawTable, nents: int, direction: DataDirection) -> int:
    """``dma_map_sg``: map the first ``nents`` entries and return the DMA segment count.
    Unlike ``dma_map_sgtable`` it does not store the count in the table; pass the same
    ``nents`` (not the returned count) to :func:`dma_unmap_sg` and the syncs."""
    _check_pair(dev, table)
    count_in = _nents(nents)
    _, count, findings, mode = map_table(
        dev, table, direction_value(direction), count_in, devres=False
    )
    dma_debug.deliver(dev, findings, stacklevel=2, mode=mode)
    return count


def dma_unmap_sg(dev: Device, table: RawTable, nents: int, direction: DataDirection) -> None:
    """``dma_unmap_sg``: ``nents`` must be the count passed to ``dma_map_sg``; dma-debug
    reports the classic bug of passing the mapped count instead."""
    _unmap(dev, table, direction, _nents(nents))


def dma_sync_sg_for_cpu(dev: Device, table: RawTable, nents: int, direction: DataDirection) -> None:
    _sync(dev, table, direction, True, _nents(nents))


def dma_sync_sg_for_device(
    dev: Device, table: RawTable, nents: int, direction: DataDirection
) -> None:
    _sync(dev, table, direction, False, _nents(nents))


def dma_sync_single_for_cpu(
    dev: Device, dma_addr: int, size: int, direction: DataDirection
) -> None:
    """Sync part of a mapping by DMA address: dma-debug checks it lies inside one mapping,
    in the mapped direction."""
    _sync_single(dev, dma_addr, size, direction, True)


def dma_sync_single_for_device(
    dev: Device, dma_addr: int, size: int, direction: DataDirection
) -> None:
    _sync_single(dev, dma_addr, size, direction, False)


def _sync_single(dev: Device, dma_addr: int, size: int, direction: Any, for_cpu: bool) -> None:
    if not isinstance(dev, Device):
        raise TypeError(f"dev must be a Device, not {type(dev).__name__}")
    dir_value = direction_value(direction)
    dma_addr = require_range("dma_addr", dma_addr, 0, U64_MAX)
    size = require_range("size", size, 1, U64_MAX)
    mode = dma_debug.mode_of(dev)
    with dev._life:
        findings = (
            dma_debug.check_sync(dev, [(dma_addr, size)], dir_value, None, for_cpu)
            if mode != "off"
            else []
        )
    dma_debug.deliver(dev, findings, stacklevel=3, mode=mode)


__all__ = [
    "dma_map_sgtable",
    "dma_unmap_sgtable",
    "dma_sync_sgtable_for_cpu",
    "dma_sync_sgtable_for_device",
    "dma_map_sg",
    "dma_unmap_sg",
    "dma_sync_sg_for_cpu",
    "dma_sync_sg_for_device",
    "dma_sync_single_for_cpu",
    "dma_sync_single_for_device",
    "map_table",
    "direction_value",
    "DmaApiError",
]
