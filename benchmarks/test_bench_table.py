"""Table building, native against model: one group per (layout, size).

Run: ``pytest benchmarks --benchmark-only`` (or ``--benchmark-disable`` as a smoke test).
The model gets one round on the largest size; its per-page cost is what matters there."""

from __future__ import annotations

import pytest
from bench_data import pfns_for

import scatterlist as sg

SIZES = (1_000, 65_536, 1_048_576)
LAYOUTS = ("contiguous", "scattered", "random")


@pytest.mark.parametrize("engine", ["native", "model"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n_pages", SIZES)
def test_build_table(benchmark, engine, layout, n_pages):
    pfns = pfns_for(n_pages, layout)
    benchmark.group = f"build {layout} {n_pages} pages"
    benchmark.extra_info["ns_per_page_is_median_over"] = n_pages

    def build():
        table = sg.alloc_table_from_pages(pfns, engine=engine)
        counts = (table.orig_nents, table.sg_nents())
        table.close()
        return counts

    if engine == "model" and n_pages > 65_536:
        orig_nents, walked = benchmark.pedantic(build, rounds=1, iterations=1)
    else:
        orig_nents, walked = benchmark(build)
    assert orig_nents == walked >= 1
    if layout == "scattered":
        assert orig_nents == n_pages
    elif layout == "contiguous":
        assert orig_nents == -(-n_pages // 1_048_575)  # UINT_MAX rounds to 1,048,575 pages
