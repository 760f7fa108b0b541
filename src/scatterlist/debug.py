"""DMA-API debugging: the kernel's ``CONFIG_DMA_API_DEBUG`` checks, as warnings or exceptions.

Modes: ``"off"`` (nothing recorded, no cost), ``"warn"`` (a :class:`DmaApiWarning` through
:mod:`warnings`) and ``"raise"`` (:class:`DmaApiError`).  In ``raise`` mode a refused unmap or
sync is not done, and a refused map is undone before the error is raised: nothing stays mapped
or recorded, but the map did happen and was unmapped (the IOVA allocator's range cache, a
fault-injection countdown and the table's DMA fields moved as for any map and unmap, and
entries read before go stale).  Set the
global mode with :func:`set_mode` (or ``SCATTERLIST_DMA_DEBUG``); a device's own mode
(``Device(..., debug="raise")``) overrides it.  In ``warn`` mode the state a call leaves is the
same whatever the warning filters do: a warning turned into an exception (``-W error``) is
raised after the call has mapped or unmapped, as it would have with warnings off.

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
- ``map-padding-exposure``: iommu-dma pads the entry before a segment that would cross the
  device's boundary, so the IOMMU maps physical memory after that entry, outside the table:
  the report names the exposed physical range (the kernel does this; it does not report it);
- ``unbind-pending``: mappings still live when the device unbinds, each with its traceback;
- ``leak``: a table dropped while still mapped (garbage-collected without unmap or close);
- ``free-mapped``: pages freed (``Pages.close``, ``SGTable.close`` or a safety net) while a
  recorded mapping still maps them: once the allocator hands them to a new owner, the device
  would reach the new owner's data.  In ``raise`` mode the close is refused; a safety net
  keeps the pages allocated rather than free them.

This module knows devices only through :class:`DebugTarget`: a name and a debug mode.  The
DMA layer (``scatterlist.dma``) runs the checks, makes its state change, then delivers the
findings with :func:`deliver`, outside every lock.
"""

from __future__ import annotations

import bisect
import os
import threading
import traceback
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple

from ._util import in_package, reinit_after_fork
from .constants import U64_MAX, DataDirection
from .errors import DmaApiError, DmaApiWarning, InvalidArgument

MODES = ("off", "warn", "raise")
L1_CACHE_SHIFT = 6  # the cacheline size dma-debug tracks overlaps by (64 bytes)
_DIRECTION_NAMES = {0: "DMA_BIDIRECTIONAL", 1: "DMA_TO_DEVICE", 2: "DMA_FROM_DEVICE", 3: "DMA_NONE"}


class DebugTarget(Protocol):
    """What the debug layer needs of a device."""

    @property
    def name(self) -> str: ...

    @property
    def debug(self) -> Optional[str]:
        """The device's own mode, or None to follow the global one."""


def _mode_from_env() -> str:
    mode = os.environ.get("SCATTERLIST_DMA_DEBUG", "off").strip().lower() or "off"
    if mode not in MODES:
        raise InvalidArgument(f"SCATTERLIST_DMA_DEBUG={mode!r} is not one of {MODES}")
    return mode


