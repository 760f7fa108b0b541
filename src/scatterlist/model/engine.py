"""ModelEngine: the :class:`scatterlist._engine.Engine` protocol on the pure-Python model.

This module only adapts the calling conventions (memoryviews in, ``array("Q")`` out, integer
arguments checked against the C parameter types the way cffi checks them); the behaviour is
in :mod:`.physmem` and :mod:`.table`.
"""

from __future__ import annotations

from array import array
from typing import Any, List, Tuple

from .._contract import TableCounts
from .cargs import byte_view, c_int, pfn_list, u32, u64
from .dma import DmaEngineMixin
from .physmem import PhysMem
from .table import SgTable


def _memory(mem: Any) -> PhysMem:
    if not isinstance(mem, PhysMem):
        raise TypeError(f"not a model memory handle: {mem!r}")
    return mem


def _table(table: Any) -> SgTable:
    if not isinstance(table, SgTable):
        raise TypeError(f"not a model table handle: {table!r}")
    return table


class ModelEngine(DmaEngineMixin):
    """The pure-Python engine: the oracle the C core is tested against."""

    name = "model"
    consistent_across_fork = False  # Python state under Python locks: may be half changed

    # -- emulated physical memory --------------------------------------------------------
    def memory_create(self, size_bytes: int, page_size: int) -> PhysMem:
        return PhysMem(u64(size_bytes), u32(page_size))

    def memory_destroy(self, mem: Any) -> None:
        _memory(mem).destroy()

    def memory_info(self, mem: Any) -> Tuple[int, int, int]:
        m = _memory(mem)
        return (m.n_pages, m.n_free, m.n_resident)

    def memory_alloc_pages(self, mem: Any, n_pages: int, layout: int, seed: int) -> "array[int]":
        return _memory(mem).alloc_pages(u64(n_pages), c_int(layout, 32, signed=True), u64(seed))

    def memory_free_pages(self, mem: Any, pfns: memoryview) -> None:
        _memory(mem).free_pages(pfn_list(pfns))

    def memory_read(self, mem: Any, phys: int, n_bytes: int) -> bytes:
        return _memory(mem).read(u64(phys), u64(n_bytes))

    def memory_write(self, mem: Any, phys: int, data: memoryview) -> None:
        _memory(mem).write(u64(phys), byte_view(data))

    # -- scatter-gather tables -----------------------------------------------------------
    def table_create(self, page_size: int, max_segment_bytes: int) -> SgTable:
        return SgTable(u32(page_size), u32(max_segment_bytes))

    def table_address(self, table: Any) -> int:
        return id(_table(table))

    def table_destroy(self, table: Any) -> None:
        _table(table).free_entries()

    def table_append(
        self, table: Any, pfns: memoryview, offset: int, size_bytes: int, left_pages: int
    ) -> None:
        _table(table).append(pfn_list(pfns), u32(offset), u64(size_bytes), u64(left_pages))

    def table_set_entries(self, table: Any, rows: memoryview) -> None:
        _table(table).set_entries(pfn_list(rows))

    def table_counts(self, table: Any) -> TableCounts:
        t = _table(table)
        return TableCounts(t.nents, t.orig_nents, t.total_nents, t.final)

    def table_export_cpu(self, table: Any, n_entries: int) -> "array[int]":
        return _table(table).export_cpu(u64(n_entries))

    def table_export_dma(self, table: Any, n_entries: int) -> "array[int]":
        return _table(table).export_dma(u64(n_entries))

    def table_chunk_slots(self, table: Any) -> List[int]:
        return _table(table).chunk_slots()

    def table_sg_nents(self, table: Any) -> int:
        return _table(table).sg_nents()

    def table_nents_for_len(self, table: Any, len_bytes: int) -> int:
        return _table(table).sg_nents_for_len(u64(len_bytes))

    def table_page_pfns(self, table: Any, start_pgoffset: int) -> "array[int]":
        return _table(table).page_pfns(u64(start_pgoffset))

    def table_copy(self, table: Any, mem: Any, buf: memoryview, skip: int, to_buffer: bool) -> int:
        return _table(table).copy(_memory(mem), byte_view(buf), u64(skip), bool(to_buffer))
