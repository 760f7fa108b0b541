"""The IOMMU domain in pure Python: the model of csrc/iommu.c (rules in csrc/iommu.h).

The C keeps a radix tree of page tables like real hardware; the model keeps a dict from IOVA
page number to page entry, ``phys | prot`` (the page's physical address is granule-aligned, so
the permission bits fit below it, as in the C's entries).  Everything a caller can observe is
the same: which check fails first and with which index and value, all-or-nothing maps,
unmaps that stop at the first unmapped page, translated runs, and the fault log with its seq
numbering.  :attr:`IommuDomain.table_count` is derived from the mapped pages: the C frees a
table as soon as it is empty, so a table exists exactly when a mapped page lies under it.
"""

from __future__ import annotations

import errno
from collections import deque
from typing import Deque, Dict, List, Optional, Sequence, Tuple

from ..errors import Reason, ScatterlistError, error_for

IOMMU_READ = 1
IOMMU_WRITE = 2
IOMMU_CACHE = 4
IOMMU_NOEXEC = 8
IOMMU_MMIO = 16
IOMMU_PRIV = 32
IOMMU_PROT_MASK = 63

IOMMU_FAULT_LOG_SIZE = 256  # records kept; older ones are overwritten

IOMMU_FAULT_NOT_MAPPED = 1
IOMMU_FAULT_NO_PERMISSION = 2
IOMMU_FAULT_OUT_OF_APERTURE = 3

U64_MAX = (1 << 64) - 1
INT64_MAX = (1 << 63) - 1

_FAULT_SL_REASON = {
    IOMMU_FAULT_NOT_MAPPED: Reason.IOMMU_FAULT_NOT_MAPPED,
    IOMMU_FAULT_NO_PERMISSION: Reason.IOMMU_FAULT_PERMISSION,
    IOMMU_FAULT_OUT_OF_APERTURE: Reason.IOMMU_FAULT_APERTURE,
}

#: One fault record: (seq, iova, access, reason, prot), as struct iommu_fault.
Fault = Tuple[int, int, int, int, int]


def is_valid_granule(granule_bytes: int) -> bool:
    """A power of two from 4 KiB to 64 KiB."""
    return 4096 <= granule_bytes <= 65536 and granule_bytes & (granule_bytes - 1) == 0


