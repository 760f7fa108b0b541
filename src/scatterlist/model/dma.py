"""DMA mapping in pure Python: the model of csrc/dma.c.

A :class:`ModelIommu` pairs the IOMMU domain (page table and fault log) with the IOVA allocator
that hands out its address space, behind one lock.  A :class:`ModelDevice` carries the limits a
driver sees, behind a lock of its own, so that one device's tables can be mapped on several
threads.  The functions below map tables the way iommu-dma and dma-direct do: one IOVA block
per table, entries rounded to the granule, padding before a segment that would cross the
device's boundary, merging as the kernel's ``__finalise_sg`` does; direct mapping one to one.
Every observable result must match the C engine, which the test suite checks call by call.

Where the emulation departs from the kernel, as the C does: unmap clears the table's DMA view
(the kernel leaves stale DMA fields that a device could still follow into another table's
IOVAs), a map defines every DMA field it exposes, and a DMA segment longer than 2**32-1 bytes
(whose 32-bit length the kernel would wrap) is refused before anything is mapped.
"""

from __future__ import annotations

import errno
from typing import List, NamedTuple, Optional, Tuple

from .._contract import DeviceLimits, TableMapping
from .._util import EngineLock
from ..constants import DMA_MAPPING_ERROR, IOMMU_READ, IOMMU_WRITE, U32_MAX, U64_MAX, DataDirection
from ..errors import Reason, ScatterlistError, error_for
from .cargs import byte_view, c_int, u32, u64
from .iommu import IommuDomain
from .iova import IovaDomain
from .physmem import PhysMem, SplitMix64
from .table import Entry, SgTable, sg_next

DMA_BIDIRECTIONAL = int(DataDirection.BIDIRECTIONAL)
DMA_TO_DEVICE = int(DataDirection.TO_DEVICE)
DMA_FROM_DEVICE = int(DataDirection.FROM_DEVICE)
RUN_BATCH = 512  # runs handed to the page table at a time (iommu_map_runs batches)


class ModelIommu:
    """struct sl_iommu: page table + IOVA allocator (start pfn 1, one depot magazine)."""

    def __init__(self, granule_bytes: int, aperture_bits: int) -> None:
        self.domain = IommuDomain(granule_bytes, aperture_bits)
        self.iovad = IovaDomain(granule_bytes, 1, 1)
        self.granule = granule_bytes
        self.granule_shift = granule_bytes.bit_length() - 1
        self.lock = EngineLock()  # (which a forked child re-creates itself)


