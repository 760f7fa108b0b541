"""The DMA-API debug layer: the kernel's dma-debug reports, as warnings or exceptions."""

from __future__ import annotations

import warnings

import pytest

import scatterlist as sg
from scatterlist import DataDirection as Dir
from scatterlist import debug

PAGE = 4096


@pytest.fixture
def debugged(system):
    """The shared system with dma-debug raising on "nic", and a second device "disk" on the
    same IOMMU (raising too) in place of the direct one."""
    system.dev.debug = "raise"
    return system._replace(
        direct=sg.Device(system.mem, iommu=system.iommu, name="disk", debug="raise")
    )


def scattered(mem, n):
    return sg.alloc_table_from_pages(list(range(10, 10 + 2 * n, 2)), engine=mem.engine)


def test_the_classic_nents_bug_is_caught(debugged):
    mem, iommu, dev, _ = debugged
    t = scattered(mem, 4)
    count = sg.dma_map_sg(dev, t, t.orig_nents, Dir.TO_DEVICE)
    assert count == 1 < t.orig_nents  # the IOMMU merged the four pages
    assert t.nents == 4  # dma_map_sg leaves the table's nents alone
    with pytest.raises(
        sg.DmaApiError,
        match=r"different entry count \[map count=4\] "
        r"\[unmap count=1\]",
    ) as info:
        sg.dma_unmap_sg(dev, t, count, Dir.TO_DEVICE)
    assert info.value.rule == "unmap-entry-count"
    assert "test_the_classic_nents_bug_is_caught" in str(info.value)  # where it was mapped
    assert t.mapped and iommu.mapped_pages == 4  # raise mode: nothing changed
    with pytest.raises(sg.DmaApiError, match="syncs DMA sg list with different entry count"):
        sg.dma_sync_sg_for_cpu(dev, t, count, Dir.TO_DEVICE)
    sg.dma_unmap_sg(dev, t, t.orig_nents, Dir.TO_DEVICE)
    assert not t.mapped and debug.dump(dev) == []


def test_warn_mode_reports_and_goes_on(debugged):
    mem, iommu, dev, _ = debugged
    dev.debug = "warn"
    t = scattered(mem, 3)
    sg.dma_map_sg(dev, t, 3, Dir.FROM_DEVICE)
    before = dev.debug_error_count
    with pytest.warns(
        sg.DmaApiWarning, match="different direction.*DMA_FROM_DEVICE.*DMA_TO_DEVICE"
    ):
        sg.dma_unmap_sg(dev, t, 3, Dir.TO_DEVICE)
    assert not t.mapped  # the unmap happened, as in the kernel
    assert dev.debug_error_count == before + 1


def test_unmap_of_memory_never_mapped_or_mapped_by_another_device(debugged):
    mem, _, dev, other = debugged
    t = scattered(mem, 2)
    sg.dma_map_sgtable(other, t, Dir.TO_DEVICE)
    with pytest.raises(
        sg.DmaApiError, match="free DMA memory it has not allocated.*mapped by device 'disk'"
    ) as info:
        sg.dma_unmap_sgtable(dev, t, Dir.TO_DEVICE)
    assert info.value.rule == "unmap-not-mapped"
    sg.dma_unmap_sgtable(other, t, Dir.TO_DEVICE)
    with pytest.raises(sg.DmaApiError, match="has not allocated"):  # already unmapped
        sg.dma_unmap_sgtable(other, t, Dir.TO_DEVICE)


def test_sync_checks(debugged):
    mem, _, dev, _ = debugged
    t = scattered(mem, 2)
    sg.dma_map_sgtable(dev, t, Dir.TO_DEVICE)
    seg = t.dma_entries()[0]
    addr, length = seg.dma_address, seg.dma_len
    sg.dma_sync_sgtable_for_device(dev, t, Dir.TO_DEVICE)
    sg.dma_sync_single_for_cpu(dev, addr, 16, Dir.TO_DEVICE)
    with pytest.raises(sg.DmaApiError, match="outside allocated range"):
        sg.dma_sync_single_for_cpu(dev, addr + 8, length, Dir.TO_DEVICE)
    with pytest.raises(sg.DmaApiError, match="with different direction"):
        sg.dma_sync_sgtable_for_cpu(dev, t, Dir.FROM_DEVICE)
    sg.dma_unmap_sgtable(dev, t, Dir.TO_DEVICE)
    with pytest.raises(sg.DmaApiError, match="sync DMA memory it has not allocated") as info:
        sg.dma_sync_single_for_device(dev, addr, 1, Dir.TO_DEVICE)
    assert info.value.rule == "sync-not-mapped"


def test_map_time_segment_checks_undo_the_map(debugged):
    mem, iommu, dev, _ = debugged
    # A 128 KiB CPU entry: longer than the 64 KiB the device claims to support.
    t = sg.alloc_table_from_entries([(0, 0, 32 * PAGE), (64, 0, PAGE)], engine=mem.engine)
    with pytest.raises(
        sg.DmaApiError,
        match=r"longer than device claims to support "
        r"\[len=131072\] \[max=65536\]",
    ):
        sg.dma_map_sgtable(dev, t, Dir.TO_DEVICE)
    assert not t.mapped and iommu.mapped_pages == 0 and iommu.iova_ranges() == []
    dev.debug = "warn"
    with pytest.warns(sg.DmaApiWarning, match="longer than device"):
        sg.dma_map_sgtable(dev, t, Dir.TO_DEVICE)
    assert t.mapped
    sg.dma_unmap_sgtable(dev, t, Dir.TO_DEVICE)


