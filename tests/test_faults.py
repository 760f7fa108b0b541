"""Fault injection: failures leave no IOVA, no page-table entry and no entry behind."""

from __future__ import annotations

import errno

import pytest

import scatterlist as sg
from scatterlist import DataDirection as Dir
from scatterlist import faults

PAGE = 4096


def nothing_left(iommu, dev):
    return iommu.mapped_pages == 0 and iommu.iova_ranges() == [] and dev.live_mappings == 0


@pytest.mark.parametrize(
    "errno_value, exc",
    [
        (errno.ENOMEM, sg.OutOfMemory),
        (errno.EINVAL, sg.InvalidArgument),
        (errno.EIO, sg.MappingError),
    ],
)
def test_nth_map_fails_with_the_chosen_errno(system, errno_value, exc):
    mem, iommu, dev, _ = system
    dev.fail_maps(nth=3, errno_value=errno_value)
    tables = [
        sg.alloc_table_from_pages(list(range(10 * i, 10 * i + 6, 2)), engine=mem.engine)
        for i in range(1, 5)
    ]
    sg.dma_map_sgtable(dev, tables[0], Dir.TO_DEVICE)
    sg.dma_map_sgtable(dev, tables[1], Dir.TO_DEVICE)
    before = (iommu.mapped_pages, iommu.iova_ranges(), dev.live_mappings)
    with pytest.raises(exc, match="injected failure") as info:
        sg.dma_map_sgtable(dev, tables[2], Dir.TO_DEVICE)
    assert info.value.errno == errno_value
    assert (iommu.mapped_pages, iommu.iova_ranges(), dev.live_mappings) == before
    assert not tables[2].mapped
    assert [(e.pfn, e.offset, e.length) for e in tables[2]] == [
        (30, 0, PAGE),
        (32, 0, PAGE),
        (34, 0, PAGE),
    ]
    assert dev.injected_failures == 1
    sg.dma_map_sgtable(dev, tables[3], Dir.TO_DEVICE)  # only the 3rd failed
    sg.dma_map_sgtable(dev, tables[2], Dir.TO_DEVICE)
    for t in tables:
        sg.dma_unmap_sgtable(dev, t, Dir.TO_DEVICE)
    assert nothing_left(iommu, dev)


def test_probabilistic_failures_are_seeded(system):
    mem, iommu, dev, direct = system

    def outcomes(device):
        device.fail_maps(probability=0.3, seed=1234)
        results = []
        for i in range(60):
            t = sg.alloc_table_from_pages([2 * i + 1], engine=mem.engine)
            try:
                sg.dma_map_sgtable(device, t, Dir.FROM_DEVICE)
            except sg.OutOfMemory:
                results.append(False)
                continue
            results.append(True)
            sg.dma_unmap_sgtable(device, t, Dir.FROM_DEVICE)
        device.fail_maps()
        return results

    first, again, direct_run = outcomes(dev), outcomes(dev), outcomes(direct)
    assert first == again == direct_run
    assert 5 < first.count(False) < 35
    assert nothing_left(iommu, dev) and direct.live_mappings == 0


def test_failed_owned_table_keeps_nothing(system):
    mem, iommu, dev, _ = system
    pages = mem.alloc_pages(5)
    dev.fail_maps(nth=1)
    with pytest.raises(sg.OutOfMemory):
        sg.SGTable.new(dev, pages, Dir.BIDIRECTIONAL)
    assert nothing_left(iommu, dev) and not pages.closed and dev._state.live(devres=True) == []
    with sg.SGTable.new(dev, pages, Dir.BIDIRECTIONAL) as table:
        assert table.nents == 1


def test_exhausted_iova_space(system):
    mem, iommu, dev, _ = system
    t = sg.alloc_table_from_pages([1], engine=mem.engine)
    with faults.exhaust_iova(iommu) as granules:
        assert granules == (1 << 36) - 1  # every granule but IOVA 0
        with pytest.raises(sg.OutOfMemory, match="no IOVA block"):
            sg.dma_map_sgtable(dev, t, Dir.TO_DEVICE)
        assert dev.live_mappings == 0 and iommu.mapped_pages == 0
    sg.dma_map_sgtable(dev, t, Dir.TO_DEVICE)
    sg.dma_unmap_sgtable(dev, t, Dir.TO_DEVICE)
    assert iommu.iova_ranges() == []


def test_dropped_mapping_faults_and_unmap_still_releases(system):
    mem, iommu, dev, _ = system
    t = sg.alloc_table_from_pages(list(range(100, 104)), engine=mem.engine)
    sg.dma_map_sgtable(dev, t, Dir.BIDIRECTIONAL)
    seg = t.dma_entries()[0]
    addr = seg.dma_address
    assert faults.drop_mapping(iommu, addr + PAGE, PAGE) == PAGE
    dev.dma_write(addr, b"ok")  # the first page is still there
    with pytest.raises(sg.IommuFault) as info:
        dev.dma_read(addr, 2 * PAGE)
    assert info.value.iova == addr + PAGE and info.value.fault_reason == "not mapped"
    assert iommu.faults()[-1].iova == addr + PAGE
    sg.dma_unmap_sgtable(dev, t, Dir.BIDIRECTIONAL)
    assert nothing_left(iommu, dev)


def test_revoked_permission_faults(system):
    mem, iommu, dev, _ = system
    t = sg.alloc_table_from_pages([40, 41], engine=mem.engine)
    sg.dma_map_sgtable(dev, t, Dir.BIDIRECTIONAL)
    addr = t.dma_entries()[0].dma_address
    assert faults.restrict_permissions(iommu, addr, 2 * PAGE, sg.IOMMU_READ) == 2
    dev.dma_read(addr, 16)
    with pytest.raises(sg.IommuFault, match="does not permit") as info:
        dev.dma_write(addr + PAGE, b"x")
    assert info.value.access == "write"
    assert mem.read(41 * PAGE, 1) == b"\0"
    with pytest.raises(sg.InvalidArgument, match="nothing is mapped"):
        faults.restrict_permissions(iommu, 1 << 40, PAGE, 0)
    sg.dma_unmap_sgtable(dev, t, Dir.BIDIRECTIONAL)
    assert nothing_left(iommu, dev)


def test_bad_fault_injection_arguments(system):
    _, _, dev, _ = system
    with pytest.raises(sg.InvalidArgument, match="not ENOMEM, EINVAL or EIO"):
        dev.fail_maps(nth=1, errno_value=errno.EPERM)
    with pytest.raises(sg.InvalidArgument, match="not both"):
        dev.fail_maps(nth=1, probability=0.5)
    with pytest.raises(sg.InvalidArgument, match="probability=1.5"):
        dev.fail_maps(probability=1.5)
    with pytest.raises(sg.InvalidArgument, match="nth=0"):
        dev.fail_maps(nth=0)