class ModelDevice:
    """struct dma_device, with the kernel's defaults.  ``lock`` guards the limits, the bound
    state and the fault-injection state; a map works on a snapshot of the limits."""

    def __init__(self, mem: PhysMem, iommu: Optional[ModelIommu]) -> None:
        if iommu is not None and iommu.granule > mem.page_size:
            raise error_for(
                errno.EINVAL, Reason.GRANULE_PAGE, value=iommu.granule, limit=mem.page_size
            )
        self.mem = mem
        self.iommu = iommu
        self.limits = DeviceLimits(
            dma_mask=U32_MAX,
            max_segment_size=65536,
            seg_boundary_mask=U64_MAX,
            max_mapping_size=U64_MAX,
        )
        self.pci_32bit_workaround = True  # guarded by the IOMMU's lock, where it is used
        self.bound = True
        self.live_mappings = 0
        self.inject_countdown = 0
        self.inject_ppm = 0
        self.inject_errno = 0
        self.inject_rng = SplitMix64(0)
        self.injected_failures = 0
        self.lock = EngineLock()  # (which a forked child re-creates itself)

    def set_limits(self, limits: DeviceLimits) -> None:
        """dma_device_set_limits: all four, or none."""
        smallest = self.mem.page_size - 1
        dma_mask = u64(limits.dma_mask)
        max_segment_size = u32(limits.max_segment_size)
        seg_boundary_mask = u64(limits.seg_boundary_mask)
        max_mapping_size = u64(limits.max_mapping_size)
        if dma_mask & (dma_mask + 1) or dma_mask < smallest:
            raise error_for(errno.EINVAL, Reason.DEVICE_DMA_MASK, value=dma_mask, limit=smallest)
        if max_segment_size == 0:
            raise error_for(errno.EINVAL, Reason.DEVICE_MAX_SEGMENT, value=max_segment_size)
        if seg_boundary_mask & (seg_boundary_mask + 1) or seg_boundary_mask < smallest:
            raise error_for(
                errno.EINVAL, Reason.DEVICE_SEG_BOUNDARY, value=seg_boundary_mask, limit=smallest
            )
        with self.lock:
            self.limits = DeviceLimits(
                dma_mask, max_segment_size, seg_boundary_mask, max_mapping_size
            )

    def set_injection(self, nth: int, ppm: int, err: int, seed: int) -> None:
        """dma_device_inject_failures."""
        nth, ppm, err, seed = u64(nth), u32(ppm), c_int(err, 32, signed=True), u64(seed)
        if err not in (errno.ENOMEM, errno.EINVAL, errno.EIO):
            raise error_for(errno.EINVAL, Reason.INJECT_ERRNO, value=err & U64_MAX)
        if ppm > 1_000_000:
            raise error_for(errno.EINVAL, Reason.INJECT_PPM, value=ppm, limit=1_000_000)
        with self.lock:
            self.inject_countdown = nth
            self.inject_ppm = ppm
            self.inject_errno = err
            self.inject_rng = SplitMix64(seed)

    def begin_map(self) -> Tuple[DeviceLimits, int]:
        """At the start of a map: the limits it uses, and the errno it must fail with (0: do
        not inject).  Fault injection decides once per call, under the lock, which also
        checks again that the device is bound: a map never starts on an unbound device."""
        with self.lock:
            if not self.bound:
                raise error_for(errno.ENODEV, Reason.DEVICE_UNBOUND)
            inject = False
            if self.inject_countdown:
                self.inject_countdown -= 1
                inject = self.inject_countdown == 0
            elif self.inject_ppm:
                inject = self.inject_rng.next() % 1_000_000 < self.inject_ppm
            if inject:
                self.injected_failures += 1
            return self.limits, self.inject_errno if inject else 0


def _valid_direction(direction: int) -> bool:
    return direction in (DMA_BIDIRECTIONAL, DMA_TO_DEVICE, DMA_FROM_DEVICE)


def _direction_prot(direction: int) -> int:
    """dma_info_to_prot: what the device may do with the memory."""
    return {
        DMA_BIDIRECTIONAL: IOMMU_READ | IOMMU_WRITE,
        DMA_TO_DEVICE: IOMMU_READ,
        DMA_FROM_DEVICE: IOMMU_WRITE,
    }.get(direction, 0)


def _entries(table: SgTable, count: int) -> List[Entry]:
    out: List[Entry] = []
    sg = table.sgl
    while sg is not None and len(out) < count:
        out.append(sg)
        sg = sg_next(sg)
    return out


def _phys(table: SgTable, sg: Entry) -> int:
    return (sg.pfn << table.page_shift) + sg.offset


def _poison(entries: List[Entry]) -> None:
    for sg in entries:
        sg.dma_address = DMA_MAPPING_ERROR
        sg.dma_length = 0


