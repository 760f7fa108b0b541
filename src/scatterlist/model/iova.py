"""The IOVA allocator in pure Python: the model of csrc/iova.c (rules in csrc/iova.h).

An :class:`IovaDomain` hands out size-aligned ranges of granule numbers (pfns).  Every range,
whatever its state (live, reserved, or cached: freed into the range cache but still occupied),
is one entry of three parallel lists sorted by first pfn; ranges never overlap, so the lists of
first and last pfns are both ascending and :mod:`bisect` finds a range in either.  Beside them
the model keeps the complement, the free intervals (granules at or above ``start_pfn`` that no
range holds), also sorted.  Where the C walks gaps down an AVL tree with per-subtree largest
gaps, the model walks the free intervals downward from the limit: the answer, the highest
size-aligned start that fits, is the same, and with ranges packed top-down (the usual case)
there are only a handful of free intervals to look at.

The range cache is the C's exactly: per order 0..5 a ``loaded`` and a ``prev`` magazine of up
to :data:`IOVA_MAG_SIZE` ranges and a depot (a stack) of full magazines, at most
``depot_max_magazines`` of them.  Magazines hold first pfns (the C holds node pointers; the
size follows from the order), in the C's slot order, since which cached range an allocation
takes depends on it.
"""

from __future__ import annotations

import errno
from bisect import bisect_left, bisect_right
from typing import Collection, List, Optional, Tuple

from ..errors import Reason, error_for

IOVA_RANGE_CACHE_MAX_ORDER = 6   # orders 0..5 are cached: sizes up to 32 granules
IOVA_FAST_ROUND_BELOW = 32       # sizes below this are rounded up to a power of two
IOVA_MAG_SIZE = 127              # ranges per magazine

IOVA_RANGE_LIVE = 0
IOVA_RANGE_RESERVED = 1
IOVA_RANGE_CACHED = 2

IOVA_MASK_LIVE = 1 << IOVA_RANGE_LIVE
IOVA_MASK_RESERVED = 1 << IOVA_RANGE_RESERVED
IOVA_MASK_CACHED = 1 << IOVA_RANGE_CACHED
IOVA_MASK_ALL = IOVA_MASK_LIVE | IOVA_MASK_RESERVED | IOVA_MASK_CACHED

U64_MAX = (1 << 64) - 1
# The C's anchor node occupies pfn U64_MAX, so the highest free granule is the one below it.
_TOP_FREE_PFN = U64_MAX - 1
_CACHE_MAX_SIZE = 1 << (IOVA_RANGE_CACHE_MAX_ORDER - 1)   # 32 granules


def is_valid_granule(granule_bytes: int) -> bool:
    """A power of two from 4 KiB to 64 KiB."""
    return 4096 <= granule_bytes <= 65536 and granule_bytes & (granule_bytes - 1) == 0


