"""DMA mapping through the emulated IOMMU and direct (spec sections 7, 8 and 10)."""

from __future__ import annotations

import pytest

import scatterlist as sg
from scatterlist import DataDirection as Dir

PAGE = 4096
DMA_MAPPING_ERROR = (1 << 64) - 1


def dma_rows(table):
    return [(e.dma_address, e.dma_len) for e in table.dma_entries()]


# -- worked examples of spec section 8 --------------------------------------------------


def test_unaligned_last_entry_opens_a_new_segment(system):
    mem, iommu, dev, _ = system
    t = sg.alloc_table_from_entries(
        [(100, 0, 4096), (200, 0, 8192), (300, 512, 1000)], engine=mem.engine
    )
    sg.dma_map_sgtable(dev, t, Dir.BIDIRECTIONAL)
    (block,) = iommu.iova_ranges()
    assert block.size_bytes == 16384
    iova = block.start
    assert (t.nents, t.orig_nents) == (2, 3)
    assert dma_rows(t) == [(iova, 12288), (iova + 12288 + 512, 1000)]
    assert list(t.export_dma(3))[4:] == [DMA_MAPPING_ERROR, 0]
    # CPU fields are restored exactly.
    assert [(e.pfn, e.offset, e.length) for e in t] == [
        (100, 0, 4096),
        (200, 0, 8192),
        (300, 512, 1000),
    ]
    sg.dma_unmap_sgtable(dev, t, Dir.BIDIRECTIONAL)


def test_entry_ending_on_a_granule_merges_with_the_next(system):
    mem, iommu, dev, _ = system
    t = sg.alloc_table_from_pages([10, 20], offset=100, size=3996 + 4096, engine=mem.engine)
    sg.dma_map_sgtable(dev, t, Dir.TO_DEVICE)
    (block,) = iommu.iova_ranges()
    assert dma_rows(t) == [(block.start + 100, 8092)]
    assert t.nents == 1


def test_oversized_input_entry_is_not_split_and_merges_past_the_limit(system):
    # A 128 KiB entry then a 4 KiB one: one 132 KiB segment despite the 64 KiB limit, because
    # max_len - cur_len wraps around as an unsigned 32-bit value.
    mem, iommu, dev, _ = system
    t = sg.alloc_table_from_entries([(0, 0, 32 * PAGE), (64, 0, PAGE)], engine=mem.engine)
    sg.dma_map_sgtable(dev, t, Dir.TO_DEVICE)
    assert dev.max_segment_size == 65536
    assert [length for _, length in dma_rows(t)] == [33 * PAGE]


def test_segments_stop_at_the_max_segment_size(system):
    mem, iommu, dev, _ = system
    t = sg.alloc_table_from_pages(list(range(0, 64, 2)), engine=mem.engine)  # 32 single pages
    sg.dma_map_sgtable(dev, t, Dir.TO_DEVICE)
    assert [length for _, length in dma_rows(t)] == [65536, 65536]
    iova = iommu.iova_ranges()[0].start
    assert [addr for addr, _ in dma_rows(t)] == [iova, iova + 65536]


def test_boundary_padding(system):
    mem, iommu, dev, _ = system
    dev.seg_boundary_mask = 0xFFFF  # segments may not cross 64 KiB boundaries
    t = sg.alloc_table_from_entries([(5, 0, PAGE), (100, 0, 16 * PAGE)], engine=mem.engine)
    sg.dma_map_sgtable(dev, t, Dir.TO_DEVICE)
    (block,) = iommu.iova_ranges()
    # The 64 KiB entry would cross a boundary after the first 4 KiB: the first entry is
    # padded to 64 KiB, and the block grows to 128 KiB (size-aligned).
    assert block.size_bytes == 131072
    assert block.start % 131072 == 0
    assert dma_rows(t) == [(block.start, PAGE), (block.start + 65536, 65536)]
    # The padding is mapped too (to the memory after the first entry's page), as iommu_map_sg
    # maps each padded entry's full length.
    assert iommu.mapped_pages == 32
    assert iommu.lookup(block.start + PAGE) == (6 * PAGE, sg.IOMMU_READ)