def _check_mappable(dev: ModelDevice, table: SgTable, n_entries: int, direction: int) -> None:
    if not _valid_direction(direction):
        raise error_for(errno.EINVAL, Reason.DMA_DIRECTION, value=direction & U64_MAX)
    with dev.lock:
        bound = dev.bound
    if not bound:
        raise error_for(errno.ENODEV, Reason.DEVICE_UNBOUND)
    if table.sgl is None:
        raise error_for(errno.EINVAL, Reason.TABLE_FREED)
    if table.dma_dev is not None:
        raise error_for(errno.EBUSY, Reason.TABLE_MAPPED)
    if not table.final:
        raise error_for(errno.EINVAL, Reason.TABLE_NOT_FINAL)
    if table.page_size != dev.mem.page_size:
        raise error_for(
            errno.EINVAL, Reason.PAGE_SIZE_MISMATCH, value=dev.mem.page_size, limit=table.page_size
        )
    if n_entries == 0 or n_entries > table.orig_nents:
        raise error_for(errno.EINVAL, Reason.NENTS_RANGE, value=n_entries, limit=table.orig_nents)
    mem_end = dev.mem.n_pages << table.page_shift
    for i, sg in enumerate(_entries(table, n_entries)):
        if _phys(table, sg) + sg.length > mem_end:
            raise error_for(errno.EINVAL, Reason.PHYS_RANGE, element=i, value=sg.pfn)


def _map_direct(
    limits: DeviceLimits, table: SgTable, entries: List[Entry], inject_errno: int
) -> int:
    dma_mask = limits.dma_mask
    for i, sg in enumerate(entries):
        phys = _phys(table, sg)
        if phys > dma_mask or sg.length - 1 > dma_mask - phys:
            raise error_for(errno.EIO, Reason.DMA_MASK, element=i, value=phys, limit=dma_mask)
    if inject_errno:
        raise error_for(inject_errno, Reason.INJECTED, value=inject_errno)
    for sg in entries:
        sg.dma_address = _phys(table, sg)  # phys_to_dma is the identity here
        sg.dma_length = sg.length
    return len(entries)


def _unmap_block(iommu: ModelIommu, iova: int, length: int) -> None:
    """Unmap the whole block, stepping over pages someone unmapped by hand."""
    done = 0
    while done < length:
        done += iommu.domain.unmap(iova + done, length - done)
        if done < length:
            done += iommu.granule


# -- IOMMU mapping (iommu_dma_map_sg) ---------------------------------------------------------
#
# The kernel lays the entries out in place (whole granules each, the in-granule offset and the
# CPU length stashed in the DMA fields), maps, then __finalise_sg restores the CPU fields and
# writes the segments; __invalidate_sg undoes the layout on failure.  The net effect on the CPU
# fields is nil, so here, as in the C, the layout is computed beside the table and never stored:
# a failed map leaves the table exactly as it was.  The passes: the layout and the IOVA bytes
# it needs; once the IOVA is known, __finalise_sg's merging as a check (a segment past 32 bits
# is refused); the page table; __finalise_sg writing the DMA fields.


class _Step(NamedTuple):
    """One entry's layout."""

    iova_off: int  # offset of its data in its first granule
    length: int  # its CPU length
    iova_len: int  # its data rounded out to whole granules
    pad: int  # boundary padding appended to the previous entry, before this one


def _layout(limits: DeviceLimits, granule: int, entries: List[Entry]) -> Tuple[List[_Step], int]:
    """The steps of every entry and the IOVA bytes they need.  Padding goes where a segment
    would cross the boundary: the block is size-aligned, so it starts on a boundary whenever
    it is larger than one.  The kernel keeps lengths in 32 bits: an entry whose rounded
    length, or the previous entry's length with its padding, would not fit is refused."""
    granule_mask = granule - 1
    boundary_mask = limits.seg_boundary_mask
    iova_len = prev_len = 0
    steps: List[_Step] = []
    for i, sg in enumerate(entries):
        iova_off = sg.offset & granule_mask
        s_iova_len = (sg.length + iova_off + granule_mask) & ~granule_mask
        pad_len = (boundary_mask - iova_len + 1) & boundary_mask
        pad = pad_len if pad_len and pad_len < s_iova_len - 1 else 0
        if s_iova_len > U32_MAX:
            raise error_for(
                errno.EINVAL, Reason.DMA_SEGMENT_LENGTH, element=i, value=s_iova_len, limit=U32_MAX
            )
        if pad and prev_len + pad > U32_MAX:
            raise error_for(
                errno.EINVAL,
                Reason.DMA_SEGMENT_LENGTH,
                element=i - 1,
                value=prev_len + pad,
                limit=U32_MAX,
            )
        iova_len += pad + s_iova_len
        prev_len = s_iova_len
        steps.append(_Step(iova_off, sg.length, s_iova_len, pad))
    return steps, iova_len


