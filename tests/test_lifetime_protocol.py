"""The lifetime protocol every owner shares (``scatterlist._util.Lifetime``), from public calls.

No call reads or writes freed memory, whatever runs inside it (user code in ``__index__``, a
callback) or beside it (another thread, the garbage collector, interpreter exit, a fork):
arguments are converted before an object is entered, ``close()`` waits for the calls in flight
or refuses with BusyError, and a second ``close()`` racing the first simply waits for it.
Each test here is a regression test for one finding of the hardening review (issue 7, part 1);
the interleavings are forced by holding an engine call (``helpers.Pause``), so each runs the
race every time.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import threading
from array import array
from typing import Any, Callable, List

import pytest
from helpers import PAGE, EngineHook, InThread, Pause

import scatterlist as sg
from scatterlist import DataDirection as Dir
from scatterlist import faults

BLOCKED = 0.3  # seconds a waiting call must stay blocked to count as waiting


class ClosingIndex:
    """An int-like argument whose ``__index__`` closes ``victim``: user code that runs while a
    call converts its arguments."""

    def __init__(self, value: int, victim: Any) -> None:
        self.value = value
        self.victim = victim

    def __index__(self) -> int:
        self.victim.close()
        return self.value


# -- user code inside argument conversion -------------------------------------------------------


def _memory_read(mem: sg.PhysicalMemory, *_: Any) -> Callable[[], Any]:
    return lambda: mem.read(0, ClosingIndex(16, mem))


def _device_read(mem: sg.PhysicalMemory, *_: Any) -> Callable[[], Any]:
    dev = sg.Device(mem, name="reader")
    return lambda: dev.dma_read(0, ClosingIndex(16, dev))


def _table_copy_closing_table(mem: sg.PhysicalMemory, table: sg.RawTable) -> Callable[[], Any]:
    return lambda: table.copy_to_buffer(mem, ClosingIndex(8, table))


def _table_copy_closing_memory(mem: sg.PhysicalMemory, table: sg.RawTable) -> Callable[[], Any]:
    return lambda: table.copy_to_buffer(mem, ClosingIndex(8, mem))


def _iommu_map(mem: sg.PhysicalMemory, *_: Any) -> Callable[[], Any]:
    iommu = sg.Iommu(mem)
    return lambda: iommu.map(ClosingIndex(0x10000, iommu), 0, PAGE)


def _table_page_pfns(mem: sg.PhysicalMemory, table: sg.RawTable) -> Callable[[], Any]:
    return lambda: table.page_pfns(ClosingIndex(0, table))


@pytest.mark.parametrize(
    "make_call",
    [
        _memory_read,
        _device_read,
        _table_copy_closing_table,
        _table_copy_closing_memory,
        _iommu_map,
        _table_page_pfns,
    ],
)
def test_argument_that_closes_the_object_is_converted_first(engine: str, make_call: Any) -> None:
    """The arguments are converted before the object is entered: the ``__index__`` closes it
    for good, and the call then finds it closed (it used to go on with the freed C object)."""
    mem = sg.PhysicalMemory(1 << 20, engine=engine)
    mem.write(0, b"abcdefgh" * 2)
    table = sg.alloc_table_from_pages([0, 2], engine=engine)
    call = make_call(mem, table)
    with pytest.raises(sg.ClosedError, match="closed"):
        call()


def test_close_from_inside_a_call_is_refused(engine: str) -> None:
    """A callback that runs inside a call and closes the object the call is using gets
    BusyError; the call completes on live memory."""
    mem = sg.PhysicalMemory(1 << 20, engine=engine)
    mem.write(0, b"payload!")
    table = sg.alloc_table_from_pages([0, 2], engine=engine)
    refused = []

    def read_then_close(real: Any, handle: Any, *args: Any) -> Any:
        with pytest.raises(sg.BusyError, match="inside a call"):
            mem.close()
        refused.append("memory")
        return real(handle, *args)

    def export_then_close(real: Any, handle: Any, *args: Any) -> Any:
        with pytest.raises(
            sg.BusyError, match="already in use by a call on this thread|inside a call"
        ):
            table.close()
        refused.append("table")
        return real(handle, *args)

    with EngineHook(engine, "memory_read", read_then_close):
        assert mem.read(0, 8) == b"payload!"
    with EngineHook(engine, "table_export_cpu", export_then_close):
        assert table.export_cpu().tolist() == [0, 0, PAGE, 2, 0, PAGE]
    assert refused == ["memory", "table"]
    assert not mem.closed and not table.closed
    table.close()
    mem.close()


# -- close() while a call runs on another thread -----------------------------------------------


def test_device_close_waits_for_a_map_in_flight_then_refuses(engine: str) -> None:
    """Device.close() on one thread while dma_map_sgtable runs on another: the close waits for
    the map, then refuses (the table is mapped by hand); the table can be unmapped and closed,
    and then the device closes.  (The device used to be destroyed mid-map, leaving a table
    mapped for a freed device that could be neither unmapped nor closed.)"""
    mem = sg.PhysicalMemory(16 << 20, engine=engine)
    iommu = sg.Iommu(mem)
    dev = sg.Device(mem, iommu, name="nic")
    table = sg.alloc_table_from_pages([4, 6, 8], engine=engine)
    with Pause(
        engine, "dma_map", when=lambda dev_handle, *a: dev_handle is dev._life.handle, after=True
    ) as pause:
        mapper = InThread(lambda: sg.dma_map_sgtable(dev, table, Dir.TO_DEVICE), "mapper")
        assert pause.entered.wait(5)
        closer = InThread(dev.close, "closer")
        assert closer.running_after(BLOCKED), "close() did not wait for the map in flight"
        pause.resume()
        mapper.result()
        with pytest.raises(sg.BusyError, match="still mapped"):
            closer.result()
    assert not dev.closed and table.mapped and iommu.mapped_pages == 3
    sg.dma_unmap_sgtable(dev, table, Dir.TO_DEVICE)
    table.close()
    dev.close()
    assert dev.closed and iommu.mapped_pages == 0


def test_memory_close_waits_for_a_copy_in_flight(engine: str) -> None:
    mem = sg.PhysicalMemory(1 << 20, engine=engine)
    mem.write(0, b"A" * PAGE)
    mem.write(2 * PAGE, b"B" * PAGE)
    table = sg.alloc_table_from_pages([0, 2], engine=engine)
    with Pause(engine, "table_copy") as pause:
        copier = InThread(lambda: table.copy_to_buffer(mem), "copier")
        assert pause.entered.wait(5)
        closer = InThread(mem.close, "closer")
        assert closer.running_after(BLOCKED), "close() did not wait for the copy in flight"
        pause.resume()
        assert copier.result() == b"A" * PAGE + b"B" * PAGE
        closer.result()
    assert mem.closed
    with pytest.raises(sg.ClosedError):
        table.copy_to_buffer(mem)


def test_unbind_and_close_race_releases_each_mapping_once(engine: str) -> None:
    """Device.unbind() on one thread, Device.close() on another: the close waits for the
    unbind (it is a call in flight), every owned mapping is unmapped exactly once, and the
    owned table then closes without a second unmap."""
    mem = sg.PhysicalMemory(16 << 20, engine=engine)
    iommu = sg.Iommu(mem)
    dev = sg.Device(mem, iommu, name="hotplug")
    owned = sg.SGTable.new(dev, mem.alloc_pages(3), Dir.FROM_DEVICE)
    unmaps = []

    def counting_unmap(real: Any, dev_handle: Any, *args: Any) -> Any:
        if dev_handle is dev._life.handle:
            unmaps.append(args[0])
        return real(dev_handle, *args)

    with (
        EngineHook(engine, "dma_unmap", counting_unmap),
        Pause(
            engine,
            "device_set_bound",
            when=lambda dev_handle, bound: dev_handle is dev._life.handle,
        ) as pause,
    ):
        unbinder = InThread(dev.unbind, "unbinder")
        assert pause.entered.wait(5)
        closer = InThread(dev.close, "closer")
        assert closer.running_after(BLOCKED), "close() did not wait for the unbind"
        pause.resume()
        assert unbinder.result() == 1
        closer.result()
        assert dev.closed and owned.revoked
        owned.close()
    assert len(unmaps) == 1 and iommu.mapped_pages == 0
    assert owned.closed and mem.free_pages == mem.n_pages


def test_device_created_while_its_memory_closes(engine: str) -> None:
    """Device() enters its memory before creating the C device: a close() racing it waits,
    then refuses because the new device pins the memory."""
    mem = sg.PhysicalMemory(1 << 20, engine=engine)
    with Pause(engine, "device_create") as pause:
        maker = InThread(lambda: sg.Device(mem, name="late"), "maker")
        assert pause.entered.wait(5)
        closer = InThread(mem.close, "closer")
        assert closer.running_after(BLOCKED)
        pause.resume()
        dev = maker.result()
        with pytest.raises(sg.BusyError, match="still in use by 1 Device"):
            closer.result()
    dev.close()
    mem.close()
    assert mem.closed


def test_iommu_cannot_close_while_exhausted(engine: str) -> None:
    mem = sg.PhysicalMemory(1 << 20, engine=engine)
    iommu = sg.Iommu(mem, aperture_bits=24)
    with faults.exhaust_iova(iommu) as taken:
        assert taken > 0
        with pytest.raises(sg.BusyError, match="exhaust_iova"):
            iommu.close()
    assert iommu.iova_ranges() == []
    iommu.close()
    mem.close()


@pytest.mark.parametrize("kind", ["table", "memory", "sgtable"])
def test_two_threads_closing_at_once(engine: str, kind: str) -> None:
    """close() is idempotent also when two threads call it at once: the second waits for the
    first and returns (it used to raise ClosedError, or free twice)."""
    mem = sg.PhysicalMemory(4 << 20, engine=engine)
    if kind == "table":
        obj: Any = sg.alloc_table_from_pages([1, 3], engine=engine)
        method = "table_destroy"
    elif kind == "memory":
        obj, method = mem, "memory_destroy"
    else:
        iommu = sg.Iommu(mem)
        dev = sg.Device(mem, iommu)
        obj, method = sg.SGTable.new(dev, mem.alloc_pages(2), Dir.TO_DEVICE), "table_destroy"
    with Pause(engine, method) as pause:
        first = InThread(obj.close, "first")
        assert pause.entered.wait(5)
        second = InThread(obj.close, "second")
        assert second.running_after(BLOCKED), "the second close() did not wait for the first"
        pause.resume()
        first.result()
        second.result()
    assert obj.closed
    obj.close()


# -- interpreter exit ----------------------------------------------------------------------------


def _run(script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_daemon_thread_inside_a_map_at_exit(engine: str) -> None:
    """The interpreter exits while a daemon thread is inside dma_map_sgtable: the exit-time
    safety nets must not free the table under the call (it used to crash every time).  The
    map is held (table mutex taken) while the main thread exits; an exit handler that runs
    after the package's safety nets then lets it finish, and the table, device and memory are
    torn down by the call that leaves last, in order."""
    result = _run(f"""
        import atexit, sys, threading, weakref
        assert not weakref.finalize._registered_with_atexit
        state = {{}}

        def finish():  # registered first: runs after weakref.finalize's exit handler
            state["pause"].resume()
            state["worker"].join(10)
            print("daemon:", state.get("result"), "| mapped pages:",
                  state["iommu"]._engine.iommu_info(state["iommu"]._life.handle)[0]
                  if not state["iommu"]._life.destroyed else "iommu gone", flush=True)

        atexit.register(finish)
        sys.path.insert(0, {str(__file__.rsplit("/", 1)[0])!r})
        import scatterlist as sg
        from helpers import Pause
        mem = sg.PhysicalMemory(64 << 20, engine={engine!r})
        iommu = state["iommu"] = sg.Iommu(mem)
        dev = sg.Device(mem, iommu, dma_mask=sg.DMA_BIT_MASK(64))
        table = sg.alloc_table_from_pages(list(range(0, 4000, 2)), engine={engine!r})
        state["pause"] = Pause({engine!r}, "dma_map", after=True, timeout=30).__enter__()

        def work(table=table):
            try:
                sg.dma_map_sgtable(dev, table, sg.DataDirection.TO_DEVICE)
                state["result"] = "mapped"
            except BaseException as exc:
                state["result"] = repr(exc)

        state["worker"] = threading.Thread(target=work, daemon=True)
        state["worker"].start()
        state["pause"].entered.wait(5)
        del table
    """)
    assert result.returncode == 0, result.stderr
    assert "daemon: mapped" in result.stdout, result.stdout + result.stderr
    assert "Exception ignored" not in result.stderr, result.stderr


def test_daemon_threads_mapping_at_exit_free_running(engine: str) -> None:
    """The same race free-running, with the C core really inside the map at exit."""
    for attempt in range(3):
        result = _run(f"""
            import threading, time
            import scatterlist as sg
            mem = sg.PhysicalMemory(1 << 32, engine={engine!r})
            dev = sg.Device(mem, sg.Iommu(mem), dma_mask=sg.DMA_BIT_MASK(64))
            n = {20_000 if engine == "native" else 500}
            def loop():
                table = sg.alloc_table_from_pages(range(0, 2 * n, 2), engine={engine!r})
                while True:
                    sg.dma_map_sgtable(dev, table, sg.DataDirection.TO_DEVICE)
                    sg.dma_unmap_sgtable(dev, table, sg.DataDirection.TO_DEVICE)
            for _ in range(2):
                threading.Thread(target=loop, daemon=True).start()
            time.sleep(0.05 * {attempt + 1})
        """)
        assert result.returncode == 0, (attempt, result.returncode, result.stderr[-2000:])


# -- a caller's buffer changing under the C core -------------------------------------------------


def _mutate_first_then(real: Any, original: "array[int]", *args: Any) -> Any:
    original[0] = 1 << 60  # an out-of-range pfn, written while the call is in flight
    return real(*args)


@pytest.mark.parametrize(
    "call", ["alloc_table_from_pages", "append_pages", "alloc_table_from_entries"]
)
def test_a_callers_array_is_read_once(engine: str, call: str) -> None:
    """The C core reads a page array twice with the GIL released; another thread changing the
    caller's array in between used to make it read past the end and take unchecked pfns.  The
    engine now gets a copy: a change after the call started does not reach the table."""
    pfns = array("Q", [10, 11, 12, 20])
    rows = array("Q", [10, 0, PAGE, 30, 0, PAGE])
    method = "table_set_entries" if call == "alloc_table_from_entries" else "table_append"
    source = rows if call == "alloc_table_from_entries" else pfns

    def hook(real: Any, *args: Any) -> Any:
        return _mutate_first_then(real, source, *args)

    table = (
        sg.alloc_table_from_pages([2], left_pages=4, engine=engine)
        if call == "append_pages"
        else None
    )
    with EngineHook(engine, method, hook):
        if call == "alloc_table_from_pages":
            table = sg.alloc_table_from_pages(pfns, engine=engine)
        elif call == "append_pages":
            assert table is not None
            table.append_pages(pfns)
        else:
            table = sg.alloc_table_from_entries(rows, engine=engine)
    assert source[0] == 1 << 60  # the hook did change the caller's array
    expected = {
        "alloc_table_from_pages": [(10, 0, 3 * PAGE), (20, 0, PAGE)],
        "append_pages": [(2, 0, PAGE), (10, 0, 3 * PAGE), (20, 0, PAGE)],
        "alloc_table_from_entries": [(10, 0, PAGE), (30, 0, PAGE)],
    }[call]
    assert [(e.pfn, e.offset, e.length) for e in table] == expected


def test_numpy_array_is_copied_too(engine: str) -> None:
    np = pytest.importorskip("numpy")
    pfns = np.array([5, 6, 9], dtype=np.uint64)

    def hook(real: Any, *args: Any) -> Any:
        pfns[1] = 1 << 60
        return real(*args)

    with EngineHook(engine, "table_append", hook):
        table = sg.alloc_table_from_pages(pfns, engine=engine)
    assert [(e.pfn, e.length) for e in table] == [(5, 2 * PAGE), (9, PAGE)]


# -- the device's shared state under threads --------------------------------------------------


def test_fault_injection_counts_are_exact_under_threads(engine: str) -> None:
    """Threads mapping on one device with probabilistic fault injection: every injected
    failure is counted once (the C core used to decrement and draw unsynchronised)."""
    mem = sg.PhysicalMemory(64 << 20, engine=engine)
    dev = sg.Device(mem, sg.Iommu(mem), dma_mask=sg.DMA_BIT_MASK(64))
    dev.fail_maps(probability=0.5, seed=11)
    n_threads, maps = 4, {"native": 400, "model": 100}[engine]
    observed = [0] * n_threads

    def worker(k: int) -> None:
        table = sg.alloc_table_from_pages(
            range(1000 + 64 * k, 1000 + 64 * k + 32, 2), engine=engine
        )
        for _ in range(maps):
            try:
                sg.dma_map_sgtable(dev, table, Dir.TO_DEVICE)
            except sg.OutOfMemory as exc:
                assert exc.reason is sg.Reason.INJECTED
                observed[k] += 1
            else:
                sg.dma_unmap_sgtable(dev, table, Dir.TO_DEVICE)
        table.close()

    threads = [InThread(lambda k=k: worker(k), f"mapper-{k}") for k in range(n_threads)]
    for thread in threads:
        thread.result(120)
    assert sum(observed) == dev.injected_failures
    assert 0.3 < sum(observed) / (n_threads * maps) < 0.7
    assert dev.live_mappings == 0


def test_garbage_collection_never_waits_on_a_call(engine: str) -> None:
    """A safety net that runs while its object's mutex is held (here: a table released while
    a call on another thread holds it) never blocks: the last one out tears down."""
    mem = sg.PhysicalMemory(1 << 20, engine=engine)
    mem.write(0, b"x" * PAGE)
    table = sg.alloc_table_from_pages([0], engine=engine)
    life = table._life
    with Pause(engine, "table_copy") as pause:
        copier = InThread(lambda: table.copy_to_buffer(mem), "copier")
        assert pause.entered.wait(5)
        life.release()  # what the finalizer does; must return at once
        assert not life.destroyed  # the call in flight still uses it
        pause.resume()
        assert copier.result() == b"x" * PAGE
    assert life.destroyed  # torn down by the call that left last
    assert table.closed


def test_safety_nets_run_inside_a_locked_section_of_the_same_thread(engine: str) -> None:
    """The collector can run a safety net at any allocation, also while this thread is inside
    one of the package's own locked sections: the nets must not wait on those locks (a Pages
    net unpinning its memory while the memory's condition is held; a table net forgetting its
    mapping while the device's state lock is held)."""
    mem = sg.PhysicalMemory(4 << 20, engine=engine)
    dev = sg.Device(mem, sg.Iommu(mem))
    pages = mem.alloc_pages(2)
    table = sg.alloc_table_from_pages([9, 11], engine=engine)
    sg.dma_map_sgtable(dev, table, Dir.TO_DEVICE)

    def collect_inside_locks() -> None:
        with mem._life._sync[0]:
            pages._finalizer()  # what the collector does to dropped Pages
        with dev._state.lock, pytest.warns(ResourceWarning):
            table._finalizer()  # a dropped, still mapped table

    InThread(collect_inside_locks, "collector").result(10)
    assert pages.closed and table.closed and dev.live_mappings == 0
    assert mem.free_pages == mem.n_pages