def test_large_offsets_with_big_pages_and_small_granules(engine):
    mem = sg.PhysicalMemory(256 * 16384, 16384, engine=engine)
    iommu = sg.Iommu(mem, granule=4096)
    dev = sg.Device(mem, iommu=iommu)
    t = sg.alloc_table_from_pages(
        [3, 9], offset=5000, size=2 * 16384 - 5000, page_size=16384, engine=engine
    )
    sg.dma_map_sgtable(dev, t, Dir.FROM_DEVICE)
    iova = iommu.iova_ranges()[0].start
    # 5000 = 4096 + 904: the in-granule offset is 904 and the entry starts one granule in.
    assert dma_rows(t) == [(iova + 904, 16384 - 5000 + 16384)]
    dev.dma_write(iova + 904, b"abc")
    assert mem.read(3 * 16384 + 5000, 3) == b"abc"


# -- direct mapping ---------------------------------------------------------------------


def test_direct_mapping_is_one_to_one(system):
    mem, _, _, direct = system
    t = sg.alloc_table_from_pages([7, 8, 20], offset=10, size=3 * PAGE - 20, engine=mem.engine)
    sg.dma_map_sgtable(direct, t, Dir.BIDIRECTIONAL)
    assert dma_rows(t) == [(7 * PAGE + 10, 2 * PAGE - 10), (20 * PAGE, PAGE - 10)]
    assert t.nents == t.orig_nents == 2
    direct.dma_write(7 * PAGE + 10, b"hi")
    assert mem.read(7 * PAGE + 10, 2) == b"hi"
    assert direct.dma_read_table(t)[:2] == b"hi"


def test_direct_mapping_above_the_dma_mask_fails_with_eio(engine):
    mem = sg.PhysicalMemory(1 << 33, engine=engine)  # 8 GiB
    direct = sg.Device(mem)
    assert direct.dma_mask == (1 << 32) - 1  # the kernel's default
    high_pfn = (1 << 32) // PAGE + 5
    t = sg.alloc_table_from_pages([1, high_pfn], engine=engine)
    with pytest.raises(sg.MappingError, match="above the device's dma_mask") as info:
        sg.dma_map_sgtable(direct, t, Dir.TO_DEVICE)
    assert info.value.errno == 5
    assert not t.mapped and direct.live_mappings == 0
    assert list(t.export_dma()) == [0, 0, 0, 0]  # nothing written
    direct.dma_mask = sg.DMA_BIT_MASK(64)
    sg.dma_map_sgtable(direct, t, Dir.TO_DEVICE)
    assert dma_rows(t)[1] == (high_pfn * PAGE, PAGE)
    with pytest.raises(sg.IommuFault, match="runs past the end of the emulated memory"):
        direct.dma_read(1 << 40, 1)


# -- permissions, faults, unmap -----------------------------------------------------------


@pytest.mark.parametrize(
    "direction, may_read, may_write",
    [
        (Dir.TO_DEVICE, True, False),
        (Dir.FROM_DEVICE, False, True),
        (Dir.BIDIRECTIONAL, True, True),
    ],
)
def test_permissions_follow_the_direction(system, direction, may_read, may_write):
    mem, iommu, dev, _ = system
    pages = mem.alloc_pages(3, "scattered")
    t = sg.alloc_table_from_pages(pages.pfns, engine=mem.engine)
    sg.dma_map_sgtable(dev, t, direction)
    addr = t.dma_entries()[0].dma_address
    for allowed, attempt in (
        (may_read, lambda: dev.dma_read(addr, 8)),
        (may_write, lambda: dev.dma_write(addr, b"x" * 8)),
    ):
        if allowed:
            attempt()
        else:
            with pytest.raises(sg.IommuFault) as info:
                attempt()
            assert info.value.fault_reason == "no permission"
            assert info.value.iova == addr
            assert info.value.errno == 14
    faults = iommu.faults()
    assert len(faults) == (not may_read) + (not may_write)
    assert all(f.reason == "no permission" and f.iova == addr for f in faults)