class _Locked:
    """The module's lock, re-created in a forked child.  ``with _guard:`` takes it inside the
    package, so that a safety net the collector runs meanwhile (its teardown forgets a record;
    its report runs user code) is put off until the lock is free."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        reinit_after_fork(self)

    def _reinit_after_fork(self) -> None:
        self.lock = threading.RLock()

    def __enter__(self) -> None:
        _INSIDE.__enter__()
        self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.lock.release()
        _INSIDE.__exit__()


_INSIDE = in_package()


_guard = _Locked()
_global_mode = _mode_from_env()
_error_count = 0


def set_mode(mode: str) -> None:
    """Set the global mode: ``"off"``, ``"warn"`` or ``"raise"``."""
    global _global_mode
    _global_mode = check_mode(mode)


def get_mode() -> str:
    return _global_mode


def check_mode(mode: str) -> str:
    """``mode`` as one of the MODES strings themselves (not a caller's str subclass)."""
    if not isinstance(mode, str):
        raise InvalidArgument(f"debug mode {mode!r} is not one of {MODES}")
    for known in MODES:
        if str.__eq__(known, mode) is True:
            return known
    raise InvalidArgument(f"debug mode {str.__str__(mode)!r} is not one of {MODES}")


def _own_field(target: DebugTarget, field: str, public: str) -> Any:
    """A Device's own field, not its property: this runs inside calls, where a subclass's
    property (user code) must not run.  Another DebugTarget is asked for ``public``."""
    try:
        return object.__getattribute__(target, field)
    except AttributeError:
        return getattr(target, public)


def mode_of(target: DebugTarget) -> str:
    return _own_field(target, "_debug_mode", "debug") or _global_mode


def name_of(target: DebugTarget) -> str:
    return str(_own_field(target, "_name", "name"))


def error_count() -> int:
    """Reports made since the process started (or :func:`reset_error_count`)."""
    return _error_count


def reset_error_count() -> None:
    global _error_count
    with _guard:
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
    memory_key: int = 0  # the memory the mapped pages are in (id of the PhysicalMemory)
    phys_ranges: List[Tuple[int, int]] = field(default_factory=list)  # [start, end) mapped

    def describe(self) -> str:
        addr, size, _ = self.segments[0]
        return (
            f"[device address={addr:#018x}] [size={size} bytes] [mapped with "
            f"{_DIRECTION_NAMES.get(self.direction, str(self.direction))}] [mapped as sg] "
            f"[entries={self.sg_call_ents} mapped={self.sg_mapped_ents}]"
        )


@dataclass(frozen=True)
class Finding:
    """One misuse found by a check, to be delivered with :func:`deliver`."""

    rule: str
    message: str
    entry: Optional[DebugEntry] = None  # the mapping it concerns, for its traceback


class _DeviceRecords:
    """The live entries of one device, found by the DMA address of any of their segments
    (several at one address: without an IOMMU, two tables mapping the same pages share their
    DMA addresses; the newest is found first, and the others once it goes)."""

    def __init__(self) -> None:
        self.by_address: Dict[int, List[DebugEntry]] = {}
        self.entries: List[DebugEntry] = []
        self.error_count = 0


class _ByDevice:
    """Records per device, keyed by identity (a device subclass's ``__hash__`` or ``__eq__``
    is user code, and these lookups run inside calls) and held weakly."""

    def __init__(self) -> None:
        self._by_id: Dict[int, Tuple["weakref.ref[Any]", _DeviceRecords]] = {}

    def get(self, target: DebugTarget) -> Optional[_DeviceRecords]:
        found = self._by_id.get(id(target))
        return found[1] if found is not None and found[0]() is target else None

    def add(self, target: DebugTarget) -> _DeviceRecords:
        key = id(target)
        records = _DeviceRecords()

        def forget(ref: "weakref.ref[Any]", key: int = key) -> None:
            found = self._by_id.get(key)
            if found is not None and found[0] is ref:
                del self._by_id[key]

        self._by_id[key] = (weakref.ref(target, forget), records)
        return records

    def items(self) -> List[Tuple[Any, _DeviceRecords]]:
        live = [(ref(), records) for ref, records in list(self._by_id.values())]
        return [(target, records) for target, records in live if target is not None]


_records = _ByDevice()
_active_cachelines: Dict[int, int] = {}


def _records_of(target: DebugTarget) -> _DeviceRecords:
    records = _records.get(target)
    if records is None:
        records = _records.add(target)
    return records


def deliver(
    target: DebugTarget,
    findings: Sequence[Finding],
    stacklevel: int = 2,
    mode: Optional[str] = None,
) -> None:
    """Count the findings and deliver them in the target's mode: DmaApiError for the first
    in ``raise`` mode, one DmaApiWarning each in ``warn`` mode.  Call it once the state change
    is made and no lock is held: a warning filter may run any code, or raise."""
    global _error_count
    if not findings:
        return
    with _guard:
        _error_count += len(findings)
        _records_of(target).error_count += len(findings)
    if mode is None:
        mode = mode_of(target)  # else: the mode the caller decided by (read once)
    texts = []
    for finding in findings:
        text = f"DMA-API: {name_of(target)}: {finding.message} [rule {finding.rule}]"
        if finding.entry is not None:
            text += "\nMapped at:\n" + finding.entry.traceback
        texts.append((finding.rule, text))
    if mode == "raise":
        rule, text = texts[0]
        raise DmaApiError(text, rule=rule)
    if mode == "warn":
        for _, text in texts:
            warnings.warn(DmaApiWarning(text), stacklevel=stacklevel + 1)


def _require_target(device: object) -> None:
    if not (isinstance(getattr(device, "name", None), str) and hasattr(device, "debug")):
        raise TypeError(f"device must be a Device, not {type(device).__name__}")


def device_error_count(device: DebugTarget) -> int:
    """Reports made against one device."""
    _require_target(device)
    with _guard:
        records = _records.get(device)
        return 0 if records is None else records.error_count


def _caller_traceback() -> str:
    frames = traceback.extract_stack()[:-3]
    frames = [
        f
        for f in frames
        if "/scatterlist/" not in f.filename.replace("\\", "/") or "/tests/" in f.filename
    ] or frames
    return "".join(traceback.format_list(frames[-8:]))


# -- checks (called by scatterlist.dma) -------------------------------------------------------


def _padding_exposures(
    cpu_rows: Sequence[Tuple[int, int, int]], page_size: int, granule: int, seg_boundary_mask: int
) -> List[Tuple[int, int, int]]:
    """Where iommu-dma's layout pads the entry before a segment that would cross the
    boundary: ``(entry, phys, n_bytes)`` per padded entry, the physical range the IOMMU maps
    after that entry's own granules (outside the table)."""
    granule_mask = granule - 1
    exposures = []
    iova_len = 0
    prev: Optional[Tuple[int, int]] = None  # (index, physical end of its granules)
    for index, (pfn, offset, length) in enumerate(cpu_rows):
        in_granule = offset & granule_mask
        s_length = (length + in_granule + granule_mask) & ~granule_mask
        pad_len = (seg_boundary_mask - iova_len + 1) & seg_boundary_mask
        if pad_len and pad_len < s_length - 1 and prev is not None:
            exposures.append((prev[0], prev[1], pad_len))
            iova_len += pad_len
        iova_len += s_length
        phys_start = pfn * page_size + offset - in_granule
        prev = (index, phys_start + s_length)
    return exposures


def check_map(
    cpu_rows: Sequence[Tuple[int, int, int]],
    dma_rows: Sequence[Tuple[int, int]],
    page_size: int,
    direction: int,
    mapped_ents: int,
    *,
    max_segment_size: int,
    seg_boundary_mask: int,
    granule: Optional[int],
) -> List[Finding]:
    """After a successful map: the per-segment checks of debug_dma_map_sg, and the padding
    exposure of an IOMMU mapping (``granule`` None for direct mapping)."""
    findings = []
    for index in range(mapped_ents):
        length = cpu_rows[index][2]
        if length > max_segment_size:
            findings.append(
                Finding(
                    "map-segment-length",
                    f"mapping sg segment longer than device claims to support [len={length}] "
                    f"[max={max_segment_size}]",
                )
            )
        start, dma_len = dma_rows[index]
        end = start + dma_len - 1
        if (start ^ end) & ~seg_boundary_mask & U64_MAX:
            findings.append(
                Finding(
                    "map-segment-boundary",
                    f"mapping sg segment across boundary [start={start:#018x}] [end={end:#018x}] "
                    f"[boundary={seg_boundary_mask:#018x}]",
                )
            )
    if granule is not None:
        for index, phys, n_bytes in _padding_exposures(
            cpu_rows, page_size, granule, seg_boundary_mask
        ):
            findings.append(
                Finding(
                    "map-padding-exposure",
                    f"boundary padding after sg entry {index} maps physical memory outside the "
                    f"table [phys={phys:#x}-{phys + n_bytes - 1:#x}] [size={n_bytes} bytes] "
                    f"[boundary={seg_boundary_mask:#018x}]",
                )
            )
    if direction != DataDirection.TO_DEVICE:  # TO_DEVICE mappings are not tracked for overlaps
        with _guard:
            for index in range(mapped_ents):
                pfn, offset, _ = cpu_rows[index]
                line = (pfn * page_size + offset) >> L1_CACHE_SHIFT
                if _active_cachelines.get(line):
                    findings.append(
                        Finding(
                            "map-overlap",
                            "cacheline tracking EEXIST, overlapping mappings aren't supported "
                            f"[cacheline={line:#x}]",
                        )
                    )
    return findings


def record_map(
    target: DebugTarget,
    cpu_rows: Sequence[Tuple[int, int, int]],
    dma_rows: Sequence[Tuple[int, int]],
    page_size: int,
    direction: int,
    call_ents: int,
    mapped_ents: int,
    memory_key: int = 0,
) -> DebugEntry:
    segments = [
        (dma_rows[i][0], dma_rows[i][1], cpu_rows[i][0] * page_size + cpu_rows[i][1])
        for i in range(mapped_ents)
    ]
    phys_ranges: List[Tuple[int, int]] = []
    for pfn, offset, length in cpu_rows:  # the CPU entries mapped, merged where they touch
        start = pfn * page_size + offset
        if phys_ranges and phys_ranges[-1][1] == start:
            phys_ranges[-1] = (phys_ranges[-1][0], start + length)
        else:
            phys_ranges.append((start, start + length))
    entry = DebugEntry(
        name_of(target),
        segments,
        direction,
        call_ents,
        mapped_ents,
        _caller_traceback(),
        memory_key=memory_key,
        phys_ranges=phys_ranges,
    )
    with _guard:
        records = _records_of(target)
        records.entries.append(entry)
        for addr, _, _ in segments:
            records.by_address.setdefault(addr, []).append(entry)
        if direction != DataDirection.TO_DEVICE:
            entry.cachelines = [paddr >> L1_CACHE_SHIFT for _, _, paddr in segments]
            for line in entry.cachelines:
                _active_cachelines[line] = _active_cachelines.get(line, 0) + 1
    return entry


def forget(target: DebugTarget, entry: Optional[DebugEntry]) -> None:
    """The mapping is gone: drop its record."""
    if entry is None:
        return
    with _guard:
        records = _records_of(target)
        _remove_identical(records.entries, entry)  # (equal records may be distinct maps)
        for addr, _, _ in entry.segments:
            sharing = records.by_address.get(addr)
            if sharing is not None:
                _remove_identical(sharing, entry)
                if not sharing:
                    del records.by_address[addr]
        for line in entry.cachelines:
            left = _active_cachelines.get(line, 0) - 1
            if left > 0:
                _active_cachelines[line] = left
            else:
                _active_cachelines.pop(line, None)


def _remove_identical(entries: List[DebugEntry], entry: DebugEntry) -> None:
    for index in range(len(entries) - 1, -1, -1):
        if entries[index] is entry:
            del entries[index]
            return


def _find(target: DebugTarget, dev_addr: int) -> Optional[DebugEntry]:
    with _guard:
        records = _records.get(target)
        sharing = None if records is None else records.by_address.get(dev_addr)
        return sharing[-1] if sharing else None


def _owner_of(dev_addr: int, besides: DebugTarget) -> Optional[str]:
    with _guard:
        targets = [target for target, _ in _records.items() if target is not besides]
    return next((name_of(t) for t in targets if _find(t, dev_addr) is not None), None)


def check_unmap(
    target: DebugTarget, dma_rows: Sequence[Tuple[int, int]], direction: int, call_ents: int
) -> List[Finding]:
    """check_unmap for the first segment's entry."""
    dev_addr, size = dma_rows[0] if dma_rows else (0, 0)
    entry = _find(target, dev_addr)
    if entry is None:
        owner = _owner_of(dev_addr, target)
        extra = f" (it is mapped by device {owner!r})" if owner else ""
        return [
            Finding(
                "unmap-not-mapped",
                "device driver tries to free DMA memory it has not allocated "
                f"[device address={dev_addr:#018x}] [size={size} bytes]{extra}",
            )
        ]
    findings = []
    for index in range(min(entry.sg_mapped_ents, len(dma_rows))):
        _, map_size, _ = entry.segments[index]
        unmap_addr, unmap_size = dma_rows[index]
        if unmap_size != map_size:
            findings.append(
                Finding(
                    "unmap-size",
                    f"device driver frees DMA memory with different size [device address="
                    f"{unmap_addr:#018x}] [map size={map_size} bytes] [unmap size={unmap_size} "
                    f"bytes]",
                    entry,
                )
            )
            break
    if call_ents != entry.sg_call_ents:
        findings.append(
            Finding(
                "unmap-entry-count",
                "device driver frees DMA sg list with different entry count [map count="
                f"{entry.sg_call_ents}] [unmap count={call_ents}]",
                entry,
            )
        )
    if direction != entry.direction:
        findings.append(
            Finding(
                "unmap-direction",
                f"device driver frees DMA memory with different direction [device address="
                f"{dev_addr:#018x}] [size={size} bytes] [mapped with "
                f"{_DIRECTION_NAMES[entry.direction]}] [unmapped with "
                f"{_DIRECTION_NAMES.get(direction, str(direction))}]",
                entry,
            )
        )
    return findings


def check_sync(
    target: DebugTarget,
    ranges: Iterable[Tuple[int, int]],
    direction: int,
    call_ents: Optional[int],
    for_cpu: bool,
) -> List[Finding]:
    """check_sync for each range (dev_addr, size); call_ents is None for single syncs."""
    findings = []
    for dev_addr, size in ranges:
        entry, seg_size, seg_addr = None, 0, 0
        with _guard:
            records = _records.get(target)
            for candidate in records.entries if records else []:
                for addr, length, _ in candidate.segments:
                    if addr <= dev_addr < addr + max(length, 1):
                        entry, seg_size, seg_addr = candidate, length, addr
                        break
                if entry:
                    break
        if entry is None:
            findings.append(
                Finding(
                    "sync-not-mapped",
                    "device driver tries to sync DMA memory it has not allocated "
                    f"[device address={dev_addr:#018x}] [size={size} bytes]",
                )
            )
            continue
        if dev_addr + size > seg_addr + seg_size:
            findings.append(
                Finding(
                    "sync-outside",
                    "device driver syncs DMA memory outside allocated range [device address="
                    f"{dev_addr:#018x}] [allocation size={seg_size} bytes] [sync offset+size="
                    f"{dev_addr - seg_addr + size}]",
                    entry,
                )
            )
        if entry.direction != DataDirection.BIDIRECTIONAL:
            if direction != entry.direction:
                findings.append(
                    Finding(
                        "sync-direction",
                        "device driver syncs DMA memory with different direction [device "
                        f"address={dev_addr:#018x}] [size={size} bytes] [mapped with "
                        f"{_DIRECTION_NAMES[entry.direction]}] [synced with "
                        f"{_DIRECTION_NAMES.get(direction, str(direction))}]",
                        entry,
                    )
                )
            if (
                for_cpu
                and entry.direction != DataDirection.FROM_DEVICE
                and direction != DataDirection.TO_DEVICE
            ):
                findings.append(
                    Finding(
                        "sync-read-only",
                        "device driver syncs device read-only DMA memory for cpu [device "
                        f"address={dev_addr:#018x}] [size={size} bytes]",
                        entry,
                    )
                )
            if (
                not for_cpu
                and entry.direction != DataDirection.TO_DEVICE
                and direction != DataDirection.FROM_DEVICE
            ):
                findings.append(
                    Finding(
                        "sync-write-only",
                        "device driver syncs device write-only DMA memory to device [device "
                        f"address={dev_addr:#018x}] [size={size} bytes]",
                        entry,
                    )
                )
        if call_ents is not None and call_ents != entry.sg_call_ents:
            findings.append(
                Finding(
                    "sync-entry-count",
                    "device driver syncs DMA sg list with different entry count [map count="
                    f"{entry.sg_call_ents}] [sync count={call_ents}]",
                    entry,
                )
            )
        if call_ents is not None:
            break  # one check per entry count is enough for an sg sync
    return findings


def check_free(
    memory_key: int, pfns: Sequence[int], page_size: int
) -> List[Tuple[DebugTarget, Finding]]:
    """Pages about to be freed that a recorded mapping still maps: the device could go on
    reading and writing them once the allocator hands them to a new owner.  One finding per
    such mapping, with the device it is reported against."""
    with _guard:
        candidates = [
            (target, entry)
            for target, records in _records.items()
            for entry in records.entries
            if entry.memory_key == memory_key
        ]
    if not candidates:
        return []
    freed = sorted(set(pfns))
    findings = []
    for target, entry in candidates:
        for start, end in entry.phys_ranges:
            at = bisect.bisect_left(freed, start // page_size)
            if at < len(freed) and freed[at] <= (end - 1) // page_size:
                findings.append(
                    (
                        target,
                        Finding(
                            "free-mapped",
                            "device driver frees memory that is still DMA-mapped "
                            f"[pfn={freed[at]:#x}] [mapped range phys={start:#x}-{end - 1:#x}] "
                            f"{entry.describe()}",
                            entry,
                        ),
                    )
                )
                break
    return findings


def check_unbind(target: DebugTarget) -> List[Finding]:
    """Mappings still live when the device unbinds: one finding listing each with its
    traceback."""
    with _guard:
        records = _records.get(target)
        pending = list(records.entries) if records else []
    if not pending:
        return []
    details = "\n".join(
        f"  {entry.describe()}\n  Mapped at:\n"
        + "".join("    " + line + "\n" for line in entry.traceback.splitlines())
        for entry in pending
    )
    return [
        Finding(
            "unbind-pending",
            f"device driver has pending DMA allocations while released from device "
            f"[count={len(pending)}]\n{details}",
        )
    ]


def leak(what: str, entry: DebugEntry) -> Finding:
    """A mapped table dropped without unmap or close (found by its safety net)."""
    return Finding(
        "leak",
        f"{what} dropped while DMA-mapped: the safety net unmapped it {entry.describe()}",
        entry,
    )


def dump(device: Optional[DebugTarget] = None) -> List[DebugEntry]:
    """The live recorded mappings (of one device, or of all)."""
    if device is not None:
        _require_target(device)
    with _guard:
        if device is not None:
            records = _records.get(device)
            return list(records.entries) if records else []
        return [entry for _, records in _records.items() for entry in records.entries]


__all__ = [
    "MODES",
    "DebugEntry",
    "DebugTarget",
    "Finding",
    "DmaApiError",
    "DmaApiWarning",
    "set_mode",
    "get_mode",
    "error_count",
    "reset_error_count",
    "dump",
    "device_error_count",
]
