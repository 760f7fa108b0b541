"""The contract between the Pythonic layer and an engine: what each engine method does.

Two engines implement :class:`Engine`: ``native`` (the C core through cffi, in ``_native.py``)
and ``model`` (pure Python, in ``scatterlist.model``).  The Pythonic layer validates arguments
that need no engine state, then calls the engine; the engine checks everything that depends on
its state and raises the exceptions of :mod:`scatterlist.errors` (via ``error_for`` with a
:class:`~scatterlist.errors.Reason`).  A call that raises changes nothing.

Conventions for every method:

* sizes and addresses are ``int`` bytes, page frame numbers are ``int`` pfns;
* ``pfns`` arguments are 1-D ``memoryview`` objects of format ``"Q"``;
* array results are ``array.array("Q")`` objects;
* handles (``mem``, ``table``) are opaque: only the engine that made them may use them.

Both engines import this module (it sits below them); :mod:`scatterlist._engine` chooses one.
"""

from __future__ import annotations

from array import array
from typing import Any, List, NamedTuple, Optional, Protocol, Tuple

LAYOUTS = {"contiguous": 0, "scattered": 1, "random": 2}


class TableCounts(NamedTuple):
    """A table's counters (``struct sg_append_table`` and the emulation's final flag)."""

    nents: int  #: DMA entries once mapped; orig_nents before and after
    orig_nents: int  #: CPU entries holding pages
    total_nents: int  #: usable entry slots allocated (more than orig_nents while appending)
    final: bool  #: the last append had left_pages == 0


class DeviceLimits(NamedTuple):
    """What a driver sees of a device's DMA constraints (``struct device_dma_parameters``),
    in bytes."""

    dma_mask: int  #: highest address the device can generate: 2**n - 1
    max_segment_size: int  #: dma_get_max_seg_size
    seg_boundary_mask: int  #: segments may not cross multiples of mask + 1
    max_mapping_size: int  #: dma_max_mapping_size


class TableMapping(NamedTuple):
    """A table's live DMA mapping, as the engine keeps it."""

    direction: int  #: DataDirection value
    iova: int  #: the IOVA block (0 for direct mapping)
    iova_len: int  #: its length in bytes (0 for direct mapping)
    map_nents: int  #: the entry count passed to the map call
    mapped_count: int  #: the DMA segment count the map returned


