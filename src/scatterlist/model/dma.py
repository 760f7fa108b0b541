"""DMA mapping in pure Python: the model of csrc/dma.c.

An :class:`Iommu` pairs the IOMMU domain (page table and fault log) with the IOVA allocator
that hands out its address space, behind one lock.  A :class:`Device` carries the limits a
driver sees.  The functions below map tables the way iommu-dma and dma-direct do
(shared/spec/kernel-semantics.md, sections 7 and 8): every observable result must match the C
engine, which the test suite checks call by call.
"""

from __future__ import annotations

import errno
import threading
from typing import Any, List, Optional, Tuple

from ..errors import Reason, error_for
from .iommu import IommuDomain
from .iova import IovaDomain
from .physmem import PhysMem, SplitMix64
from .table import Entry, SgTable, sg_next

DMA_BIDIRECTIONAL, DMA_TO_DEVICE, DMA_FROM_DEVICE, DMA_NONE = 0, 1, 2, 3
IOMMU_READ, IOMMU_WRITE = 1, 2
DMA_MAPPING_ERROR = (1 << 64) - 1
U32_MAX = 0xFFFFFFFF
U64_MAX = (1 << 64) - 1


class Iommu:
    """struct sl_iommu: page table + IOVA allocator (start pfn 1, one depot magazine)."""

    def __init__(self, granule_bytes: int, aperture_bits: int) -> None:
        self.domain = IommuDomain(granule_bytes, aperture_bits)
        self.iovad = IovaDomain(granule_bytes, 1, 1)
        self.granule = granule_bytes
        self.granule_shift = granule_bytes.bit_length() - 1
        self.lock = threading.RLock()


class Device:
    """struct dma_device, with the kernel's defaults."""

    FIELDS = ("dma_mask", "max_segment_size", "seg_boundary_mask", "max_mapping_size",
              "pci_32bit_workaround", "bound", "live_mappings", "inject_countdown",
              "inject_ppm", "inject_errno", "inject_rng_state", "injected_failures")

    def __init__(self, mem: PhysMem, iommu: Optional[Iommu]) -> None:
        if iommu is not None and iommu.granule > mem.page_size:
            raise error_for(errno.EINVAL, Reason.GRANULE_PAGE, 0, iommu.granule)
        self.mem = mem
        self.iommu = iommu
        self.dma_mask = U32_MAX
        self.max_segment_size = 65536
        self.seg_boundary_mask = U64_MAX
        self.max_mapping_size = U64_MAX
        self.pci_32bit_workaround = 1
        self.bound = 1
        self.live_mappings = 0
        self.inject_countdown = 0
        self.inject_ppm = 0
        self.inject_errno = 0
        self.inject_rng_state = 0
        self.injected_failures = 0
        self.lock = threading.Lock()

    def inject_failure(self) -> bool:
        """Whether fault injection fails this map call (decided once, before mapping)."""
        if self.inject_countdown:
            self.inject_countdown -= 1
            return self.inject_countdown == 0
        if self.inject_ppm:
            rng = SplitMix64(self.inject_rng_state)
            draw = rng.next()
            self.inject_rng_state = rng.state
            return draw % 1_000_000 < self.inject_ppm
        return False


def _valid_direction(direction: int) -> bool:
    return direction in (DMA_BIDIRECTIONAL, DMA_TO_DEVICE, DMA_FROM_DEVICE)


def _direction_prot(direction: int) -> int:
    """dma_info_to_prot: what the device may do with the memory."""
    return {DMA_BIDIRECTIONAL: IOMMU_READ | IOMMU_WRITE, DMA_TO_DEVICE: IOMMU_READ,
            DMA_FROM_DEVICE: IOMMU_WRITE}.get(direction, 0)


def _entries(table: SgTable, count: int) -> List[Entry]:
    out: List[Entry] = []
    sg = table.sgl
    while sg is not None and len(out) < count:
        out.append(sg)
        sg = sg_next(sg)
    return out


def _phys(table: SgTable, sg: Entry) -> int:
    return (sg.pfn << table.page_shift) + sg.offset


