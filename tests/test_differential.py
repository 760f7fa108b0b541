"""Native against model: random page layouts, offsets, sizes, segment limits and appends must
give the same tables, entry by entry, and the same errors."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

from hypothesis import given
from hypothesis import strategies as st

import scatterlist as sg

PAGE_SIZES = st.sampled_from([4096, 16384, 65536])


@st.composite
def pfn_runs(draw: st.DrawFn, max_pages: int = 300) -> List[int]:
    """Runs of consecutive pfns with random gaps, sometimes going backwards or repeating."""
    pfns: List[int] = []
    pfn = draw(st.integers(0, 1 << 20))
    while len(pfns) < max_pages:
        run = draw(st.integers(1, 40))
        pfns.extend(range(pfn, pfn + run))
        pfn += run + draw(st.sampled_from([0, 1, 2, 7, -3, -run]))
        pfn = max(pfn, 0)
        if draw(st.booleans()):
            break
    return pfns[:max_pages]


def outcome(fn: Callable[[], Any]) -> Tuple[str, Any]:
    try:
        return ("ok", fn())
    except sg.ScatterlistError as exc:
        return (type(exc).__name__, (exc.errno, exc.reason, str(exc)))


def snapshot(table: sg.RawTable) -> Tuple[Any, ...]:
    return (
        list(table.export_cpu()),
        list(table.export_dma()),
        table.nents,
        table.orig_nents,
        table.total_nents,
        table.final,
        table.chunk_slots(),
        table.sg_nents(),
        list(table.page_pfns()),
    )


def build_both(pfns: List[int], **kwargs: Any) -> Tuple[Optional[sg.RawTable], ...]:
    results = []
    for engine in ("native", "model"):
        try:
            results.append(sg.alloc_table_from_pages(pfns, engine=engine, **kwargs))
        except sg.ScatterlistError:
            results.append(None)
    return tuple(results)


@given(pfns=pfn_runs(), page_size=PAGE_SIZES, data=st.data())
def test_build_matches(pfns: List[int], page_size: int, data: st.DataObject) -> None:
    offset = data.draw(
        st.one_of(st.just(0), st.integers(0, page_size - 1), st.integers(page_size, page_size + 10))
    )
    total = len(pfns) * page_size - offset
    size = data.draw(
        st.one_of(st.none(), st.integers(max(total - page_size - 2, 0), max(total + 2, 0)))
    )
    max_segment = data.draw(
        st.one_of(
            st.none(),
            st.integers(0, 40 * page_size),
            st.sampled_from([page_size, 2 * page_size + 1, 0xFFFFFFFF]),
        )
    )
    kwargs = dict(offset=offset, size=size, max_segment=max_segment, page_size=page_size)
    native = outcome(lambda: snapshot(sg.alloc_table_from_pages(pfns, engine="native", **kwargs)))
    model = outcome(lambda: snapshot(sg.alloc_table_from_pages(pfns, engine="model", **kwargs)))
    assert native == model


@given(
    first=pfn_runs(120),
    appends=st.lists(st.tuples(pfn_runs(60), st.integers(0, 200), st.booleans()), max_size=5),
    max_pages_per_segment=st.integers(1, 64),
    offset=st.integers(0, 4095),
    data=st.data(),
)
def test_append_sequences_match(
    first: List[int],
    appends: List[Tuple[List[int], int, bool]],
    max_pages_per_segment: int,
    offset: int,
    data: st.DataObject,
) -> None:
    max_segment = max_pages_per_segment * 4096
    left = data.draw(st.integers(1, 300))
    tables = build_both(first, offset=offset, max_segment=max_segment, left_pages=left)
    assert (tables[0] is None) == (tables[1] is None)
    if tables[0] is None:
        return
    native, model = tables
    assert model is not None
    assert snapshot(native) == snapshot(model)
    for pfns, left_pages, partial in appends:
        size = len(pfns) * 4096 - (data.draw(st.integers(0, 4095)) if partial else 0)
        assert outcome(
            lambda: native.append_pages(pfns, size=size, left_pages=left_pages)
        ) == outcome(lambda: model.append_pages(pfns, size=size, left_pages=left_pages))
        assert snapshot(native) == snapshot(model)


@given(
    pfns=pfn_runs(200),
    lengths=st.lists(st.integers(0, 300 * 4096), max_size=8),
    starts=st.lists(st.integers(0, 400), max_size=4),
)
def test_walk_helpers_match(pfns: List[int], lengths: List[int], starts: List[int]) -> None:
    native, model = build_both(pfns)
    assert native is not None and model is not None
    for length in lengths:
        assert outcome(lambda: native.nents_for_len(length)) == outcome(
            lambda: model.nents_for_len(length)
        )
    for start in starts:
        assert list(native.page_pfns(start)) == list(model.page_pfns(start))


@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["contiguous", "scattered", "random"]),
            st.integers(1, 300),
            st.integers(0, 2**64 - 1),
            st.booleans(),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_page_allocator_matches(ops: List[Tuple[str, int, int, bool]]) -> None:
    mems = [sg.PhysicalMemory(1024 * 4096, engine=e) for e in ("native", "model")]
    held: List[List[sg.Pages]] = [[], []]
    for layout, n, seed, free_first in ops:
        if free_first and held[0]:
            for side in held:
                side.pop(0).close()
        got = [outcome(lambda m=m: m.alloc_pages(n, layout, seed=seed)) for m in mems]
        assert got[0][0] == got[1][0]
        if got[0][0] == "ok":
            assert list(got[0][1].pfns) == list(got[1][1].pfns)
            held[0].append(got[0][1])
            held[1].append(got[1][1])
        else:
            assert got[0][1] == got[1][1]
        assert mems[0].free_pages == mems[1].free_pages


@given(pfns=pfn_runs(40), offset=st.integers(0, 4095), data=st.data())
def test_copies_match(pfns: List[int], offset: int, data: st.DataObject) -> None:
    pfns = [p % 2000 for p in pfns]
    payload = data.draw(st.binary(min_size=0, max_size=3 * 4096))
    skip = data.draw(st.integers(0, 50 * 4096))
    seen = []
    for engine in ("native", "model"):
        mem = sg.PhysicalMemory(2048 * 4096, engine=engine)
        table = sg.alloc_table_from_pages(pfns, offset=offset, engine=engine)
        written = table.copy_from_buffer(mem, payload, skip=skip)
        seen.append(
            (written, table.copy_to_buffer(mem, len(payload) + 10, skip=skip), mem.resident_pages)
        )
    assert seen[0] == seen[1]
