"""Isolation: a device reaches only what a live mapping grants (issue 7, part 2).

Unmap clears a table's DMA view and a map defines every DMA field it exposes; revocation makes
entries stale like any other change; the Rust drop order (unmap, free the entries, free the
pages) holds when the garbage collector tears an owner down; and a dma-debug warning turned
into an exception leaves the state exactly as with warnings off.
"""

from __future__ import annotations

import gc
import warnings
from typing import Any, List

import pytest
from helpers import PAGE, EngineHook

import scatterlist as sg
from scatterlist import DataDirection as Dir
from scatterlist import debug

POISON = (1 << 64) - 1  # DMA_MAPPING_ERROR


def test_unmap_clears_the_dma_view_and_a_map_defines_every_field(system: Any) -> None:
    """The remap example: map, unmap, another table reusing the IOVAs, then dma_map_sg of one
    entry.  The old table used to keep nents 3 and stale DMA fields into the other table's
    IOVAs, and a whole-table device write landed in the other table without a fault."""
    mem, iommu, dev, _ = system
    dev.max_segment_size = PAGE  # no merging: three DMA segments
    victim_pages = mem.alloc_pages(3)
    t = sg.alloc_table_from_pages(mem.alloc_pages(3).pfns, engine=mem.engine)
    sg.dma_map_sgtable(dev, t, Dir.BIDIRECTIONAL)
    assert t.nents == 3
    sg.dma_unmap_sgtable(dev, t, Dir.BIDIRECTIONAL)
    assert t.nents == t.orig_nents == 3
    assert t.export_dma(3).tolist() == [POISON, 0] * 3  # nothing left to follow

    other = sg.alloc_table_from_pages(victim_pages.pfns, engine=mem.engine)
    sg.dma_map_sgtable(dev, other, Dir.BIDIRECTIONAL)  # reuses the freed IOVA block
    other_rows = other.export_dma().tolist()
    assert sg.dma_map_sg(dev, t, 1, Dir.BIDIRECTIONAL) == 1
    # Only the first entry is mapped: the others read DMA_MAPPING_ERROR / 0, not the stale
    # addresses that now belong to the other table.
    rows = t.export_dma(3).tolist()
    assert rows[2:] == [POISON, 0, POISON, 0]
    assert rows[0] not in other_rows[0::2]
    # A device transfer over the table covers its one mapped segment only.
    with pytest.raises(sg.InvalidArgument, match="hold 4096 bytes, fewer than the 12288"):
        dev.dma_write_table(t, b"\xee" * 3 * PAGE)
    assert dev.dma_write_table(t, b"\xee" * PAGE) == PAGE
    assert dev.dma_read_table(other) == bytes(3 * PAGE)  # the other table is untouched
    sg.dma_unmap_sg(dev, t, 1, Dir.BIDIRECTIONAL)
    sg.dma_unmap_sgtable(dev, other, Dir.BIDIRECTIONAL)
    assert iommu.mapped_pages == 0


def test_direct_remap_defines_every_field(system: Any) -> None:
    mem, _, _, direct = system
    t = sg.alloc_table_from_pages([1, 3, 5], engine=mem.engine)
    sg.dma_map_sgtable(direct, t, Dir.TO_DEVICE)
    assert t.export_dma().tolist() == [PAGE, PAGE, 3 * PAGE, PAGE, 5 * PAGE, PAGE]
    sg.dma_unmap_sgtable(direct, t, Dir.TO_DEVICE)
    assert sg.dma_map_sg(direct, t, 2, Dir.TO_DEVICE) == 2
    assert t.export_dma(3).tolist() == [PAGE, PAGE, 3 * PAGE, PAGE, POISON, 0]
    sg.dma_unmap_sg(direct, t, 2, Dir.TO_DEVICE)