def test_boundary_crossing_is_reported(engine):
    mem = sg.PhysicalMemory(64 << 20, engine=engine)
    direct = sg.Device(mem, debug="raise", seg_boundary_mask=0xFFFF)
    # Direct mapping does not split: a 16 KiB entry at 60 KiB crosses the 64 KiB boundary.
    t = sg.alloc_table_from_pages([15, 16, 17, 18], engine=engine)
    with pytest.raises(sg.DmaApiError, match="across boundary") as info:
        sg.dma_map_sgtable(direct, t, Dir.TO_DEVICE)
    assert info.value.rule == "map-segment-boundary"
    assert not t.mapped


def test_overlapping_writable_mappings(engine):
    mem = sg.PhysicalMemory(64 << 20, engine=engine)
    a = sg.Device(mem, name="a", debug="raise", dma_mask=sg.DMA_BIT_MASK(64))
    b = sg.Device(mem, name="b", debug="raise", dma_mask=sg.DMA_BIT_MASK(64))
    t1 = sg.alloc_table_from_pages([7], engine=engine)
    t2 = sg.alloc_table_from_pages([7], engine=engine)
    sg.dma_map_sgtable(a, t1, Dir.FROM_DEVICE)
    with pytest.raises(sg.DmaApiError, match="overlapping mappings aren't supported"):
        sg.dma_map_sgtable(b, t2, Dir.BIDIRECTIONAL)
    sg.dma_map_sgtable(b, t2, Dir.TO_DEVICE)  # read-only mappings are not tracked
    sg.dma_unmap_sgtable(b, t2, Dir.TO_DEVICE)
    sg.dma_unmap_sgtable(a, t1, Dir.FROM_DEVICE)
    sg.dma_map_sgtable(b, t2, Dir.FROM_DEVICE)  # free again
    sg.dma_unmap_sgtable(b, t2, Dir.FROM_DEVICE)


@pytest.mark.parametrize("first_unmapped", ["older", "newer"])
def test_two_direct_mappings_at_the_same_addresses(engine, first_unmapped):
    """Without an IOMMU, two tables mapping the same pages share their DMA addresses.  The
    record of the older one used to be lost when the newer one was unmapped, so unmapping
    the older one then reported "not allocated"; identical records were confused too."""
    mem = sg.PhysicalMemory(16 << 20, engine=engine)
    dev = sg.Device(mem, debug="raise")
    tables = [sg.alloc_table_from_pages([3, 5], engine=engine) for _ in range(2)]
    for table in tables:  # the same line: equal records, apart from being two maps
        sg.dma_map_sgtable(dev, table, Dir.TO_DEVICE)
    assert len(debug.dump(dev)) == 2
    order = tables if first_unmapped == "older" else tables[::-1]
    for table in order:
        sg.dma_unmap_sgtable(dev, table, Dir.TO_DEVICE)  # raises if its record is lost
    assert debug.dump(dev) == [] and dev.debug_error_count == 0


def test_pending_mappings_at_unbind(debugged):
    mem, _, dev, _ = debugged
    leaked = scattered(mem, 2)
    sg.dma_map_sgtable(dev, leaked, Dir.TO_DEVICE)  # this line is in the report
    owned = sg.SGTable.new(dev, mem.alloc_pages(2), Dir.TO_DEVICE)  # released by Devres
    assert len(debug.dump(dev)) == 2
    with pytest.raises(
        sg.DmaApiError,
        match=r"pending DMA allocations while released from "
        r"device \[count=1\]",
    ) as info:
        dev.unbind()
    assert "test_pending_mappings_at_unbind" in str(info.value)
    assert owned.revoked and not dev.bound
    assert len(debug.dump(dev)) == 1
    owned.close()
    sg.dma_unmap_sgtable(dev, leaked, Dir.TO_DEVICE)


def test_off_mode_records_nothing(engine):
    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    dev = sg.Device(mem, iommu=sg.Iommu(mem), debug="off")
    t = scattered(mem, 4)
    count = sg.dma_map_sg(dev, t, 4, Dir.TO_DEVICE)
    assert debug.dump(dev) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sg.dma_unmap_sg(dev, t, count, Dir.TO_DEVICE)  # the bug goes unnoticed, as in the
    assert not t.mapped  # kernel without dma-debug


def test_global_mode_and_counts(engine):
    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    dev = sg.Device(mem, iommu=sg.Iommu(mem))
    assert dev.debug is None
    previous = debug.get_mode()
    try:
        debug.set_mode("raise")
        total = debug.error_count()
        t = scattered(mem, 2)
        sg.dma_map_sgtable(dev, t, Dir.TO_DEVICE)
        with pytest.raises(sg.DmaApiError):
            sg.dma_unmap_sg(dev, t, 1, Dir.TO_DEVICE)
        assert debug.error_count() == total + 1
        with pytest.raises(sg.InvalidArgument, match="not one of"):
            debug.set_mode("loud")
        with pytest.raises(sg.InvalidArgument, match="not one of"):
            sg.Device(mem, debug="verbose")
    finally:
        debug.set_mode(previous)
