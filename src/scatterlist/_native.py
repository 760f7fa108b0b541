"""The native engine: the only module that touches the compiled extension ``scatterlist._sg``.

It turns C return codes into the exceptions of :mod:`scatterlist.errors` (one translator,
:func:`_check`), passes page arrays to C without copying (``ffi.from_buffer``), and moves entries
out in one bulk call per table rather than one call per entry.
"""

from __future__ import annotations

from array import array
from typing import Any, List, Tuple

try:
    from ._sg import ffi, lib
except ImportError as exc:  # pragma: no cover - exercised only without a build
    raise ImportError(
        "scatterlist's native engine is not built (scatterlist._sg is missing): reinstall with "
        "`pip install .`, or choose the pure-Python engine with SCATTERLIST_ENGINE=model") from exc

from .errors import error_for

EXPECTED_ABI_VERSION = 1
if lib.sl_abi_version() != EXPECTED_ABI_VERSION:  # a stale build must fail loudly
    raise ImportError(
        f"scatterlist._sg has ABI version {lib.sl_abi_version()}, the Python layer expects "
        f"{EXPECTED_ABI_VERSION}: rebuild with `pip install .`")


def _check(rc: int) -> int:
    """Raise the exception for a negative return code; pass other values through."""
    if rc < 0:
        detail = lib.sl_last_error()
        raise error_for(-rc, detail.reason, detail.index, detail.value)
    return rc


def _u64_array(n: int) -> "array[int]":
    return array("Q", bytes(8 * n))


class NativeEngine:
    name = "native"

    # -- memory ----------------------------------------------------------------------------
    def memory_create(self, size_bytes: int, page_size: int) -> Any:
        out = ffi.new("struct physmem **")
        _check(lib.physmem_create(size_bytes, page_size, out))
        return ffi.gc(out[0], lib.physmem_destroy)

    def memory_destroy(self, mem: Any) -> None:
        ffi.release(mem)

    def memory_info(self, mem: Any) -> Tuple[int, int, int]:
        return (lib.physmem_n_pages(mem), lib.physmem_free_pages(mem),
                lib.physmem_resident_pages(mem))

    def memory_alloc_pages(self, mem: Any, n_pages: int, layout: int, seed: int) -> "array[int]":
        pfns = _u64_array(n_pages)
        _check(lib.physmem_alloc_pages(mem, n_pages, layout, seed,
                                       ffi.from_buffer("uint64_t[]", pfns)))
        return pfns

    def memory_free_pages(self, mem: Any, pfns: memoryview) -> None:
        _check(lib.physmem_free_pages_list(mem, ffi.from_buffer("uint64_t[]", pfns), len(pfns)))

    def memory_read(self, mem: Any, phys: int, n_bytes: int) -> bytes:
        buf = ffi.new("uint8_t[]", n_bytes)
        _check(lib.physmem_read(mem, phys, buf, n_bytes))
        return ffi.buffer(buf)[:]

    def memory_write(self, mem: Any, phys: int, data: memoryview) -> None:
        _check(lib.physmem_write(mem, phys, ffi.from_buffer(data), len(data)))

    # -- tables ----------------------------------------------------------------------------
    def table_create(self, page_size: int, max_segment_bytes: int) -> Any:
        out = ffi.new("struct sl_table **")
        _check(lib.sl_table_create(page_size, max_segment_bytes, out))
        return ffi.gc(out[0], lib.sl_table_destroy)

    def table_destroy(self, table: Any) -> None:
        ffi.release(table)

    def table_free_entries(self, table: Any) -> None:
        lib.sl_table_free_entries(table)

    def table_append(self, table: Any, pfns: memoryview, offset: int, size_bytes: int,
                     left_pages: int) -> None:
        _check(lib.sg_alloc_append_table_from_pages(
            table, ffi.from_buffer("uint64_t[]", pfns), len(pfns), offset, size_bytes,
            left_pages))

    def table_counts(self, table: Any) -> Tuple[int, int, int, bool]:
        return (table.sgt.nents, table.sgt.orig_nents, table.total_nents, bool(table.final))

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

    def table_sg_nents(self, table: Any) -> int:
        return int(lib.sg_nents(table))

    def table_nents_for_len(self, table: Any, len_bytes: int) -> int:
        return _check(lib.sg_nents_for_len(table, len_bytes))

    def table_page_pfns(self, table: Any, start_pgoffset: int) -> "array[int]":
        n_pages = lib.sl_table_page_count(table, start_pgoffset)
        pfns = _u64_array(n_pages)
        lib.sl_table_page_pfns(table, start_pgoffset, ffi.from_buffer("uint64_t[]", pfns),
                               n_pages)
        return pfns

    def table_copy(self, table: Any, mem: Any, buf: memoryview, skip: int,
                   to_buffer: bool) -> int:
        copied = ffi.new("uint64_t *")
        c_buf = ffi.from_buffer(buf, require_writable=to_buffer)
        _check(lib.sg_copy_buffer(table, mem, c_buf, len(buf), skip, int(to_buffer), copied))
        return int(copied[0])
