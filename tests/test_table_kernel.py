"""The kernel's table-building and walking results (spec sections 1-5), on both engines."""

from __future__ import annotations

import pytest
from helpers import cpu_rows

import scatterlist as sg

PAGE = 4096


# -- worked results of spec section 4 --------------------------------------------------------


def test_append_merges_into_previous_entry(table_from):
    t = table_from([0, 1, 3, 4, 5, 6], max_segment=12 * PAGE, left_pages=6)
    assert cpu_rows(t) == [(0, 0, 8192), (3, 0, 16384)]
    t.append_pages(list(range(7, 13)))
    assert cpu_rows(t) == [(0, 0, 8192), (3, 0, 40960)]
    assert (t.nents, t.orig_nents, t.final) == (2, 2, True)


def test_max_segment_splits_runs(table_from):
    t = table_from(list(range(5)), max_segment=2 * PAGE)
    assert [e.length for e in t] == [8192, 8192, 4096]


def test_offset_and_size_clip_first_and_last(table_from):
    t = table_from([0, 2, 4], offset=100, size=3 * PAGE - 200)
    assert cpu_rows(t) == [(0, 100, 3996), (2, 0, 4096), (4, 0, 3996)]


def test_offset_ignored_by_segment_split(table_from):
    t = table_from([0, 1, 2, 3], offset=100, max_segment=2 * PAGE)
    assert [(e.offset, e.length) for e in t] == [(100, 8092), (0, 8192)]


def test_max_segment_rounds_down_to_pages(table_from):
    t = table_from(list(range(4)), max_segment=PAGE + 1)
    assert [e.length for e in t] == [PAGE] * 4
    assert [e.length for e in table_from(list(range(4)))] == [4 * PAGE]


def test_unlimited_segment_is_uint_max_rounded(table_from):
    # UINT_MAX rounds down to 0xFFFFF000: 1,048,575 pages per entry.
    n = 1_048_576
    t = table_from(range(n))
    assert [e.length for e in t] == [0xFFFFF000, PAGE]


def test_size_clips_only_the_last_entry(table_from):
    t = table_from([10, 11, 20], size=2 * PAGE + 1)
    assert cpu_rows(t) == [(10, 0, 8192), (20, 0, 1)]


# -- chaining ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_entries, slots",
    [
        (1, [1]),
        (127, [127]),
        (128, [128]),
        (129, [128, 2]),
        (255, [128, 128]),
        (256, [128, 128, 2]),
        (10_000, [128] * 78 + [94]),
    ],
)
def test_chunks_of_128_with_the_last_slot_as_link(table_from, n_entries, slots):
    pfns = list(range(0, 2 * n_entries, 2))  # scattered: one entry per page
    t = table_from(pfns)
    assert t.chunk_slots() == slots
    # Every full chunk but the last gives one slot to the link.
    assert t.orig_nents == t.nents == n_entries == sum(slots) - (len(slots) - 1)
    assert t.sg_nents() == n_entries  # sg_next crosses every chain link
    assert [e.pfn for e in t] == pfns


@pytest.mark.parametrize("page_size, per_chunk", [(16384, 512), (65536, 2048)])
def test_chunk_size_follows_page_size(table_from, page_size, per_chunk):
    t = table_from(list(range(0, 2 * (per_chunk + 1), 2)), page_size=page_size)
    assert t.chunk_slots() == [per_chunk, 2]
    assert t.sg_nents() == per_chunk + 1
    assert all(e.length == page_size for e in t)


# -- append tables ---------------------------------------------------------------------


def test_left_pages_reserves_slots(table_from):
    # An append with left_pages=2 that ends with 2 used entries gives total_nents 3.
    t = table_from([0, 2], left_pages=2)
    assert (t.orig_nents, t.total_nents, t.final) == (2, 4, False)
    t2 = table_from([0, 2, 4], left_pages=2)
    t2.append_pages([6], left_pages=0)
    assert (t2.orig_nents, t2.total_nents) == (4, 5)
    t3 = table_from([0], left_pages=2)
    t3.append_pages([2], left_pages=0)
    assert (t3.orig_nents, t3.total_nents) == (2, 3)