def _check_mappable(dev: Device, table: SgTable, n_entries: int, direction: int) -> None:
    if not _valid_direction(direction):
        raise error_for(errno.EINVAL, Reason.DMA_DIRECTION, 0, direction)
    if not dev.bound:
        raise error_for(errno.ENODEV, Reason.DEVICE_UNBOUND, 0, 0)
    if table.sgl is None:
        raise error_for(errno.EINVAL, Reason.TABLE_FREED, 0, 0)
    if table.dma_dev is not None:
        raise error_for(errno.EBUSY, Reason.TABLE_MAPPED, 0, 0)
    if not table.final:
        raise error_for(errno.EINVAL, Reason.TABLE_NOT_FINAL, 0, 0)
    if table.page_size != dev.mem.page_size:
        raise error_for(errno.EINVAL, Reason.PAGE_SIZE_MISMATCH, 0, dev.mem.page_size)
    if n_entries == 0 or n_entries > table.orig_nents:
        raise error_for(errno.EINVAL, Reason.NENTS_RANGE, n_entries, table.orig_nents)
    mem_end = dev.mem.n_pages << table.page_shift
    for i, sg in enumerate(_entries(table, n_entries)):
        if _phys(table, sg) + sg.length > mem_end:
            raise error_for(errno.EINVAL, Reason.PHYS_RANGE, i, sg.pfn)


def _map_direct(dev: Device, table: SgTable, entries: List[Entry], inject: bool) -> int:
    for i, sg in enumerate(entries):
        phys = _phys(table, sg)
        if phys > dev.dma_mask or sg.length - 1 > dev.dma_mask - phys:
            raise error_for(errno.EIO, Reason.DMA_MASK, i, phys)
    if inject:
        raise error_for(dev.inject_errno, Reason.INJECTED, 0, 0)
    for sg in entries:
        sg.dma_address = _phys(table, sg)   # phys_to_dma is the identity here
        sg.dma_length = sg.length
    return len(entries)


def _invalidate_layout(entries: List[Entry]) -> None:
    """__invalidate_sg: undo the layout pass and poison the DMA fields."""
    for sg in entries:
        if sg.dma_address != DMA_MAPPING_ERROR:
            sg.offset += sg.dma_address
        if sg.dma_length:
            sg.length = sg.dma_length
        sg.dma_address = DMA_MAPPING_ERROR
        sg.dma_length = 0


def _unmap_block(iommu: Iommu, iova: int, length: int) -> None:
    """Unmap the whole block, stepping over pages someone unmapped by hand."""
    done = 0
    while done < length:
        done += iommu.domain.unmap(iova + done, length - done)
        if done < length:
            done += iommu.granule


def _finalise(dev: Device, entries: List[Entry], iova: int) -> int:
    """__finalise_sg: merge the laid-out entries into DMA segments, restore the CPU fields,
    return the segment count."""
    dma_addr = iova
    seg_mask = dev.seg_boundary_mask
    max_len = dev.max_segment_size
    cur_index = 0
    cur_len = 0
    count = 0
    for i, sg in enumerate(entries):
        s_iova_off = sg.dma_address        # stashed by the layout pass
        s_length = sg.dma_length
        s_iova_len = sg.length
        sg.dma_address = DMA_MAPPING_ERROR
        sg.dma_length = 0
        sg.offset += s_iova_off
        sg.length = s_length
        # Merge only onto an open segment, from a granule start, not at a boundary, within
        # the length limit computed as a 32-bit unsigned value (so it can wrap).
        if (cur_len and not s_iova_off and dma_addr & seg_mask
                and (max_len - cur_len) & U32_MAX >= s_length):
            cur_len += s_length
        else:
            if i > 0:
                cur_index += 1
            cur_len = s_length
            count += 1
            entries[cur_index].dma_address = dma_addr + s_iova_off
        entries[cur_index].dma_length = cur_len & U32_MAX
        dma_addr += s_iova_len
        if s_length + s_iova_off < s_iova_len:
            cur_len = 0   # ends before its granule does (or was padded): nothing merges on
    return count


