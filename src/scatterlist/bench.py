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
from .memory import PhysicalMemory
from .table import alloc_table_from_pages

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


def bench_build(sizes: Sequence[int] = DEFAULT_SIZES, layouts: Sequence[str] = LAYOUTS,
                engines: Sequence[str] = ("native", "model"), runs: int = 15,
                progress: Callable[[str], None] = lambda line: None) -> List[Result]:
    results = []
    for n_pages in sizes:
        for layout in layouts:
            pfns = layout_pfns(n_pages, layout)
            for engine in engines:
                get_engine(engine)  # import outside the timed region

                def build(engine: str = engine) -> None:
                    alloc_table_from_pages(pfns, engine=engine).close()

                count = runs_for(engine, n_pages, runs)
                build()  # warm-up: first-touch costs and caches
                median = time_runs(build, count)
                results.append(Result("build", layout, n_pages, engine, median, count))
                progress(f"build {layout:<10} {n_pages:>9} pages {engine:<6} "
                         f"{median * 1e3:10.3f} ms")
    return results


def format_table(results: Sequence[Result]) -> str:
    by_case: Dict[tuple[str, str, int], Dict[str, Result]] = {}
    for result in results:
        by_case.setdefault((result.operation, result.layout, result.n_pages), {})[
            result.engine] = result
    lines = [f"{'operation':<10}{'layout':<12}{'pages':>10}{'native ms':>12}{'ns/page':>9}"
             f"{'model ms':>12}{'ns/page':>9}{'model/native':>14}"]
    for (operation, layout, n_pages), row in by_case.items():
        native, model = row.get("native"), row.get("model")
        cells = [f"{operation:<10}{layout:<12}{n_pages:>10}"]
        for measured in (native, model):
            if measured is None:
                cells.append(f"{'-':>12}{'-':>9}")
            else:
                cells.append(f"{measured.median_s * 1e3:>12.3f}{measured.ns_per_page:>9.1f}")
        ratio = (f"{model.median_s / native.median_s:>13.0f}x"
                 if native is not None and model is not None else f"{'-':>14}")
        lines.append("".join(cells) + ratio)
    return "\n".join(lines)
