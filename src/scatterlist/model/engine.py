"""ModelEngine: the :class:`scatterlist._engine.Engine` protocol on the pure-Python model.

This module only adapts the calling conventions (memoryviews in, ``array("Q")`` out, integer
arguments checked against the C parameter types the way cffi checks them); the behaviour is
in :mod:`.physmem` and :mod:`.table`.
"""

from __future__ import annotations

from array import array
from typing import Any, List, Tuple

from .dma import DmaEngineMixin
from .physmem import PhysMem
from .table import SgTable


def _c_int(value: int, bits: int, signed: bool = False) -> int:
    """value, if it fits the C integer type the native engine passes it as.

    cffi raises TypeError for a non-integer and OverflowError for an integer that does not
    fit; the model does the same so that both engines fail alike."""
    if not isinstance(value, int):
        raise TypeError(f"an integer is required, not {type(value).__name__}")
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if not low <= value <= high:
        if value < 0 and not signed:
            raise OverflowError("can't convert negative number to unsigned")
        raise OverflowError("int too big to convert")
    return int(value)


def _u32(value: int) -> int:
    return _c_int(value, 32)


def _u64(value: int) -> int:
    return _c_int(value, 64)


def _pfn_list(pfns: memoryview) -> List[int]:
    """The values of a 1-D "Q" view (pfns, or flat rows of an entry table)."""
    if pfns.format != "Q" or pfns.ndim != 1:
        raise TypeError(f"expected a 1-D memoryview of format 'Q', not {pfns.format!r}")
    return pfns.tolist()


def _byte_view(buf: memoryview) -> memoryview:
    """buf as a flat view of bytes (format "B")."""
    if buf.format == "B" and buf.ndim == 1 and buf.c_contiguous:
        return buf
    return buf.cast("B")


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

    # -- emulated physical memory --------------------------------------------------------
    def memory_create(self, size_bytes: int, page_size: int) -> PhysMem:
        return PhysMem(_u64(size_bytes), _u32(page_size))

    def memory_destroy(self, mem: Any) -> None:
        _memory(mem).destroy()

    def memory_info(self, mem: Any) -> Tuple[int, int, int]:
        m = _memory(mem)
        return (m.n_pages, m.n_free, m.n_resident)

    def memory_alloc_pages(self, mem: Any, n_pages: int, layout: int,
                           seed: int) -> "array[int]":
        return _memory(mem).alloc_pages(_u64(n_pages), _c_int(layout, 32, signed=True),
                                        _u64(seed))

    def memory_free_pages(self, mem: Any, pfns: memoryview) -> None:
        _memory(mem).free_pages(_pfn_list(pfns))

    def memory_read(self, mem: Any, phys: int, n_bytes: int) -> bytes:
        return _memory(mem).read(_u64(phys), _u64(n_bytes))

    def memory_write(self, mem: Any, phys: int, data: memoryview) -> None:
        _memory(mem).write(_u64(phys), _byte_view(data))

    # -- scatter-gather tables -----------------------------------------------------------
    def table_create(self, page_size: int, max_segment_bytes: int) -> SgTable:
        return SgTable(_u32(page_size), _u32(max_segment_bytes))

    def table_address(self, table: Any) -> int:
        return id(_table(table))

    def table_destroy(self, table: Any) -> None:
        _table(table).free_entries()

    def table_free_entries(self, table: Any) -> None:
        _table(table).free_entries()

    def table_append(self, table: Any, pfns: memoryview, offset: int, size_bytes: int,
                     left_pages: int) -> None:
        _table(table).append(_pfn_list(pfns), _u32(offset), _u64(size_bytes),
                             _u64(left_pages))

    def table_set_entries(self, table: Any, rows: memoryview) -> None:
        _table(table).set_entries(_pfn_list(rows))

    def table_counts(self, table: Any) -> Tuple[int, int, int, bool]:
        t = _table(table)
        return (t.nents, t.orig_nents, t.total_nents, t.final)

    def table_export_cpu(self, table: Any, n_entries: int) -> "array[int]":
        return _table(table).export_cpu(_u64(n_entries))

    def table_export_dma(self, table: Any, n_entries: int) -> "array[int]":
        return _table(table).export_dma(_u64(n_entries))

    def table_chunk_slots(self, table: Any) -> List[int]:
        return _table(table).chunk_slots()

    def table_sg_nents(self, table: Any) -> int:
        return _table(table).sg_nents()

    def table_nents_for_len(self, table: Any, len_bytes: int) -> int:
        return _table(table).sg_nents_for_len(_u64(len_bytes))

    def table_page_pfns(self, table: Any, start_pgoffset: int) -> "array[int]":
        return _table(table).page_pfns(_u64(start_pgoffset))

    def table_copy(self, table: Any, mem: Any, buf: memoryview, skip: int,
                   to_buffer: bool) -> int:
        return _table(table).copy(_memory(mem), _byte_view(buf), _u64(skip), bool(to_buffer))
