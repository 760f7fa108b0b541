"""Semantics at the edges (issue 7, part 3): boundary padding, 32-bit DMA lengths, the DMA
mask behind an IOMMU, huge transfer lengths, device limits below a page, and fork."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest
from helpers import PAGE, InThread, Pause

import scatterlist as sg
from scatterlist import DataDirection as Dir
from scatterlist import debug


def padded_table(mem: sg.PhysicalMemory) -> sg.RawTable:
    """Two entries that iommu-dma lays out with boundary padding under a 64 KiB boundary:
    8 KiB, then 60 KiB, which would cross the boundary at IOVA offset 64 KiB, so 56 KiB of
    padding goes to the first entry."""
    return sg.alloc_table_from_entries([(100, 0, 2 * PAGE), (300, 0, 15 * PAGE)], engine=mem.engine)


def test_boundary_padding_keeps_the_kernel_layout_and_exposes_memory(system: Any) -> None:
    """The kernel really maps the physical pages after the padded entry: with dma-debug off
    the layout is the kernel's, and the device can read memory outside the table."""
    mem, iommu, dev, _ = system
    dev.seg_boundary_mask = 0xFFFF
    mem.write(102 * PAGE, b"secret")  # right after the first entry's 8 KiB, not in the table
    table = padded_table(mem)
    sg.dma_map_sgtable(dev, table, Dir.TO_DEVICE)
    (first, _), (second, _) = [(e.dma_address, e.dma_len) for e in table.dma_entries()]
    assert second - first == 0x10000  # the second segment starts on the next boundary
    assert iommu.mapped_pages == 2 + 14 + 15  # 8 KiB, 56 KiB of padding, 60 KiB
    assert dev.dma_read(first + 2 * PAGE, 6) == b"secret"
    sg.dma_unmap_sgtable(dev, table, Dir.TO_DEVICE)


def test_dma_debug_reports_the_padding_exposure(system: Any) -> None:
    mem, iommu, dev, _ = system
    dev.seg_boundary_mask = 0xFFFF
    dev.debug = "raise"
    table = padded_table(mem)
    exposed = 102 * PAGE
    with pytest.raises(
        sg.DmaApiError,
        match=rf"after sg entry 0 maps physical memory outside "
        rf"the table \[phys={exposed:#x}-{exposed + 14 * PAGE - 1:#x}\]",
    ) as info:
        sg.dma_map_sgtable(dev, table, Dir.TO_DEVICE)
    assert info.value.rule == "map-padding-exposure"
    assert not table.mapped and iommu.mapped_pages == 0  # raise mode: the call changed nothing
    dev.debug = "off"
    sg.dma_map_sgtable(dev, table, Dir.TO_DEVICE)  # off: the kernel's layout, unreported
    sg.dma_unmap_sgtable(dev, table, Dir.TO_DEVICE)
    assert debug._padding_exposures(
        [(100, 0, 2 * PAGE), (300, 0, 15 * PAGE)], PAGE, PAGE, 0xFFFF
    ) == [(0, exposed, 14 * PAGE)]


def test_a_dma_length_that_would_wrap_32_bits_is_refused(engine: str) -> None:
    """A physically contiguous 4 GiB table: its first entry is longer than max_segment_size,
    so the kernel's ``max_len - cur_len`` wraps and the next entry merges, making one segment
    whose 32-bit length wraps to 0.  Refused before anything is mapped, debug or not."""
    mem = sg.PhysicalMemory(8 << 30, engine=engine)
    iommu = sg.Iommu(mem)
    dev = sg.Device(mem, iommu, dma_mask=sg.DMA_BIT_MASK(64))
    table = sg.alloc_table_from_entries([(0, 0, 0xFFFFF000), (0xFFFFF, 0, PAGE)], engine=engine)
    dma_before = table.export_dma(2).tolist()
    for mode in ("off", "raise"):
        dev.debug = mode
        with pytest.raises(sg.InvalidArgument, match="DMA segment of 4294967296 bytes") as info:
            sg.dma_map_sgtable(dev, table, Dir.TO_DEVICE)
        assert info.value.reason is sg.Reason.DMA_SEGMENT_LENGTH
        assert (info.value.detail.element, info.value.detail.value) == (1, 1 << 32)
        assert not table.mapped and iommu.mapped_pages == 0 and iommu.iova_ranges() == []
        assert table.export_dma(2).tolist() == dma_before  # a failed map changes nothing
        assert [(e.pfn, e.length) for e in table] == [(0, 0xFFFFF000), (0xFFFFF, PAGE)]
    assert dev.live_mappings == 0


