"""Native-against-model benchmarks behind ``python -m scatterlist bench``.

Each case builds a table from a page array (``alloc_table_from_pages``) and frees it, on both
engines, from the same pfns.  Times are medians of several runs; the model gets fewer runs on
large cases because one run takes seconds.
"""

from __future__ import annotations

import statistics
import time
from array import array
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

from ._engine import get_engine
from .constants import DMA_BIT_MASK, U64_MAX, DataDirection
from .device import Device
from .dma import dma_map_sgtable, dma_unmap_sgtable
from .iommu import Iommu
from .memory import PhysicalMemory
from .sgtable import SGTable
from .table import RawTable, alloc_table_from_pages

LAYOUTS = ("contiguous", "scattered", "random")
DEFAULT_SIZES = (1_000, 65_536, 1_048_576)


@dataclass
class Result:
    operation: str
    layout: str
    n_pages: int
    engine: str
    median_s: float
    runs: int

    @property
    def ns_per_page(self) -> float:
        return self.median_s / self.n_pages * 1e9


def layout_pfns(n_pages: int, layout: str, seed: int = 1) -> "array[int]":
    """Page frame numbers of n_pages pages in a layout, from the real page allocator."""
    mem = PhysicalMemory(4 * n_pages * 4096, engine="model" if n_pages <= 4096 else None)
    pages = mem.alloc_pages(n_pages, layout, seed=seed)
    pfns = array("Q", pages.pfns)
    pages.close()
    mem.close()
    return pfns


