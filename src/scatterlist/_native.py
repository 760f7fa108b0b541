"""The native engine: the only module that touches the compiled extension ``scatterlist._sg``.

It turns C return codes into the exceptions of :mod:`scatterlist.errors` (one translator,
:func:`_check`), passes page arrays to C without copying (``ffi.from_buffer``), and moves entries
out in one bulk call per table rather than one call per entry.
"""

from __future__ import annotations

from array import array
from typing import Any, List, Optional, Tuple

try:
    from ._sg import ffi, lib
except ImportError as exc:  # pragma: no cover - exercised only without a build
    raise ImportError(
        "scatterlist's native engine is not built (scatterlist._sg is missing): reinstall with "
        "`pip install .`, or choose the pure-Python engine with SCATTERLIST_ENGINE=model"
    ) from exc

from ._contract import DeviceLimits, TableCounts, TableMapping
from .errors import error_for

EXPECTED_ABI_VERSION = 3
if lib.sl_abi_version() != EXPECTED_ABI_VERSION:  # a stale build must fail loudly
    raise ImportError(
        f"scatterlist._sg has ABI version {lib.sl_abi_version()}, the Python layer expects "
        f"{EXPECTED_ABI_VERSION}: rebuild with `pip install .`"
    )


def _check(rc: int) -> int:
    """Raise the exception for a negative return code; pass other values through."""
    if rc < 0:
        detail = lib.sl_last_error()
        raise error_for(
            -rc,
            detail.reason,
            element=detail.element,
            value=detail.value,
            limit=detail.limit,
            access=detail.access,
        )
    return rc


def _u64_array(n: int) -> "array[int]":
    return array("Q", bytes(8 * n))