def test_the_dma_mask_binds_accesses_through_an_iommu(system: Any) -> None:
    """A device cannot emit an address above its dma_mask, with an IOMMU as without one: the
    access faults before the IOMMU sees it (nothing in its fault log)."""
    mem, iommu, dev, _ = system
    high = 1 << 33
    iommu.map(high, 7 * PAGE, PAGE)  # an IOVA above 4 GiB, mapped by hand
    mem.write(7 * PAGE, b"above")
    with pytest.raises(sg.IommuFault, match="above the device's dma_mask") as info:
        dev.dma_read(high, 5)  # dev has the default 32-bit mask
    assert info.value.fault_reason == "above the DMA mask" and info.value.iova == high
    assert iommu.faults() == []
    with pytest.raises(sg.IommuFault, match="dma_mask"):
        dev.dma_write(high, b"x")
    wide = sg.Device(mem, iommu, dma_mask=sg.DMA_BIT_MASK(34))
    assert wide.dma_read(high, 5) == b"above"


def test_huge_lengths_are_checked_before_allocating(system: Any) -> None:
    """A read larger than the mapping is a fault (or, for a table, a length error) found
    before the result buffer is allocated, the same on both engines (the native one used to
    allocate first and raise a bare MemoryError)."""
    mem, iommu, dev, direct = system
    table = sg.alloc_table_from_pages([3, 5], engine=mem.engine)
    sg.dma_map_sgtable(dev, table, Dir.BIDIRECTIONAL)
    addr = table.dma_entries()[0].dma_address
    for n_bytes in (1 << 40, (1 << 63) + 5):
        with pytest.raises(sg.IommuFault):
            dev.dma_read(addr, n_bytes)
        with pytest.raises(sg.InvalidArgument, match=f"fewer than the {n_bytes} requested"):
            dev.dma_read_table(table, n_bytes)
    with pytest.raises(
        sg.IommuFault,
        match=rf"at physical 0x0: runs past the end of the emulated memory \({mem.size:#x} bytes",
    ):
        direct.dma_read(0, mem.size + 1)
    sg.dma_unmap_sgtable(dev, table, Dir.BIDIRECTIONAL)


def test_sgtable_new_names_the_device_limit_below_a_page(system: Any) -> None:
    mem, iommu, dev, _ = system
    dev.max_segment_size = 512
    pages = mem.alloc_pages(1)
    with pytest.raises(
        sg.InvalidArgument, match="device's max_segment_size=512 is below one page"
    ) as info:
        sg.SGTable.new(dev, pages, Dir.TO_DEVICE)
    assert "max_segment=" not in str(info.value)
    dev.max_segment_size = 65536
    dev.max_mapping_size = 100
    with pytest.raises(sg.InvalidArgument, match="max_mapping_size=100"):
        sg.SGTable.new(dev, pages, Dir.TO_DEVICE)
    assert not pages.owned