def test_faulting_write_changes_nothing(system):
    mem, iommu, dev, _ = system
    pages = mem.alloc_pages(2, "scattered")
    t = sg.alloc_table_from_pages(pages.pfns, engine=mem.engine)
    sg.dma_map_sgtable(dev, t, Dir.FROM_DEVICE)
    first = t.dma_entries()[0]
    # One segment of 8 KiB at the top of the 32-bit space: writing 8 KiB + 1 runs past the
    # mapping, and past the device's 32-bit dma_mask: an address it cannot emit, so the
    # access never reaches the IOMMU (nothing in its fault log).
    first_address = first.dma_address
    assert first.dma_len == 2 * PAGE and first_address + 2 * PAGE == 1 << 32
    with pytest.raises(sg.IommuFault, match="above the device's dma_mask") as info:
        dev.dma_write(first_address, b"\xff" * (2 * PAGE + 1))
    assert info.value.fault_reason == "above the DMA mask" and iommu.faults() == []
    # A 64-bit device gets the same block (below 4 GiB first) and faults in the IOMMU.
    sg.dma_unmap_sgtable(dev, t, Dir.FROM_DEVICE)
    wide = sg.Device(mem, iommu=iommu, dma_mask=sg.DMA_BIT_MASK(64))
    t2 = sg.alloc_table_from_pages(mem.alloc_pages(2, "scattered").pfns, engine=mem.engine)
    sg.dma_map_sgtable(wide, t2, Dir.FROM_DEVICE)
    second = t2.dma_entries()[0]
    assert second.dma_address == first_address
    with pytest.raises(sg.IommuFault, match="not mapped"):
        wide.dma_write(second.dma_address, b"\xff" * (2 * PAGE + 1))
    assert [f.reason for f in iommu.faults()] == ["not mapped"]
    assert mem.resident_pages == 0  # not one byte landed


def test_access_after_unmap_faults_and_block_is_released(system):
    mem, iommu, dev, _ = system
    t = sg.alloc_table_from_pages([4, 5, 6], engine=mem.engine)
    sg.dma_map_sgtable(dev, t, Dir.TO_DEVICE)
    addr = t.dma_entries()[0].dma_address
    dev.dma_read(addr, 3 * PAGE)
    # The block is rounded up to 4 granules (a power of two below 32); 3 pages are mapped.
    assert iommu.mapped_pages == 3
    assert [r.size_bytes for r in iommu.iova_ranges()] == [4 * PAGE]
    sg.dma_unmap_sgtable(dev, t, Dir.TO_DEVICE)
    assert iommu.mapped_pages == 0
    assert iommu.iova_ranges() == []
    assert [r.state for r in iommu.iova_ranges(cached=True)] == ["cached"]
    with pytest.raises(sg.IommuFault, match="not mapped"):
        dev.dma_read(addr, 1)
    assert not t.mapped and dev.live_mappings == 0
    # Remapping reuses the cached block.
    sg.dma_map_sgtable(dev, t, Dir.TO_DEVICE)
    assert t.dma_entries()[0].dma_address == addr


def test_iova_space_exhaustion_leaves_nothing(engine):
    mem = sg.PhysicalMemory(64 << 20, engine=engine)
    iommu = sg.Iommu(mem)
    dev = sg.Device(mem, iommu=iommu, dma_mask=sg.DMA_BIT_MASK(16))  # 16 granules, IOVA 0 unused
    small = sg.alloc_table_from_pages([1, 2, 3, 4, 5, 6, 7, 8], engine=engine)
    sg.dma_map_sgtable(dev, small, Dir.TO_DEVICE)  # 8 granules at the top
    big = sg.alloc_table_from_pages(list(range(100, 108)), engine=engine)
    with pytest.raises(sg.OutOfMemory, match="no IOVA block of 32768 bytes") as info:
        sg.dma_map_sgtable(dev, big, Dir.TO_DEVICE)
    assert info.value.errno == 12
    assert not big.mapped
    assert iommu.mapped_pages == 8
    assert len(iommu.iova_ranges()) == 1
    assert [(e.pfn, e.length) for e in big] == [(100, 8 * PAGE)]  # CPU fields restored


