"""DMA-API debugging: the kernel's ``CONFIG_DMA_API_DEBUG`` checks, as warnings or exceptions.

Modes: ``"off"`` (nothing recorded, no cost), ``"warn"`` (a :class:`DmaApiWarning` through
:mod:`warnings`) and ``"raise"`` (:class:`DmaApiError`, and the call changes nothing).  Set the
global mode with :func:`set_mode` (or ``SCATTERLIST_DMA_DEBUG``); a device's own mode
(``Device(..., debug="raise")``) overrides it.

Every mapping made while debugging is on is recorded with its device, DMA address and size of
each segment, direction, the entry counts passed and mapped, and the Python traceback of the
map call.  Reports use the kernel's wording and name the rule broken:

- ``unmap-not-mapped``: free of an address never mapped, already unmapped, or mapped by
  another device ("device driver tries to free DMA memory it has not allocated");
- ``unmap-size``, ``unmap-direction``, ``unmap-entry-count`` (passing the mapped count where
  ``orig_nents`` is due: the classic bug);
- ``sync-not-mapped``, ``sync-outside``, ``sync-direction``, ``sync-read-only``,
  ``sync-write-only``, ``sync-entry-count``;
- ``map-segment-length`` (an entry longer than the device's ``max_segment_size``),
  ``map-segment-boundary`` (a segment across the device's boundary), ``map-overlap`` (a
  device-writable mapping of a cacheline already mapped so);
- ``unbind-pending``: mappings still live when the device unbinds, each with its traceback.
"""

from __future__ import annotations

import os
import threading
import traceback
import warnings
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Tuple

from .errors import DmaApiError, DmaApiWarning, InvalidArgument

if TYPE_CHECKING:
    from .device import Device

MODES = ("off", "warn", "raise")
L1_CACHE_SHIFT = 6  # the cacheline size dma-debug tracks overlaps by (64 bytes)
_DIRECTION_NAMES = {0: "DMA_BIDIRECTIONAL", 1: "DMA_TO_DEVICE", 2: "DMA_FROM_DEVICE",
                    3: "DMA_NONE"}


def _mode_from_env() -> str:
    mode = os.environ.get("SCATTERLIST_DMA_DEBUG", "off").strip().lower() or "off"
    if mode not in MODES:
        raise InvalidArgument(f"SCATTERLIST_DMA_DEBUG={mode!r} is not one of {MODES}")
    return mode


_lock = threading.RLock()
_global_mode = _mode_from_env()
_error_count = 0


def set_mode(mode: str) -> None:
    """Set the global mode: ``"off"``, ``"warn"`` or ``"raise"``."""
    global _global_mode
    _global_mode = check_mode(mode)


def get_mode() -> str:
    return _global_mode


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InvalidArgument(f"debug mode {mode!r} is not one of {MODES}")
    return mode


def error_count() -> int:
    """Reports made since the process started (or :func:`reset_error_count`)."""
    return _error_count


def reset_error_count() -> None:
    global _error_count
    with _lock:
        _error_count = 0


@dataclass
class DebugEntry:
    """One mapping as dma-debug records it (one record per map call; its segments are the
    kernel's per-segment entries)."""

    device_name: str
    segments: List[Tuple[int, int, int]]  # (dev_addr, size, paddr) per mapped segment
    direction: int
    sg_call_ents: int
    sg_mapped_ents: int
    traceback: str
    cachelines: List[int] = field(default_factory=list)

    def describe(self) -> str:
        addr, size, _ = self.segments[0]
        return (f"[device address={addr:#018x}] [size={size} bytes] [mapped with "
                f"{_DIRECTION_NAMES.get(self.direction, str(self.direction))}] [mapped as sg] "
                f"[entries={self.sg_call_ents} mapped={self.sg_mapped_ents}]")


class _DeviceRecords:
    """The live entries of one device, found by the DMA address of any of their segments."""

    def __init__(self) -> None:
        self.by_address: Dict[int, DebugEntry] = {}
        self.entries: List[DebugEntry] = []
        self.error_count = 0


_records: "weakref.WeakKeyDictionary[Device, _DeviceRecords]" = weakref.WeakKeyDictionary()
_active_cachelines: Dict[int, int] = {}


def mode_of(device: "Device") -> str:
    return device._debug_mode or _global_mode


def _records_of(device: "Device") -> _DeviceRecords:
    records = _records.get(device)
    if records is None:
        records = _records[device] = _DeviceRecords()
    return records


