"""Regression tests for the second hostile review of the lifetime protocol (issue 7).

Each test is one finding: safety nets put off inside a call, the fork gate and the thread that
forks, a warning delivered under a table's mutex, ``free-mapped`` on an owned table's close, a
fork during ``SGTable.new``, an IOMMU changed through a device at a fork, and user code
(subclass properties) run inside the package.  Forks that used to hang run in a subprocess
with a time limit, so a regression fails the test instead of hanging the suite.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from typing import Any, Iterator, List

import pytest
from helpers import PAGE, EngineHook, InThread, Pause

import scatterlist as sg
import scatterlist._util as util
from scatterlist import DataDirection as Dir

HERE = os.path.dirname(os.path.abspath(__file__))
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _refused_by_fork(use: Any) -> bool:
    """In a forked child: True if ``use()`` raises the ClosedError that names the fork."""
    try:
        use()
    except sg.ClosedError as exc:
        return "when the process forked" in str(exc)
    return False


def _run(script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A script in a fresh interpreter; a hang shows as faulthandler's stacks and exit 1."""
    prologue = "import faulthandler; faulthandler.dump_traceback_later(20, exit=True)\n"
    return subprocess.run(
        [sys.executable, "-c", prologue + textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- 1. safety nets put off inside a call run one after the other -------------------------------


def test_thousands_of_put_off_safety_nets_run_without_recursion(engine: str) -> None:
    """Safety nets the collector runs inside a call are put off until the thread leaves the
    package.  Running them used to recurse (each one's own leave ran the rest of the list),
    so a few thousand raised RecursionError into an unrelated call, lost their teardowns and
    left the memory pinned for good."""
    mem = sg.PhysicalMemory(1 << 28, engine=engine)
    dropped = [mem.alloc_pages(1) for _ in range(3000)]

    def collect_inside(real: Any, *args: Any) -> Any:
        for pages in dropped:
            pages._finalizer()  # what the collector does to dropped Pages, here inside a call
        return real(*args)

    with EngineHook(engine, "memory_read", collect_inside):
        assert mem.read(0, 4) == bytes(4)  # no RecursionError out of the call
    assert mem.free_pages == mem.n_pages  # every teardown ran
    mem.close()


def test_put_off_safety_nets_are_not_lost_when_the_call_fails(engine: str) -> None:
    """The call inside which the nets were put off raises: they still run when it leaves."""
    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    dropped = [mem.alloc_pages(2) for _ in range(50)]

    def fail_inside(real: Any, *args: Any) -> Any:
        for pages in dropped:
            pages._finalizer()
        assert mem.free_pages == mem.n_pages - 100  # put off: still allocated
        raise sg.InvalidArgument("injected")

    with EngineHook(engine, "memory_read", fail_inside), pytest.raises(sg.InvalidArgument):
        mem.read(0, 4)
    assert mem.free_pages == mem.n_pages
    mem.close()


def test_work_put_off_that_fails_does_not_stop_the_rest(engine: str) -> None:
    """A put-off item that raises goes to sys.unraisablehook; the items after it still run
    and the call that left is not failed by it."""
    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    ran: List[int] = []

    def boom() -> None:
        raise RuntimeError("put-off failure")

    def put_off_inside(real: Any, *args: Any) -> Any:
        util.after_leaving(lambda: ran.append(1))
        util.after_leaving(boom)
        util.after_leaving(lambda: ran.append(2))
        assert ran == []  # inside the package: put off
        return real(*args)

    seen: List[BaseException] = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = lambda info: seen.append(info.exc_value)  # type: ignore[assignment]
    try:
        with EngineHook(engine, "memory_read", put_off_inside):
            assert mem.read(0, 1) == b"\0"
    finally:
        sys.unraisablehook = old_hook
    assert ran == [1, 2]
    assert len(seen) == 1 and str(seen[0]) == "put-off failure"
    mem.close()


# -- 2. the fork gate never waits for the thread that forks -------------------------------------


@needs_fork
@pytest.mark.parametrize("hook", ["before", "after_in_parent", "after_in_child"])
def test_an_at_fork_hook_may_use_the_package(engine: str, hook: str) -> None:
    """At-fork hooks registered before the import run inside the fork gate, on the forking
    thread: one that used the package waited for the gate it was itself holding (the parent,
    or the child, hung for good)."""
    result = _run(f"""
        import os, sys
        state = {{}}
        os.register_at_fork({hook}=lambda: print("hook", state["mem"].free_pages, flush=True))
        sys.path.insert(0, {HERE!r})
        import scatterlist as sg
        state["mem"] = sg.PhysicalMemory(1 << 20, engine={engine!r})
        pid = os.fork()
        if pid == 0:
            os._exit(0 if state["mem"].read(0, 1) == b"\\0" else 3)
        _, status = os.waitpid(pid, 0)
        print("child exit", os.waitstatus_to_exitcode(status), flush=True)
    """)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "child exit 0" in result.stdout and "hook 256" in result.stdout, result.stdout


@needs_fork
def test_code_run_on_the_forking_thread_while_the_fork_waits(engine: str) -> None:
    """The fork waits for a call in flight on another thread; meanwhile the forking thread
    runs other code: a signal handler, or safety nets the collector runs at an allocation
    (the CI hang under ASan).  Either one entering the package used to wait for the fork it
    was part of, for good.  Here a timer signal arrives during the wait, and its handler
    runs a safety net and a call."""
    result = _run(f"""
        import os, signal, sys, threading
        sys.path.insert(0, {HERE!r})
        import scatterlist as sg
        from helpers import InThread, Pause
        mem = sg.PhysicalMemory(1 << 24, engine={engine!r})
        table = sg.alloc_table_from_pages([0], engine={engine!r})
        dropped = mem.alloc_pages(3)
        seen = []

        def handler(*args):
            dropped._finalizer()  # what the collector does to dropped Pages
            seen.append(mem.free_pages)

        signal.signal(signal.SIGALRM, handler)
        with Pause({engine!r}, "table_copy") as pause:
            copier = InThread(lambda: table.copy_to_buffer(mem, 8), "copier")
            assert pause.entered.wait(5)
            threading.Timer(0.6, pause.resume).start()
            signal.setitimer(signal.ITIMER_REAL, 0.2)  # while the fork waits for the copier
            pid = os.fork()
            if pid == 0:
                os._exit(0 if table.copy_to_buffer(mem, 8) == bytes(8) else 3)
            _, status = os.waitpid(pid, 0)
            print("child exit", os.waitstatus_to_exitcode(status), flush=True)
            copier.result()
        print("handler saw", seen, "of", mem.n_pages, flush=True)
    """)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "child exit 0" in result.stdout, result.stdout
    assert "handler saw [4096] of 4096" in result.stdout, result.stdout


# -- 3. no user code under a table's mutex ------------------------------------------------------


def test_a_leak_warning_is_delivered_after_the_tables_mutex_is_released(engine: str) -> None:
    """An owned table dropped while mapped warns (ResourceWarning) from its safety net.  The
    warning used to be delivered with the table's mutex held: a warning hook that closes the
    device, on another thread, deadlocked (the close revokes the mapping under that mutex,
    and the hook waits for the close)."""
    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    dev = sg.Device(mem, sg.Iommu(mem))
    owned = sg.SGTable.new(dev, mem.alloc_pages(2), Dir.TO_DEVICE)
    table_mutex = owned._raw._life._mutex
    assert table_mutex is not None
    outcome: List[Any] = []

    def hook(message: Any, *args: Any, **kwargs: Any) -> None:
        outcome.append(table_mutex._is_owned())  # type: ignore[attr-defined]
        closer = InThread(dev.close, "closer")
        outcome.append(closer.running_after(5))  # True: deadlocked on the mutex

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        del owned
        gc.collect()
    assert outcome == [False, False]
    assert dev.closed and mem.free_pages == mem.n_pages


# -- 4. free-mapped on an owned table's close ---------------------------------------------------


@pytest.mark.parametrize("mode", ["raise", "warn"])
def test_closing_an_sgtable_whose_pages_a_hand_mapping_still_maps(engine: str, mode: str) -> None:
    """SGTable.close() frees its pages; a table mapped by hand on the same pages would then
    let the device reach their next owner.  dma-debug used to check only Pages.close() and the
    safety nets: now raise mode refuses the close before it changes anything, and warn mode
    reports it (free-mapped)."""
    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    dev = sg.Device(mem, debug=mode)
    pages = mem.alloc_pages(4)
    by_hand = sg.alloc_table_from_pages(pages.pfns, engine=engine)
    sg.dma_map_sgtable(dev, by_hand, Dir.TO_DEVICE)
    owned = sg.SGTable.new(dev, pages, Dir.TO_DEVICE)
    if mode == "raise":
        with pytest.raises(sg.DmaApiError, match="still DMA-mapped") as info:
            owned.close()
        assert info.value.rule == "free-mapped"
        assert not owned.closed and not pages.closed and dev.live_mappings == 2
        assert mem.free_pages == mem.n_pages - 4
        sg.dma_unmap_sgtable(dev, by_hand, Dir.TO_DEVICE)
        owned.close()  # nothing maps them now
    else:
        with pytest.warns(sg.DmaApiWarning, match=r"still DMA-mapped.*\[rule free-mapped\]"):
            owned.close()
        assert owned.closed and pages.closed
        sg.dma_unmap_sgtable(dev, by_hand, Dir.TO_DEVICE)
    assert dev.live_mappings == 0 and mem.free_pages == mem.n_pages
    by_hand.close()


def test_an_sgtable_close_with_no_other_mapping_reports_nothing(engine: str) -> None:
    """The table's own mapping is not a finding: it goes first."""
    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    dev = sg.Device(mem, sg.Iommu(mem), debug="raise")
    owned = sg.SGTable.new(dev, mem.alloc_pages(3), Dir.BIDIRECTIONAL)
    owned.close()
    assert dev.debug_error_count == 0 and mem.free_pages == mem.n_pages


# -- 5. a fork while SGTable.new delivers its warning --------------------------------------------


def _overlap_setup(engine: str) -> Any:
    """A device in warn mode, and pages whose one entry crosses its segment boundary:
    SGTable.new on them delivers a dma-debug warning."""
    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    dev = sg.Device(mem, debug="warn", max_segment_size=2 * PAGE, seg_boundary_mask=PAGE - 1)
    pages = mem.alloc_pages(2, "contiguous")  # one 8 KiB entry across a 4 KiB boundary: warns
    return mem, dev, pages


@needs_fork
@pytest.mark.parametrize("wait_seconds", [0.2, 5.0])
def test_a_fork_while_sgtable_new_delivers_its_warning(
    engine: str, wait_seconds: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SGTable.new delivers its warning between claiming the pages and handing them to the
    table, and used to do it outside the package: a fork then went ahead at once, and the
    child's pages stayed "being taken" for good (every close refused).  Now the fork waits
    for it; when it does not leave in time, the pages are unusable in the child, with an
    error naming the fork."""
    from test_edges import _child

    monkeypatch.setattr(util, "FORK_WAIT_SECONDS", wait_seconds)
    mem, dev, pages = _overlap_setup(engine)
    inside, release = threading.Event(), threading.Event()

    def hook(*args: Any, **kwargs: Any) -> None:
        if threading.current_thread().name == "maker":
            inside.set()
            release.wait(10)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        maker = InThread(lambda: sg.SGTable.new(dev, pages, Dir.BIDIRECTIONAL), "maker")
        assert inside.wait(5)
        threading.Timer(0.6, release.set).start()
        started = time.monotonic()
        if wait_seconds > 1:

            def child() -> bool:  # the fork waited: the table exists, the pages are its
                return pages.owned and dev.live_mappings == 1

        else:

            def child() -> bool:
                return _refused_by_fork(lambda: pages.pfns) and not pages.owned

        assert _child(child) == 0
        waited = time.monotonic() - started
        owner = maker.result()
    if wait_seconds > 1:
        assert waited >= 0.5  # the fork waited for SGTable.new to hand the pages over
    owner.close()
    assert pages.closed and mem.free_pages == mem.n_pages


# -- 6. an IOMMU changed through a device at a fork ---------------------------------------------


@needs_fork
def test_an_iommu_a_map_is_changing_at_fork_is_unusable_in_the_child(
    engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A map in flight changes the device's IOMMU (in the model engine under a Python lock
    that the child re-creates): after the fork's time limit the child used to use that IOMMU
    half changed.  The map enters the IOMMU too, so the child refuses it.  (The C core holds
    its locks across fork(): its IOMMU is consistent in the child, and stays usable.)"""
    from test_edges import _child

    monkeypatch.setattr(util, "FORK_WAIT_SECONDS", 0.2)
    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    iommu = sg.Iommu(mem)
    dev, spare = sg.Device(mem, iommu), sg.Device(mem, iommu, name="spare")
    table = sg.alloc_table_from_pages([1, 3, 5], engine=engine)
    with Pause(engine, "dma_map", timeout=30) as pause:
        mapper = InThread(lambda: sg.dma_map_sgtable(dev, table, Dir.TO_DEVICE), "mapper")
        assert pause.entered.wait(5)

        def child() -> bool:
            if engine == "native":  # the C core's IOMMU is consistent in a child
                mine = sg.alloc_table_from_pages([40], engine=engine)
                sg.dma_map_sgtable(spare, mine, Dir.TO_DEVICE)
                mapped = iommu.mapped_pages == 1
                sg.dma_unmap_sgtable(spare, mine, Dir.TO_DEVICE)
                return mapped and iommu.mapped_pages == 0
            return _refused_by_fork(lambda: iommu.mapped_pages)

        assert _child(child) == 0
        pause.resume()
        mapper.result()
    assert iommu.mapped_pages == 3  # the parent is not affected
    sg.dma_unmap_sgtable(dev, table, Dir.TO_DEVICE)
    assert iommu.mapped_pages == 0


# -- 7. no user code inside the package ----------------------------------------------------------


def _inside_package() -> bool:
    state = getattr(util._local, "state", None)
    return bool(state and state[util._DEPTH])


class WatchedMemory(sg.PhysicalMemory):
    reads_inside: List[str] = []

    @property
    def page_size(self) -> int:
        if _inside_package():
            WatchedMemory.reads_inside.append("page_size")
        return super().page_size


class WatchedDevice(sg.Device):
    """A subclass whose properties are user code: the package must read its own fields
    inside calls (a property that blocks there used to hold a table's mutex)."""

    reads_inside: List[str] = []

    def _note(self, name: str) -> None:
        if _inside_package():
            WatchedDevice.reads_inside.append(name)

    @property
    def debug(self) -> Any:
        self._note("debug")
        return super().debug

    @debug.setter
    def debug(self, mode: Any) -> None:
        sg.Device.debug.fset(self, mode)  # type: ignore[attr-defined]

    @property
    def iommu(self) -> Any:
        self._note("iommu")
        return super().iommu

    @property
    def memory(self) -> Any:
        self._note("memory")
        return super().memory


@pytest.mark.parametrize("mode", ["off", "warn"])
def test_subclass_properties_are_never_read_inside_a_call(engine: str, mode: str) -> None:
    WatchedDevice.reads_inside.clear()
    WatchedMemory.reads_inside.clear()
    mem = WatchedMemory(1 << 24, engine=engine)
    dev = WatchedDevice(mem, sg.Iommu(mem), debug=mode)
    pages = mem.alloc_pages(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = sg.alloc_table_from_pages([20, 21], engine=engine)
        sg.dma_map_sgtable(dev, raw, Dir.BIDIRECTIONAL)
        dev.dma_write_table(raw, b"data")
        assert dev.dma_read_table(raw, 4) == b"data"
        sg.dma_sync_sgtable_for_cpu(dev, raw, Dir.BIDIRECTIONAL)
        sg.dma_unmap_sgtable(dev, raw, Dir.BIDIRECTIONAL)
        raw.close()
        owned = sg.SGTable.new(dev, pages, Dir.BIDIRECTIONAL)
        owned.copy_from_buffer(b"abc")
        assert owned.copy_to_buffer(3) == b"abc"
        owned.close()
        dropped = sg.SGTable.new(dev, mem.alloc_pages(1), Dir.TO_DEVICE)
        del dropped
        gc.collect()
    assert WatchedDevice.reads_inside == [] and WatchedMemory.reads_inside == []
    assert mem.free_pages == mem.n_pages


@needs_fork
def test_the_fork_forgets_threads_that_ended(engine: str) -> None:
    """Each thread that entered the package has a state the fork gate looks at: the states
    of ended threads are dropped (at the next fork) rather than kept for good."""
    from test_edges import _child

    mem = sg.PhysicalMemory(1 << 20, engine=engine)
    threads = [threading.Thread(target=mem.read, args=(0, 1)) for _ in range(40)]
    for thread in threads:
        thread.start()
        thread.join()
    assert _child(lambda: True) == 0
    alive = {thread.ident for thread in threading.enumerate()}
    assert set(util._thread_states) <= alive


# -- third review: a failed unmap frees nothing; a failed map maps nothing ------------------------


@needs_fork
def test_closing_in_a_child_whose_iommu_is_unusable_frees_nothing(
    engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A map on another device of the same IOMMU is in flight at the fork and does not leave
    in time: the model's IOMMU is unusable in the child (the C core's is consistent there).
    Closing an SGTable mapped through it there used to free its entries and pages anyway
    (the unmap failed, the rest ran in ``finally``): the next call read freed memory, and the
    device read the pages' next owner.  Now the close is refused having changed nothing, and
    the devices on that IOMMU are unusable."""
    from test_edges import _child

    monkeypatch.setattr(util, "FORK_WAIT_SECONDS", 0.2)
    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    iommu = sg.Iommu(mem)
    dev, other = sg.Device(mem, iommu, name="dev"), sg.Device(mem, iommu, name="other")
    pages = mem.alloc_pages(2)
    owned = sg.SGTable.new(dev, pages, Dir.BIDIRECTIONAL)
    iova, segments = owned.entries()[0].dma_address, owned.nents
    raw = sg.alloc_table_from_pages([100], engine=engine)
    hold_other = Pause(engine, "dma_map", when=lambda handle, *a: handle is other._life.handle)
    with hold_other as pause:
        mapper = InThread(lambda: sg.dma_map_sgtable(other, raw, Dir.TO_DEVICE), "mapper")
        assert pause.entered.wait(5)

        def child() -> bool:
            if engine == "native":
                owned.close()
                try:
                    dev.dma_read(iova, 4)
                    return False
                except sg.IommuFault:
                    return pages.closed
            refused = _refused_by_fork(owned.close)
            intact = not owned.closed and not pages.closed and owned.nents == segments
            device_refused = _refused_by_fork(lambda: dev.dma_read(iova, 4))
            return refused and intact and device_refused

        assert _child(child) == 0
        pause.resume()
        mapper.result()
    owned.close()  # the parent is not affected
    sg.dma_unmap_sgtable(other, raw, Dir.TO_DEVICE)
    assert iommu.mapped_pages == 0 and mem.free_pages == mem.n_pages


@pytest.mark.parametrize("how", ["dma_map_sgtable", "SGTable.new"])
def test_a_map_that_fails_after_the_engine_mapped_is_undone(engine: str, how: str) -> None:
    """A failure after the engine made the mapping (here: the host out of memory while
    dma-debug records it) used to leave the table mapped, with no record, while the call
    raised; SGTable.new then gave the pages back to the caller with their IOVAs still live,
    and the device read their next owner."""
    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    iommu = sg.Iommu(mem)
    dev = sg.Device(mem, iommu, debug="warn")
    pages = mem.alloc_pages(2)

    def out_of_memory(real: Any, *args: Any) -> Any:
        raise MemoryError

    with EngineHook(engine, "table_export_dma", out_of_memory), pytest.raises(MemoryError):
        if how == "SGTable.new":
            sg.SGTable.new(dev, pages, Dir.TO_DEVICE)
        else:
            raw = sg.alloc_table_from_pages(pages.pfns, engine=engine)
            sg.dma_map_sgtable(dev, raw, Dir.TO_DEVICE)
    assert iommu.mapped_pages == 0 and iommu.iova_ranges() == [] and dev.live_mappings == 0
    if how == "dma_map_sgtable":
        assert not raw.mapped and raw.nents == raw.orig_nents
        raw.close()
    assert not pages.owned
    pages.close()
    assert mem.free_pages == mem.n_pages


def test_a_device_subclass_name_is_not_read_inside_a_call(engine: str) -> None:
    """dma-debug names the device in its records and reports; a subclass's ``name`` property
    is user code (one that raised made a map fail after the engine mapped)."""
    reads: List[bool] = []

    class Named(sg.Device):
        @property
        def name(self) -> str:
            reads.append(_inside_package())
            raise RuntimeError("not here")

    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    dev = Named(mem, sg.Iommu(mem), name="named", debug="raise")
    raw = sg.alloc_table_from_pages([4, 9], engine=engine)
    sg.dma_map_sgtable(dev, raw, Dir.TO_DEVICE)
    with pytest.raises(sg.DmaApiError, match="named: device driver frees DMA sg list"):
        sg.dma_unmap_sg(dev, raw, 1, Dir.TO_DEVICE)
    sg.dma_unmap_sgtable(dev, raw, Dir.TO_DEVICE)
    assert True not in reads
    raw.close()


# -- third review: code run inside a close on the closing thread ---------------------------------


@pytest.mark.parametrize("kind", ["device", "memory"])
def test_a_call_from_inside_a_close_on_the_same_thread_is_refused(engine: str, kind: str) -> None:
    """A signal handler or a __del__ that runs inside close() on the closing thread and uses
    the object waited for the outcome of that very close, for good.  It is refused."""
    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    target: Any = mem
    use: Any = lambda: mem.free_pages  # noqa: E731
    method = "memory_destroy"
    if kind == "device":
        dev = target = sg.Device(mem)
        use, method = (lambda: dev.bound), "device_destroy"
    outcome: List[Any] = []

    def inside(real: Any, *args: Any) -> Any:
        for attempt in (use, target.close):
            try:
                attempt()
                outcome.append("ran")
            except sg.BusyError as exc:
                outcome.append(str(exc))
        return real(*args)

    with EngineHook(engine, method, inside):
        InThread(target.close, "closer").result(10)  # a deadlock fails here
    assert len(outcome) == 2
    assert all("is being closed by this thread" in text for text in outcome), outcome
    assert target.closed


# -- third review: the model's locks and dma-debug's lock under re-entry -------------------------


def test_code_run_inside_a_model_call_cannot_call_in_again(engine: str) -> None:
    """The model engine runs Python under its locks; a __del__ or a signal handler that runs
    there and calls the package again first deadlocked on the lock, then (re-entrant) ran on
    half-changed state: two Pages got the same page.  Now it is refused with BusyError, and
    the outer call is unharmed.  The C engine runs no Python inside a call, so code run
    around its calls may call in."""
    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    mem.write(0, b"outer")
    inner: List[Any] = []
    if engine == "model":
        model = mem._life.handle
        real_pieces = type(model)._pieces

        def pieces(self: Any, *args: Any) -> Any:
            if not inner:  # inside the model's memory lock
                try:
                    inner.append(mem.alloc_pages(4))
                except sg.BusyError as exc:
                    inner.append(exc)
            return real_pieces(self, *args)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(type(model), "_pieces", pieces)
            outer = InThread(lambda: mem.read(0, 5), "reader").result(10)
        assert isinstance(inner[0], sg.BusyError)
        assert "model engine is in the middle of a call on this thread" in str(inner[0])
    else:

        def reenter(real: Any, *args: Any) -> Any:
            if not inner:  # around the C call: the C holds no lock here
                inner.append(mem.alloc_pages(4))
            return real(*args)

        with EngineHook(engine, "memory_read", reenter):
            outer = InThread(lambda: mem.read(0, 5), "reader").result(10)
        inner[0].close()
    assert outer == b"outer"
    taken = [mem.alloc_pages(4) for _ in range(3)]
    pfns = [pfn for pages in taken for pfn in pages.pfns]
    assert len(set(pfns)) == len(pfns)  # no page handed out twice
    for pages in taken:
        pages.close()
    assert mem.free_pages == mem.n_pages
    mem.close()


def test_a_safety_net_inside_dma_debug_reports_after_its_lock(engine: str) -> None:
    """The collector may run a safety net while this thread holds dma-debug's lock (inside
    debug.dump()): its leak report is delivered once the lock is free."""
    from scatterlist import debug

    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    dev = sg.Device(mem, sg.Iommu(mem), debug="warn")
    table = sg.alloc_table_from_pages([7], engine=engine)
    sg.dma_map_sgtable(dev, table, Dir.TO_DEVICE)
    lock_held: List[bool] = []

    def hook(*args: Any, **kwargs: Any) -> None:
        lock_held.append(debug._guard.lock._is_owned())  # type: ignore[attr-defined]

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        with debug._guard:
            table._finalizer()  # what the collector does, inside the lock
            assert lock_held == []  # put off
    assert lock_held == [False, False]  # the ResourceWarning and the leak report
    assert dev.live_mappings == 0 and table.closed


# -- fourth review: a fork from a signal handler while its thread waits --------------------------


@needs_fork
@pytest.mark.parametrize("held_seconds", [0.6, 1.5])
@pytest.mark.parametrize("wait", ["table mutex", "close"])
def test_a_fork_from_a_signal_handler_while_its_thread_waits(
    engine: str, wait: str, held_seconds: float
) -> None:
    """The main thread waits inside the package (for a table's mutex, or in a close for a
    call in flight) when a signal handler forks.  The child's thread went on waiting on the
    lock or condition the child had replaced: it hung for good, or released a lock it never
    took.  Now it looks again: when the other call left before the fork (held 0.6 s) the
    object works in the child; when it did not (held 1.5 s, the fork waits 0.3 s) the object
    refuses with an error naming the fork."""
    result = _run(f"""
        import os, signal, sys, threading
        sys.path.insert(0, {HERE!r})
        import scatterlist as sg
        import scatterlist._util as util
        from helpers import InThread, Pause
        util.FORK_WAIT_SECONDS = 0.3 if {held_seconds} > 1 else 2.0
        mem = sg.PhysicalMemory(1 << 24, engine={engine!r})
        table = sg.alloc_table_from_pages([0, 2], engine={engine!r})
        if {wait!r} == "table mutex":
            method, call = "table_copy", lambda: table.counts().orig_nents
            other = lambda: table.copy_to_buffer(mem, 8)
        else:
            method, call = "memory_read", lambda: (mem.close(), mem.read(0, 1))
            other = lambda: mem.read(0, 8)
        outcome = {{}}

        def handler(*args):
            pid = os.fork()
            if pid:
                outcome["pid"] = pid
            else:
                outcome["child"] = True

        signal.signal(signal.SIGALRM, handler)
        with Pause({engine!r}, method, timeout=30) as pause:
            worker = InThread(other, "other")
            assert pause.entered.wait(5)
            threading.Timer({held_seconds}, pause.resume).start()
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            try:
                result = repr(call())
            except sg.ScatterlistError as exc:
                result = type(exc).__name__ + ": " + str(exc)
            if outcome.get("child"):
                print("child:", result, flush=True)
                os._exit(0)
            _, status = os.waitpid(outcome["pid"], 0)
            print("parent:", result, "| child exit", os.waitstatus_to_exitcode(status), flush=True)
            worker.result(30)
    """)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "child exit 0" in out, out
    child = next(line for line in out.splitlines() if line.startswith("child:"))
    if held_seconds > 1:
        assert "ClosedError" in child and "when the process forked" in child, out
    else:
        expected = (
            "child: 2" if wait == "table mutex" else "child: ClosedError: PhysicalMemory is closed"
        )
        assert child == expected, out


def test_a_device_subclass_with_its_own_equality_works_with_dma_debug(engine: str) -> None:
    """dma-debug kept its records in a dictionary keyed by the device: a subclass defining
    __eq__ (so unhashable) could not be mapped, and one defining __hash__ ran it under the
    table's mutex.  Records are kept by identity now."""
    hashed: List[bool] = []

    class EqualByName(sg.Device):
        def __eq__(self, other: object) -> bool:
            return isinstance(other, sg.Device) and other.name == self.name

    class Hashing(sg.Device):
        def __hash__(self) -> int:
            hashed.append(_inside_package())
            return 1

    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    iommu = sg.Iommu(mem)
    for cls in (EqualByName, Hashing):
        dev = cls(mem, iommu, debug="raise")
        table = sg.alloc_table_from_pages([3, 9], engine=engine)
        sg.dma_map_sgtable(dev, table, Dir.TO_DEVICE)
        assert len(sg.debug.dump(dev)) == 1
        sg.dma_unmap_sgtable(dev, table, Dir.TO_DEVICE)
        table.close()
        dev.close()
    assert True not in hashed


@needs_fork
def test_pages_on_a_memory_unusable_in_the_child_are_unusable_too(
    engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages free into their memory without entering it: where the memory was in use at the
    fork (half changed), closing the pages in the child would free into it."""
    from test_edges import _child

    monkeypatch.setattr(util, "FORK_WAIT_SECONDS", 0.2)
    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    pages = mem.alloc_pages(2)
    with Pause(engine, "memory_read", timeout=30) as pause:
        reader = InThread(lambda: mem.read(0, 8), "reader")
        assert pause.entered.wait(5)

        def child() -> bool:
            return _refused_by_fork(lambda: pages.pfns)

        assert _child(child) == 0
        pause.resume()
        reader.result()
    pages.close()
    assert mem.free_pages == mem.n_pages


# -- fifth review ----------------------------------------------------------------------------------


class _SignalAsAcquireReturns:
    """Stands for an EngineLock's inner lock: runs ``handler`` the moment the lock is taken
    or let go, as a signal handler may run as soon as ``acquire()`` returns."""

    def __init__(self, handler: Any) -> None:
        self._real = threading.Lock()
        self.handler = handler

    def acquire(self, timeout: float = -1) -> bool:
        taken = self._real.acquire(timeout=timeout)
        if taken:
            self.handler("taken")
        return taken

    def release(self) -> None:
        self._real.release()
        self.handler("let go")


def test_a_signal_handler_at_the_edge_of_an_engine_lock_is_refused() -> None:
    """The model's lock recorded its owner only after acquire() returned: a signal handler
    run in between (and calling the model) saw no owner and waited for the lock its own
    thread held, for good.  Refused now, at both edges."""
    lock = util.EngineLock()
    seen: List[str] = []

    def handler(edge: str) -> None:
        if len(seen) < 2:
            try:
                with lock:
                    seen.append(edge + ": ran")
            except sg.BusyError as exc:
                seen.append(edge + ": " + str(exc))

    lock._lock = _SignalAsAcquireReturns(handler)  # type: ignore[assignment]

    def outer() -> None:
        with lock:
            pass

    InThread(outer, "outer").result(5)  # a deadlock fails here
    assert len(seen) == 2
    assert all("in the middle of a call on this thread" in text for text in seen), seen


def test_a_safety_net_inside_exhaust_iova_is_put_off(engine: str) -> None:
    """exhaust_iova gave its IOVAs back with engine calls outside the package: a safety net
    the collector ran there (an SGTable dropped) ran inside the model's IOMMU lock and
    failed, leaving the table mapped and the memory pinned for good."""
    from scatterlist import faults

    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    iommu = sg.Iommu(mem)
    dev = sg.Device(mem, iommu)
    owned = sg.SGTable.new(dev, mem.alloc_pages(2), Dir.TO_DEVICE)
    struck: List[int] = []

    def collect_inside(real: Any, *args: Any) -> Any:
        if not struck:
            struck.append(1)
            owned._finalizer()  # what the collector does to a dropped SGTable
            struck.append(iommu.mapped_pages)  # put off: still mapped
        return real(*args)

    with pytest.warns(ResourceWarning, match="SGTable dropped while DMA-mapped"):
        with EngineHook(engine, "iommu_iova_free", collect_inside):
            with faults.exhaust_iova(iommu):
                pass
    assert struck == [1, 2] and dev.live_mappings == 0 and iommu.mapped_pages == 0
    dev.close()
    iommu.close()
    mem.close()


@needs_fork
def test_a_fork_waits_for_exhaust_iova_to_give_its_iovas_back(engine: str) -> None:
    """Leaving exhaust_iova gives the IOVAs back one call after the other: a fork meanwhile
    used to go ahead at once, and the child found the IOVA allocator half given back."""
    from test_edges import _child

    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    iommu = sg.Iommu(mem)
    from scatterlist import faults

    entered = threading.Event()
    with Pause(engine, "iommu_iova_free") as pause:

        def exhaust_and_leave() -> None:
            with faults.exhaust_iova(iommu):
                entered.set()

        leaver = InThread(exhaust_and_leave, "leaver")
        assert pause.entered.wait(5)
        threading.Timer(0.4, pause.resume).start()
        started = time.monotonic()
        assert _child(lambda: iommu.iova_ranges() == []) == 0
        waited = time.monotonic() - started
        leaver.result()
    assert waited >= 0.3  # the fork waited for the IOVAs to be back
    iommu.close()
    mem.close()


def test_device_close_waits_for_a_mapping_another_thread_is_ending(engine: str) -> None:
    """An owned table's mapping being ended on another thread (no longer live, its pin not
    yet dropped): Device.close() used to refuse ("still in use by 1 mapping") instead of
    waiting for it."""
    import scatterlist.device as device_module

    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    dev = sg.Device(mem, sg.Iommu(mem))
    owned = sg.SGTable.new(dev, mem.alloc_pages(2), Dir.TO_DEVICE)
    real_forget = device_module._DeviceState.forget
    inside, release = threading.Event(), threading.Event()

    def slow_forget(self: Any, mapping: Any) -> None:
        if threading.current_thread().name == "ender":
            inside.set()
            release.wait(10)
        real_forget(self, mapping)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(device_module._DeviceState, "forget", slow_forget)
        ender = InThread(owned.close, "ender")
        assert inside.wait(5)
        closer = InThread(dev.close, "closer")
        assert closer.running_after(0.3)  # waits for the mapping to be gone
        release.set()
        ender.result()
        closer.result()
    assert dev.closed and owned.closed and mem.free_pages == mem.n_pages


# -- sixth review ------------------------------------------------------------------------------


def test_the_debug_mode_is_read_once_per_call(engine: str) -> None:
    """The mode was read once to decide (refuse the unmap, keep the map) and again to deliver:
    switched in between (by another thread), a refused unmap returned as if done, and a map
    kept raised DmaApiError.  Forced here by switching it inside the checks."""
    from scatterlist import debug

    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    dev = sg.Device(mem, sg.Iommu(mem), debug="raise")
    table = sg.alloc_table_from_pages([2, 7], engine=engine)
    sg.dma_map_sgtable(dev, table, Dir.BIDIRECTIONAL)
    real_check_unmap, real_record_map = debug.check_unmap, debug.record_map

    def check_unmap_then_switch(*args: Any) -> Any:
        findings = real_check_unmap(*args)
        dev.debug = "off"
        return findings

    def record_map_then_switch(*args: Any) -> Any:
        entry = real_record_map(*args)
        dev.debug = "raise"
        return entry

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(debug, "check_unmap", check_unmap_then_switch)
        with pytest.raises(sg.DmaApiError, match="different direction"):
            sg.dma_unmap_sgtable(dev, table, Dir.TO_DEVICE)  # refused: not done
    assert table.mapped and dev.live_mappings == 1
    dev.debug = "raise"
    sg.dma_unmap_sgtable(dev, table, Dir.BIDIRECTIONAL)

    long_entry = sg.alloc_table_from_pages([10, 11, 12, 13, 14, 15, 16, 17], engine=engine)
    dev.debug = "warn"
    dev.max_segment_size = 4 * PAGE  # the 32 KiB entry is longer: a warning, and mapped
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(debug, "record_map", record_map_then_switch)
        with pytest.warns(sg.DmaApiWarning, match="map-segment-length"):
            sg.dma_map_sgtable(dev, long_entry, Dir.TO_DEVICE)
    assert long_entry.mapped and len(debug.dump(dev)) == 1
    dev.debug = "warn"
    sg.dma_unmap_sgtable(dev, long_entry, Dir.TO_DEVICE)
    assert dev.live_mappings == 0


def test_exhaust_iova_left_from_inside_a_call_gives_everything_back(engine: str) -> None:
    """A generator suspended inside ``exhaust_iova`` finalized by the collector inside a call
    on this thread (here: inside the model's IOMMU lock) used to fail to give the IOVAs back
    (BusyError) and leak them: every later map failed.  The giving back waits for the call."""
    from scatterlist import faults

    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    iommu = sg.Iommu(mem)
    dev = sg.Device(mem, iommu)

    def holder() -> Iterator[None]:
        with faults.exhaust_iova(iommu):
            yield

    suspended = holder()
    next(suspended)
    closed: List[int] = []

    def finalize_inside() -> None:
        if not closed:
            closed.append(1)
            suspended.close()  # what the collector does to a dropped, suspended generator

    if engine == "model":
        model = iommu._life.handle
        real_ranges = type(model.iovad).ranges

        def ranges(self: Any, *args: Any) -> Any:
            finalize_inside()  # inside the model's IOMMU lock
            return real_ranges(self, *args)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(type(model.iovad), "ranges", ranges)
            iommu.iova_ranges()
    else:
        with EngineHook(
            engine, "iommu_iova_ranges", lambda real, *a: finalize_inside() or real(*a)
        ):
            iommu.iova_ranges()
    assert closed and iommu.iova_ranges() == []
    table = sg.alloc_table_from_pages([3], engine=engine)
    sg.dma_map_sgtable(dev, table, Dir.TO_DEVICE)  # the IOVA space is back
    sg.dma_unmap_sgtable(dev, table, Dir.TO_DEVICE)
    dev.close()
    iommu.close()  # no pin left behind


def test_restrict_permissions_never_outlives_the_mapping(engine: str) -> None:
    """restrict_permissions looks a page up, unmaps it and maps it again; an unmap of its
    DMA mapping on another thread used to come in between, and the re-map then outlived the
    mapping: the device read the pages' next owner, and the IOVA stayed taken for good."""
    from scatterlist import faults

    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    iommu = sg.Iommu(mem)
    dev = sg.Device(mem, iommu)
    owned = sg.SGTable.new(dev, mem.alloc_pages(1), Dir.BIDIRECTIONAL)
    iova = owned.entries()[0].dma_address
    with Pause(engine, "iommu_map") as pause:  # held between its unmap and its re-map
        restrict = InThread(
            lambda: faults.restrict_permissions(iommu, iova, PAGE, sg.IOMMU_READ), "restrict"
        )
        assert pause.entered.wait(5)
        closer = InThread(owned.close, "closer")
        assert closer.running_after(0.3)  # the unmap waits for the edit to be whole
        pause.resume()
        assert restrict.result() == 1
        closer.result()
    assert iommu.lookup(iova) is None and iommu.mapped_pages == 0
    victim = mem.alloc_pages(1)
    mem.write(victim.pfns[0] * PAGE, b"next owner")
    with pytest.raises(sg.IommuFault):
        dev.dma_read(iova, 10)
    again = sg.SGTable.new(dev, victim, Dir.TO_DEVICE)  # the IOVA space is whole
    again.close()
    assert mem.free_pages == mem.n_pages