def test_an_owned_tables_safety_net_never_waits_for_its_table(engine: str) -> None:
    """An SGTable dropped while another thread holds its table (a revocation in progress):
    the safety net returns at once; the table's last user unmaps and frees the entries, and
    only then do the pages go back."""
    mem = sg.PhysicalMemory(4 << 20, engine=engine)
    iommu = sg.Iommu(mem)
    dev = sg.Device(mem, iommu)
    owned = sg.SGTable.new(dev, mem.alloc_pages(3), Dir.TO_DEVICE)
    raw_life = owned._raw._life
    holding, let_go = threading.Event(), threading.Event()

    def hold_the_table() -> None:
        with raw_life.hold():
            holding.set()
            let_go.wait(10)

    holder = InThread(hold_the_table, "holder")
    assert holding.wait(5)
    net = owned._finalizer
    del owned
    returned = InThread(net, "collector")
    assert not returned.running_after(BLOCKED), "the safety net waited for the table"
    assert iommu.mapped_pages == 3 and mem.free_pages == mem.n_pages - 3  # nothing freed yet
    with pytest.warns(ResourceWarning, match="SGTable dropped while DMA-mapped"):
        let_go.set()
        holder.result()
    assert iommu.mapped_pages == 0 and mem.free_pages == mem.n_pages
    assert dev.live_mappings == 0