def report(device: "Device", rule: str, message: str, entry: Optional[DebugEntry] = None
           ) -> None:
    """Count and deliver one report in the device's mode."""
    global _error_count
    text = f"DMA-API: {device.name}: {message} [rule {rule}]"
    if entry is not None:
        text += "\nMapped at:\n" + entry.traceback
    with _lock:
        _error_count += 1
        _records_of(device).error_count += 1
    mode = mode_of(device)
    if mode == "raise":
        raise DmaApiError(text, rule=rule)
    if mode == "warn":
        warnings.warn(DmaApiWarning(text), stacklevel=4)


def _require_device(device: object) -> None:
    from .device import Device
    if not isinstance(device, Device):
        raise TypeError(f"device must be a Device, not {type(device).__name__}")


def device_error_count(device: "Device") -> int:
    _require_device(device)
    with _lock:
        records = _records.get(device)
        return 0 if records is None else records.error_count


def _caller_traceback() -> str:
    frames = traceback.extract_stack()[:-3]
    frames = [f for f in frames if "/scatterlist/" not in f.filename.replace("\\", "/")
              or "/tests/" in f.filename] or frames
    return "".join(traceback.format_list(frames[-8:]))


# -- hooks called by device.py ----------------------------------------------------------

def check_map(device: "Device", cpu_rows: List[Tuple[int, int, int]],
              dma_rows: List[Tuple[int, int]], page_size: int, direction: int,
              call_ents: int, mapped_ents: int) -> None:
    """After a successful map: the per-segment checks of debug_dma_map_sg.  Raises in raise
    mode (the caller then undoes the mapping)."""
    max_seg = device.max_segment_size
    boundary = device.seg_boundary_mask
    for index in range(mapped_ents):
        pfn, offset, length = cpu_rows[index]
        if length > max_seg:
            report(device, "map-segment-length",
                   f"mapping sg segment longer than device claims to support [len={length}] "
                   f"[max={max_seg}]")
        start, dma_len = dma_rows[index]
        end = start + dma_len - 1
        if (start ^ end) & ~boundary & ((1 << 64) - 1):
            report(device, "map-segment-boundary",
                   f"mapping sg segment across boundary [start={start:#018x}] "
                   f"[end={end:#018x}] [boundary={boundary:#018x}]")
    if direction != 1:  # DMA_TO_DEVICE mappings are not tracked for overlaps
        for index in range(mapped_ents):
            pfn, offset, _ = cpu_rows[index]
            line = (pfn * page_size + offset) >> L1_CACHE_SHIFT
            if _active_cachelines.get(line):
                report(device, "map-overlap",
                       "cacheline tracking EEXIST, overlapping mappings aren't supported "
                       f"[cacheline={line:#x}]")


def record_map(device: "Device", cpu_rows: List[Tuple[int, int, int]],
               dma_rows: List[Tuple[int, int]], page_size: int, direction: int,
               call_ents: int, mapped_ents: int) -> DebugEntry:
    segments = [(dma_rows[i][0], dma_rows[i][1], cpu_rows[i][0] * page_size + cpu_rows[i][1])
                for i in range(mapped_ents)]
    entry = DebugEntry(device.name, segments, direction, call_ents, mapped_ents,
                       _caller_traceback())
    with _lock:
        records = _records_of(device)
        records.entries.append(entry)
        for addr, _, _ in segments:
            records.by_address[addr] = entry
        if direction != 1:
            entry.cachelines = [paddr >> L1_CACHE_SHIFT for _, _, paddr in segments]
            for line in entry.cachelines:
                _active_cachelines[line] = _active_cachelines.get(line, 0) + 1
    return entry


def forget(device: "Device", entry: Optional[DebugEntry]) -> None:
    """The mapping is gone: drop its record."""
    if entry is None:
        return
    with _lock:
        records = _records_of(device)
        if entry in records.entries:
            records.entries.remove(entry)
        for addr, _, _ in entry.segments:
            if records.by_address.get(addr) is entry:
                del records.by_address[addr]
        for line in entry.cachelines:
            left = _active_cachelines.get(line, 0) - 1
            if left > 0:
                _active_cachelines[line] = left
            else:
                _active_cachelines.pop(line, None)


def _find(device: "Device", dev_addr: int) -> Optional[DebugEntry]:
    with _lock:
        records = _records.get(device)
        return None if records is None else records.by_address.get(dev_addr)


