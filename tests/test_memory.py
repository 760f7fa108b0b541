"""Emulated physical memory: sparse frames, the page allocator, byte access."""

from __future__ import annotations

import pytest

import scatterlist as sg

TIB = 1 << 40


def test_terabyte_memory_costs_nothing_until_touched(engine):
    mem = sg.PhysicalMemory(TIB, engine=engine)
    assert mem.n_pages == TIB // 4096
    assert mem.resident_pages == 0
    mem.write(TIB - 3, b"end")  # the very last bytes
    mem.write(123 * 4096 + 5, b"x")
    assert mem.resident_pages == 2
    assert mem.read(TIB - 3, 3) == b"end"
    assert mem.read(0, 4) == bytes(4)  # never written: zeros, and still not resident
    assert mem.resident_pages == 2
    pages = mem.alloc_pages(1000, "contiguous")
    assert list(pages.pfns) == list(range(1000))
    assert mem.resident_pages == 2  # allocation alone gives no backing
    pages.close()
    mem.close()


def test_read_write_across_pages(memory):
    data = bytes(range(256)) * 40  # 10240 bytes over three pages
    memory.write(4096 - 17, data)
    assert memory.read(4096 - 17, len(data)) == data
    assert memory.read(4096 - 18, 1) == b"\0"
    memory.write(0, bytearray(b"ab"))
    memory.write(2, memoryview(b"cd"))
    assert memory.read(0, 4) == b"abcd"


@pytest.mark.parametrize("phys, n", [(1 << 30, 1), ((1 << 30) - 1, 2), (1 << 62, 1)])
def test_out_of_range_access(memory, phys, n):
    with pytest.raises(sg.InvalidArgument, match="outside the emulated memory") as info:
        memory.read(phys, n)
    assert info.value.errno == 14  # EFAULT
    with pytest.raises(sg.InvalidArgument, match="outside the emulated memory"):
        memory.write(phys, b"\1" * n)
    assert memory.resident_pages == 0  # a refused write changed nothing
    with pytest.raises(sg.InvalidArgument):
        memory.read(-1, 1)


def test_contiguous_layout(memory):
    a = memory.alloc_pages(3, "contiguous")
    b = memory.alloc_pages(4, "contiguous")
    assert list(a.pfns) == [0, 1, 2] and list(b.pfns) == [3, 4, 5, 6]
    a.close()
    c = memory.alloc_pages(4, "contiguous")  # the hole at 0..2 is too small
    assert list(c.pfns) == [7, 8, 9, 10]
    d = memory.alloc_pages(3, "contiguous")
    assert list(d.pfns) == [0, 1, 2]


def test_scattered_layout_has_no_neighbours(memory):
    pages = memory.alloc_pages(500, "scattered")
    pfns = list(pages.pfns)
    assert len(set(pfns)) == 500
    assert all(b != a + 1 for a, b in zip(pfns, pfns[1:]))
    t = sg.alloc_table_from_pages(pages.pfns, engine=memory.engine)
    assert t.orig_nents == 500  # nothing merges
    # The gaps are handed out next.
    more = memory.alloc_pages(10, "scattered")
    assert set(more.pfns).isdisjoint(pfns)


def test_random_layout_is_seeded_and_reproducible(engine):
    def pfns_for(seed):
        mem = sg.PhysicalMemory(1 << 26, engine=engine)
        pages = mem.alloc_pages(2000, "random", seed=seed)
        result = list(pages.pfns)
        pages.close()
        mem.close()
        return result

    first, again, other = pfns_for(7), pfns_for(7), pfns_for(8)
    assert first == again
    assert first != other
    assert first == sorted(set(first))
    runs = sum(1 for a, b in zip(first, first[1:]) if b != a + 1) + 1
    assert 2000 / 16 <= runs < 2000  # runs of 1 to 16 pages
    t = sg.alloc_table_from_pages(first, engine=engine)
    assert t.orig_nents == runs


def test_out_of_pages_allocates_nothing(engine):
    mem = sg.PhysicalMemory(64 * 4096, engine=engine)
    held = mem.alloc_pages(30, "contiguous")
    with pytest.raises(sg.OutOfMemory, match="cannot allocate 35 pages") as info:
        mem.alloc_pages(35)
    assert info.value.errno == 12
    assert isinstance(info.value, MemoryError)
    assert mem.free_pages == 34
    with pytest.raises(sg.OutOfMemory):
        mem.alloc_pages(34, "scattered")  # 34 free pages, but not 34 without neighbours
    with pytest.raises(sg.OutOfMemory):
        mem.alloc_pages(35, "contiguous")
    assert mem.free_pages == 34
    rest = mem.alloc_pages(34, "contiguous")
    assert mem.free_pages == 0
    held.close()
    rest.close()
    mem.close()


def test_freed_pages_lose_their_contents(memory):
    pages = memory.alloc_pages(1, "contiguous")
    phys = pages.pfns[0] * 4096
    memory.write(phys, b"secret")
    assert memory.resident_pages == 1
    pages.close()
    assert memory.resident_pages == 0
    assert memory.read(phys, 6) == bytes(6)


def test_vmalloc(memory):
    pages = memory.vmalloc(10000)
    assert pages.size == 10000
    assert pages.n_pages == 3
    pfns = list(pages.pfns)
    assert all(b > a + 1 for a, b in zip(pfns, pfns[1:]))


@pytest.mark.parametrize("page_size", [16384, 65536])
def test_large_pages(engine, page_size):
    mem = sg.PhysicalMemory(256 * page_size, page_size, engine=engine)
    pages = mem.alloc_pages(4, "contiguous")
    assert pages.size == 4 * page_size
    mem.write(page_size - 1, b"xy")
    assert mem.read(page_size - 1, 2) == b"xy"
    assert mem.resident_pages == 2
    pages.close()
    mem.close()


@pytest.mark.parametrize(
    "size, page_size, needle",
    [
        (0, 4096, "size=0"),
        (4097, 4096, "size=4097"),
        ((1 << 46) + 4096, 4096, "64 TiB"),
        (8192, 3000, "page_size=3000"),
        (-1, 4096, "size=-1"),
    ],
)
def test_bad_memory_arguments(engine, size, page_size, needle):
    with pytest.raises(sg.InvalidArgument, match=needle):
        sg.PhysicalMemory(size, page_size, engine=engine)


def test_bad_alloc_arguments(memory):
    with pytest.raises(sg.InvalidArgument, match="layout='striped'"):
        memory.alloc_pages(1, "striped")
    with pytest.raises(sg.InvalidArgument, match="at least one page"):
        memory.alloc_pages(0)
    with pytest.raises(TypeError):
        memory.alloc_pages("2")
    assert memory.free_pages == memory.n_pages