def _map_iommu(dev: Device, table: SgTable, entries: List[Entry], direction: int,
               inject: bool) -> int:
    iommu = dev.iommu
    assert iommu is not None
    granule_mask = iommu.granule - 1
    boundary_mask = dev.seg_boundary_mask
    iova_len = 0
    prev: Optional[Entry] = None
    for i, sg in enumerate(entries):
        s_iova_off = sg.offset & granule_mask
        s_length = (sg.length + s_iova_off + granule_mask) & ~granule_mask
        sg.dma_address = s_iova_off
        sg.dma_length = sg.length
        sg.offset -= s_iova_off
        pad_len = (boundary_mask - iova_len + 1) & boundary_mask
        pad = bool(pad_len) and pad_len < s_length - 1
        if s_length > U32_MAX or (pad and prev is not None and prev.length + pad_len > U32_MAX):
            _invalidate_layout(entries[:i + 1])
            raise error_for(errno.EINVAL, Reason.TOO_MANY_ENTRIES, i, s_length)
        sg.length = s_length
        if pad:
            assert prev is not None
            prev.length += pad_len
            iova_len += pad_len
        iova_len += s_length
        prev = sg

    with iommu.lock:
        limit = min(dev.dma_mask, iommu.domain.aperture_last)
        n_granules = iova_len >> iommu.granule_shift
        iova_pfn: Optional[int] = None
        if dev.pci_32bit_workaround and limit > U32_MAX:
            try:
                iova_pfn = iommu.iovad.alloc_noflush(n_granules, U32_MAX >> iommu.granule_shift)
            except Exception:
                dev.pci_32bit_workaround = 0   # the kernel's "Using %d-bit DMA addresses"
        if iova_pfn is None:
            try:
                iova_pfn = iommu.iovad.alloc(n_granules, limit >> iommu.granule_shift)
            except Exception:
                _invalidate_layout(entries)
                raise error_for(errno.ENOMEM, Reason.IOVA_SPACE, 0, iova_len) from None
        iova = iova_pfn << iommu.granule_shift

        # iommu_map_sg: back to back, physically contiguous entries merged into runs, in
        # batches of 512 runs (each all or nothing), as the C does.
        runs: List[Tuple[int, int]] = []
        mapped = batch_bytes = 0
        failure: Optional[Exception] = None
        for sg in entries:
            phys = _phys(table, sg)
            if runs and phys == runs[-1][0] + runs[-1][1]:
                runs[-1] = (runs[-1][0], runs[-1][1] + sg.length)
            else:
                if len(runs) == 512:
                    try:
                        iommu.domain.map_runs(iova + mapped, runs, _direction_prot(direction))
                        mapped += batch_bytes
                    except Exception as exc:
                        failure = exc
                        break
                    runs, batch_bytes = [], 0
                runs.append((phys, sg.length))
            batch_bytes += sg.length
        if failure is None and runs:
            try:
                iommu.domain.map_runs(iova + mapped, runs, _direction_prot(direction))
                mapped += batch_bytes
            except Exception as exc:
                failure = exc
        if failure is None and inject:
            _unmap_block(iommu, iova, mapped)
            iommu.iovad.free(iova_pfn, n_granules)
            _invalidate_layout(entries)
            raise error_for(dev.inject_errno, Reason.INJECTED, 0, 0)
        if failure is not None:
            err = getattr(failure, "errno", errno.EINVAL)
            reason = getattr(failure, "reason", Reason.NONE)
            _unmap_block(iommu, iova, mapped)
            iommu.iovad.free(iova_pfn, n_granules)
            _invalidate_layout(entries)
            # __invalidate_sg passes -ENOMEM through and turns anything else into -EINVAL.
            raise error_for(errno.ENOMEM if err == errno.ENOMEM else errno.EINVAL,
                            int(reason or 0), 0, 0) from None

    count = _finalise(dev, entries, iova)
    table.dma_iova = iova
    table.dma_iova_len = iova_len
    return count


def map_entries(dev: Device, table: SgTable, n_entries: int, direction: int) -> int:
    _check_mappable(dev, table, n_entries, direction)
    inject = dev.inject_failure()
    if inject:
        dev.injected_failures += 1
    entries = _entries(table, n_entries)
    if dev.iommu is not None:
        count = _map_iommu(dev, table, entries, direction, inject)
    else:
        count = _map_direct(dev, table, entries, inject)
    table.dma_map_nents = n_entries
    table.dma_dev = dev
    table.dma_dir = direction
    with dev.lock:
        dev.live_mappings += 1
    return count


def _check_mapped_for(dev: Device, table: SgTable, n_entries: int, direction: int) -> None:
    if not _valid_direction(direction):
        raise error_for(errno.EINVAL, Reason.DMA_DIRECTION, 0, direction)
    if table.dma_dev is None:
        raise error_for(errno.EINVAL, Reason.NOT_MAPPED, 0, 0)
    if table.dma_dev is not dev:
        raise error_for(errno.EINVAL, Reason.WRONG_DEVICE, 0, 0)
    if n_entries == 0 or n_entries > table.orig_nents:
        raise error_for(errno.EINVAL, Reason.NENTS_RANGE, n_entries, table.orig_nents)