# -- user code reached through argument objects, and the collector -----------------------------


class LoudName(str):
    """A device name whose methods run user code (here: they count, and close a table)."""

    calls = 0
    victim: Any = None

    def __repr__(self) -> str:
        LoudName.calls += 1
        if LoudName.victim is not None:
            LoudName.victim.close()
        return "'loud'"

    __str__ = __repr__


def test_string_arguments_are_copied_to_plain_str(engine: str) -> None:
    """A str subclass given as a name (or a debug mode) is copied to a plain str: none of its
    methods runs later, inside a call (a repr that closed the table its error message named
    used to run inside RawTable.close)."""
    mem = sg.PhysicalMemory(1 << 20, engine=engine)
    dev = sg.Device(mem, sg.Iommu(mem), name=LoudName("nic"), debug=LoudName("warn"))
    table = sg.alloc_table_from_pages([1, 3], engine=engine)
    sg.dma_map_sgtable(dev, table, Dir.TO_DEVICE)
    LoudName.victim = table
    try:
        with pytest.raises(sg.BusyError, match="mapped for device 'nic'"):
            table.close()
        assert type(dev.name) is str and type(dev.debug) is str and repr(dev)
    finally:
        LoudName.victim = None
    assert LoudName.calls == 0
    sg.dma_unmap_sgtable(dev, table, Dir.TO_DEVICE)
    table.close()