class Engine(Protocol):
    name: str
    #: True when a forked child finds every engine object in a consistent state even if a
    #: thread of the parent was changing it (the C core holds its locks across fork()); the
    #: model's objects may be half changed, and are marked unusable instead.
    consistent_across_fork: bool

    # -- emulated physical memory --------------------------------------------------------
    def memory_create(self, size_bytes: int, page_size: int) -> Any:
        """A new sparse memory of size_bytes (a positive multiple of page_size, <= 2**52)."""

    def memory_destroy(self, mem: Any) -> None:
        """Frees the memory and every page's backing."""

    def memory_info(self, mem: Any) -> Tuple[int, int, int]:
        """(n_pages, free_pages, resident_pages): resident pages have backing bytes."""

    def memory_alloc_pages(self, mem: Any, n_pages: int, layout: int, seed: int) -> "array[int]":
        """Allocates n_pages pfns in the layout (LAYOUTS) or raises OutOfMemory having
        allocated nothing.  Layout rules (both engines, bit for bit):

        * contiguous: the lowest run of n_pages consecutive free pfns;
        * scattered: walk free pfns upward, take a pfn unless it is the last taken pfn + 1;
        * random: walk free pfns upward alternating "take" runs of 1 + r % 16 pfns and "skip"
          runs of 1 + r % 4 pfns, starting with a take run; r are successive splitmix64
          outputs from state=seed.
        """

    def memory_free_pages(self, mem: Any, pfns: memoryview) -> None:
        """Frees the pages (their contents are dropped), or none if any is out of range, not
        allocated, or listed twice."""

    def memory_read(self, mem: Any, phys: int, n_bytes: int) -> bytes:
        """Bytes at [phys, phys + n_bytes); never-written bytes read as zero."""

    def memory_write(self, mem: Any, phys: int, data: memoryview) -> None:
        """Writes data at phys; the whole range must lie inside the memory."""

    # -- scatter-gather tables -----------------------------------------------------------
    def table_create(self, page_size: int, max_segment_bytes: int) -> Any:
        """An empty append table; max_segment_bytes is rounded down to whole pages
        (0xFFFFFFFF means no limit)."""

    def table_address(self, table: Any) -> int:
        """A number identifying the table while it lives (its C address for native)."""

    def table_destroy(self, table: Any) -> None:
        """Frees the entries and the handle."""

    def table_append(
        self, table: Any, pfns: memoryview, offset: int, size_bytes: int, left_pages: int
    ) -> None:
        """sg_alloc_append_table_from_pages with the rules of csrc/scatterlist.c."""

    def table_set_entries(self, table: Any, rows: memoryview) -> None:
        """sg_alloc_table + sg_set_page per entry on an empty table: rows is a flat "Q" view
        of (pfn, offset, length) triples (sg_alloc_table_from_entries in C)."""

    def table_counts(self, table: Any) -> TableCounts: ...

    def table_export_cpu(self, table: Any, n_entries: int) -> "array[int]":
        """3 * n_entries values: (pfn, offset, length) per entry, walked with sg_next."""

    def table_export_dma(self, table: Any, n_entries: int) -> "array[int]":
        """2 * n_entries values: (dma_address, dma_length) per entry."""

    def table_chunk_slots(self, table: Any) -> List[int]:
        """Slots in each entry chunk, in chain order."""

    def table_sg_nents(self, table: Any) -> int:
        """sg_nents: entries reachable with sg_next from the first."""

    def table_nents_for_len(self, table: Any, len_bytes: int) -> int:
        """sg_nents_for_len; raises InvalidArgument (NENTS_FOR_LEN) when the list is short."""

    def table_page_pfns(self, table: Any, start_pgoffset: int) -> "array[int]":
        """The pfns for_each_sgtable_page visits, starting start_pgoffset pages in."""

    def table_copy(self, table: Any, mem: Any, buf: memoryview, skip: int, to_buffer: bool) -> int:
        """sg_copy_buffer over orig_nents entries; buf is writable when to_buffer.  Returns the
        bytes copied."""

    # -- IOMMU (csrc/iommu.c + csrc/iova.c behind csrc/dma.c's sl_iommu) -------------------
    def iommu_create(self, granule: int, aperture_bits: int) -> Any:
        """An IOMMU domain with its IOVA allocator (start pfn 1, one depot magazine)."""

    def iommu_destroy(self, iommu: Any) -> None: ...

    def iommu_map(self, iommu: Any, iova: int, phys: int, size_bytes: int, prot: int) -> None:
        """iommu_map: all or nothing."""

    def iommu_unmap(self, iommu: Any, iova: int, size_bytes: int) -> int:
        """iommu_unmap: bytes unmapped, stopping at the first unmapped page."""

    def iommu_translate(self, iommu: Any, iova: int, access: int) -> int:
        """Physical address for a one-byte device access (1 read, 2 write); a fault is logged
        and raised as IommuFault."""

    def iommu_lookup(self, iommu: Any, iova: int) -> Optional[Tuple[int, int]]:
        """(phys, prot) of a mapped page, else None; never a fault."""

    def iommu_faults(self, iommu: Any) -> List[Tuple[int, int, int, int, int]]:
        """The held fault records, oldest first: (seq, iova, access, reason, prot)."""

    def iommu_clear_faults(self, iommu: Any) -> None: ...

    def iommu_info(self, iommu: Any) -> Tuple[int, int, int, int]:
        """(mapped_pages, fault_total, live IOVA ranges, cached IOVA ranges)."""

    def iommu_iova_ranges(self, iommu: Any, state_mask: int) -> List[Tuple[int, int, int]]:
        """IOVA ranges (pfn_lo, pfn_hi, state) whose state bit is in state_mask, ascending."""

    def iommu_reserve(self, iommu: Any, lo_pfn: int, hi_pfn: int) -> None: ...

    def iommu_iova_alloc(self, iommu: Any, size_granules: int, limit_pfn: int) -> int:
        """iova_alloc: a live IOVA range outside any mapping (fault injection)."""

    def iommu_iova_free(self, iommu: Any, pfn: int, size_granules: int) -> None: ...

    # -- devices and DMA mapping (csrc/dma.c) ---------------------------------------------
    def device_create(self, mem: Any, iommu: Optional[Any]) -> Any:
        """A bound device with the kernel's defaults."""

    def device_destroy(self, dev: Any) -> None: ...

    def device_limits(self, dev: Any) -> DeviceLimits: ...

    def device_set_limits(self, dev: Any, limits: DeviceLimits) -> None:
        """All four at once, or none (InvalidArgument: DEVICE_DMA_MASK, DEVICE_MAX_SEGMENT,
        DEVICE_SEG_BOUNDARY)."""

    def device_bound(self, dev: Any) -> bool: ...

    def device_set_bound(self, dev: Any, bound: bool) -> None: ...

    def device_live_mappings(self, dev: Any) -> int:
        """Tables mapped for the device and not yet unmapped."""

    def device_inject_failures(self, dev: Any, nth: int, ppm: int, err: int, seed: int) -> None:
        """The nth map call from now fails (0: off), or each one with probability ppm per
        million from splitmix64(seed) (0: off), with -err (ENOMEM, EINVAL or EIO)."""

    def device_injection(self, dev: Any) -> Tuple[int, int, int, int]:
        """What device_inject_failures armed, as it stands: (maps left before the nth fails,
        ppm, errno, RNG state)."""

    def device_injected_failures(self, dev: Any) -> int: ...

    def dma_map(self, dev: Any, table: Any, direction: int, nents: Optional[int] = None) -> int:
        """dma_map_sgtable (nents None: orig_nents, and the table's nents is set) or
        dma_map_sg (the first nents entries; the table's nents is left alone).  Returns the
        DMA segment count.  Every DMA field of the table is defined afterwards: entries past
        the count read DMA_MAPPING_ERROR / 0.  A DMA segment longer than 2**32-1 bytes is
        refused (DMA_SEGMENT_LENGTH) before anything is mapped."""

    def dma_unmap(self, dev: Any, table: Any, direction: int, nents: Optional[int] = None) -> None:
        """dma_unmap_sgtable (nents None) or dma_unmap_sg.  Clears the DMA view: every entry
        reads DMA_MAPPING_ERROR / 0 and nents is orig_nents again."""

    def dma_sync(
        self, dev: Any, table: Any, direction: int, for_cpu: bool, nents: Optional[int] = None
    ) -> None: ...

    def table_mapping(self, table: Any) -> Optional[TableMapping]:
        """The table's live mapping, else None."""

    def dma_check_access(self, dev: Any, dma_addr: int, n_bytes: int, access: int) -> None:
        """Translates and checks [dma_addr, dma_addr + n_bytes) as a device access (1 read, 2
        write) would, logging a fault as it would; moves nothing."""

    def dma_read(self, dev: Any, dma_addr: int, n_bytes: int) -> bytes:
        """The device reads: all translated and checked before a byte moves; a device cannot
        emit an address above its dma_mask, with or without an IOMMU."""

    def dma_write(self, dev: Any, dma_addr: int, data: memoryview) -> None: ...

    def dma_read_sg(self, dev: Any, table: Any, n_bytes: int) -> bytes:
        """The first n_bytes of the table's mapped DMA segments (the count the map returned),
        in order."""

    def dma_write_sg(self, dev: Any, table: Any, data: memoryview) -> None: ...