def _finalise(
    limits: DeviceLimits, entries: List[Entry], steps: List[_Step], iova: int, write: bool
) -> int:
    """__finalise_sg over the layout of a block at ``iova``: merge the entries into DMA
    segments and return their count.  Without ``write`` it only checks, refusing a segment
    whose length would pass 2**32-1 (where the kernel's 32-bit length wraps); with it, segment
    k goes to entry k and the other entries get DMA_MAPPING_ERROR / 0.  Lengths merge with the
    kernel's 32-bit arithmetic, including where ``max_len - cur_len`` wraps."""
    seg_mask = limits.seg_boundary_mask
    max_len = limits.max_segment_size
    dma_addr = iova
    cur_index = 0
    cur_len = 0  # the open segment's length; 0: nothing merges on
    count = 0
    for i, (sg, step) in enumerate(zip(entries, steps)):
        if step.pad:
            # The previous entry was padded: nothing merges onto its segment, and the padding
            # moves the address on.
            dma_addr += step.pad
            cur_len = 0
        if write:
            sg.dma_address = DMA_MAPPING_ERROR
            sg.dma_length = 0
        # Merge only onto an open segment, from a granule start, not at a boundary, within
        # the length limit computed as a 32-bit unsigned value (so it can wrap).
        if (
            cur_len
            and not step.iova_off
            and dma_addr & seg_mask
            and (max_len - cur_len) & U32_MAX >= step.length
        ):
            cur_len += step.length
            if cur_len > U32_MAX:
                raise error_for(
                    errno.EINVAL, Reason.DMA_SEGMENT_LENGTH, element=i, value=cur_len, limit=U32_MAX
                )
        else:
            if i > 0:
                cur_index += 1
            cur_len = step.length
            count += 1
            if write:
                entries[cur_index].dma_address = dma_addr + step.iova_off
        if write:
            entries[cur_index].dma_length = cur_len
        dma_addr += step.iova_len
        if step.length + step.iova_off < step.iova_len:
            cur_len = 0  # ends before its granule does: nothing merges on
    return count


def _map_runs(
    iommu: ModelIommu,
    table: SgTable,
    entries: List[Entry],
    steps: List[_Step],
    iova: int,
    prot: int,
) -> Tuple[int, Optional[ScatterlistError]]:
    """iommu_map_sg: the laid-out entries back to back, physically contiguous ones merged into
    runs (padding extends the run it follows), in batches of RUN_BATCH runs, each all or
    nothing.  Returns the bytes mapped and the error that stopped it."""
    runs: List[List[int]] = []
    mapped = batch_bytes = 0
    for sg, step in zip(entries, steps):
        if step.pad:
            runs[-1][1] += step.pad
            batch_bytes += step.pad
        phys = _phys(table, sg) - step.iova_off
        if runs and phys == runs[-1][0] + runs[-1][1]:
            runs[-1][1] += step.iova_len
        else:
            if len(runs) == RUN_BATCH:
                try:
                    iommu.domain.map_runs(iova + mapped, [(p, n) for p, n in runs], prot)
                except ScatterlistError as exc:
                    return mapped, exc
                mapped += batch_bytes
                runs, batch_bytes = [], 0
            runs.append([phys, step.iova_len])
        batch_bytes += step.iova_len
    if runs:
        try:
            iommu.domain.map_runs(iova + mapped, [(p, n) for p, n in runs], prot)
        except ScatterlistError as exc:
            return mapped, exc
        mapped += batch_bytes
    return mapped, None