class CountingInt(int):
    """An int subclass whose operators run user code."""

    calls = 0

    def _count(self, *args: Any) -> Any:
        CountingInt.calls += 1
        return NotImplemented

    __eq__ = __lt__ = __le__ = __gt__ = __ge__ = __and__ = __add__ = __sub__ = _count
    __hash__ = int.__hash__


def test_int_subclass_arguments_become_plain_ints(engine: str) -> None:
    mem = sg.PhysicalMemory(1 << 20, engine=engine)
    mem.write(CountingInt(8), b"abc")
    assert mem.read(CountingInt(8), CountingInt(3)) == b"abc"
    table = sg.alloc_table_from_pages([CountingInt(2), 4], offset=CountingInt(8), engine=engine)
    assert [e.pfn for e in table] == [2, 4] and table.page_pfns(CountingInt(1)).tolist() == [4]
    assert CountingInt.calls == 0


class Reentrant:
    """In a reference cycle, so that the collector frees it at some allocation, possibly
    inside a call on ``table``; its __del__ then calls into that table."""

    outcomes: List[str] = []

    def __init__(self, table: sg.RawTable) -> None:
        self.table = table
        self.me = self

    def __del__(self) -> None:
        try:
            self.table.counts()
            Reentrant.outcomes.append("ok")
        except sg.BusyError:
            Reentrant.outcomes.append("busy")  # refused: it was inside a call on the table


