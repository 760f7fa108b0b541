"""Emulated physical memory in pure Python: sparse page frames, a page allocator, byte access.

The model of csrc/physmem.c.  Memory is named by page frame number (pfn).  Nothing is stored for
a page until it is used:

* allocation state lives in :class:`PageGroup` records, one per run of :data:`GROUP_PAGES`
  consecutive pfns, created the first time the allocator hands out a page of the group (a
  missing group means "all 512 pages free");
* a page's bytes live in ``PhysMem.frames`` (pfn -> bytearray), created on the first write
  that touches the page; reads of pages without a frame see zeros.

So a 1 TiB memory costs two empty dicts until it is used.

The allocator must choose exactly the pfns the C allocator chooses.  All three layouts "walk
the free pfns upward"; here the walk is done over *intervals* of consecutive free pfns
(:meth:`PhysMem.free_intervals`), which visits the same pfns in the same order as the C's
pfn-by-pfn walk but lets an untouched group be handled in one step.
"""

from __future__ import annotations

import errno
from array import array
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from .._util import EngineLock
from ..errors import Reason, error_for

GROUP_PAGES = 512  # SL_GROUP_PAGES
U64_MASK = (1 << 64) - 1
MAX_MEMORY_BYTES = 1 << 46

LAYOUT_CONTIGUOUS = 0
LAYOUT_SCATTERED = 1
LAYOUT_RANDOM = 2


def is_valid_page_size(page_size: int) -> bool:
    """A power of two from 4 KiB to 64 KiB."""
    return 4096 <= page_size <= 65536 and page_size & (page_size - 1) == 0


class SplitMix64:
    """The splitmix64 generator of physmem.c, with 64-bit wrap-around made explicit."""

    __slots__ = ("state",)

    def __init__(self, seed: int) -> None:
        self.state = seed & U64_MASK

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & U64_MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64_MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64_MASK
        return z ^ (z >> 31)


class PageGroup:
    """Allocation state of GROUP_PAGES consecutive pfns: one byte per page (1 = allocated)."""

    __slots__ = ("allocated", "n_allocated")

    def __init__(self) -> None:
        self.allocated = bytearray(GROUP_PAGES)
        self.n_allocated = 0


