"""sg_copy_from_buffer / sg_copy_to_buffer against emulated memory."""

from __future__ import annotations

import pytest

import scatterlist as sg


def test_round_trip_through_scattered_pages(memory):
    pages = memory.alloc_pages(5, "scattered")
    t = sg.alloc_table_from_pages(pages.pfns, offset=100, size=5 * 4096 - 300, engine=memory.engine)
    data = bytes((i * 7) % 251 for i in range(5 * 4096 - 300))
    assert t.copy_from_buffer(memory, data) == len(data)
    assert t.copy_to_buffer(memory) == data
    # The bytes landed where the entries say.
    for entry in t:
        start = sum(e.length for e in t.entries()[: entry.index])
        assert memory.read(entry.phys, entry.length) == data[start : start + entry.length]


def test_skip_and_short_copies(memory):
    t = sg.alloc_table_from_pages([3, 9], engine=memory.engine)
    payload = bytes(range(200))
    assert t.copy_from_buffer(memory, payload, skip=4000) == 200
    assert memory.read(3 * 4096 + 4000, 96) == payload[:96]
    assert memory.read(9 * 4096, 104) == payload[96:]
    assert t.copy_to_buffer(memory, 200, skip=4000) == payload
    assert t.copy_to_buffer(memory, 10, skip=8192) == b""  # skip runs past the end
    assert t.copy_from_buffer(memory, b"zz", skip=8191) == 1  # the table ends first
    assert len(t.copy_to_buffer(memory, 1 << 20)) == 8192


def test_copy_refuses_mismatched_memory(engine):
    small = sg.PhysicalMemory(16 * 4096, engine=engine)
    t = sg.alloc_table_from_pages([1, 40], engine=engine)
    with pytest.raises(sg.InvalidArgument, match="outside the emulated memory"):
        t.copy_from_buffer(small, b"x" * 8192)
    assert small.resident_pages == 0  # checked before any byte moved
    big_pages = sg.PhysicalMemory(16 * 16384, 16384, engine=engine)
    with pytest.raises(sg.InvalidArgument, match="page sizes differ"):
        t.copy_to_buffer(big_pages, 1)
    other = "model" if engine == "native" else "native"
    foreign = sg.PhysicalMemory(1 << 20, engine=other)
    with pytest.raises(sg.InvalidArgument, match="belongs to the"):
        t.copy_to_buffer(foreign, 1)
    with pytest.raises(TypeError):
        t.copy_to_buffer(b"not memory", 1)  # type: ignore[arg-type]