def unmap(dev: Device, table: SgTable, n_entries: int, direction: int) -> None:
    _check_mapped_for(dev, table, n_entries, direction)
    if dev.iommu is not None:
        with dev.iommu.lock:
            _unmap_block(dev.iommu, table.dma_iova, table.dma_iova_len)
            dev.iommu.iovad.free(table.dma_iova >> dev.iommu.granule_shift,
                                 table.dma_iova_len >> dev.iommu.granule_shift)
    table.dma_dev = None
    table.dma_iova = 0
    table.dma_iova_len = 0
    with dev.lock:
        dev.live_mappings -= 1


def sync(dev: Device, table: SgTable, n_entries: int, direction: int) -> None:
    _check_mapped_for(dev, table, n_entries, direction)   # coherent: no bytes move


# -- device-side access ----------------------------------------------------------------------

def _translate(dev: Device, dma_addr: int, n_bytes: int, access: int
               ) -> List[Tuple[int, int]]:
    if n_bytes == 0:
        return []
    if dev.iommu is None:
        if dma_addr > dev.dma_mask or n_bytes - 1 > dev.dma_mask - dma_addr:
            raise error_for(errno.EFAULT, Reason.DMA_ACCESS_MASK, access, dma_addr)
        runs = [(dma_addr, n_bytes)]
    else:
        with dev.iommu.lock:
            runs = dev.iommu.domain.translate_range(dma_addr, n_bytes, access)
    mem_end = dev.mem.n_pages * dev.mem.page_size
    for phys, length in runs:
        if phys > mem_end or length > mem_end - phys:
            raise error_for(errno.EFAULT, Reason.DMA_ACCESS_MEMORY, access, phys)
    return runs


def _copy_runs(dev: Device, runs: List[Tuple[int, int]], buf: memoryview,
               to_memory: bool) -> None:
    at = 0
    for phys, length in runs:
        if to_memory:
            dev.mem.write(phys, buf[at:at + length])
        else:
            dev.mem.read_into(phys, buf[at:at + length])
        at += length


def device_read(dev: Device, dma_addr: int, n_bytes: int) -> bytes:
    runs = _translate(dev, dma_addr, n_bytes, IOMMU_READ)
    out = bytearray(n_bytes)
    _copy_runs(dev, runs, memoryview(out), False)
    return bytes(out)


def device_write(dev: Device, dma_addr: int, data: memoryview) -> None:
    runs = _translate(dev, dma_addr, len(data), IOMMU_WRITE)
    _copy_runs(dev, runs, data, True)


def _table_runs(dev: Device, table: SgTable, n_bytes: int, access: int
                ) -> List[Tuple[int, int]]:
    if table.dma_dev is None:
        raise error_for(errno.EINVAL, Reason.NOT_MAPPED, 0, 0)
    if table.dma_dev is not dev:
        raise error_for(errno.EINVAL, Reason.WRONG_DEVICE, 0, 0)
    pieces: List[Tuple[int, int]] = []
    total = 0
    for sg in _entries(table, table.nents):
        if total >= n_bytes:
            break
        piece = min(n_bytes - total, sg.dma_length)
        pieces.append((sg.dma_address, piece))
        total += piece
    if total < n_bytes:
        raise error_for(errno.EINVAL, Reason.DMA_LENGTH, total, n_bytes)
    runs: List[Tuple[int, int]] = []
    for addr, piece in pieces:
        runs.extend(_translate(dev, addr, piece, access))
    return runs


def device_read_sg(dev: Device, table: SgTable, n_bytes: int) -> bytes:
    runs = _table_runs(dev, table, n_bytes, IOMMU_READ)
    out = bytearray(n_bytes)
    _copy_runs(dev, runs, memoryview(out), False)
    return bytes(out)


def device_write_sg(dev: Device, table: SgTable, data: memoryview) -> None:
    runs = _table_runs(dev, table, len(data), IOMMU_WRITE)
    _copy_runs(dev, runs, data, True)


# -- the engine methods (mixed into ModelEngine) -------------------------------------------

