"""DMA mapping and device access, native against model: one group per (operation, size).

Scattered tables (one entry per page) are the worst case for mapping.  The model gets one
round on the largest size."""

from __future__ import annotations

from array import array

import pytest

import scatterlist as sg
from scatterlist import DataDirection as Dir

SIZES = (1_000, 65_536, 1_048_576)


@pytest.fixture(params=["native", "model"])
def engine(request):
    return request.param


def make_system(engine, with_iommu):
    mem = sg.PhysicalMemory(1 << 40, engine=engine)
    iommu = sg.Iommu(mem) if with_iommu else None
    dev = sg.Device(mem, iommu=iommu, dma_mask=sg.DMA_BIT_MASK(64))
    return mem, iommu, dev


@pytest.mark.parametrize("mode", ["iommu", "direct"])
@pytest.mark.parametrize("n_pages", SIZES)
def test_map_unmap(benchmark, engine, mode, n_pages):
    mem, iommu, dev = make_system(engine, mode == "iommu")
    table = sg.alloc_table_from_pages(array("Q", range(0, 2 * n_pages, 2)), engine=engine)
    benchmark.group = f"map+unmap {mode} {n_pages} scattered pages"

    def map_unmap():
        sg.dma_map_sgtable(dev, table, Dir.TO_DEVICE)
        nents = table.nents
        sg.dma_unmap_sgtable(dev, table, Dir.TO_DEVICE)
        return nents

    if engine == "model" and n_pages > 65_536:
        nents = benchmark.pedantic(map_unmap, rounds=1, iterations=1)
    else:
        nents = benchmark(map_unmap)
    # 64 KiB segments through the IOMMU, one per page without it.
    assert nents == (-(-n_pages // 16) if mode == "iommu" else n_pages)
    assert dev.live_mappings == 0
    if iommu is not None:
        assert iommu.mapped_pages == 0


def test_device_read_1mib(benchmark, engine):
    mem, iommu, dev = make_system(engine, True)
    pages = mem.alloc_pages(256, "scattered")
    payload = bytes(range(256)) * 4096
    with sg.SGTable.new(dev, pages, Dir.BIDIRECTIONAL) as table:
        table.copy_from_buffer(payload)
        first = next(iter(table)).dma_address
        benchmark.group = "device read 1 MiB through the IOMMU"
        # 256 scattered pages merge into 16 segments of 64 KiB, contiguous in IOVA space.
        data = benchmark(dev.dma_read, first, 1 << 20)
        assert data == payload