class IommuDomain:
    """An IOMMU domain: ``iommu_domain_create`` and the calls on it (addresses and sizes in
    bytes; access codes IOMMU_READ / IOMMU_WRITE)."""

    def __init__(self, granule_bytes: int, aperture_bits: int) -> None:
        # The checks of iommu_domain_create, in its order.
        if not is_valid_granule(granule_bytes):
            raise error_for(errno.EINVAL, Reason.GRANULE, value=granule_bytes)
        granule_shift = granule_bytes.bit_length() - 1
        if aperture_bits <= granule_shift or aperture_bits > 64:
            raise error_for(errno.EINVAL, Reason.APERTURE_BITS, value=aperture_bits)
        self.granule_bytes = granule_bytes
        self.granule_shift = granule_shift
        self.granule_mask = granule_bytes - 1
        self.aperture_bits = aperture_bits
        self._aperture_last = (1 << aperture_bits) - 1
        # The C's table geometry, for levels and table_count only.
        self.bits_per_level = granule_shift - 3
        pfn_bits = aperture_bits - granule_shift
        self.levels = (pfn_bits + self.bits_per_level - 1) // self.bits_per_level
        # IOVA page number -> page entry: the page's physical address | prot.
        self._pages: Dict[int, int] = {}
        self._fault_total = 0
        self._faults: Deque[Fault] = deque(maxlen=IOMMU_FAULT_LOG_SIZE)

    # -- counters ----------------------------------------------------------------------
    @property
    def aperture_last(self) -> int:
        """The highest valid IOVA."""
        return self._aperture_last

    @property
    def mapped_pages(self) -> int:
        return len(self._pages)

    @property
    def table_count(self) -> int:
        """Page tables the C would hold, the root included: one per distinct path prefix of
        the mapped pages at every level below the root."""
        count = 1
        for level in range(1, self.levels):
            shift = self.bits_per_level * (self.levels - level)
            count += len({pfn >> shift for pfn in self._pages})
        return count

    @property
    def fault_total(self) -> int:
        """Faults ever logged (not reduced by clears or by wrapping)."""
        return self._fault_total

    def faults(self) -> List[Fault]:
        """The held fault records, oldest first."""
        return list(self._faults)

    def faults_clear(self) -> None:
        """Forgets the held faults; the total and the seq numbering carry on."""
        self._faults.clear()

    # -- checks ------------------------------------------------------------------------
    def _check_align(self, iova: int, phys: int, size_bytes: int) -> None:
        """Alignment of a map/unmap request: the first misaligned of iova, phys, size."""
        for misaligned in (iova, phys, size_bytes):
            if misaligned & self.granule_mask:
                raise error_for(
                    errno.EINVAL, Reason.IOMMU_ALIGN, value=misaligned, limit=self.granule_bytes
                )

    def _check_aperture(self, iova: int, size_bytes: int) -> None:
        """[iova, iova + size_bytes) inside the aperture; size_bytes > 0."""
        if iova > self._aperture_last or size_bytes - 1 > self._aperture_last - iova:
            raise self._aperture_error(iova)

    def _aperture_error(self, iova: int, element: int = 0) -> ScatterlistError:
        return error_for(
            errno.EINVAL,
            Reason.IOMMU_APERTURE,
            element=element,
            value=iova,
            limit=self._aperture_last,
        )

    # -- mapping -----------------------------------------------------------------------
    def _first_mapped(self, pfn: int, n_pages: int) -> Optional[int]:
        """The lowest mapped page number in [pfn, pfn + n_pages), or None."""
        pages = self._pages
        end = pfn + n_pages
        if len(pages) < n_pages:
            return min((p for p in pages if pfn <= p < end), default=None)
        for p in range(pfn, end):
            if p in pages:
                return p
        return None

    def _map_pages(
        self, pfn: int, n_pages: int, runs: Sequence[Tuple[int, int]], prot: int
    ) -> None:
        """map_pages: fills n_pages entries from pfn on with the pages of runs (aligned,
        checked, zero-length runs allowed), all or nothing: -EEXIST at the first page in order
        that is already mapped."""
        clash = self._first_mapped(pfn, n_pages)
        if clash is not None:
            raise error_for(errno.EEXIST, Reason.IOMMU_MAPPED, value=clash << self.granule_shift)
        pages = self._pages
        granule = self.granule_bytes
        cur = pfn
        for phys, len_bytes in runs:
            for page_phys in range(phys, phys + len_bytes, granule):
                pages[cur] = page_phys | prot
                cur += 1
        assert cur == pfn + n_pages

    def map(self, iova: int, phys: int, size_bytes: int, prot: int) -> None:
        """iommu_map: maps [iova, iova + size_bytes) to [phys, phys + size_bytes) with prot,
        all or nothing."""
        if prot & ~IOMMU_PROT_MASK:
            raise error_for(errno.EINVAL, Reason.IOMMU_PROT, value=prot)
        self._check_align(iova, phys, size_bytes)
        if size_bytes == 0:
            return
        self._check_aperture(iova, size_bytes)
        if size_bytes - 1 > U64_MAX - phys:
            raise error_for(errno.EINVAL, Reason.IOMMU_PHYS_RANGE, value=phys)
        self._map_pages(
            iova >> self.granule_shift, size_bytes >> self.granule_shift, [(phys, size_bytes)], prot
        )

    def map_runs(self, iova: int, runs: Sequence[Tuple[int, int]], prot: int) -> None:
        """iommu_map_runs (the kernel's iommu_map_sg): maps the (phys, len_bytes) runs back to
        back from iova on, all of them or nothing; zero-length runs are skipped."""
        if prot & ~IOMMU_PROT_MASK:
            raise error_for(errno.EINVAL, Reason.IOMMU_PROT, value=prot)
        mask = self.granule_mask
        if iova & mask:
            raise error_for(errno.EINVAL, Reason.IOMMU_ALIGN, value=iova, limit=self.granule_bytes)
        total = 0
        for i, (phys, len_bytes) in enumerate(runs):
            if (phys | len_bytes) & mask:
                raise error_for(
                    errno.EINVAL,
                    Reason.IOMMU_ALIGN,
                    element=i,
                    value=phys if phys & mask else len_bytes,
                    limit=self.granule_bytes,
                )
            if len_bytes == 0:
                continue
            if len_bytes - 1 > U64_MAX - phys:
                raise error_for(errno.EINVAL, Reason.IOMMU_PHYS_RANGE, element=i, value=phys)
            if len_bytes > U64_MAX - total:
                raise self._aperture_error(iova, i)
            total += len_bytes
        if total == 0:
            return
        self._check_aperture(iova, total)
        self._map_pages(iova >> self.granule_shift, total >> self.granule_shift, runs, prot)

    def unmap(self, iova: int, size_bytes: int) -> int:
        """iommu_unmap: unmaps pages from iova on, stopping at the first page that is not
        mapped; returns the bytes unmapped."""
        self._check_align(iova, 0, size_bytes)
        if size_bytes == 0:
            return 0
        self._check_aperture(iova, size_bytes)
        if size_bytes > INT64_MAX:  # the byte count is returned as int64_t
            raise self._aperture_error(iova)
        pages = self._pages
        pfn = iova >> self.granule_shift
        end = pfn + (size_bytes >> self.granule_shift)
        cur = pfn
        while cur < end and pages.pop(cur, None) is not None:
            cur += 1
        return (cur - pfn) << self.granule_shift

    # -- device access -----------------------------------------------------------------
    def _log_fault(self, iova: int, access: int, reason: int, prot: int) -> ScatterlistError:
        """Appends a record (the oldest is dropped when the log is full) and returns the
        exception the C's -EFAULT becomes."""
        self._faults.append((self._fault_total, iova, access, reason, prot))
        self._fault_total += 1
        return error_for(errno.EFAULT, _FAULT_SL_REASON[reason], value=iova, access=access)

    def _check_pte(self, pte: Optional[int], iova: int, access: int) -> None:
        """A page entry (None: not mapped) for an access at iova; a fault is logged and
        raised."""
        if pte is None:
            raise self._log_fault(iova, access, IOMMU_FAULT_NOT_MAPPED, 0)
        if not pte & access:
            raise self._log_fault(iova, access, IOMMU_FAULT_NO_PERMISSION, pte & IOMMU_PROT_MASK)

    @staticmethod
    def _check_access(access: int) -> None:
        if access != IOMMU_READ and access != IOMMU_WRITE:
            raise error_for(errno.EINVAL, Reason.IOMMU_ACCESS, value=access)

    def translate(self, iova: int, access: int) -> int:
        """iommu_translate: the physical address of a one-byte device access."""
        self._check_access(access)
        if iova > self._aperture_last:
            raise self._log_fault(iova, access, IOMMU_FAULT_OUT_OF_APERTURE, 0)
        pte = self._pages.get(iova >> self.granule_shift)
        self._check_pte(pte, iova, access)
        assert pte is not None
        mask = self.granule_mask
        return (pte & ~mask) | (iova & mask)

    def translate_range(
        self, iova: int, len_bytes: int, access: int, capacity: Optional[int] = None
    ) -> List[Tuple[int, int]]:
        """iommu_translate_range: the physically contiguous (phys, len_bytes) runs of a device
        access to [iova, iova + len_bytes), neighbouring pages merged.  The first fault is
        logged and raised (the C also returns the runs before it); with a capacity, needing
        more runs is -ENOSPC (not a fault).  No capacity means unlimited."""
        self._check_access(access)
        if len_bytes == 0:
            return []
        if len_bytes - 1 > U64_MAX - iova:
            raise self._aperture_error(iova)
        pages = self._pages
        granule = self.granule_bytes
        mask = self.granule_mask
        shift = self.granule_shift
        runs: List[Tuple[int, int]] = []
        run_phys = run_len = 0  # the last run, kept apart until it is complete
        addr = iova
        left = len_bytes
        while left:
            if addr > self._aperture_last:
                raise self._log_fault(addr, access, IOMMU_FAULT_OUT_OF_APERTURE, 0)
            pte = pages.get(addr >> shift)
            self._check_pte(pte, addr, access)
            assert pte is not None
            in_page = addr & mask
            piece = min(granule - in_page, left)
            phys = (pte & ~mask) | in_page
            # The C compares in 64 bits: a run ending exactly at 2**64 continues at 0.
            if run_len and (run_phys + run_len) & U64_MAX == phys:
                run_len += piece
            else:
                if run_len:
                    runs.append((run_phys, run_len))
                if capacity is not None and len(runs) == capacity:
                    raise error_for(
                        errno.ENOSPC, Reason.IOMMU_RUNS_CAPACITY, value=addr, limit=capacity
                    )
                run_phys, run_len = phys, piece
            addr += piece
            left -= piece
        runs.append((run_phys, run_len))
        return runs

    def lookup(self, iova: int) -> Optional[Tuple[int, int]]:
        """iommu_lookup (the kernel's iommu_iova_to_phys), never a fault: (phys, prot) of the
        page mapped at iova, or None."""
        if iova > self._aperture_last:
            return None
        pte = self._pages.get(iova >> self.granule_shift)
        if pte is None:
            return None
        mask = self.granule_mask
        return (pte & ~mask) | (iova & mask), pte & IOMMU_PROT_MASK