def test_collector_reentering_a_table_from_del_never_deadlocks(engine: str) -> None:
    table = sg.alloc_table_from_pages([1, 2, 3], engine=engine)
    old = gc.get_threshold()
    gc.set_threshold(20)
    try:

        def churn() -> None:
            for _ in range(3000):
                Reentrant(table)
                table.counts()
                table.entries()

        InThread(churn, "churn").result(60)
    finally:
        gc.set_threshold(*old)
        gc.collect()
    assert Reentrant.outcomes and set(Reentrant.outcomes) <= {"ok", "busy"}


def test_pages_collected_inside_the_allocator_never_deadlock(engine: str) -> None:
    """Pages dropped in reference cycles are collected at allocations, some inside the
    engine's allocator (the model's memory lock held): their safety nets wait for the
    thread's call to leave the package, then free."""
    mem = sg.PhysicalMemory(1 << 28, engine=engine)
    old = gc.get_threshold()
    gc.set_threshold(50)
    try:

        def churn() -> None:
            for _ in range(2000):
                pages = mem.alloc_pages(32)
                pages.cycle = pages  # type: ignore[attr-defined]
                del pages

        InThread(churn, "churn").result(60)
    finally:
        gc.set_threshold(*old)
    gc.collect()
    assert mem.free_pages == mem.n_pages
    mem.close()