class DmaEngineMixin:
    """The IOMMU, device and DMA methods of the engine contract (scatterlist._engine)."""

    def iommu_create(self, granule: int, aperture_bits: int) -> Iommu:
        return Iommu(granule, aperture_bits)

    def iommu_destroy(self, iommu: Any) -> None:
        pass

    def iommu_map(self, iommu: Iommu, iova: int, phys: int, size_bytes: int,
                  prot: int) -> None:
        with iommu.lock:
            iommu.domain.map(iova, phys, size_bytes, prot)

    def iommu_unmap(self, iommu: Iommu, iova: int, size_bytes: int) -> int:
        with iommu.lock:
            return iommu.domain.unmap(iova, size_bytes)

    def iommu_translate(self, iommu: Iommu, iova: int, access: int) -> int:
        with iommu.lock:
            return iommu.domain.translate(iova, access)

    def iommu_lookup(self, iommu: Iommu, iova: int) -> Optional[Tuple[int, int]]:
        with iommu.lock:
            return iommu.domain.lookup(iova)

    def iommu_faults(self, iommu: Iommu) -> List[Tuple[int, int, int, int, int]]:
        with iommu.lock:
            return list(iommu.domain.faults())

    def iommu_clear_faults(self, iommu: Iommu) -> None:
        with iommu.lock:
            iommu.domain.faults_clear()

    def iommu_info(self, iommu: Iommu) -> Tuple[int, int, int, int]:
        with iommu.lock:
            return (iommu.domain.mapped_pages, iommu.domain.fault_total,
                    iommu.iovad.live_ranges, iommu.iovad.cached_ranges)

    def iommu_iova_ranges(self, iommu: Iommu, state_mask: int) -> List[Tuple[int, int, int]]:
        with iommu.lock:
            return [tuple(r) for r in iommu.iovad.ranges(0, state_mask)]  # type: ignore[misc]

    def iommu_reserve(self, iommu: Iommu, lo_pfn: int, hi_pfn: int) -> None:
        with iommu.lock:
            iommu.iovad.reserve(lo_pfn, hi_pfn)

    def iommu_iova_alloc(self, iommu: Iommu, size_granules: int, limit_pfn: int) -> int:
        with iommu.lock:
            return iommu.iovad.alloc(size_granules, limit_pfn)

    def iommu_iova_free(self, iommu: Iommu, pfn: int, size_granules: int) -> None:
        with iommu.lock:
            iommu.iovad.free(pfn, size_granules)

    def device_create(self, mem: PhysMem, iommu: Optional[Iommu]) -> Device:
        return Device(mem, iommu)

    def device_destroy(self, dev: Any) -> None:
        pass

    def device_get(self, dev: Device, field: str) -> int:
        if field not in Device.FIELDS:
            raise AttributeError(field)
        return int(getattr(dev, field))

    def device_set(self, dev: Device, field: str, value: int) -> None:
        if field not in Device.FIELDS:
            raise AttributeError(field)
        setattr(dev, field, value)

    def dma_map(self, dev: Device, table: SgTable, direction: int,
                nents: Optional[int] = None) -> int:
        count = map_entries(dev, table, table.orig_nents if nents is None else nents,
                            direction)
        if nents is None:
            table.nents = count
        return count

    def dma_unmap(self, dev: Device, table: SgTable, direction: int,
                  nents: Optional[int] = None) -> None:
        unmap(dev, table, table.orig_nents if nents is None else nents, direction)

    def dma_sync(self, dev: Device, table: SgTable, direction: int, for_cpu: bool,
                 nents: Optional[int] = None) -> None:
        sync(dev, table, table.orig_nents if nents is None else nents, direction)

    def table_mapping(self, table: SgTable) -> Optional[Tuple[int, int, int, int]]:
        if table.dma_dev is None:
            return None
        return (table.dma_dir, table.dma_iova, table.dma_iova_len, table.dma_map_nents)

    def dma_read(self, dev: Device, dma_addr: int, n_bytes: int) -> bytes:
        return device_read(dev, dma_addr, n_bytes)

    def dma_write(self, dev: Device, dma_addr: int, data: memoryview) -> None:
        device_write(dev, dma_addr, data)

    def dma_read_sg(self, dev: Device, table: SgTable, n_bytes: int) -> bytes:
        return device_read_sg(dev, table, n_bytes)

    def dma_write_sg(self, dev: Device, table: SgTable, data: memoryview) -> None:
        device_write_sg(dev, table, data)