def test_32_bit_addresses_first_for_64_bit_devices(system):
    mem, iommu, dev, _ = system
    dev.dma_mask = sg.DMA_BIT_MASK(64)
    t = sg.alloc_table_from_pages([1], engine=mem.engine)
    sg.dma_map_sgtable(dev, t, Dir.TO_DEVICE)
    assert t.dma_entries()[0].dma_address == (1 << 32) - PAGE
    iommu.reserve_iova(PAGE, (1 << 32) - 2 * PAGE)  # fill what is left below 4 GiB
    t2 = sg.alloc_table_from_pages([2], engine=mem.engine)
    sg.dma_map_sgtable(dev, t2, Dir.TO_DEVICE)
    assert t2.dma_entries()[0].dma_address == (1 << 48) - PAGE  # top of the 48-bit aperture


def test_sync_checks_the_mapping(system):
    mem, _, dev, direct = system
    t = sg.alloc_table_from_pages([1], engine=mem.engine)
    with pytest.raises(sg.InvalidArgument, match="not DMA-mapped"):
        sg.dma_sync_sgtable_for_cpu(dev, t, Dir.FROM_DEVICE)
    sg.dma_map_sgtable(dev, t, Dir.FROM_DEVICE)
    sg.dma_sync_sgtable_for_cpu(dev, t, Dir.FROM_DEVICE)
    sg.dma_sync_sgtable_for_device(dev, t, Dir.FROM_DEVICE)
    with pytest.raises(sg.InvalidArgument, match="mapped for another device"):
        sg.dma_sync_sgtable_for_device(direct, t, Dir.FROM_DEVICE)


# -- misuse -------------------------------------------------------------------------------


def test_direction_none_is_refused_everywhere(system):
    mem, iommu, dev, _ = system
    t = sg.alloc_table_from_pages([1], engine=mem.engine)
    for call in (
        sg.dma_map_sgtable,
        sg.dma_unmap_sgtable,
        sg.dma_sync_sgtable_for_cpu,
        sg.dma_sync_sgtable_for_device,
    ):
        with pytest.raises(sg.InvalidArgument, match="DMA_NONE is for debugging only"):
            call(dev, t, Dir.NONE)
    with pytest.raises(sg.InvalidArgument, match="not a DataDirection"):
        sg.dma_map_sgtable(dev, t, 7)
    assert not t.mapped and iommu.mapped_pages == 0


def test_table_rules_while_mapped(system):
    mem, iommu, dev, direct = system
    t = sg.alloc_table_from_pages([1, 3], engine=mem.engine)
    sg.dma_map_sgtable(dev, t, Dir.TO_DEVICE)
    with pytest.raises(sg.BusyError, match="DMA-mapped"):
        sg.dma_map_sgtable(dev, t, Dir.TO_DEVICE)
    with pytest.raises(sg.BusyError, match="DMA-mapped"):
        sg.dma_map_sgtable(direct, t, Dir.TO_DEVICE)
    with pytest.raises(sg.BusyError, match="dma_unmap_sgtable it first"):
        t.close()
    with pytest.raises(sg.InvalidArgument, match="mapped for another device"):
        sg.dma_unmap_sgtable(direct, t, Dir.TO_DEVICE)
    with pytest.raises(sg.BusyError, match="still mapped"):
        dev.close()
    sg.dma_unmap_sgtable(dev, t, Dir.TO_DEVICE)
    with pytest.raises(sg.InvalidArgument, match="not DMA-mapped"):
        sg.dma_unmap_sgtable(dev, t, Dir.TO_DEVICE)
    t.close()
    dev.close()