def _map_iommu(
    dev: ModelDevice,
    limits: DeviceLimits,
    table: SgTable,
    entries: List[Entry],
    direction: int,
    inject_errno: int,
) -> int:
    iommu = dev.iommu
    assert iommu is not None
    steps, iova_len = _layout(limits, iommu.granule, entries)

    with iommu.lock:
        # One IOVA block under the DMA mask, trying below 4 GiB first for PCI devices.
        limit = min(limits.dma_mask, iommu.domain.aperture_last)
        n_granules = iova_len >> iommu.granule_shift
        iova_pfn: Optional[int] = None
        if dev.pci_32bit_workaround and limit > U32_MAX:
            try:
                iova_pfn = iommu.iovad.alloc_noflush(n_granules, U32_MAX >> iommu.granule_shift)
            except ScatterlistError:
                dev.pci_32bit_workaround = False  # the kernel's "Using %d-bit DMA addresses"
        if iova_pfn is None:
            try:
                iova_pfn = iommu.iovad.alloc(n_granules, limit >> iommu.granule_shift)
            except ScatterlistError:
                raise error_for(
                    errno.ENOMEM, Reason.IOVA_SPACE, value=iova_len, limit=limit
                ) from None
        iova = iova_pfn << iommu.granule_shift

        mapped = 0
        try:
            # The merge decisions depend on the IOVA: check them before mapping anything.
            _finalise(limits, entries, steps, iova, write=False)
            mapped, failure = _map_runs(
                iommu, table, entries, steps, iova, _direction_prot(direction)
            )
            if failure is not None:
                detail = failure.detail
                assert detail is not None
                # __invalidate_sg passes -ENOMEM through and turns anything else into
                # -EINVAL; the page table's record stays as it is.
                raise error_for(
                    errno.ENOMEM if failure.errno == errno.ENOMEM else errno.EINVAL,
                    detail.reason,
                    element=detail.element,
                    value=detail.value,
                    limit=detail.limit,
                    access=detail.access,
                ) from None
            if inject_errno:
                # Everything is mapped: the rollback has all of it to undo.
                raise error_for(inject_errno, Reason.INJECTED, value=inject_errno)
        except ScatterlistError:
            _unmap_block(iommu, iova, mapped)
            iommu.iovad.free(iova_pfn, n_granules)
            raise

    count = _finalise(limits, entries, steps, iova, write=True)
    table.dma_iova = iova
    table.dma_iova_len = iova_len
    return count


def map_entries(dev: ModelDevice, table: SgTable, n_entries: int, direction: int) -> int:
    _check_mappable(dev, table, n_entries, direction)
    limits, inject_errno = dev.begin_map()
    entries = _entries(table, n_entries)
    if dev.iommu is not None:
        count = _map_iommu(dev, limits, table, entries, direction, inject_errno)
    else:
        count = _map_direct(limits, table, entries, inject_errno)
    _poison(_entries(table, table.orig_nents)[count:])  # a map defines every DMA field
    table.dma_map_nents = n_entries
    table.dma_mapped_count = count
    table.dma_dev = dev
    table.dma_dir = direction
    with dev.lock:
        dev.live_mappings += 1
    return count


def _check_mapped_for(dev: ModelDevice, table: SgTable, n_entries: int, direction: int) -> None:
    if not _valid_direction(direction):
        raise error_for(errno.EINVAL, Reason.DMA_DIRECTION, value=direction & U64_MAX)
    if table.dma_dev is None:
        raise error_for(errno.EINVAL, Reason.NOT_MAPPED)
    if table.dma_dev is not dev:
        raise error_for(errno.EINVAL, Reason.WRONG_DEVICE)
    if n_entries == 0 or n_entries > table.orig_nents:
        raise error_for(errno.EINVAL, Reason.NENTS_RANGE, value=n_entries, limit=table.orig_nents)


