"""Fault injection for device models and driver tests.

- :meth:`scatterlist.Device.fail_maps`: the Nth map call, or maps with a seeded probability,
  fail with a chosen errno, after the IOVA block and page-table entries were made, so the
  rollback runs;
- :func:`exhaust_iova`: no IOVA space left while the ``with`` block runs;
- :func:`drop_mapping` and :func:`restrict_permissions`: take pages away from a live DMA
  mapping, or change what the device may do with them, while the device uses it: its next
  access there faults (IommuFault) and is logged in the IOMMU's fault log.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple

from ._util import after_leaving, in_package, require_range
from .constants import U64_MAX
from .errors import InvalidArgument, OutOfMemory
from .iommu import Iommu

#: drop_mapping and restrict_permissions look at every granule of their range: at most 1 GiB.
MAX_WALK_BYTES = 1 << 30


def _require_iommu(iommu: object) -> None:
    if not isinstance(iommu, Iommu):
        raise TypeError(f"iommu must be an Iommu, not {type(iommu).__name__}")


@contextmanager
def exhaust_iova(iommu: Iommu, limit: Optional[int] = None) -> Iterator[int]:
    """Occupy every free IOVA range below ``limit`` (default: the whole aperture) while the
    block runs; yields the number of granules taken.  Mappings made inside fail with
    ``OutOfMemory`` (the kernel's -ENOMEM).  Everything is given back on exit.  The IOMMU
    cannot be closed inside the block (``BusyError``)."""
    _require_iommu(iommu)
    last = (
        (1 << iommu.aperture_bits) - 1
        if limit is None
        else require_range("limit", limit, 0, U64_MAX)
    )
    engine = iommu._engine
    life = iommu._life
    limit_pfn = last >> (iommu.granule.bit_length() - 1)
    taken: List[Tuple[int, int]] = []
    with life as handle:
        life.pin("exhaust_iova")  # the ranges taken live in the IOMMU until the block ends
    try:
        size = 1 << max(limit_pfn.bit_length() - 1, 0)
        # Largest aligned blocks first, halving on failure: a few blocks per free gap.
        with life as handle:
            while size >= 1:
                try:
                    taken.append((engine.iommu_iova_alloc(handle, size, limit_pfn), size))
                except OutOfMemory:
                    size //= 2
        yield sum(granules for _, granules in taken)
    finally:

        def give_back() -> None:
            try:
                # A call on the IOMMU (pinned: still there, whatever its owner did): a fork
                # waits for it, and safety nets the collector runs meanwhile wait for it.
                with life.use() as handle:
                    for pfn, granules in reversed(taken):
                        engine.iommu_iova_free(handle, pfn, granules)
            finally:
                life.unpin("exhaust_iova")

        # At once, unless this block is left from inside another call on this thread (the
        # collector finalizing a suspended generator there): then once that call is done.
        after_leaving(give_back)


def drop_mapping(iommu: Iommu, iova: int, size_bytes: int) -> int:
    """Unmap pages of a live mapping behind the driver's back; returns the bytes dropped.
    Unmapping the table later still succeeds and releases the rest."""
    _require_iommu(iommu)
    dropped = 0
    granule = iommu.granule
    start = require_range("iova", iova, 0, U64_MAX) // granule * granule
    walk_bytes = require_range("size_bytes", size_bytes, 1, MAX_WALK_BYTES)
    end = start + -(-walk_bytes // granule) * granule
    with in_package(), iommu._edits.lock:  # see PageTableEdits
        for page in range(start, end, granule):
            if iommu.lookup(page) is not None:
                dropped += iommu.unmap(page, granule)
    return dropped


def restrict_permissions(iommu: Iommu, iova: int, size_bytes: int, prot: int) -> int:
    """Give the mapped pages in ``[iova, iova + size_bytes)`` the permission bits ``prot``
    (``IOMMU_READ``, ``IOMMU_WRITE``, both or 0); returns the pages changed."""
    _require_iommu(iommu)
    prot = require_range("prot", prot, 0, 3)
    granule = iommu.granule
    start = require_range("iova", iova, 0, U64_MAX) // granule * granule
    walk_bytes = require_range("size_bytes", size_bytes, 1, MAX_WALK_BYTES)
    end = start + -(-walk_bytes // granule) * granule
    changed = 0
    # Each page's look-up, unmap and re-map, whole: an unmap of its DMA mapping on another
    # thread waits (else the re-map would outlive the mapping: see PageTableEdits).
    with in_package(), iommu._edits.lock:
        for page in range(start, end, granule):
            found = iommu.lookup(page)
            if found is None:
                continue
            phys = found[0] // granule * granule
            iommu.unmap(page, granule)
            iommu.map(page, phys, granule, prot)
            changed += 1
    if changed == 0:
        raise InvalidArgument(
            f"restrict_permissions: nothing is mapped in [{iova:#x}, {iova + size_bytes:#x})"
        )
    return changed


__all__ = ["exhaust_iova", "drop_mapping", "restrict_permissions"]