class NativeEngine:
    name = "native"
    consistent_across_fork = True  # sl_fork.c holds the core's locks across fork()

    # -- memory ----------------------------------------------------------------------------
    def memory_create(self, size_bytes: int, page_size: int) -> Any:
        out = ffi.new("struct physmem **")
        _check(lib.physmem_create(size_bytes, page_size, out))
        return out[0]

    def memory_destroy(self, mem: Any) -> None:
        lib.physmem_destroy(mem)

    def memory_info(self, mem: Any) -> Tuple[int, int, int]:
        return (
            lib.physmem_n_pages(mem),
            lib.physmem_free_pages(mem),
            lib.physmem_resident_pages(mem),
        )

    def memory_alloc_pages(self, mem: Any, n_pages: int, layout: int, seed: int) -> "array[int]":
        if n_pages > lib.physmem_free_pages(mem):  # refuse before sizing the result buffer
            _check(lib.physmem_alloc_pages(mem, n_pages, layout, seed, ffi.NULL))
        pfns = _u64_array(n_pages)
        _check(
            lib.physmem_alloc_pages(mem, n_pages, layout, seed, ffi.from_buffer("uint64_t[]", pfns))
        )
        return pfns

    def memory_free_pages(self, mem: Any, pfns: memoryview) -> None:
        _check(lib.physmem_free_pages_list(mem, ffi.from_buffer("uint64_t[]", pfns), len(pfns)))

    def memory_read(self, mem: Any, phys: int, n_bytes: int) -> bytes:
        limit = lib.physmem_n_pages(mem) * lib.physmem_page_size(mem)
        if phys > limit or n_bytes > limit - phys:  # refuse before sizing the result buffer
            _check(lib.physmem_read(mem, phys, ffi.NULL, n_bytes))  # fails its range check
        buf = ffi.new("uint8_t[]", n_bytes)
        _check(lib.physmem_read(mem, phys, buf, n_bytes))
        return ffi.buffer(buf)[:]

    def memory_write(self, mem: Any, phys: int, data: memoryview) -> None:
        _check(lib.physmem_write(mem, phys, ffi.from_buffer(data), data.nbytes))

    # -- tables ----------------------------------------------------------------------------
    def table_create(self, page_size: int, max_segment_bytes: int) -> Any:
        out = ffi.new("struct sl_table **")
        _check(lib.sl_table_create(page_size, max_segment_bytes, out))
        return out[0]

    def table_address(self, table: Any) -> int:
        if not isinstance(table, ffi.CData) or ffi.typeof(table) is not ffi.typeof(
            "struct sl_table *"
        ):
            raise TypeError(f"not a struct sl_table pointer: {table!r}")
        return int(ffi.cast("uintptr_t", table))

    def table_destroy(self, table: Any) -> None:
        lib.sl_table_destroy(table)

    def table_append(
        self, table: Any, pfns: memoryview, offset: int, size_bytes: int, left_pages: int
    ) -> None:
        _check(
            lib.sg_alloc_append_table_from_pages(
                table,
                ffi.from_buffer("uint64_t[]", pfns),
                len(pfns),
                offset,
                size_bytes,
                left_pages,
            )
        )

    def table_set_entries(self, table: Any, rows: memoryview) -> None:
        _check(
            lib.sg_alloc_table_from_entries(
                table, ffi.from_buffer("uint64_t[]", rows), len(rows) // 3
            )
        )

    def table_counts(self, table: Any) -> TableCounts:
        return TableCounts(
            table.sgt.nents, table.sgt.orig_nents, table.total_nents, bool(table.final)
        )

    def table_export_cpu(self, table: Any, n_entries: int) -> "array[int]":
        rows = _u64_array(3 * n_entries)
        _check(lib.sl_table_export_cpu(table, n_entries, ffi.from_buffer("uint64_t[]", rows)))
        return rows

    def table_export_dma(self, table: Any, n_entries: int) -> "array[int]":
        rows = _u64_array(2 * n_entries)
        _check(lib.sl_table_export_dma(table, n_entries, ffi.from_buffer("uint64_t[]", rows)))
        return rows

    def table_chunk_slots(self, table: Any) -> List[int]:
        slots = ffi.new("uint32_t[]", table.n_chunks)
        lib.sl_table_chunk_slots(table, slots)
        return list(slots)

    def drain_chunk_cache(self) -> None:
        """Give the entry chunks the C core keeps for reuse back to the allocator (so that a
        leak checker sees only real leaks); not part of the engine contract."""
        lib.sl_chunk_cache_drain()

    def table_sg_nents(self, table: Any) -> int:
        return int(lib.sg_nents(table))

    def table_nents_for_len(self, table: Any, len_bytes: int) -> int:
        return _check(lib.sg_nents_for_len(table, len_bytes))

    def table_page_pfns(self, table: Any, start_pgoffset: int) -> "array[int]":
        n_pages = lib.sl_table_page_count(table, start_pgoffset)
        pfns = _u64_array(n_pages)
        lib.sl_table_page_pfns(table, start_pgoffset, ffi.from_buffer("uint64_t[]", pfns), n_pages)
        return pfns

    def table_copy(self, table: Any, mem: Any, buf: memoryview, skip: int, to_buffer: bool) -> int:
        copied = ffi.new("uint64_t *")
        c_buf = ffi.from_buffer(buf, require_writable=to_buffer)
        _check(lib.sg_copy_buffer(table, mem, c_buf, len(buf), skip, int(to_buffer), copied))
        return int(copied[0])

    # -- IOMMU ------------------------------------------------------------------------------
    def iommu_create(self, granule: int, aperture_bits: int) -> Any:
        out = ffi.new("struct sl_iommu **")
        _check(lib.sl_iommu_create(granule, aperture_bits, out))
        return out[0]

    def iommu_destroy(self, iommu: Any) -> None:
        lib.sl_iommu_destroy(iommu)

    def iommu_map(self, iommu: Any, iova: int, phys: int, size_bytes: int, prot: int) -> None:
        lib.sl_iommu_lock(iommu)
        try:
            _check(lib.iommu_map(lib.sl_iommu_domain(iommu), iova, phys, size_bytes, prot))
        finally:
            lib.sl_iommu_unlock(iommu)

    def iommu_unmap(self, iommu: Any, iova: int, size_bytes: int) -> int:
        lib.sl_iommu_lock(iommu)
        try:
            return _check(lib.iommu_unmap(lib.sl_iommu_domain(iommu), iova, size_bytes))
        finally:
            lib.sl_iommu_unlock(iommu)

    def iommu_translate(self, iommu: Any, iova: int, access: int) -> int:
        phys = ffi.new("uint64_t *")
        lib.sl_iommu_lock(iommu)
        try:
            _check(lib.iommu_translate(lib.sl_iommu_domain(iommu), iova, access, phys))
        finally:
            lib.sl_iommu_unlock(iommu)
        return int(phys[0])

    def iommu_lookup(self, iommu: Any, iova: int) -> Optional[Tuple[int, int]]:
        phys = ffi.new("uint64_t *")
        prot = ffi.new("uint32_t *")
        lib.sl_iommu_lock(iommu)
        try:
            found = lib.iommu_lookup(lib.sl_iommu_domain(iommu), iova, phys, prot)
        finally:
            lib.sl_iommu_unlock(iommu)
        return (int(phys[0]), int(prot[0])) if found else None

    def iommu_faults(self, iommu: Any) -> List[Tuple[int, int, int, int, int]]:
        records = ffi.new("struct iommu_fault[]", lib.IOMMU_FAULT_LOG_SIZE)
        lib.sl_iommu_lock(iommu)
        try:
            count = lib.iommu_faults_read(
                lib.sl_iommu_domain(iommu), records, lib.IOMMU_FAULT_LOG_SIZE
            )
        finally:
            lib.sl_iommu_unlock(iommu)
        return [(r.seq, r.iova, r.access, r.reason, r.prot) for r in records[0:count]]

    def iommu_clear_faults(self, iommu: Any) -> None:
        lib.sl_iommu_lock(iommu)
        lib.iommu_faults_clear(lib.sl_iommu_domain(iommu))
        lib.sl_iommu_unlock(iommu)

    def iommu_info(self, iommu: Any) -> Tuple[int, int, int, int]:
        lib.sl_iommu_lock(iommu)
        try:
            domain, iovad = lib.sl_iommu_domain(iommu), lib.sl_iommu_iovad(iommu)
            return (
                lib.iommu_mapped_pages(domain),
                lib.iommu_fault_total(domain),
                lib.iova_live_ranges(iovad),
                lib.iova_cached_ranges(iovad),
            )
        finally:
            lib.sl_iommu_unlock(iommu)

    def iommu_iova_ranges(self, iommu: Any, state_mask: int) -> List[Tuple[int, int, int]]:
        ranges: List[Tuple[int, int, int]] = []
        batch = ffi.new("struct iova_range[]", 256)
        from_pfn = 0
        lib.sl_iommu_lock(iommu)
        try:
            while True:
                count = lib.iova_ranges(lib.sl_iommu_iovad(iommu), from_pfn, state_mask, batch, 256)
                ranges.extend((r.pfn_lo, r.pfn_hi, r.state) for r in batch[0:count])
                if count < 256:
                    return ranges
                from_pfn = batch[count - 1].pfn_hi + 1
        finally:
            lib.sl_iommu_unlock(iommu)

    def iommu_reserve(self, iommu: Any, lo_pfn: int, hi_pfn: int) -> None:
        lib.sl_iommu_lock(iommu)
        try:
            _check(lib.iova_reserve(lib.sl_iommu_iovad(iommu), lo_pfn, hi_pfn))
        finally:
            lib.sl_iommu_unlock(iommu)

    def iommu_iova_alloc(self, iommu: Any, size_granules: int, limit_pfn: int) -> int:
        pfn = ffi.new("uint64_t *")
        lib.sl_iommu_lock(iommu)
        try:
            _check(lib.iova_alloc(lib.sl_iommu_iovad(iommu), size_granules, limit_pfn, pfn))
        finally:
            lib.sl_iommu_unlock(iommu)
        return int(pfn[0])

    def iommu_iova_free(self, iommu: Any, pfn: int, size_granules: int) -> None:
        lib.sl_iommu_lock(iommu)
        try:
            _check(lib.iova_free(lib.sl_iommu_iovad(iommu), pfn, size_granules))
        finally:
            lib.sl_iommu_unlock(iommu)

    # -- devices and DMA --------------------------------------------------------------------
    def device_create(self, mem: Any, iommu: Optional[Any]) -> Any:
        out = ffi.new("struct dma_device **")
        _check(lib.dma_device_create(mem, ffi.NULL if iommu is None else iommu, out))
        return out[0]

    def device_destroy(self, dev: Any) -> None:
        lib.dma_device_destroy(dev)

    def device_limits(self, dev: Any) -> DeviceLimits:
        limits = ffi.new("struct dma_device_limits *")
        lib.dma_device_get_limits(dev, limits)
        return DeviceLimits(
            limits.dma_mask,
            limits.max_segment_size,
            limits.seg_boundary_mask,
            limits.max_mapping_size,
        )

    def device_set_limits(self, dev: Any, limits: DeviceLimits) -> None:
        c_limits = ffi.new("struct dma_device_limits *", limits._asdict())
        _check(lib.dma_device_set_limits(dev, c_limits))

    def device_bound(self, dev: Any) -> bool:
        return bool(lib.dma_device_is_bound(dev))

    def device_set_bound(self, dev: Any, bound: bool) -> None:
        lib.dma_device_set_bound(dev, int(bound))

    def device_live_mappings(self, dev: Any) -> int:
        return int(lib.dma_device_live_mappings(dev))

    def device_inject_failures(self, dev: Any, nth: int, ppm: int, err: int, seed: int) -> None:
        _check(lib.dma_device_inject_failures(dev, nth, ppm, err, seed))

    def device_injection(self, dev: Any) -> Tuple[int, int, int, int]:
        state = ffi.new("struct dma_device_injection *")
        lib.dma_device_get_injection(dev, state)
        return (state.nth, state.ppm, state.err, state.rng_state)

    def device_injected_failures(self, dev: Any) -> int:
        return int(lib.dma_device_injected_failures(dev))

    def dma_map(self, dev: Any, table: Any, direction: int, nents: Optional[int] = None) -> int:
        if nents is None:
            _check(lib.dma_map_sgtable(dev, table, direction))
            return int(table.sgt.nents)
        return _check(lib.dma_map_sg(dev, table, nents, direction))

    def dma_unmap(self, dev: Any, table: Any, direction: int, nents: Optional[int] = None) -> None:
        if nents is None:
            _check(lib.dma_unmap_sgtable(dev, table, direction))
        else:
            _check(lib.dma_unmap_sg(dev, table, nents, direction))

    def dma_sync(
        self, dev: Any, table: Any, direction: int, for_cpu: bool, nents: Optional[int] = None
    ) -> None:
        if nents is None:
            _check(lib.dma_sync_sgtable(dev, table, direction, int(for_cpu)))
        else:
            _check(lib.dma_sync_sg(dev, table, nents, direction, int(for_cpu)))

    def table_mapping(self, table: Any) -> Optional[TableMapping]:
        if table.dma_dev == ffi.NULL:
            return None
        return TableMapping(
            table.dma_dir,
            table.dma_iova,
            table.dma_iova_len,
            table.dma_map_nents,
            table.dma_mapped_count,
        )

    def dma_check_access(self, dev: Any, dma_addr: int, n_bytes: int, access: int) -> None:
        _check(lib.dma_device_check_access(dev, dma_addr, n_bytes, access))

    def dma_read(self, dev: Any, dma_addr: int, n_bytes: int) -> bytes:
        buf = ffi.new("uint8_t[]", n_bytes)
        _check(lib.dma_device_read(dev, dma_addr, buf, n_bytes))
        return ffi.buffer(buf)[:]

    def dma_write(self, dev: Any, dma_addr: int, data: memoryview) -> None:
        _check(lib.dma_device_write(dev, dma_addr, ffi.from_buffer(data), len(data)))

    def dma_read_sg(self, dev: Any, table: Any, n_bytes: int) -> bytes:
        buf = ffi.new("uint8_t[]", n_bytes)
        _check(lib.dma_device_read_sg(dev, table, buf, n_bytes))
        return ffi.buffer(buf)[:]

    def dma_write_sg(self, dev: Any, table: Any, data: memoryview) -> None:
        _check(lib.dma_device_write_sg(dev, table, ffi.from_buffer(data), len(data)))
