"""SGTable[Owned[Pages]] and SGTable[Borrowed]: the Rust abstraction's type-states, drop order
and Devres revocation (the Rust SGTable abstraction)."""

from __future__ import annotations

import gc

import pytest

import scatterlist as sg
from scatterlist import DataDirection as Dir

PAGE = 4096


def test_owned_table_maps_iterates_and_drops_in_order(system):
    mem, iommu, dev, _ = system
    pages = mem.vmalloc(5 * PAGE + 100)
    free_before = mem.free_pages
    with sg.SGTable.new(dev, pages, Dir.FROM_DEVICE) as table:
        assert table.pages is pages
        assert table.device is dev and table.direction is Dir.FROM_DEVICE
        segments = list(table)
        # Scattered pages, but the IOMMU merges them into one IOVA-contiguous segment.
        assert table.orig_nents == 6 and table.nents == len(segments) == 1
        assert segments[0].dma_len == 5 * PAGE + 100
        dev.dma_write_table(table, b"\xab" * 200)
        assert mem.read(pages.pfns[0] * PAGE, 200) == b"\xab" * 200
        assert iommu.mapped_pages == 6 and dev.live_mappings == 1
        with pytest.raises(sg.BusyError, match="an SGTable owns these pages"):
            pages.close()
    assert table.closed and pages.closed
    assert iommu.mapped_pages == 0 and dev.live_mappings == 0
    assert mem.free_pages == free_before + 6
    with pytest.raises(sg.ClosedError):
        list(table)


def test_segment_limit_is_the_devices(system):
    mem, iommu, dev, _ = system
    pages = mem.alloc_pages(40, "contiguous")
    with sg.SGTable.new(dev, pages, Dir.TO_DEVICE) as table:
        # 160 KiB of contiguous pages: CPU entries of at most 64 KiB (max_segment_size),
        # where the Rust abstraction would build one 160 KiB entry.
        assert [e.length for e in table._raw.entries()] == [65536, 65536, 32768]
        assert all(s.dma_len <= dev.max_segment_size for s in table)
    dev.max_mapping_size = 3 * PAGE
    pages2 = mem.alloc_pages(8, "contiguous")
    with sg.SGTable.new(dev, pages2, Dir.TO_DEVICE) as table:
        assert [e.length for e in table._raw.entries()] == [3 * PAGE, 3 * PAGE, 2 * PAGE]


def test_borrowed_views_never_dangle(system):
    mem, _, dev, _ = system
    table = sg.SGTable.new(dev, mem.alloc_pages(3), Dir.TO_DEVICE)
    view = table.borrow()
    view_of_view = view.borrow()
    assert [s.dma_len for s in view] == [s.dma_len for s in table]
    entry = next(iter(view))
    with pytest.raises(sg.InvalidArgument, match="close\\(\\) is for the owner"):
        view.close()  # type: ignore[misc]
    table.close()
    for use in (
        lambda: list(view),
        lambda: view.nents,
        lambda: list(view_of_view),
        lambda: entry.dma_address,
    ):
        with pytest.raises(sg.ClosedError):
            use()
    assert view.closed


def test_unbind_revokes_once_and_close_does_not_unmap_again(system):
    mem, iommu, dev, _ = system
    tables = [sg.SGTable.new(dev, mem.alloc_pages(2), Dir.BIDIRECTIONAL) for _ in range(3)]
    addrs = [next(iter(t)).dma_address for t in tables]
    view = tables[1].borrow()
    assert dev.live_mappings == 3 and iommu.mapped_pages == 6
    assert dev.unbind() == 3
    assert dev.unbind() == 0  # exactly once
    assert dev.live_mappings == 0 and iommu.mapped_pages == 0
    assert all(t.revoked for t in tables)
    for addr in addrs:
        with pytest.raises(sg.IommuFault, match="not mapped"):
            dev.dma_read(addr, 1)
    with pytest.raises(sg.ClosedError, match="revoked by device unbind"):
        list(view)
    with pytest.raises(sg.ClosedError, match="revoked"):
        list(tables[0])
    ranges_before = iommu.iova_ranges(cached=True)
    for t in tables:
        t.close()  # frees entries and pages, no second unmap
    assert iommu.iova_ranges(cached=True) == ranges_before
    assert all(t.closed for t in tables)
    # Unbound: new owned tables are refused and leave the pages with the caller.
    pages = mem.alloc_pages(1)
    with pytest.raises(sg.DeviceUnbound):
        sg.SGTable.new(dev, pages, Dir.TO_DEVICE)
    assert not pages.closed and iommu.mapped_pages == 0
    dev.bind()
    sg.SGTable.new(dev, pages, Dir.TO_DEVICE).close()
    # Tables dropped without close leave no stale Devres entries behind.
    for _ in range(5):
        sg.SGTable.new(dev, mem.alloc_pages(1), Dir.TO_DEVICE)
    gc.collect()
    sg.SGTable.new(dev, mem.alloc_pages(1), Dir.TO_DEVICE).close()
    assert len(dev._state.mappings) <= 1