def time_runs(fn: Callable[[], object], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def runs_for(engine: str, n_pages: int, budget_runs: int) -> int:
    if engine == "native":
        return max(5, budget_runs)
    # The model needs about a microsecond per page: keep each case to a few seconds.
    return max(1, min(budget_runs, 3_000_000 // max(n_pages, 1)))


def bench_build(
    sizes: Sequence[int] = DEFAULT_SIZES,
    layouts: Sequence[str] = LAYOUTS,
    engines: Sequence[str] = ("native", "model"),
    runs: int = 15,
    progress: Callable[[str], None] = lambda line: None,
) -> List[Result]:
    results = []
    for n_pages in sizes:
        for layout in layouts:
            pfns = layout_pfns(n_pages, layout)
            for engine in engines:
                get_engine(engine)  # import outside the timed region

                def build(engine: str = engine, pfns: "array[int]" = pfns) -> None:
                    alloc_table_from_pages(pfns, engine=engine).close()

                count = runs_for(engine, n_pages, runs)
                build()  # warm-up: first-touch costs and caches
                median = time_runs(build, count)
                results.append(Result("build", layout, n_pages, engine, median, count))
                progress(
                    f"build {layout:<10} {n_pages:>9} pages {engine:<6} {median * 1e3:10.3f} ms"
                )
    return results


def bench_dma(
    sizes: Sequence[int] = DEFAULT_SIZES,
    engines: Sequence[str] = ("native", "model"),
    runs: int = 15,
    progress: Callable[[str], None] = lambda line: None,
) -> List[Result]:
    """DMA mapping of scattered tables (the worst case: one entry per page) and device reads.

    - ``map+unmap iommu``: dma_map_sgtable + dma_unmap_sgtable through the IOMMU (one IOVA
      block, entries merged into 64 KiB segments);
    - ``map+unmap direct``: the same without an IOMMU (one DMA segment per entry);
    - ``read 1MiB iommu``: one device read of 1 MiB through the IOMMU (256 pages)."""
    results = []
    to_device = DataDirection.TO_DEVICE
    for n_pages in sizes:
        pfns = array("Q", range(0, 2 * n_pages, 2))
        for engine in engines:
            mem = PhysicalMemory(1 << 40, engine=engine)
            iommu = Iommu(mem)
            devices = {
                "iommu": Device(mem, iommu=iommu, dma_mask=DMA_BIT_MASK(64)),
                "direct": Device(mem, dma_mask=DMA_BIT_MASK(64)),
            }
            table = alloc_table_from_pages(pfns, engine=engine)
            for mode, dev in devices.items():

                def map_unmap(dev: Device = dev, table: RawTable = table) -> None:
                    dma_map_sgtable(dev, table, to_device)
                    dma_unmap_sgtable(dev, table, to_device)

                count = runs_for(engine, 4 * n_pages, runs)
                map_unmap()
                median = time_runs(map_unmap, count)
                results.append(
                    Result(f"map+unmap {mode}", "scattered", n_pages, engine, median, count)
                )
                progress(
                    f"map+unmap {mode:<6} {n_pages:>9} pages {engine:<6} {median * 1e3:10.3f} ms"
                )
            table.close()
            for dev in devices.values():
                dev.close()
            iommu.close()
            mem.close()
    for engine in engines:
        mem = PhysicalMemory(1 << 30, engine=engine)
        iommu = Iommu(mem)
        dev = Device(mem, iommu=iommu)
        table = alloc_table_from_pages(array("Q", range(0, 512, 2)), engine=engine)
        dma_map_sgtable(dev, table, to_device)
        first = table.dma_entries()[0].dma_address

        def read(dev: Device = dev, first: int = first) -> None:
            dev.dma_read(first, 1 << 20)

        count = runs_for(engine, 2048, runs * 4)
        read()
        median = time_runs(read, count)
        results.append(Result("read 1MiB iommu", "scattered", 256, engine, median, count))
        progress(f"read 1MiB iommu {engine:<6} {median * 1e6:10.1f} us")
        dma_unmap_sgtable(dev, table, to_device)
        table.close()
        dev.close()
        iommu.close()
        mem.close()
    return results


def format_table(results: Sequence[Result]) -> str:
    by_case: Dict[tuple[str, str, int], Dict[str, Result]] = {}
    for result in results:
        by_case.setdefault((result.operation, result.layout, result.n_pages), {})[result.engine] = (
            result
        )
    lines = [
        f"{'operation':<18}{'layout':<12}{'pages':>10}{'native ms':>12}{'ns/page':>9}"
        f"{'model ms':>12}{'ns/page':>9}{'model/native':>14}"
    ]
    for (operation, layout, n_pages), row in by_case.items():
        native, model = row.get("native"), row.get("model")
        cells = [f"{operation:<18}{layout:<12}{n_pages:>10}"]
        for measured in (native, model):
            if measured is None:
                cells.append(f"{'-':>12}{'-':>9}")
            else:
                cells.append(f"{measured.median_s * 1e3:>12.3f}{measured.ns_per_page:>9.1f}")
        ratio = (
            f"{model.median_s / native.median_s:>13.0f}x"
            if native is not None and model is not None
            else f"{'-':>14}"
        )
        lines.append("".join(cells) + ratio)
    return "\n".join(lines)


def resident_bytes() -> int:
    """This process's resident set size, in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096
    except (OSError, IndexError, ValueError):
        return 0


def soak(
    cycles: int,
    engine: str = "native",
    report_every: int = 10_000,
    progress: Callable[[str], None] = lambda line: None,
) -> List[int]:
    """``cycles`` times: allocate pages, build and map an owned SGTable for a device behind an
    IOMMU, write and read through the device, close (unmap, free entries, free pages).
    Returns the resident size sampled every ``report_every`` cycles."""
    samples: List[int] = []
    with (
        PhysicalMemory(1 << 30, engine=engine) as mem,
        Iommu(mem) as iommu,
        Device(mem, iommu=iommu, dma_mask=U64_MAX) as dev,
    ):
        payload = bytes(range(256)) * 16
        for cycle in range(1, cycles + 1):
            pages = mem.alloc_pages(1 + cycle % 16, "random", seed=cycle)
            with SGTable.new(dev, pages, DataDirection.BIDIRECTIONAL) as table:
                dev.dma_write_table(table, payload)
                if dev.dma_read_table(table, len(payload)) != payload:
                    raise AssertionError(f"cycle {cycle}: data did not round-trip")
            if cycle % report_every == 0:
                samples.append(resident_bytes())
                progress(
                    f"cycle {cycle:>8}: resident {samples[-1] / 2**20:8.1f} MiB, "
                    f"IOMMU pages mapped {iommu.mapped_pages}, free pages "
                    f"{mem.free_pages}"
                )
        if (
            iommu.mapped_pages
            or iommu.iova_ranges()
            or dev.live_mappings
            or mem.free_pages != mem.n_pages
        ):
            raise AssertionError("soak: something was left mapped or allocated")
    return samples
