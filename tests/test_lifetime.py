"""Ownership and lifetimes: close is idempotent, views never dangle, safety nets run."""

from __future__ import annotations

import gc
import weakref

import pytest

import scatterlist as sg


def test_close_is_idempotent_and_guards_every_method(table_from, memory):
    t = table_from([0, 2, 3])
    t.close()
    t.close()
    assert t.closed
    for call in (
        lambda: t.nents,
        lambda: t.orig_nents,
        lambda: t.total_nents,
        lambda: t.final,
        lambda: len(t),
        lambda: list(t),
        t.entries,
        t.dma_entries,
        t.export_cpu,
        t.export_dma,
        t.chunk_slots,
        t.sg_nents,
        lambda: t.nents_for_len(1),
        t.page_pfns,
        lambda: t.append_pages([9]),
        lambda: t.copy_to_buffer(memory),
        lambda: t.copy_from_buffer(memory, b"x"),
    ):
        with pytest.raises(sg.ClosedError):
            call()


def test_entries_raise_after_close(table_from):
    t = table_from([0, 2])
    entry = t.entries()[0]
    assert entry.pfn == 0
    t.close()
    for field in ("pfn", "offset", "length", "dma_address", "dma_len", "index", "phys"):
        with pytest.raises(sg.ClosedError, match="after its table was closed"):
            getattr(entry, field)


def test_iterator_raises_when_table_closes_midway(table_from):
    t = table_from([0, 2, 4])
    it = iter(t)
    first = next(it)
    assert first.pfn == 0
    t.close()
    with pytest.raises(sg.ClosedError):
        next(it)


def test_entries_go_stale_after_append(table_from):
    t = table_from([0, 2, 3], left_pages=1)
    last = t.entries()[-1]
    it = iter(t)
    next(it)
    t.append_pages([4])  # grows the entry `last` describes
    with pytest.raises(sg.ClosedError, match="stale"):
        last.length
    with pytest.raises(sg.ClosedError):
        next(it)
    assert t.entries()[-1].length == 3 * 4096 and t.orig_nents == 2


def test_context_manager_closes(table_from):
    with table_from([0]) as t:
        assert t.orig_nents == 1
    assert t.closed


def test_unclosed_table_is_freed_by_gc(table_from):
    t = table_from(list(range(0, 1000, 2)))
    finalizer = t._finalizer
    ref = weakref.ref(t)
    del t
    gc.collect()
    assert ref() is None
    assert not finalizer.alive


def test_entry_keeps_table_object_alive_but_not_open(table_from):
    """An entry holds its table object (so it can check it) but not its entries: closing the
    table through another reference frees them, and the entry then raises."""
    table = table_from([0, 2])
    table_ref = weakref.ref(table)
    entry = table.entries()[1]
    del table
    gc.collect()
    assert table_ref() is not None  # alive: the entry holds it
    assert entry.pfn == 2 and not table_ref().closed  # and not closed by the collection
    table_ref().close()  # closable while the entry exists: the entry keeps nothing open
    assert table_ref().closed
    with pytest.raises(sg.ClosedError, match="after its table was closed"):
        entry.pfn
    del entry
    gc.collect()
    assert table_ref() is None


def test_pages_lifetime(memory):
    pages = memory.alloc_pages(3)
    free_before = memory.free_pages
    pfns = list(pages.pfns)
    with pytest.raises(TypeError):
        pages.pfns[0] = 5  # read-only view
    pages.close()
    pages.close()
    assert memory.free_pages == free_before + 3
    with pytest.raises(sg.ClosedError):
        pages.pfns
    again = memory.alloc_pages(3)
    assert list(again.pfns) == pfns  # freed pages are handed out again
    again.close()


def test_memory_close_refused_while_pages_open(engine):
    mem = sg.PhysicalMemory(1 << 20, engine=engine)
    pages = mem.alloc_pages(2)
    with pytest.raises(sg.BusyError, match="still in use"):
        mem.close()
    assert not mem.closed
    pages.close()
    mem.close()
    mem.close()
    with pytest.raises(sg.ClosedError):
        mem.read(0, 1)
    with pytest.raises(sg.ClosedError):
        mem.alloc_pages(1)


def test_dropped_pages_return_to_memory(engine):
    mem = sg.PhysicalMemory(1 << 20, engine=engine)
    mem.alloc_pages(5)  # dropped at once
    gc.collect()
    assert mem.free_pages == mem.n_pages
    mem.close()


def test_close_racing_with_use_never_reads_freed_memory(engine):
    """A table, memory or device closed on one thread while another uses it: the user sees
    ClosedError or a full result, never freed memory."""
    import threading

    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    errors = []
    for _ in range(100):
        table = sg.alloc_table_from_pages(list(range(0, 2000, 2)), engine=engine)
        pages = mem.alloc_pages(3)
        results = []

        def reader():
            try:
                for _ in range(20):
                    rows = table.export_cpu()
                    results.append(len(rows))
                    mem.read(0, 64)
            except sg.ClosedError:
                pass
            except Exception as exc:  # pragma: no cover - the failure being tested for
                errors.append(exc)

        thread = threading.Thread(target=reader)
        thread.start()
        table.close()
        pages.close()
        thread.join()
        assert all(count == 3000 for count in results)
    assert errors == []
    mem.close()
