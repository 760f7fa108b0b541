"""Run a Python workload through the native engine under valgrind memcheck.

Passes when valgrind reports no invalid read or write, no use of uninitialised memory, and no
definitely lost block allocated by the extension (scatterlist._sg).  Used by .ci/run:

    python tests/reliability/memcheck.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

WORKLOAD = r"""
import gc, errno
import scatterlist as sg
from scatterlist import DataDirection as Dir, faults

mem = sg.PhysicalMemory(1 << 30)
iommu = sg.Iommu(mem)
dev = sg.Device(mem, iommu=iommu, dma_mask=sg.DMA_BIT_MASK(64), debug="warn")
direct = sg.Device(mem, dma_mask=sg.DMA_BIT_MASK(64))
for i in range(200):
    pages = mem.alloc_pages(1 + i % 40, ("contiguous", "scattered", "random")[i % 3], seed=i)
    table = sg.alloc_table_from_pages(pages.pfns, offset=i % 100, size=pages.size - i % 100 - 7,
                                      max_segment=(1 + i % 5) * 4096)
    table.copy_from_buffer(mem, bytes(range(256)) * 4)
    table.copy_to_buffer(mem, 500, skip=3)
    list(table.page_pfns(1)); table.sg_nents(); table.nents_for_len(100)
    for d in (dev, direct):
        sg.dma_map_sgtable(d, table, Dir.BIDIRECTIONAL)
        d.dma_write_table(table, b"x" * 100)
        d.dma_read_table(table)
        sg.dma_sync_sgtable_for_cpu(d, table, Dir.BIDIRECTIONAL)
        sg.dma_unmap_sgtable(d, table, Dir.BIDIRECTIONAL)
    table.close()
    with sg.SGTable.new(dev, pages, Dir.FROM_DEVICE) as owned:
        view = owned.borrow()
        list(view)
    try:
        list(view)
    except sg.ClosedError:
        pass
# chained tables and appends
big = sg.alloc_table_from_pages(list(range(0, 2 * 3000, 2)), left_pages=500)
big.append_pages(list(range(10000, 10500)))
big.close()
# errors and failed calls
for bad in ([], [1 << 60]):
    try:
        sg.alloc_table_from_pages(bad)
    except sg.InvalidArgument:
        pass
t = sg.alloc_table_from_pages(list(range(50, 90, 2)))
dev.fail_maps(nth=1)
try:
    sg.dma_map_sgtable(dev, t, Dir.TO_DEVICE)
except sg.OutOfMemory:
    pass
sg.dma_map_sgtable(dev, t, Dir.TO_DEVICE)
a = t.dma_entries()[0].dma_address
faults.drop_mapping(iommu, a, 4096)
try:
    dev.dma_read(a, 10)
except sg.IommuFault:
    pass
sg.dma_unmap_sgtable(dev, t, Dir.TO_DEVICE)
with faults.exhaust_iova(iommu):
    try:
        sg.dma_map_sgtable(dev, t, Dir.TO_DEVICE)
    except sg.OutOfMemory:
        pass
# dropped without close: the safety nets run
owned = sg.SGTable.new(dev, mem.alloc_pages(3), Dir.TO_DEVICE)
del owned
leaked = sg.alloc_table_from_pages([7, 9])
sg.dma_map_sgtable(dev, leaked, Dir.TO_DEVICE)
del leaked
gc.collect()
dev.unbind()
t.close(); dev.close(); direct.close(); iommu.close(); mem.close()
from scatterlist._engine import get_engine
get_engine("native").drain_chunk_cache()
print("workload done")
"""


def main() -> int:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("memcheck: valgrind is not installed (apt-get install valgrind)")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "workload.py")
        log = os.path.join(tmp, "valgrind.log")
        with open(script, "w") as handle:
            handle.write(WORKLOAD)
        env = dict(os.environ, PYTHONMALLOC="malloc", SCATTERLIST_ENGINE="native")
        result = subprocess.run(
            [
                valgrind,
                "--tool=memcheck",
                "--leak-check=full",
                "--show-leak-kinds=definite",
                "--keep-debuginfo=yes",
                "--num-callers=30",
                f"--log-file={log}",
                sys.executable,
                script,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        report = open(log).read()
    print(result.stdout.strip())
    if result.returncode != 0 or "workload done" not in result.stdout:
        print(result.stderr[-4000:])
        print("memcheck: the workload failed")
        return 1
    # Split the log into records (blank-line separated) and keep those that involve the
    # extension: Python itself has a few known exit-time leaks that are not ours.
    records = re.split(r"\n==\d+== \n", report)
    ours = [
        r
        for r in records
        if re.search(r"_sg\.|\((sl_common|physmem|scatterlist|iova|iommu|dma)\.c:\d+\)", r)
        # cffi's own module-init allocation, made once per process: not ours.
        and "_my_Py_InitModule" not in r
        and "PyInit__sg" not in r
    ]
    errors = [
        r
        for r in ours
        if re.search(
            r"Invalid (read|write|free)|uninitialised|"
            r"definitely lost|Mismatched free",
            r,
        )
    ]
    summary = re.findall(r"ERROR SUMMARY: .*", report)
    print(
        f"memcheck: {len(records)} valgrind records, {len(ours)} involving the extension, "
        f"{len(errors)} errors in the extension; {summary[-1] if summary else ''}"
    )
    for record in errors[:10]:
        print(record)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
