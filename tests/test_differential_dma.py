"""Native against model for DMA mapping: random tables, granules, boundary masks, segment
limits and DMA masks must give the same segments, IOVA blocks, page tables and errors."""

from __future__ import annotations

from typing import Any, List, Tuple

from hypothesis import given
from hypothesis import strategies as st

import scatterlist as sg

Row = Tuple[int, int, int]


@st.composite
def systems(draw: st.DrawFn) -> dict:
    page_size = draw(st.sampled_from([4096, 16384, 65536]))
    granule = draw(st.sampled_from([g for g in (4096, 16384, 65536) if g <= page_size]))
    return dict(
        page_size=page_size,
        granule=granule,
        use_iommu=draw(st.booleans()),
        dma_mask_bits=draw(st.sampled_from([20, 24, 32, 40, 64])),
        boundary_bits=draw(st.sampled_from([16, 17, 20, 32, 64])),
        max_segment_size=draw(st.sampled_from([4096, 65536, 65536 + 512, 1 << 20, 0xFFFFFFFF])),
        direction=draw(
            st.sampled_from(
                [
                    sg.DataDirection.TO_DEVICE,
                    sg.DataDirection.FROM_DEVICE,
                    sg.DataDirection.BIDIRECTIONAL,
                ]
            )
        ),
    )


@st.composite
def entry_rows(draw: st.DrawFn, page_size: int) -> List[Row]:
    rows: List[Row] = []
    pfn = draw(st.integers(0, 200))
    for _ in range(draw(st.integers(1, 24))):
        offset = draw(st.sampled_from([0, 0, 0, 512, 100, page_size - 1, page_size + 8]))
        length = draw(
            st.one_of(
                st.integers(1, 3 * page_size),
                st.sampled_from([page_size, 2 * page_size, 16 * page_size]),
            )
        )
        rows.append((pfn, offset, length))
        pfn += -(-(offset + length) // page_size) + draw(st.sampled_from([0, 0, 1, 5]))
    return rows


def outcome(fn: Any) -> Tuple[str, Any]:
    try:
        return ("ok", fn())
    except sg.ScatterlistError as exc:
        return (type(exc).__name__, (exc.errno, str(exc)))


def run(engine: str, config: dict, rows: List[Row], pages_mode: bool) -> List[Any]:
    mem = sg.PhysicalMemory(4096 * config["page_size"], config["page_size"], engine=engine)
    iommu = sg.Iommu(mem, config["granule"]) if config["use_iommu"] else None
    dev = sg.Device(
        mem,
        iommu=iommu,
        dma_mask=sg.DMA_BIT_MASK(config["dma_mask_bits"]),
        seg_boundary_mask=sg.DMA_BIT_MASK(config["boundary_bits"]),
        max_segment_size=config["max_segment_size"],
    )
    if pages_mode:
        pfns = [r[0] for r in rows]
        table = sg.alloc_table_from_pages(
            pfns,
            offset=rows[0][1] % config["page_size"],
            page_size=config["page_size"],
            engine=engine,
        )
    else:
        table = sg.alloc_table_from_entries(rows, config["page_size"], engine=engine)
    seen: List[Any] = []
    seen.append(outcome(lambda: sg.dma_map_sgtable(dev, table, config["direction"])))
    seen.append(
        (
            table.nents,
            table.orig_nents,
            list(table.export_cpu()),
            list(table.export_dma(table.orig_nents)),
        )
    )
    if iommu is not None:
        seen.append((iommu.mapped_pages, iommu.iova_ranges(cached=True)))
    if table.mapped:
        first = table.dma_entries()[0]
        address = first.dma_address
        seen.append(outcome(lambda: dev.dma_read(address, min(first.dma_len, 64))))
        seen.append(outcome(lambda: dev.dma_write(address, b"\xee" * 8)))
        seen.append(outcome(lambda: dev.dma_read(address + first.dma_len, 1)))
        seen.append(outcome(lambda: len(dev.dma_read_table(table))))
        sg.dma_unmap_sgtable(dev, table, config["direction"])
        if iommu is not None:
            seen.append((iommu.mapped_pages, iommu.iova_ranges(cached=True)))
    if iommu is not None:
        seen.append(iommu.faults())
    return seen


@given(config=systems(), data=st.data(), pages_mode=st.booleans())
def test_mapping_matches(config: dict, data: st.DataObject, pages_mode: bool) -> None:
    rows = data.draw(entry_rows(config["page_size"]))
    assert run("native", config, rows, pages_mode) == run("model", config, rows, pages_mode)


@given(config=systems(), data=st.data(), n_tables=st.integers(2, 6))
def test_sequences_of_maps_match(config: dict, data: st.DataObject, n_tables: int) -> None:
    """Several tables mapped and unmapped in a random order: IOVA placement and the range
    cache must agree too."""
    config["use_iommu"] = True
    tables = [data.draw(entry_rows(config["page_size"])) for _ in range(n_tables)]
    order = data.draw(st.permutations(range(n_tables)))
    results = []
    for engine in ("native", "model"):
        mem = sg.PhysicalMemory(4096 * config["page_size"], config["page_size"], engine=engine)
        iommu = sg.Iommu(mem, config["granule"])
        dev = sg.Device(
            mem,
            iommu=iommu,
            dma_mask=sg.DMA_BIT_MASK(config["dma_mask_bits"]),
            seg_boundary_mask=sg.DMA_BIT_MASK(config["boundary_bits"]),
            max_segment_size=config["max_segment_size"],
        )
        built = [
            sg.alloc_table_from_entries(rows, config["page_size"], engine=engine) for rows in tables
        ]
        seen = []
        for t in built:
            seen.append(outcome(lambda: sg.dma_map_sgtable(dev, t, config["direction"])))
            seen.append(list(t.export_dma(t.orig_nents)))
        for index in order:
            if built[index].mapped:
                sg.dma_unmap_sgtable(dev, built[index], config["direction"])
            seen.append(iommu.iova_ranges(cached=True))
        for t in built:
            seen.append(outcome(lambda: sg.dma_map_sgtable(dev, t, config["direction"])))
            seen.append(list(t.export_dma(t.orig_nents)))
        seen.append((iommu.mapped_pages, iommu.iova_ranges(cached=True, reserved=True)))
        results.append(seen)
    assert results[0] == results[1]
