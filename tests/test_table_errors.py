"""Bad input (DESIGN rule 2): a clear exception naming the argument, and nothing changed."""

from __future__ import annotations

from array import array

import numpy as np
import pytest
from helpers import cpu_rows

import scatterlist as sg

PAGE = 4096


def state(t: sg.RawTable):
    return (
        cpu_rows(t),
        t.nents,
        t.orig_nents,
        t.total_nents,
        t.final,
        t.chunk_slots(),
        t.sg_nents(),
    )


@pytest.mark.parametrize(
    "kwargs, pfns, needle, reason",
    [
        ({}, [], "no pages: at least one page", sg.Reason.ZERO_PAGES),
        ({"max_segment": 0}, [0], "max_segment=0", sg.Reason.MAX_SEGMENT),
        ({"max_segment": 4095}, [0], "max_segment=4095", sg.Reason.MAX_SEGMENT),
        ({"max_segment": -1}, [0], "max_segment=-1", sg.Reason.MAX_SEGMENT),
        ({"offset": 4096}, [0], "offset=4096", sg.Reason.OFFSET),
        ({"offset": -1}, [0], "offset=-1", sg.Reason.OFFSET),
        ({"size": 0}, [0], "size=0", sg.Reason.SIZE),
        ({"size": 4097}, [0], "size=4097", sg.Reason.SIZE),
        ({"size": 4096}, [0, 2], "size=4096", sg.Reason.SIZE),  # ends before the last page
        ({"offset": 100, "size": 4097}, [0, 2, 4], "size=4097", sg.Reason.SIZE),
        ({"offset": 100, "size": 2 * PAGE - 99}, [0, 2], "size=8093", sg.Reason.SIZE),
        ({"page_size": 3000}, [0], "page_size=3000", sg.Reason.PAGE_SIZE),
        ({"page_size": 2048}, [0], "page_size=2048", sg.Reason.PAGE_SIZE),
        ({}, [0, 1 << 51], "pfns[1]=2251799813685248", sg.Reason.PFN_RANGE),
    ],
)
def test_bad_build_arguments(table_from, kwargs, pfns, needle, reason):
    with pytest.raises(sg.InvalidArgument) as info:
        table_from(pfns, **kwargs)
    assert needle in str(info.value)
    assert info.value.errno == 22
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)


def test_negative_and_oversized_pfns(table_from):
    with pytest.raises(sg.InvalidArgument, match=r"pfns\[2\]=-5 is negative"):
        table_from([0, 1, -5])
    with pytest.raises(sg.InvalidArgument, match=r"pfns\[0\]=.* does not fit in 64 bits"):
        table_from([1 << 64])
    # A signed buffer's negative value reads as a huge pfn and is refused by the range check.
    with pytest.raises(sg.InvalidArgument, match=r"pfns\[1\]=.*out of range"):
        table_from(np.array([0, -1], dtype=np.int64))


def test_wrong_types(table_from):
    with pytest.raises(TypeError):
        table_from(b"\x00" * 8)
    with pytest.raises(TypeError):
        table_from([0, "1"])
    with pytest.raises(TypeError):
        table_from([0], offset=1.5)
    with pytest.raises(sg.InvalidArgument, match="one-dimensional"):
        table_from(np.zeros((2, 2), dtype=np.uint64))


def test_pfn_buffers_of_every_kind_agree(table_from):
    pfns = [4, 5, 9, 11, 12, 13]
    expected = cpu_rows(table_from(pfns))
    for form in (
        array("Q", pfns),
        memoryview(array("Q", pfns)),
        np.array(pfns, dtype=np.uint64),
        np.array(pfns, dtype=np.int64),
        np.array(pfns, dtype=np.uint32),
        array("I", pfns),
        tuple(pfns),
        range(0) or pfns,
    ):
        assert cpu_rows(table_from(form)) == expected
    # A strided view is copied, not misread.
    strided = np.array([4, 0, 5, 0, 9], dtype=np.uint64)[::2]
    assert cpu_rows(table_from(strided)) == [(4, 0, 2 * PAGE), (9, 0, PAGE)]


def test_append_after_final_call(table_from):
    t = table_from([0, 2])
    before = state(t)
    with pytest.raises(sg.InvalidArgument, match="the table is final"):
        t.append_pages([4])
    assert state(t) == before


@pytest.mark.parametrize(
    "pfns, kwargs, needle",
    [
        ([], {}, "no pages"),
        ([10], {"size": 0}, "size=0"),
        ([10], {"size": 5000}, "size=5000"),
        ([2, 1 << 60], {}, "pfns[1]="),
        ([3], {"size": 100}, "not whole pages while pfns[0] continues"),  # 3 merges into [1,2]
    ],
)
def test_failed_append_changes_nothing(table_from, pfns, kwargs, needle):
    t = table_from([1, 2], left_pages=4)
    before = state(t)
    with pytest.raises(sg.InvalidArgument) as info:
        t.append_pages(pfns, **kwargs)
    assert needle in str(info.value)
    assert state(t) == before
    t.append_pages([7, 8])  # still usable
    assert cpu_rows(t) == [(1, 0, 2 * PAGE), (7, 0, 2 * PAGE)]


def test_append_with_offset_is_refused(table_from):
    t = table_from([1], left_pages=1)
    # append_pages has no offset argument; the engine's rule still guards the C entry point.
    with pytest.raises(TypeError):
        t.append_pages([2], offset=5)  # type: ignore[call-arg]


def test_append_repeating_a_page_ended_inside(table_from):
    # The kernel would stretch (0, 100, 4096-200) over pfn 0 again and past the data.
    t = table_from([0], offset=100, size=PAGE - 200, left_pages=1)
    before = state(t)
    with pytest.raises(sg.InvalidArgument, match="repeats the page the previous call ended"):
        t.append_pages([0])
    assert state(t) == before
    t.append_pages([5])  # a different page is a new entry
    assert cpu_rows(t) == [(0, 100, PAGE - 200), (5, 0, PAGE)]


def test_partial_size_without_merge_is_fine(table_from):
    t = table_from([1], left_pages=1)
    t.append_pages([9], size=10)
    assert cpu_rows(t) == [(1, 0, PAGE), (9, 0, 10)]


def test_bad_counts(table_from):
    t = table_from([0, 2])
    with pytest.raises(sg.InvalidArgument, match="left_pages=-1"):
        table_from([0], left_pages=-1)
    with pytest.raises(sg.InvalidArgument, match="len_bytes=-1"):
        t.nents_for_len(-1)
    with pytest.raises(sg.InvalidArgument, match="start=-1"):
        t.page_pfns(-1)
    with pytest.raises(sg.InvalidArgument, match="n_entries=3"):
        t.export_dma(3)


def test_unknown_engine():
    with pytest.raises(sg.InvalidArgument, match="engine='fast' is not an engine"):
        sg.alloc_table_from_pages([0], engine="fast")