def test_table_closed_before_unbind_is_not_revoked(system):
    mem, iommu, dev, _ = system
    table = sg.SGTable.new(dev, mem.alloc_pages(2), Dir.TO_DEVICE)
    table.close()
    assert dev.unbind() == 0


def test_from_raw_views(system):
    mem, _, dev, _ = system
    raw = sg.alloc_table_from_pages([1, 3, 5], engine=mem.engine)
    sg.dma_map_sgtable(dev, raw, Dir.TO_DEVICE)
    view = sg.SGTable.from_raw(raw)
    assert view.nents == 1 and [s.dma_len for s in view] == [3 * PAGE]
    if mem.engine == "native":
        again = sg.SGTable.from_raw(raw._life.handle)  # a C pointer, as a C device model holds
        assert again.nents == 1
    sg.dma_unmap_sgtable(dev, raw, Dir.TO_DEVICE)
    raw.close()
    with pytest.raises(sg.ClosedError):
        list(view)
    with pytest.raises(TypeError):
        sg.SGTable.from_raw(42)


def test_new_refuses_bad_input_and_changes_nothing(system, engine):
    mem, iommu, dev, _ = system
    pages = mem.alloc_pages(2)
    with pytest.raises(sg.InvalidArgument, match="DMA_NONE"):
        sg.SGTable.new(dev, pages, Dir.NONE)
    other_mem = sg.PhysicalMemory(1 << 20, engine=engine)
    foreign = other_mem.alloc_pages(1)
    with pytest.raises(sg.InvalidArgument, match="different memories"):
        sg.SGTable.new(dev, foreign, Dir.TO_DEVICE)
    owned = sg.SGTable.new(dev, pages, Dir.TO_DEVICE)
    with pytest.raises(sg.BusyError, match="already belong"):
        sg.SGTable.new(dev, pages, Dir.TO_DEVICE)
    closed_pages = mem.alloc_pages(1)
    closed_pages.close()
    with pytest.raises(sg.ClosedError):
        sg.SGTable.new(dev, closed_pages, Dir.TO_DEVICE)
    tiny = sg.Device(mem, iommu=iommu, dma_mask=sg.DMA_BIT_MASK(13))  # one usable granule
    big = mem.alloc_pages(4)
    with pytest.raises(sg.OutOfMemory):
        sg.SGTable.new(tiny, big, Dir.TO_DEVICE)
    assert not big.closed and tiny.live_mappings == 0 and iommu.mapped_pages == 2
    owned.close()


def test_dropped_owner_is_released_by_gc(system):
    mem, iommu, dev, _ = system
    free_before = mem.free_pages
    table = sg.SGTable.new(dev, mem.alloc_pages(4), Dir.TO_DEVICE)
    assert iommu.mapped_pages == 4
    del table
    gc.collect()
    # The RawTable's safety net unmaps before freeing; the Pages' net frees the pages.
    assert iommu.mapped_pages == 0
    assert dev.live_mappings == 0
    assert mem.free_pages == free_before


def test_borrow_of_a_from_raw_view(system):
    mem, _, dev, _ = system
    raw = sg.alloc_table_from_pages([2, 4], engine=mem.engine)
    view = sg.SGTable.from_raw(raw).borrow()
    assert view.nents == 2 and not view.closed  # unmapped: the CPU entries, nothing revoked
    sg.dma_map_sgtable(dev, raw, Dir.TO_DEVICE)
    assert view.nents == 1
    sg.dma_unmap_sgtable(dev, raw, Dir.TO_DEVICE)
    raw.close()
    assert view.closed
    with pytest.raises(sg.ClosedError):
        list(view)