def _child(body: Any) -> int:
    """Run ``body`` in a forked child (a deadlock must not hang the suite); its exit code."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(20)
            code = 0 if body() else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), status
    return os.WEXITSTATUS(status)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_waits_for_a_copy_in_flight(engine: str) -> None:
    """os.fork() while another thread is inside a copy (holding the table's mutex and a call
    on the memory): the child used to deadlock on the inherited lock at its first access.
    The fork waits for the calls in flight to leave the package, so the child inherits the
    objects between two calls, and uses them."""
    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    mem.write(0, b"before fork")
    table = sg.alloc_table_from_pages([0], engine=engine)
    with Pause(engine, "table_copy") as pause:
        copier = InThread(lambda: table.copy_to_buffer(mem, 11), "copier")
        assert pause.entered.wait(5)
        threading.Timer(0.3, pause.resume).start()
        started = time.monotonic()

        def child() -> bool:
            ok = table.copy_to_buffer(mem, 11) == b"before fork" and mem.read(0, 6) == b"before"
            table.close()
            mem.close()
            return ok and mem.closed

        assert _child(child) == 0
        assert time.monotonic() - started >= 0.25  # the fork waited for the copy
        assert copier.result() == b"before fork"
    table.close()
    mem.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_objects_still_in_use_at_fork_are_unusable_in_the_child(
    engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call that does not leave the package in time: the fork goes ahead, and in the child
    the objects that call was using (perhaps half changed) refuse every use with a clear
    error, while the others work."""
    import scatterlist._util as util

    monkeypatch.setattr(util, "FORK_WAIT_SECONDS", 0.2)
    mem = sg.PhysicalMemory(1 << 24, engine=engine)
    table = sg.alloc_table_from_pages([0], engine=engine)
    other = sg.PhysicalMemory(1 << 20, engine=engine)
    with Pause(engine, "table_copy", timeout=30) as pause:
        copier = InThread(lambda: table.copy_to_buffer(mem, 8), "copier")
        assert pause.entered.wait(5)

        def child() -> bool:
            for use in (lambda: table.counts(), lambda: mem.read(0, 1)):
                try:
                    use()
                    return False
                except sg.ClosedError as exc:
                    if "in use by another thread when the process forked" not in str(exc):
                        return False
            table.close()  # nothing to do: it leaks in the child rather than free half a table
            other.write(0, b"fine")
            return other.read(0, 4) == b"fine" and table.closed

        assert _child(child) == 0
        pause.resume()
        copier.result()
    assert table.counts().orig_nents == 1  # the parent is not affected
    table.close()
    mem.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_children_see_tables_between_calls(engine: str) -> None:
    """A thread maps and unmaps a table in a loop, another binds the device, while the main
    thread forks: a child used to inherit a table mapped in the engine but not in Python
    (close() then freed a mapped table; the device still read its pages), and to hang on the
    device's lock.  Now each child sees the table mapped or not, consistently, and can undo
    it and close everything."""
    mem = sg.PhysicalMemory(1 << 26, engine=engine)
    iommu = sg.Iommu(mem)
    dev = sg.Device(mem, iommu)
    table = sg.alloc_table_from_pages([4, 6, 8, 10], engine=engine)
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sg.dma_map_sgtable(dev, table, Dir.BIDIRECTIONAL)
            sg.dma_unmap_sgtable(dev, table, Dir.BIDIRECTIONAL)

    def rebind() -> None:
        while not stop.is_set():
            dev.bind()

    def child() -> bool:
        consistent = table.mapped == (iommu.mapped_pages == 4) == (dev.live_mappings == 1)
        if table.mapped:
            sg.dma_unmap_sgtable(dev, table, Dir.BIDIRECTIONAL)
        dev.bind()
        table.close()
        dev.close()
        return consistent and iommu.mapped_pages == 0 and iommu.iova_ranges() == []

    workers = [
        threading.Thread(target=spin, daemon=True),
        threading.Thread(target=rebind, daemon=True),
    ]
    for worker in workers:
        worker.start()
    try:
        codes = [_child(child) for _ in range(20)]
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    assert codes == [0] * 20


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_while_threads_run_the_c_core(engine: str) -> None:
    """Free-running: threads inside C calls (copies, device transfers, maps) while the main
    thread forks; each child must be able to use the memory, IOMMU, device and tables."""
    mem = sg.PhysicalMemory(256 << 20, engine=engine)
    iommu = sg.Iommu(mem)
    dev = sg.Device(mem, iommu, dma_mask=sg.DMA_BIT_MASK(64))
    n_pages = 2048 if engine == "native" else 64
    table = sg.alloc_table_from_pages(range(0, 2 * n_pages, 2), engine=engine)
    stop = threading.Event()

    def churn() -> None:
        other = sg.alloc_table_from_pages(range(1, 2 * n_pages, 2), engine=engine)
        while not stop.is_set():
            table.copy_to_buffer(mem, n_pages * PAGE)
            sg.dma_map_sgtable(dev, other, Dir.BIDIRECTIONAL)
            dev.dma_write_table(other, b"\x5a" * PAGE)
            sg.dma_unmap_sgtable(dev, other, Dir.BIDIRECTIONAL)

    workers = [threading.Thread(target=churn, daemon=True) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        for _ in range(5):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    signal.alarm(20)
                    child = sg.alloc_table_from_pages([3 * n_pages], engine=engine)
                    sg.dma_map_sgtable(dev, child, Dir.BIDIRECTIONAL)
                    dev.dma_write_table(child, b"child")
                    ok = dev.dma_read_table(child, 5) == b"child"
                    sg.dma_unmap_sgtable(dev, child, Dir.BIDIRECTIONAL)
                    ok = ok and len(table.copy_to_buffer(mem, PAGE)) == PAGE
                    code = 0 if ok else 2
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