def test_open_append_table_sg_nents_counts_reserved_slots(table_from):
    t = table_from([0, 2], left_pages=5)
    # Slots are reserved up to the chunk's end mark; sg_nents walks to it.
    assert t.total_nents == 7
    assert t.sg_nents() == 7
    t.append_pages([4, 6, 8])
    assert t.sg_nents() == 5 and t.final


def test_append_across_chunks(table_from):
    t = table_from(list(range(0, 2 * 100, 2)), left_pages=100)
    t.append_pages(list(range(1000, 1200, 2)))
    assert t.orig_nents == 200
    assert t.sg_nents() == 200
    assert sum(t.chunk_slots()) - (len(t.chunk_slots()) - 1) == t.total_nents
    assert [e.pfn for e in t] == list(range(0, 200, 2)) + list(range(1000, 1200, 2))


def test_append_merge_stops_at_max_segment(table_from):
    t = table_from([0, 1], max_segment=3 * PAGE, left_pages=3)
    t.append_pages([2, 3, 4])
    assert [e.length for e in t] == [3 * PAGE, 2 * PAGE]


def test_append_merge_with_multi_page_previous_entry(table_from):
    # ML-3: the merge test must compare against the last page of prv, not its first.
    t = table_from([5, 6, 7], left_pages=2)
    t.append_pages([6, 9])  # 6 is not after 7: no merge
    assert cpu_rows(t) == [(5, 0, 3 * PAGE), (6, 0, PAGE), (9, 0, PAGE)]
    t2 = table_from([5, 6, 7], left_pages=2)
    t2.append_pages([8, 9])
    assert cpu_rows(t2) == [(5, 0, 5 * PAGE)]


def test_append_whole_call_merged_keeps_nents(table_from):
    t = table_from([3], left_pages=1)
    t.append_pages([4])
    assert (t.orig_nents, t.final) == (1, True)
    assert cpu_rows(t) == [(3, 0, 2 * PAGE)]


# -- counting helpers and iterators ---------------------------------------------------------


@pytest.mark.parametrize("length, expected", [(0, 0), (1, 1), (4096, 1), (4097, 2), (12288, 3)])
def test_nents_for_len(table_from, length, expected):
    t = table_from([0, 2, 4])
    assert t.nents_for_len(length) == expected


def test_nents_for_len_past_the_end(table_from):
    t = table_from([0, 2, 4])
    with pytest.raises(sg.InvalidArgument) as info:
        t.nents_for_len(12289)
    assert info.value.errno == 22
    assert "holds 12288 bytes, fewer than the requested 12289" in str(info.value)
    assert (info.value.detail.value, info.value.detail.limit) == (12289, 12288)


def test_page_iterator_ignores_sub_page_offset(table_from):
    t = table_from([0, 1, 2, 7], offset=100)
    assert list(t.page_pfns()) == [0, 1, 2, 7]
    assert list(t.page_pfns(start=2)) == [2, 7]
    assert list(t.page_pfns(start=4)) == []


def test_page_iterator_counts_pages_spanned_by_offset(table_from):
    t = table_from([0, 1], offset=4000, size=200)
    # 4000 + 200 crosses into the second page.
    assert list(t.page_pfns()) == [0, 1]


def test_dma_fields_start_zero(table_from):
    t = table_from([0, 2])
    assert list(t.export_dma()) == [0, 0, 0, 0]
    assert [(e.dma_address, e.dma_len) for e in t.dma_entries()] == [(0, 0), (0, 0)]


def test_export_cpu_matches_iteration(table_from):
    t = table_from([9, 10, 30, 31, 32, 50], offset=7, size=6 * PAGE - 7 - 5)
    rows = t.export_cpu()
    assert [tuple(rows[i : i + 3]) for i in range(0, len(rows), 3)] == cpu_rows(t)