def unmap(dev: ModelDevice, table: SgTable, n_entries: int, direction: int) -> None:
    _check_mapped_for(dev, table, n_entries, direction)
    if dev.iommu is not None:
        with dev.iommu.lock:
            _unmap_block(dev.iommu, table.dma_iova, table.dma_iova_len)
            dev.iommu.iovad.free(
                table.dma_iova >> dev.iommu.granule_shift,
                table.dma_iova_len >> dev.iommu.granule_shift,
            )
    # Clear the DMA view: a stale field would let a device follow it into IOVAs that another
    # table may own by now.
    _poison(_entries(table, table.orig_nents))
    table.nents = table.orig_nents
    table.dma_dev = None
    table.dma_iova = 0
    table.dma_iova_len = 0
    table.dma_map_nents = 0
    table.dma_mapped_count = 0
    with dev.lock:
        dev.live_mappings -= 1


def sync(dev: ModelDevice, table: SgTable, n_entries: int, direction: int) -> None:
    _check_mapped_for(dev, table, n_entries, direction)  # coherent: no bytes move


# -- device-side access ----------------------------------------------------------------------


def _translate(dev: ModelDevice, dma_addr: int, n_bytes: int, access: int) -> List[Tuple[int, int]]:
    if n_bytes == 0:
        return []
    with dev.lock:
        dma_mask = dev.limits.dma_mask
    # A device cannot emit an address above its mask, behind an IOMMU or not; such an access
    # never reaches the IOMMU, so it is not in its fault log.
    if dma_addr > dma_mask or n_bytes - 1 > dma_mask - dma_addr:
        raise error_for(
            errno.EFAULT, Reason.DMA_ACCESS_MASK, value=dma_addr, limit=dma_mask, access=access
        )
    if dev.iommu is None:
        runs = [(dma_addr, n_bytes)]
    else:
        with dev.iommu.lock:
            runs = dev.iommu.domain.translate_range(dma_addr, n_bytes, access)
    mem_end = dev.mem.n_pages * dev.mem.page_size
    for phys, length in runs:
        if phys > mem_end or length > mem_end - phys:
            raise error_for(
                errno.EFAULT, Reason.DMA_ACCESS_MEMORY, value=phys, limit=mem_end, access=access
            )
    return runs


def _copy_runs(
    dev: ModelDevice, runs: List[Tuple[int, int]], buf: memoryview, to_memory: bool
) -> None:
    at = 0
    for phys, length in runs:
        if to_memory:
            dev.mem.write(phys, buf[at : at + length])
        else:
            dev.mem.read_into(phys, buf[at : at + length])
        at += length


def _check_access_code(access: int) -> None:
    if access != IOMMU_READ and access != IOMMU_WRITE:
        raise error_for(errno.EINVAL, Reason.IOMMU_ACCESS, value=access)


def check_access(dev: ModelDevice, dma_addr: int, n_bytes: int, access: int) -> None:
    _check_access_code(access)
    _translate(dev, dma_addr, n_bytes, access)


def device_read(dev: ModelDevice, dma_addr: int, n_bytes: int) -> bytes:
    runs = _translate(dev, dma_addr, n_bytes, IOMMU_READ)
    out = bytearray(n_bytes)
    _copy_runs(dev, runs, memoryview(out), False)
    return bytes(out)


def device_write(dev: ModelDevice, dma_addr: int, data: memoryview) -> None:
    runs = _translate(dev, dma_addr, len(data), IOMMU_WRITE)
    _copy_runs(dev, runs, data, True)


def _table_runs(
    dev: ModelDevice, table: SgTable, n_bytes: int, access: int
) -> List[Tuple[int, int]]:
    if table.dma_dev is None:
        raise error_for(errno.EINVAL, Reason.NOT_MAPPED)
    if table.dma_dev is not dev:
        raise error_for(errno.EINVAL, Reason.WRONG_DEVICE)
    pieces: List[Tuple[int, int]] = []
    total = 0
    for sg in _entries(table, table.dma_mapped_count):
        if total >= n_bytes:
            break
        piece = min(n_bytes - total, sg.dma_length)
        pieces.append((sg.dma_address, piece))
        total += piece
    if total < n_bytes:
        available = sum(sg.dma_length for sg in _entries(table, table.dma_mapped_count))
        raise error_for(errno.EINVAL, Reason.DMA_LENGTH, value=n_bytes, limit=available)
    runs: List[Tuple[int, int]] = []
    for addr, piece in pieces:
        runs.extend(_translate(dev, addr, piece, access))
    return runs