# -- ownership and refused closes (hostile review) ----------------------------------------------


def test_two_threads_cannot_both_take_the_same_pages(engine: str) -> None:
    """SGTable.new on one Pages from two threads: the ownership check and the hand-over used
    to be apart (the build and the map ran between), so both could succeed, and closing one
    freed pages the other still mapped.  Forced: the first is held inside its map."""
    mem = sg.PhysicalMemory(4 << 20, engine=engine)
    iommu = sg.Iommu(mem)
    dev = sg.Device(mem, iommu)
    pages = mem.alloc_pages(3)
    with Pause(engine, "dma_map", when=lambda dev_handle, *a: dev_handle is dev._life.handle) as p:
        first = InThread(lambda: sg.SGTable.new(dev, pages, Dir.TO_DEVICE), "first")
        assert p.entered.wait(5)
        with pytest.raises(sg.BusyError, match="already belong"):
            sg.SGTable.new(dev, pages, Dir.TO_DEVICE)
        p.resume()
        owner = first.result()
    assert pages.owned and iommu.mapped_pages == 3
    owner.close()
    assert pages.closed and iommu.mapped_pages == 0


def test_a_warning_filter_cannot_take_the_pages_being_taken(engine: str) -> None:
    """A dma-debug warning delivered by SGTable.new runs a warning filter (any code): one that
    called SGTable.new on the same pages used to make a second owner."""
    import warnings

    mem = sg.PhysicalMemory(4 << 20, engine=engine)
    dev = sg.Device(mem, debug="warn", max_segment_size=2 * PAGE, seg_boundary_mask=PAGE - 1)
    pages = mem.alloc_pages(2, "contiguous")  # one 8 KiB entry across a 4 KiB boundary: warns
    seen = []

    def hook(*args: Any, **kwargs: Any) -> None:
        try:
            seen.append(sg.SGTable.new(dev, pages, Dir.BIDIRECTIONAL))
        except sg.BusyError as exc:
            seen.append(exc)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        owner = sg.SGTable.new(dev, pages, Dir.BIDIRECTIONAL)
    assert len(seen) == 1 and isinstance(seen[0], sg.BusyError)
    assert pages.owned and dev.live_mappings == 1
    owner.close()
    assert pages.closed and dev.live_mappings == 0


@pytest.mark.parametrize("kind", ["table", "device"])
def test_a_refused_close_does_not_fail_calls_on_other_threads(engine: str, kind: str) -> None:
    """A close() that is refused (the table is mapped; the device has a table mapped by hand)
    used to make calls on other threads fail with ClosedError meanwhile."""
    mem = sg.PhysicalMemory(4 << 20, engine=engine)
    dev = sg.Device(mem, sg.Iommu(mem))
    table = sg.alloc_table_from_pages([2, 4, 6], engine=engine)
    sg.dma_map_sgtable(dev, table, Dir.TO_DEVICE)
    target, read = (table, table.counts) if kind == "table" else (dev, lambda: dev.bound)
    stop = threading.Event()
    spurious: List[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                read()
            except sg.ClosedError as exc:
                spurious.append(str(exc))

    thread = InThread(reader, "reader")
    refused = 0
    for _ in range({"native": 3000, "model": 1000}[engine]):
        try:
            target.close()
        except sg.BusyError:
            refused += 1
    stop.set()
    thread.result()
    assert refused and not target.closed and spurious == []
    sg.dma_unmap_sgtable(dev, table, Dir.TO_DEVICE)
    table.close()
    dev.close()