def test_open_append_table_cannot_be_mapped(system):
    mem, _, dev, _ = system
    t = sg.alloc_table_from_pages([1], left_pages=1, engine=mem.engine)
    with pytest.raises(sg.InvalidArgument, match="open for appends"):
        sg.dma_map_sgtable(dev, t, Dir.TO_DEVICE)
    t.append_pages([5])
    sg.dma_map_sgtable(dev, t, Dir.TO_DEVICE)
    with pytest.raises(sg.InvalidArgument, match="final"):
        t.append_pages([9])


def test_unbound_device_refuses_mappings(system):
    mem, iommu, dev, _ = system
    t = sg.alloc_table_from_pages([1], engine=mem.engine)
    dev.unbind()
    assert not dev.bound
    with pytest.raises(sg.DeviceUnbound, match="not bound") as info:
        sg.dma_map_sgtable(dev, t, Dir.TO_DEVICE)
    assert info.value.errno == 19
    dev.bind()
    dev.bind()  # harmless
    sg.dma_map_sgtable(dev, t, Dir.TO_DEVICE)


def test_table_outside_the_device_memory(system):
    mem, _, dev, _ = system
    t = sg.alloc_table_from_pages([mem.n_pages + 3], engine=mem.engine)
    with pytest.raises(sg.InvalidArgument, match="outside the emulated memory"):
        sg.dma_map_sgtable(dev, t, Dir.TO_DEVICE)
    t16 = sg.alloc_table_from_pages([1], page_size=16384, engine=mem.engine)
    with pytest.raises(sg.InvalidArgument, match="page sizes differ"):
        sg.dma_map_sgtable(dev, t16, Dir.TO_DEVICE)


def test_bad_device_and_iommu_arguments(engine):
    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    other = sg.PhysicalMemory(1 << 24, engine=engine)
    iommu = sg.Iommu(mem)
    with pytest.raises(sg.InvalidArgument, match="different memories"):
        sg.Device(other, iommu=iommu)
    with pytest.raises(sg.InvalidArgument, match="larger than the memory's page size"):
        sg.Iommu(mem, granule=16384)
    with pytest.raises(sg.InvalidArgument, match="granule=5000"):
        sg.Iommu(mem, granule=5000)
    with pytest.raises(sg.InvalidArgument, match="dma_mask=0x1234"):
        sg.Device(mem, dma_mask=0x1234)
    with pytest.raises(sg.InvalidArgument, match="seg_boundary_mask"):
        sg.Device(mem, seg_boundary_mask=0xFF)
    with pytest.raises(sg.InvalidArgument, match="max_segment_size=0"):
        sg.Device(mem, max_segment_size=0)
    with pytest.raises(TypeError):
        sg.Device("memory")  # type: ignore[arg-type]
    with pytest.raises(sg.BusyError, match="still in use"):
        mem.close()
    with pytest.raises(sg.InvalidArgument, match="neither 'read' nor 'write'"):
        iommu.translate(0, "execute")


def test_iommu_page_table_direct_use(system):
    mem, iommu, dev, _ = system
    iommu.map(0x10000, 5 * PAGE, 2 * PAGE, sg.IOMMU_READ)
    assert iommu.translate(0x10000 + 7) == 5 * PAGE + 7
    assert iommu.lookup(0x11000) == (6 * PAGE, sg.IOMMU_READ)
    with pytest.raises(sg.BusyError, match="already mapped"):
        iommu.map(0x11000, 0, PAGE)
    with pytest.raises(sg.InvalidArgument, match="multiple of the IOMMU granule"):
        iommu.map(0x10001, 0, PAGE)
    with pytest.raises(sg.IommuFault, match="outside the aperture"):
        iommu.translate(1 << 50)
    assert iommu.unmap(0x10000, 3 * PAGE) == 2 * PAGE
    assert iommu.lookup(0x10000) is None
    assert [f.reason for f in iommu.faults()] == ["outside the aperture"]
    iommu.clear_faults()
    assert iommu.faults() == [] and iommu.fault_total == 1