def roundup_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1)."""
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def fast_size(size_granules: int) -> int:
    """The size alloc_iova_fast really takes: small sizes are rounded up to a power of two, so
    that freed ranges of one order can serve any request of that order."""
    return roundup_pow2(size_granules) if size_granules < IOVA_FAST_ROUND_BELOW else size_granules


def size_order(size: int) -> int:
    """order_base_2 of a cacheable size (a power of two of at most 32 granules)."""
    return size.bit_length() - 1


def free_intervals(start_pfn: int, los: List[int],
                   his: List[int]) -> Tuple[List[int], List[int]]:
    """The free intervals (first and last pfn lists, ascending) between the ranges given by
    the ascending lists ``los`` and ``his``, counting only granules at or above start_pfn."""
    free_lo: List[int] = []
    free_hi: List[int] = []
    pos = start_pfn   # the lowest pfn not yet known to be taken or described
    for lo, hi in zip(los, his):
        if lo > pos:
            free_lo.append(pos)
            free_hi.append(lo - 1)
        if hi >= pos:
            pos = hi + 1
    if pos <= _TOP_FREE_PFN:
        free_lo.append(pos)
        free_hi.append(_TOP_FREE_PFN)
    return free_lo, free_hi


class RangeCache:
    """One order's cache: two magazines and the depot (its top is the list's end)."""

    __slots__ = ("loaded", "prev", "depot")

    def __init__(self) -> None:
        self.loaded: List[int] = []
        self.prev: List[int] = []
        self.depot: List[List[int]] = []

    def clear(self) -> None:
        self.loaded = []
        self.prev = []
        self.depot = []

    def members(self) -> List[int]:
        """Every cached first pfn, magazine by magazine (the C's rcache_each order)."""
        out = self.loaded + self.prev
        for mag in reversed(self.depot):
            out.extend(mag)
        return out


class IovaDomain:
    """An IOVA domain: ``iova_domain_create`` and the calls on it (pfns and sizes in
    granules)."""

    def __init__(self, granule_bytes: int, start_pfn: int, depot_max_magazines: int) -> None:
        # The checks of iova_domain_create, in its order.
        if not is_valid_granule(granule_bytes):
            raise error_for(errno.EINVAL, Reason.GRANULE, 0, granule_bytes)
        if start_pfn == 0:
            raise error_for(errno.EINVAL, Reason.IOVA_START_PFN, 0, 0)
        self.granule_bytes = granule_bytes
        self.granule_shift = granule_bytes.bit_length() - 1
        self.start_pfn = start_pfn
        self.depot_max = depot_max_magazines
        self._max_pfn = U64_MAX >> self.granule_shift
        # Every range, ascending: first pfn, last pfn (inclusive), state.
        self._lo: List[int] = []
        self._hi: List[int] = []
        self._state: List[int] = []
        # The free intervals, ascending (never touching: a range separates any two).
        self._free_lo: List[int] = [start_pfn]
        self._free_hi: List[int] = [_TOP_FREE_PFN]
        self._n_live = 0
        self._live_granules = 0
        self._n_cached = 0
        self._n_reserved = 0
        self._rcache = [RangeCache() for _ in range(IOVA_RANGE_CACHE_MAX_ORDER)]

    # -- counters ----------------------------------------------------------------------
    @property
    def max_pfn(self) -> int:
        """The highest pfn whose address fits in 64 bits; larger limits are treated as it."""
        return self._max_pfn

    @property
    def live_ranges(self) -> int:
        return self._n_live

    @property
    def live_granules(self) -> int:
        return self._live_granules

    @property
    def cached_ranges(self) -> int:
        return self._n_cached

    @property
    def reserved_ranges(self) -> int:
        return self._n_reserved

    # -- the sorted range lists --------------------------------------------------------
    def _index_containing(self, pfn: int) -> int:
        """Index of the range holding pfn, or -1 (find_containing)."""
        i = bisect_right(self._lo, pfn) - 1
        if i >= 0 and pfn <= self._hi[i]:
            return i
        return -1

    def _index_of(self, lo: int) -> int:
        """Index of the range starting at lo, which must exist."""
        i = bisect_left(self._lo, lo)
        assert i < len(self._lo) and self._lo[i] == lo
        return i

    def _link(self, lo: int, hi: int, state: int) -> None:
        """tree_insert: adds [lo, hi], which overlaps no range, and takes it out of the free
        intervals."""
        i = bisect_left(self._lo, lo)
        self._lo.insert(i, lo)
        self._hi.insert(i, hi)
        self._state.insert(i, state)
        if hi < self.start_pfn:
            return   # granules below start_pfn are never free
        first = max(lo, self.start_pfn)
        # Nothing else lies between the range's neighbours: one free interval holds it all.
        j = bisect_right(self._free_lo, first) - 1
        free_lo, free_hi = self._free_lo[j], self._free_hi[j]
        assert free_lo <= first and hi <= free_hi
        pieces_lo: List[int] = []
        pieces_hi: List[int] = []
        if free_lo < first:
            pieces_lo.append(free_lo)
            pieces_hi.append(first - 1)
        if hi < free_hi:
            pieces_lo.append(hi + 1)
            pieces_hi.append(free_hi)
        self._free_lo[j:j + 1] = pieces_lo
        self._free_hi[j:j + 1] = pieces_hi

    def _unlink(self, i: int) -> None:
        """tree_remove of the range at index i: its granules become free, merging with the
        free intervals around them."""
        lo, hi = self._lo[i], self._hi[i]
        del self._lo[i]
        del self._hi[i]
        del self._state[i]
        if hi < self.start_pfn:
            return
        first = max(lo, self.start_pfn)
        last = hi
        j = bisect_left(self._free_lo, first)
        stop = j
        if j > 0 and self._free_hi[j - 1] == first - 1:
            j -= 1
            first = self._free_lo[j]
        if stop < len(self._free_lo) and self._free_lo[stop] == hi + 1:
            last = self._free_hi[stop]
            stop += 1
        self._free_lo[j:stop] = [first]
        self._free_hi[j:stop] = [last]

    def _unlink_many(self, los: Collection[int]) -> None:
        """Removes the ranges starting at the given pfns: one by one when they are few, else
        by rebuilding the lists once."""
        if len(los) <= 8:
            for lo in los:
                self._unlink(self._index_of(lo))
            return
        gone = set(los)
        keep = [i for i, lo in enumerate(self._lo) if lo not in gone]
        assert len(keep) == len(self._lo) - len(gone)
        self._lo = [self._lo[i] for i in keep]
        self._hi = [self._hi[i] for i in keep]
        self._state = [self._state[i] for i in keep]
        self._free_lo, self._free_hi = free_intervals(self.start_pfn, self._lo, self._hi)

    # -- placement ---------------------------------------------------------------------
    def _search_highest(self, size: int, limit_pfn: int, free_lo: List[int],
                        free_hi: List[int]) -> Optional[int]:
        """tree_alloc's search: the highest start, a multiple of roundup_pow2(size), of a free
        run of size granules ending at or below limit_pfn, or None."""
        if limit_pfn < self.start_pfn or size > limit_pfn - self.start_pfn + 1:
            return None
        align_mask = ~(roundup_pow2(size) - 1)
        j = bisect_right(free_lo, limit_pfn) - 1   # the highest interval starting <= limit
        while j >= 0:
            lo = free_lo[j]
            hi = min(free_hi[j], limit_pfn)
            if hi - lo + 1 >= size:
                start = (hi + 1 - size) & align_mask
                if start >= lo:
                    return start
            j -= 1
        return None

    # -- the range cache ---------------------------------------------------------------
    def _rcache_get(self, order: int, limit_pfn: int) -> Optional[int]:
        """A cached range of the order ending at or below limit_pfn: the first that fits
        scanning loaded from its top; the top entry fills the slot it leaves.  Refilling an
        empty loaded magazine (from prev or the depot) happens even when nothing then fits,
        as in the C."""
        rc = self._rcache[order]
        if not rc.loaded:
            if rc.prev:
                rc.loaded, rc.prev = rc.prev, rc.loaded
            elif rc.depot:
                rc.loaded = rc.depot.pop()
            else:
                return None
        mag = rc.loaded
        last_lo = limit_pfn - (1 << order) + 1   # pfn_hi <= limit_pfn  <=>  pfn_lo <= this
        for i in range(len(mag) - 1, -1, -1):
            lo = mag[i]
            if lo <= last_lo:
                top = mag.pop()
                if i < len(mag):
                    mag[i] = top
                return lo
        return None

    def _rcache_put(self, order: int, lo: int) -> None:
        """Caches the live range starting at lo (already uncounted as live)."""
        rc = self._rcache[order]
        if len(rc.loaded) == IOVA_MAG_SIZE:
            if len(rc.prev) < IOVA_MAG_SIZE:
                rc.loaded, rc.prev = rc.prev, rc.loaded
            elif len(rc.depot) < self.depot_max:
                rc.depot.append(rc.loaded)
                rc.loaded = []
            else:
                # The depot is full: the kernel pushes the magazine and its depot trimming
                # frees it moments later; the C does both at once.
                released = rc.loaded
                rc.loaded = []
                self._unlink_many(released)
                self._n_cached -= len(released)
        rc.loaded.append(lo)
        self._state[self._index_of(lo)] = IOVA_RANGE_CACHED
        self._n_cached += 1

    def _cached_members(self) -> List[int]:
        out: List[int] = []
        for rc in self._rcache:
            out.extend(rc.members())
        return out

    def _rcache_clear(self, unlink: bool) -> None:
        """Empties every magazine and the depots; with unlink, the cached ranges leave the
        range lists too (their granules become free)."""
        if unlink:
            members = self._cached_members()
            if members:
                self._unlink_many(members)
        for rc in self._rcache:
            rc.clear()
        self._n_cached = 0

    # -- public interface --------------------------------------------------------------
    def _alloc(self, size_granules: int, limit_pfn: int, flush_rcache: bool) -> int:
        if size_granules == 0:
            raise error_for(errno.EINVAL, Reason.IOVA_SIZE, 0, 0)
        size = fast_size(size_granules)
        if limit_pfn > self._max_pfn:
            limit_pfn = self._max_pfn
        if size <= _CACHE_MAX_SIZE:
            lo = self._rcache_get(size_order(size), limit_pfn)
            if lo is not None:
                self._state[self._index_of(lo)] = IOVA_RANGE_LIVE
                self._n_cached -= 1
                self._n_live += 1
                self._live_granules += size
                return lo
        pfn = self._search_highest(size, limit_pfn, self._free_lo, self._free_hi)
        if pfn is None and flush_rcache and self._n_cached:
            # The kernel frees every cached range and retries.  Search the space as it would
            # be without them first, so that a retry that fails too leaves everything as it
            # was (the C unlinks them and links them back).
            members = set(self._cached_members())
            keep = [i for i, lo in enumerate(self._lo) if lo not in members]
            free_lo, free_hi = free_intervals(self.start_pfn, [self._lo[i] for i in keep],
                                              [self._hi[i] for i in keep])
            pfn = self._search_highest(size, limit_pfn, free_lo, free_hi)
            if pfn is not None:
                self._rcache_clear(unlink=True)
        if pfn is None:
            raise error_for(errno.ENOMEM, Reason.IOVA_EXHAUSTED, 0, size)
        self._link(pfn, pfn + size - 1, IOVA_RANGE_LIVE)
        self._n_live += 1
        self._live_granules += size
        return pfn

    def alloc(self, size_granules: int, limit_pfn: int) -> int:
        """iova_alloc (alloc_iova_fast with flush_rcache): the first pfn of a new live range
        of fast_size(size_granules) granules ending at or below limit_pfn."""
        return self._alloc(size_granules, limit_pfn, True)

    def alloc_noflush(self, size_granules: int, limit_pfn: int) -> int:
        """iova_alloc_noflush: the same, but a failure does not retry with the cache
        emptied."""
        return self._alloc(size_granules, limit_pfn, False)

    def free(self, pfn: int, size_granules: int) -> None:
        """iova_free (free_iova_fast with the C's checks): ranges of up to 32 granules go into
        the range cache, larger ones back to free space.  A failure changes nothing."""
        if size_granules == 0:
            raise error_for(errno.EINVAL, Reason.IOVA_SIZE, 0, pfn)
        i = self._index_containing(pfn)
        if i < 0:
            raise error_for(errno.ENOENT, Reason.IOVA_NOT_FOUND, 0, pfn)
        state = self._state[i]
        if state != IOVA_RANGE_LIVE:
            raise error_for(errno.EINVAL, Reason.IOVA_NOT_LIVE, state, pfn)
        lo = self._lo[i]
        if lo != pfn:
            raise error_for(errno.EINVAL, Reason.IOVA_NOT_START, lo, pfn)
        size = self._hi[i] - lo + 1
        if fast_size(size_granules) != size:
            raise error_for(errno.EINVAL, Reason.IOVA_SIZE_MISMATCH, size, size_granules)
        self._n_live -= 1
        self._live_granules -= size
        if size <= _CACHE_MAX_SIZE:
            self._rcache_put(size_order(size), lo)
        else:
            self._unlink(i)

    def reserve(self, lo_pfn: int, hi_pfn: int) -> None:
        """iova_reserve: marks [lo_pfn, hi_pfn] reserved, merged with every reserved range it
        overlaps or touches; cached ranges inside are released first (every cache is
        emptied).  -EBUSY, with nothing changed, if a live range overlaps."""
        if lo_pfn > hi_pfn or hi_pfn == U64_MAX:
            raise error_for(errno.EINVAL, Reason.IOVA_RANGE, lo_pfn, hi_pfn)
        overlaps_cached = False
        n = len(self._lo)
        j = bisect_left(self._hi, lo_pfn)   # the first range ending at or after lo_pfn
        while j < n and self._lo[j] <= hi_pfn:
            state = self._state[j]
            if state == IOVA_RANGE_LIVE:
                raise error_for(errno.EBUSY, Reason.IOVA_BUSY, self._lo[j], self._hi[j])
            if state == IOVA_RANGE_CACHED:
                overlaps_cached = True
            j += 1
        if overlaps_cached:
            self._rcache_clear(unlink=True)
        lo, hi = lo_pfn, hi_pfn
        merged: List[int] = []
        n = len(self._lo)
        j = bisect_left(self._hi, lo_pfn - 1 if lo_pfn else 0)
        while j < n and self._lo[j] <= hi_pfn + 1:
            if self._state[j] == IOVA_RANGE_RESERVED:
                lo = min(lo, self._lo[j])
                hi = max(hi, self._hi[j])
                merged.append(self._lo[j])
            j += 1
        if merged:
            self._unlink_many(merged)
            self._n_reserved -= len(merged)
        self._link(lo, hi, IOVA_RANGE_RESERVED)
        self._n_reserved += 1

    def find(self, pfn: int) -> Tuple[int, int, int]:
        """iova_find: (pfn_lo, pfn_hi, state) of the range holding pfn."""
        i = self._index_containing(pfn)
        if i < 0:
            raise error_for(errno.ENOENT, Reason.IOVA_NOT_FOUND, 0, pfn)
        return self._lo[i], self._hi[i], self._state[i]

    def flush_rcache(self) -> None:
        """iova_flush_rcache: every cached range goes back to free space."""
        self._rcache_clear(unlink=True)

    def ranges(self, from_pfn: int = 0,
               state_mask: int = IOVA_MASK_ALL) -> List[Tuple[int, int, int]]:
        """iova_ranges without a capacity: (pfn_lo, pfn_hi, state) of every range whose state
        bit is in state_mask and whose pfn_hi >= from_pfn, ascending."""
        start = bisect_left(self._hi, from_pfn)
        return [(lo, hi, state) for lo, hi, state in
                zip(self._lo[start:], self._hi[start:], self._state[start:])
                if state_mask & (1 << state)]
