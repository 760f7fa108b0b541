from __future__ import annotations

from array import array
from functools import lru_cache

from scatterlist.bench import layout_pfns


@lru_cache(maxsize=None)
def pfns_for(n_pages: int, layout: str) -> "array[int]":
    return layout_pfns(n_pages, layout)