class PhysMem:
    """A sparse emulated physical memory of ``n_pages`` pages of ``page_size`` bytes."""

    def __init__(self, size_bytes: int, page_size: int) -> None:
        # The checks of physmem_create, in its order: page size first, then size.
        if not is_valid_page_size(page_size):
            raise error_for(errno.EINVAL, Reason.PAGE_SIZE, value=page_size)
        if size_bytes == 0 or size_bytes % page_size != 0 or size_bytes > MAX_MEMORY_BYTES:
            raise error_for(errno.EINVAL, Reason.MEMORY_SIZE, value=size_bytes)
        self.page_size = page_size
        self.page_shift = page_size.bit_length() - 1
        self.n_pages = size_bytes >> self.page_shift
        self.n_groups = (self.n_pages + GROUP_PAGES - 1) // GROUP_PAGES
        self.n_free = self.n_pages
        self.groups: Dict[int, PageGroup] = {}  # group index -> state; missing = all free
        self.frames: Dict[int, bytearray] = {}  # pfn -> page bytes; missing = zeros
        # Devices on several threads may share a memory: as in the C, every public call that
        # reads or changes the pages holds this lock (public calls never nest; see EngineLock
        # for the Python that may run inside it).
        self.lock = EngineLock()  # (which a forked child re-creates itself)

    # -- counters ----------------------------------------------------------------------
    @property
    def n_resident(self) -> int:
        """Pages that have backing bytes."""
        return len(self.frames)

    def destroy(self) -> None:
        with self.lock:
            self.groups.clear()
            self.frames.clear()

    # -- allocation state --------------------------------------------------------------
    def is_allocated(self, pfn: int) -> bool:
        group = self.groups.get(pfn // GROUP_PAGES)
        return group is not None and group.allocated[pfn % GROUP_PAGES] == 1

    def free_intervals(self) -> Iterator[Tuple[int, int]]:
        """Half-open intervals [start, stop) of free pfns, in ascending order.

        The same pfns, in the same order, as the C's walk with next_free_pfn: a group that
        is untouched (or has nothing allocated) is free as a whole, a full group is skipped,
        and only a partly used group is looked at page by page.  Untouched groups cost
        nothing: the stretch between two used groups is one interval.  Two intervals may
        touch (at a group boundary); callers compare pfn values, never interval ends."""
        pos = 0  # the first pfn not described yet
        for g in sorted(self.groups):
            group = self.groups[g]
            if group.n_allocated == 0:
                continue
            base = g * GROUP_PAGES
            size = min(GROUP_PAGES, self.n_pages - base)
            if pos < base:
                yield pos, base
            pos = base + size
            if group.n_allocated == GROUP_PAGES:
                continue
            bits = group.allocated
            i = 0
            while i < size:
                start = bits.find(0, i, size)
                if start < 0:
                    break
                stop = bits.find(1, start, size)
                if stop < 0:
                    stop = size
                yield base + start, base + stop
                i = stop
        if pos < self.n_pages:
            yield pos, self.n_pages

    # -- the page allocator ------------------------------------------------------------
    def _choose_contiguous(self, n_pages: int) -> Optional["array[int]"]:
        """The lowest run of n_pages consecutive free pfns."""
        run_start = run_len = 0
        for start, stop in self.free_intervals():
            if run_len == 0 or start != run_start + run_len:
                run_start, run_len = start, 0
            run_len += stop - start
            if run_len >= n_pages:
                return array("Q", range(run_start, run_start + n_pages))
        return None

    def _choose_scattered(self, n_pages: int) -> Optional["array[int]"]:
        """Free pfns upward, skipping any pfn that is the last taken pfn + 1."""
        out: "array[int]" = array("Q")
        last: Optional[int] = None
        for start, stop in self.free_intervals():
            first = start + 1 if last is not None and start == last + 1 else start
            # Inside an interval every pfn is last + 1 of the one before: take every other.
            taken = range(first, stop, 2)[: n_pages - len(out)]
            if taken:
                out.extend(taken)
                last = taken[-1]
                if len(out) == n_pages:
                    return out
        return None

    def _choose_random(self, n_pages: int, seed: int) -> Optional["array[int]"]:
        """Free pfns upward in alternating runs: take 1 + r % 16, skip 1 + r % 4, ..."""
        out: "array[int]" = array("Q")
        rng = SplitMix64(seed)
        taking = True
        left = 1 + rng.next() % 16  # pfns left in the current take or skip run
        for start, stop in self.free_intervals():
            pfn = start
            while pfn < stop:
                step = min(left, stop - pfn)
                if taking:
                    step = min(step, n_pages - len(out))
                    out.extend(range(pfn, pfn + step))
                    if len(out) == n_pages:
                        return out
                pfn += step
                left -= step
                if left == 0:
                    taking = not taking
                    left = 1 + rng.next() % (16 if taking else 4)
        return None

    def alloc_pages(self, n_pages: int, layout: int, seed: int) -> "array[int]":
        """physmem_alloc_pages: the chosen pfns, all marked allocated, or an error and no
        change."""
        if layout not in (LAYOUT_CONTIGUOUS, LAYOUT_SCATTERED, LAYOUT_RANDOM):
            raise error_for(errno.EINVAL, Reason.LAYOUT, value=layout & U64_MASK)
        if n_pages == 0:
            raise error_for(errno.EINVAL, Reason.ZERO_PAGES)
        with self.lock:
            return self._alloc_pages_locked(n_pages, layout, seed)

    def _alloc_pages_locked(self, n_pages: int, layout: int, seed: int) -> "array[int]":
        chosen: Optional["array[int]"] = None
        if n_pages <= self.n_free:
            if layout == LAYOUT_CONTIGUOUS:
                chosen = self._choose_contiguous(n_pages)
            elif layout == LAYOUT_SCATTERED:
                chosen = self._choose_scattered(n_pages)
            else:
                chosen = self._choose_random(n_pages, seed)
        if chosen is None:
            raise error_for(errno.ENOMEM, Reason.OUT_OF_PAGES, value=n_pages)
        # Mark them; pfns arrive ascending, so consecutive pfns mostly share a group.
        group_index = -1
        group = PageGroup()
        for pfn in chosen:
            if pfn // GROUP_PAGES != group_index:
                group_index = pfn // GROUP_PAGES
                group = self.groups.setdefault(group_index, PageGroup())
            group.allocated[pfn % GROUP_PAGES] = 1
            group.n_allocated += 1
        self.n_free -= n_pages
        return chosen

    def free_pages(self, pfns: Sequence[int]) -> None:
        """physmem_free_pages_list: frees every listed page and drops its contents, or frees
        nothing if any pfn is out of range, not allocated, or listed twice."""
        with self.lock:
            self._free_pages_locked(pfns)

    def _free_pages_locked(self, pfns: Sequence[int]) -> None:
        for i, pfn in enumerate(pfns):
            if pfn >= self.n_pages:
                raise error_for(errno.EINVAL, Reason.PHYS_RANGE, element=i, value=pfn)
            if not self.is_allocated(pfn):
                raise error_for(errno.EINVAL, Reason.NOT_ALLOCATED, element=i, value=pfn)
        # The C finds a duplicate as "already cleared" while clearing, at the index of the
        # second occurrence, and puts everything back; the model just looks first.
        seen = set()
        for i, pfn in enumerate(pfns):
            if pfn in seen:
                raise error_for(errno.EINVAL, Reason.DUPLICATE_PFN, element=i, value=pfn)
            seen.add(pfn)
        for pfn in pfns:
            group = self.groups[pfn // GROUP_PAGES]
            group.allocated[pfn % GROUP_PAGES] = 0
            group.n_allocated -= 1
            self.frames.pop(pfn, None)  # freed pages lose their contents
        self.n_free += len(pfns)

    # -- byte access -------------------------------------------------------------------
    def check_range(self, phys: int, n_bytes: int) -> None:
        limit = self.n_pages << self.page_shift
        if phys > limit or n_bytes > limit - phys:
            raise error_for(errno.EFAULT, Reason.PHYS_RANGE, value=phys)

    def _pieces(self, phys: int, n_bytes: int) -> Iterator[Tuple[int, int, int, int]]:
        """(pfn, offset in page, offset in the caller's buffer, length) per page touched."""
        done = 0
        mask = self.page_size - 1
        while done < n_bytes:
            addr = phys + done
            in_page = addr & mask
            piece = min(self.page_size - in_page, n_bytes - done)
            yield addr >> self.page_shift, in_page, done, piece
            done += piece

    def read_into(self, phys: int, out: memoryview) -> None:
        """Fills out (format "B") with the bytes at phys; unwritten bytes read as zero."""
        self.check_range(phys, len(out))
        with self.lock:
            self._read_into_locked(phys, out, out_is_zero=False)

    def _read_into_locked(self, phys: int, out: memoryview, out_is_zero: bool) -> None:
        for pfn, in_page, at, piece in self._pieces(phys, len(out)):
            frame = self.frames.get(pfn)
            if frame is None:
                if not out_is_zero:
                    out[at : at + piece] = bytes(piece)
            else:
                out[at : at + piece] = frame[in_page : in_page + piece]

    def read(self, phys: int, n_bytes: int) -> bytes:
        """The n_bytes at phys; unwritten bytes read as zero."""
        self.check_range(phys, n_bytes)
        out = bytearray(n_bytes)
        with self.lock:
            self._read_into_locked(phys, memoryview(out), out_is_zero=True)
        return bytes(out)

    def write(self, phys: int, data: memoryview) -> None:
        """Writes data (format "B") at phys, giving every touched page backing bytes (even a
        page the allocator has not handed out, as the C does)."""
        n_bytes = len(data)
        self.check_range(phys, n_bytes)
        with self.lock:
            self._write_locked(phys, data)

    def _write_locked(self, phys: int, data: memoryview) -> None:
        n_bytes = len(data)
        frames: List[bytearray] = []
        for pfn, _, _, _ in self._pieces(phys, n_bytes):
            frame = self.frames.get(pfn)
            if frame is None:
                frame = self.frames[pfn] = bytearray(self.page_size)
            frames.append(frame)
        for frame, (_, in_page, at, piece) in zip(frames, self._pieces(phys, n_bytes)):
            frame[in_page : in_page + piece] = data[at : at + piece]