def device_read_sg(dev: ModelDevice, table: SgTable, n_bytes: int) -> bytes:
    runs = _table_runs(dev, table, n_bytes, IOMMU_READ)
    out = bytearray(n_bytes)
    _copy_runs(dev, runs, memoryview(out), False)
    return bytes(out)


def device_write_sg(dev: ModelDevice, table: SgTable, data: memoryview) -> None:
    runs = _table_runs(dev, table, len(data), IOMMU_WRITE)
    _copy_runs(dev, runs, data, True)


# -- the engine methods (mixed into ModelEngine) -------------------------------------------


def _iommu(iommu: object) -> ModelIommu:
    if not isinstance(iommu, ModelIommu):
        raise TypeError(f"not a model IOMMU handle: {iommu!r}")
    return iommu


def _device(dev: object) -> ModelDevice:
    if not isinstance(dev, ModelDevice):
        raise TypeError(f"not a model device handle: {dev!r}")
    return dev


def _sg_table(table: object) -> SgTable:
    if not isinstance(table, SgTable):
        raise TypeError(f"not a model table handle: {table!r}")
    return table


def _nents(table: SgTable, nents: Optional[int]) -> int:
    return table.orig_nents if nents is None else u32(nents)


class DmaEngineMixin:
    """The IOMMU, device and DMA methods of the engine contract (scatterlist._engine), with
    their integer arguments checked as cffi checks the C parameter types."""

    def iommu_create(self, granule: int, aperture_bits: int) -> ModelIommu:
        return ModelIommu(u32(granule), c_int(aperture_bits, 32))

    def iommu_destroy(self, iommu: object) -> None:
        _iommu(iommu)

    def iommu_map(self, iommu: object, iova: int, phys: int, size_bytes: int, prot: int) -> None:
        model = _iommu(iommu)
        args = u64(iova), u64(phys), u64(size_bytes), u32(prot)
        with model.lock:
            model.domain.map(*args)

    def iommu_unmap(self, iommu: object, iova: int, size_bytes: int) -> int:
        model = _iommu(iommu)
        args = u64(iova), u64(size_bytes)
        with model.lock:
            return model.domain.unmap(*args)

    def iommu_translate(self, iommu: object, iova: int, access: int) -> int:
        model = _iommu(iommu)
        args = u64(iova), u32(access)
        with model.lock:
            return model.domain.translate(*args)

    def iommu_lookup(self, iommu: object, iova: int) -> Optional[Tuple[int, int]]:
        model = _iommu(iommu)
        address = u64(iova)
        with model.lock:
            return model.domain.lookup(address)

    def iommu_faults(self, iommu: object) -> List[Tuple[int, int, int, int, int]]:
        model = _iommu(iommu)
        with model.lock:
            return list(model.domain.faults())

    def iommu_clear_faults(self, iommu: object) -> None:
        model = _iommu(iommu)
        with model.lock:
            model.domain.faults_clear()

    def iommu_info(self, iommu: object) -> Tuple[int, int, int, int]:
        model = _iommu(iommu)
        with model.lock:
            return (
                model.domain.mapped_pages,
                model.domain.fault_total,
                model.iovad.live_ranges,
                model.iovad.cached_ranges,
            )

    def iommu_iova_ranges(self, iommu: object, state_mask: int) -> List[Tuple[int, int, int]]:
        model = _iommu(iommu)
        mask = u32(state_mask)
        with model.lock:
            return [(lo, hi, state) for lo, hi, state in model.iovad.ranges(0, mask)]

    def iommu_reserve(self, iommu: object, lo_pfn: int, hi_pfn: int) -> None:
        model = _iommu(iommu)
        args = u64(lo_pfn), u64(hi_pfn)
        with model.lock:
            model.iovad.reserve(*args)

    def iommu_iova_alloc(self, iommu: object, size_granules: int, limit_pfn: int) -> int:
        model = _iommu(iommu)
        args = u64(size_granules), u64(limit_pfn)
        with model.lock:
            return model.iovad.alloc(*args)

    def iommu_iova_free(self, iommu: object, pfn: int, size_granules: int) -> None:
        model = _iommu(iommu)
        args = u64(pfn), u64(size_granules)
        with model.lock:
            model.iovad.free(*args)

    def device_create(self, mem: object, iommu: Optional[object]) -> ModelDevice:
        if not isinstance(mem, PhysMem):
            raise TypeError(f"not a model memory handle: {mem!r}")
        return ModelDevice(mem, None if iommu is None else _iommu(iommu))

    def device_destroy(self, dev: object) -> None:
        _device(dev)

    def device_limits(self, dev: object) -> DeviceLimits:
        model = _device(dev)
        with model.lock:
            return model.limits

    def device_set_limits(self, dev: object, limits: DeviceLimits) -> None:
        _device(dev).set_limits(limits)

    def device_bound(self, dev: object) -> bool:
        model = _device(dev)
        with model.lock:
            return model.bound

    def device_set_bound(self, dev: object, bound: bool) -> None:
        model = _device(dev)
        with model.lock:
            model.bound = bool(bound)

    def device_live_mappings(self, dev: object) -> int:
        model = _device(dev)
        with model.lock:
            return model.live_mappings

    def device_inject_failures(self, dev: object, nth: int, ppm: int, err: int, seed: int) -> None:
        _device(dev).set_injection(nth, ppm, err, seed)

    def device_injection(self, dev: object) -> Tuple[int, int, int, int]:
        model = _device(dev)
        with model.lock:
            return (
                model.inject_countdown,
                model.inject_ppm,
                model.inject_errno,
                model.inject_rng.state,
            )

    def device_injected_failures(self, dev: object) -> int:
        model = _device(dev)
        with model.lock:
            return model.injected_failures

    def dma_map(
        self, dev: object, table: object, direction: int, nents: Optional[int] = None
    ) -> int:
        model, sgt = _device(dev), _sg_table(table)
        count = map_entries(model, sgt, _nents(sgt, nents), c_int(direction, 32, signed=True))
        if nents is None:
            sgt.nents = count
        return count

    def dma_unmap(
        self, dev: object, table: object, direction: int, nents: Optional[int] = None
    ) -> None:
        sgt = _sg_table(table)
        unmap(_device(dev), sgt, _nents(sgt, nents), c_int(direction, 32, signed=True))

    def dma_sync(
        self, dev: object, table: object, direction: int, for_cpu: bool, nents: Optional[int] = None
    ) -> None:
        sgt = _sg_table(table)
        sync(_device(dev), sgt, _nents(sgt, nents), c_int(direction, 32, signed=True))

    def table_mapping(self, table: object) -> Optional[TableMapping]:
        sgt = _sg_table(table)
        if sgt.dma_dev is None:
            return None
        return TableMapping(
            sgt.dma_dir, sgt.dma_iova, sgt.dma_iova_len, sgt.dma_map_nents, sgt.dma_mapped_count
        )

    def dma_check_access(self, dev: object, dma_addr: int, n_bytes: int, access: int) -> None:
        check_access(_device(dev), u64(dma_addr), u64(n_bytes), u32(access))

    def dma_read(self, dev: object, dma_addr: int, n_bytes: int) -> bytes:
        return device_read(_device(dev), u64(dma_addr), u64(n_bytes))

    def dma_write(self, dev: object, dma_addr: int, data: memoryview) -> None:
        device_write(_device(dev), u64(dma_addr), byte_view(data))

    def dma_read_sg(self, dev: object, table: object, n_bytes: int) -> bytes:
        return device_read_sg(_device(dev), _sg_table(table), u64(n_bytes))

    def dma_write_sg(self, dev: object, table: object, data: memoryview) -> None:
        device_write_sg(_device(dev), _sg_table(table), byte_view(data))