def test_revocation_makes_entries_and_iterators_stale(system: Any) -> None:
    """An SGEntry taken from an owned SGTable used to stay readable after unbind() revoked
    the mapping, showing a dma_address the next table is given."""
    mem, iommu, dev, _ = system
    dev.max_segment_size = PAGE  # two DMA segments
    table = sg.SGTable.new(dev, mem.alloc_pages(2), Dir.TO_DEVICE)
    entry = table.entries()[0]
    iterator = iter(table)
    next(iterator)
    view = table.borrow()
    address = entry.dma_address
    assert dev.unbind() == 1
    with pytest.raises(sg.ClosedError, match="revoked by device unbind"):
        entry.dma_address
    with pytest.raises(sg.ClosedError):
        next(iterator)
    with pytest.raises(sg.ClosedError, match="revoked"):
        list(view)
    dev.bind()
    again = sg.SGTable.new(dev, mem.alloc_pages(2), Dir.TO_DEVICE)
    assert next(iter(again)).dma_address == address  # reused: the old entry must not show it
    again.close()
    table.close()


class Cycle:
    """Keeps an owned SGTable in a reference cycle, as an application object might."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self.me = self


def test_gc_of_an_owned_table_unmaps_before_freeing_pages(system: Any) -> None:
    """An owned SGTable dropped without close() inside a reference cycle: the collector ran
    the Pages' safety net first, freeing pages the IOMMU still mapped, which the next
    allocation handed out while the device could read them through the old IOVA.  The drop
    order must hold: unmap, free the entries, free the pages."""
    mem, iommu, dev, _ = system
    order: List[str] = []
    pages = mem.alloc_pages(3)
    pfns = pages.pfns.tolist()
    table = sg.SGTable.new(dev, pages, Dir.FROM_DEVICE)
    cycle = Cycle(table)
    # Only this test's objects count (the collector may find other tests' garbage too).
    table_handle, dev_handle, mem_handle = (
        table._raw._life.handle,
        dev._life.handle,
        mem._life.handle,
    )

    def on_unmap(real: Any, device: Any, *args: Any) -> Any:
        if device is dev_handle:
            order.append("unmap")
        return real(device, *args)

    def on_destroy(real: Any, handle: Any) -> Any:
        if handle is table_handle:
            order.append("free entries")
        return real(handle)

    def on_free(real: Any, memory: Any, freed: Any) -> Any:
        if memory is mem_handle:
            order.append("free pages")
            # Pages go back only once nothing maps them.
            assert iommu.mapped_pages == 0, "pages freed while the IOMMU still maps them"
        return real(memory, freed)

    gc.disable()  # the cycle must be collected inside the block, not at an allocation before
    try:
        del table, pages, cycle
        with (
            EngineHook(mem.engine, "dma_unmap", on_unmap),
            EngineHook(mem.engine, "table_destroy", on_destroy),
            EngineHook(mem.engine, "memory_free_pages", on_free),
            pytest.warns(ResourceWarning, match="SGTable dropped while DMA-mapped"),
        ):
            gc.collect()
    finally:
        gc.enable()
    assert order == ["unmap", "free entries", "free pages"]
    assert dev.live_mappings == 0 and mem.free_pages == mem.n_pages
    again = mem.alloc_pages(3)
    assert sorted(again.pfns.tolist()) == sorted(pfns)
    again.close()


def test_dropped_mapped_table_is_reported_as_a_leak(system: Any) -> None:
    """With dma-debug on, a mapped owner dropped without close() is reported as a leak with
    the traceback of its map call, besides the ResourceWarning."""
    mem, iommu, dev, _ = system
    dev.debug = "warn"
    raw = sg.alloc_table_from_pages([2, 4], engine=mem.engine)
    sg.dma_map_sgtable(dev, raw, Dir.TO_DEVICE)  # the map call the report points at
    owned = sg.SGTable.new(dev, mem.alloc_pages(1), Dir.TO_DEVICE)
    with (
        pytest.warns(sg.DmaApiWarning) as reports,
        pytest.warns(ResourceWarning, match="dropped while DMA-mapped"),
    ):
        del raw, owned
        gc.collect()
    texts = [
        str(report.message) for report in reports if issubclass(report.category, sg.DmaApiWarning)
    ]
    assert len(texts) == 2
    assert all(
        "[rule leak]" in text and "test_dropped_mapped_table_is_reported_as_a_leak" in text
        for text in texts
    )
    assert iommu.mapped_pages == 0 and debug.dump(dev) == []


def test_warning_as_error_leaves_the_state_of_warnings_off(system: Any) -> None:
    """dma-debug in warn mode with warnings turned into errors (``-W error``): the map used
    to raise but stay mapped with no debug record, and the unmap to raise without unmapping.
    The state must be exactly as with warnings off: mapped and recorded; unmapped."""
    mem, iommu, dev, _ = system
    dev.debug = "warn"
    too_long = sg.alloc_table_from_entries([(100, 0, 2 * 65536), (300, 0, PAGE)], engine=mem.engine)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sg.DmaApiWarning)
        with pytest.raises(sg.DmaApiWarning, match="longer than device claims"):
            sg.dma_map_sgtable(dev, too_long, Dir.TO_DEVICE)
        assert too_long.mapped and len(debug.dump(dev)) == 1  # mapped fully, and recorded
        with pytest.raises(sg.DmaApiWarning, match="different entry count"):
            sg.dma_unmap_sg(dev, too_long, 1, Dir.TO_DEVICE)  # wrong count: still unmaps
        assert not too_long.mapped and debug.dump(dev) == [] and iommu.mapped_pages == 0
    too_long.close()


def test_owned_table_refused_by_a_warning_keeps_nothing(system: Any) -> None:
    """SGTable.new whose map a dma-debug warning (raised as an error) reports: the caller
    gets no table, so none may exist: nothing mapped or recorded, the pages still theirs."""
    mem, iommu, dev, _ = system
    dev.debug = "warn"
    pages = mem.alloc_pages(2)
    raw = sg.alloc_table_from_pages(pages.pfns, engine=mem.engine)
    sg.dma_map_sgtable(dev, raw, Dir.FROM_DEVICE)  # the pages, device-writable already
    mapped = iommu.mapped_pages
    with warnings.catch_warnings():
        warnings.simplefilter("error", sg.DmaApiWarning)
        with pytest.raises(sg.DmaApiWarning, match="overlapping mappings"):
            sg.SGTable.new(dev, pages, Dir.FROM_DEVICE)
    assert not pages.owned and not pages.closed
    assert iommu.mapped_pages == mapped and dev.live_mappings == 1
    assert len(debug.dump(dev)) == 1
    sg.dma_unmap_sgtable(dev, raw, Dir.FROM_DEVICE)
    raw.close()
    pages.close()
    assert mem.free_pages == mem.n_pages


@pytest.mark.parametrize("mode", ["raise", "warn"])
def test_freeing_pages_still_mapped_is_reported(system: Any, mode: str) -> None:
    """Pages closed while a table mapped by hand still maps them: the allocator then hands the
    frames to a new owner, and the device reaches that owner's data through the old mapping.
    dma-debug reports it (rule free-mapped); in raise mode the close is refused."""
    mem, iommu, dev, _ = system
    dev.debug = mode
    pages = mem.alloc_pages(2)
    table = sg.alloc_table_from_pages(pages.pfns, engine=mem.engine)
    sg.dma_map_sgtable(dev, table, Dir.BIDIRECTIONAL)
    if mode == "raise":
        with pytest.raises(sg.DmaApiError, match="frees memory that is still DMA-mapped") as info:
            pages.close()
        assert info.value.rule == "free-mapped" and "test_freeing_pages" in str(info.value)
        assert not pages.closed
    else:
        with pytest.warns(sg.DmaApiWarning, match=r"still DMA-mapped.*\[rule free-mapped\]"):
            pages.close()
        assert pages.closed
    sg.dma_unmap_sgtable(dev, table, Dir.BIDIRECTIONAL)
    pages.close()  # unmapped: nothing to report
    table.close()
    assert mem.free_pages == mem.n_pages


def test_a_dropped_pages_object_still_mapped_is_kept_and_reported(system: Any) -> None:
    mem, iommu, dev, _ = system
    dev.debug = "warn"
    pages = mem.alloc_pages(1)
    pfn = pages.pfns[0]
    table = sg.alloc_table_from_pages(pages.pfns, engine=mem.engine)
    sg.dma_map_sgtable(dev, table, Dir.BIDIRECTIONAL)
    with pytest.warns(sg.DmaApiWarning, match="still DMA-mapped"):
        del pages
        gc.collect()
    again = mem.alloc_pages(1)
    assert again.pfns[0] != pfn  # the frame was not handed out again
    sg.dma_unmap_sgtable(dev, table, Dir.BIDIRECTIONAL)
    table.close()
    again.close()