def check_unmap(device: "Device", dma_rows: List[Tuple[int, int]], direction: int,
                call_ents: int, others: Iterable["Device"]) -> Optional[DebugEntry]:
    """check_unmap for the first segment's entry; returns it when found.  ``others`` are the
    devices to blame when the address belongs to another one."""
    dev_addr, size = dma_rows[0] if dma_rows else (0, 0)
    entry = _find(device, dev_addr)
    if entry is None:
        owner = next((other.name for other in others if _find(other, dev_addr) is not None),
                     None)
        extra = f" (it is mapped by device {owner!r})" if owner else ""
        report(device, "unmap-not-mapped",
               "device driver tries to free DMA memory it has not allocated "
               f"[device address={dev_addr:#018x}] [size={size} bytes]{extra}")
        return None
    for index in range(min(entry.sg_mapped_ents, len(dma_rows))):
        map_addr, map_size, _ = entry.segments[index]
        unmap_addr, unmap_size = dma_rows[index]
        if unmap_size != map_size:
            report(device, "unmap-size",
                   f"device driver frees DMA memory with different size [device address="
                   f"{unmap_addr:#018x}] [map size={map_size} bytes] [unmap size={unmap_size} "
                   f"bytes]", entry)
            break
    if call_ents != entry.sg_call_ents:
        report(device, "unmap-entry-count",
               "device driver frees DMA sg list with different entry count [map count="
               f"{entry.sg_call_ents}] [unmap count={call_ents}]", entry)
    if direction != entry.direction:
        report(device, "unmap-direction",
               f"device driver frees DMA memory with different direction [device address="
               f"{dev_addr:#018x}] [size={size} bytes] [mapped with "
               f"{_DIRECTION_NAMES[entry.direction]}] [unmapped with "
               f"{_DIRECTION_NAMES.get(direction, str(direction))}]", entry)
    return entry


def check_sync(device: "Device", ranges: List[Tuple[int, int]], direction: int,
               call_ents: Optional[int], to_cpu: bool) -> None:
    """check_sync for each range (dev_addr, size); call_ents is None for single syncs."""
    for dev_addr, size in ranges:
        entry, seg_size, seg_addr = None, 0, 0
        with _lock:
            records = _records.get(device)
            for candidate in (records.entries if records else []):
                for addr, length, _ in candidate.segments:
                    if addr <= dev_addr < addr + max(length, 1):
                        entry, seg_size, seg_addr = candidate, length, addr
                        break
                if entry:
                    break
        if entry is None:
            report(device, "sync-not-mapped",
                   "device driver tries to sync DMA memory it has not allocated "
                   f"[device address={dev_addr:#018x}] [size={size} bytes]")
            continue
        if dev_addr + size > seg_addr + seg_size:
            report(device, "sync-outside",
                   "device driver syncs DMA memory outside allocated range [device address="
                   f"{dev_addr:#018x}] [allocation size={seg_size} bytes] [sync offset+size="
                   f"{dev_addr - seg_addr + size}]", entry)
        if entry.direction != 0:
            if direction != entry.direction:
                report(device, "sync-direction",
                       "device driver syncs DMA memory with different direction [device "
                       f"address={dev_addr:#018x}] [size={size} bytes] [mapped with "
                       f"{_DIRECTION_NAMES[entry.direction]}] [synced with "
                       f"{_DIRECTION_NAMES.get(direction, str(direction))}]", entry)
            if to_cpu and entry.direction != 2 and direction != 1:
                report(device, "sync-read-only",
                       "device driver syncs device read-only DMA memory for cpu [device "
                       f"address={dev_addr:#018x}] [size={size} bytes]", entry)
            if not to_cpu and entry.direction != 1 and direction != 2:
                report(device, "sync-write-only",
                       "device driver syncs device write-only DMA memory to device [device "
                       f"address={dev_addr:#018x}] [size={size} bytes]", entry)
        if call_ents is not None and call_ents != entry.sg_call_ents:
            report(device, "sync-entry-count",
                   "device driver syncs DMA sg list with different entry count [map count="
                   f"{entry.sg_call_ents}] [sync count={call_ents}]", entry)
        if call_ents is not None:
            break  # one check per entry count is enough for an sg sync


def check_unbind(device: "Device") -> None:
    """Mappings still live when the device unbinds: one report listing each with its
    traceback."""
    with _lock:
        records = _records.get(device)
        pending = list(records.entries) if records else []
    if not pending:
        return
    details = "\n".join(f"  {entry.describe()}\n  Mapped at:\n" +
                        "".join("    " + line + "\n" for line in entry.traceback.splitlines())
                        for entry in pending)
    report(device, "unbind-pending",
           f"device driver has pending DMA allocations while released from device "
           f"[count={len(pending)}]\n{details}")


def dump(device: Optional["Device"] = None) -> List[DebugEntry]:
    """The live recorded mappings (of one device, or of all)."""
    if device is not None:
        _require_device(device)
    with _lock:
        if device is not None:
            records = _records.get(device)
            return list(records.entries) if records else []
        return [entry for records in _records.values() for entry in records.entries]


__all__ = ["MODES", "DebugEntry", "DmaApiError", "DmaApiWarning", "set_mode", "get_mode",
           "error_count", "reset_error_count", "dump", "device_error_count"]
