"""The IOVA allocator in pure Python: the model of csrc/iova.c (rules in csrc/iova.h).

An :class:`IovaDomain` hands out size-aligned ranges of granule numbers (pfns).  Every range,
whatever its state (live, reserved, or cached: freed into the range cache but still occupied),
is one entry of three parallel lists sorted by first pfn; ranges never overlap, so the lists of
first and last pfns are both ascending and :mod:`bisect` finds a range in either.  Beside them
the model keeps the complement, the free intervals (granules at or above ``start_pfn`` that no
range holds) in a :class:`FreeSpace`, which files each interval under its length's power of two.
Where the C walks gaps down an AVL tree, skipping subtrees whose largest gap is too small, the
model walks, for each length class that can hold the request, that class's intervals downward
from the limit, and keeps the highest fit: the same answer (the highest size-aligned start that
fits), and too-small gaps are skipped as a whole class instead of one by one.

The range cache is the C's exactly: per order 0..5 a ``loaded`` and a ``prev`` magazine of up
to :data:`IOVA_MAG_SIZE` ranges and a depot (a stack) of full magazines, at most
``depot_max_magazines`` of them.  Magazines hold first pfns (the C holds node pointers; the
size follows from the order), in the C's slot order, since which cached range an allocation
takes depends on it.
"""

from __future__ import annotations

import errno
from bisect import bisect_left, bisect_right, insort
from heapq import heapify, heappop, heapreplace
from typing import Collection, Dict, List, Optional, Tuple

from ..errors import Reason, error_for

IOVA_RANGE_CACHE_MAX_ORDER = 6  # orders 0..5 are cached: sizes up to 32 granules
IOVA_FAST_ROUND_BELOW = 32  # sizes below this are rounded up to a power of two
IOVA_MAG_SIZE = 127  # ranges per magazine

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
_CACHE_MAX_SIZE = 1 << (IOVA_RANGE_CACHE_MAX_ORDER - 1)  # 32 granules


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


_EXACT_CLASSES = 256  # free intervals shorter than this are filed by their exact size


def size_class(size: int) -> int:
    """The class a free interval of size granules is filed in: its size below
    _EXACT_CLASSES, else one class per power of two."""
    return size if size < _EXACT_CLASSES else _EXACT_CLASSES + size.bit_length()


class FreeSpace:
    """The free intervals: the granules at or above start_pfn that no range holds, as maximal
    runs [first, last].  Each interval is filed in ``by_class[size_class(its size)]`` (a
    sorted list of first pfns), and bit c of ``occupied`` says whether class c has any, so a
    search for n granules looks only at classes whose intervals can be that long."""

    __slots__ = ("end_of", "start_of", "by_class", "occupied")

    def __init__(self, start_pfn: int, los: List[int], his: List[int]) -> None:
        """The free space between the ranges given by the ascending lists los and his."""
        self.end_of: Dict[int, int] = {}  # first pfn -> last pfn
        self.start_of: Dict[int, int] = {}  # last pfn -> first pfn
        self.by_class: List[List[int]] = [[] for _ in range(_EXACT_CLASSES + 65)]
        self.occupied = 0
        pos = start_pfn  # the lowest pfn not yet known to be taken or described
        for lo, hi in zip(los, his):
            if lo > pos:
                self._append(pos, lo - 1)
            if hi >= pos:
                pos = hi + 1
        if pos <= _TOP_FREE_PFN:
            self._append(pos, _TOP_FREE_PFN)

    def _append(self, first: int, last: int) -> None:
        """Files an interval above every interval filed so far (building in order)."""
        self.end_of[first] = last
        self.start_of[last] = first
        c = size_class(last - first + 1)
        self.by_class[c].append(first)
        self.occupied |= 1 << c

    def _add(self, first: int, last: int) -> None:
        self.end_of[first] = last
        self.start_of[last] = first
        c = size_class(last - first + 1)
        insort(self.by_class[c], first)
        self.occupied |= 1 << c

    def _remove(self, first: int) -> int:
        """Unfiles the interval starting at first; returns its last pfn."""
        last = self.end_of.pop(first)
        del self.start_of[last]
        c = size_class(last - first + 1)
        members = self.by_class[c]
        del members[bisect_left(members, first)]
        if not members:
            self.occupied &= ~(1 << c)
        return last

    def take(self, interval_first: int, first: int, last: int) -> None:
        """Removes [first, last] from the interval starting at interval_first, which holds
        it."""
        interval_last = self._remove(interval_first)
        assert interval_first <= first and last <= interval_last
        if interval_first < first:
            self._add(interval_first, first - 1)
        if last < interval_last:
            self._add(last + 1, interval_last)

    def give(self, first: int, last: int) -> None:
        """Frees [first, last], merging it with the free intervals it touches."""
        below = self.start_of.get(first - 1)
        if below is not None:
            self._remove(below)
            first = below
        above = self.end_of.get(last + 1)
        if above is not None:
            self._remove(last + 1)
            last = above
        self._add(first, last)

    def highest_fit(self, size: int, limit_pfn: int) -> Optional[int]:
        """The highest start, a multiple of roundup_pow2(size), of size free granules ending
        at or below limit_pfn, or None.  The classes that can hold size granules are walked
        together, interval by interval from the limit down (a heap picks the highest next
        interval), so the first fit is the highest one, as in the C's top-down search."""
        align_mask = ~(roundup_pow2(size) - 1)
        end_of = self.end_of
        # (-first pfn, class, index in the class) of each class's highest interval in reach.
        heap: List[Tuple[int, int, int]] = []
        first_class = size_class(size)
        classes = self.occupied >> first_class
        while classes:
            low_bit = classes & -classes
            c = first_class + low_bit.bit_length() - 1
            classes ^= low_bit
            members = self.by_class[c]
            j = bisect_right(members, limit_pfn) - 1
            if j >= 0:
                heap.append((-members[j], c, j))
        heapify(heap)
        while heap:
            neg_lo, c, j = heap[0]
            lo = -neg_lo
            hi = min(end_of[lo], limit_pfn)
            if hi - lo + 1 >= size:
                start = (hi + 1 - size) & align_mask
                if start >= lo:
                    return start
            if j > 0:
                heapreplace(heap, (-self.by_class[c][j - 1], c, j - 1))
            else:
                heappop(heap)
        return None


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
            raise error_for(errno.EINVAL, Reason.GRANULE, value=granule_bytes)
        if start_pfn == 0:
            raise error_for(errno.EINVAL, Reason.IOVA_START_PFN, value=start_pfn)
        self.granule_bytes = granule_bytes
        self.granule_shift = granule_bytes.bit_length() - 1
        self.start_pfn = start_pfn
        self.depot_max = depot_max_magazines
        self._max_pfn = U64_MAX >> self.granule_shift
        # Every range, ascending: first pfn, last pfn (inclusive), state.
        self._lo: List[int] = []
        self._hi: List[int] = []
        self._state: List[int] = []
        self._free = FreeSpace(start_pfn, [], [])
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
            return  # granules below start_pfn are never free
        # Everything between the range's neighbours was free: one interval, starting just
        # above the predecessor, holds the range.
        interval_first = self.start_pfn
        if i > 0 and self._hi[i - 1] >= interval_first:
            interval_first = self._hi[i - 1] + 1
        self._free.take(interval_first, max(lo, self.start_pfn), hi)

    def _unlink(self, i: int) -> None:
        """tree_remove of the range at index i: its granules become free."""
        lo, hi = self._lo[i], self._hi[i]
        del self._lo[i]
        del self._hi[i]
        del self._state[i]
        if hi >= self.start_pfn:
            self._free.give(max(lo, self.start_pfn), hi)

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
        self._free = FreeSpace(self.start_pfn, self._lo, self._hi)

    # -- placement ---------------------------------------------------------------------
    def _tree_alloc_pfn(self, size: int, limit_pfn: int, free: FreeSpace) -> Optional[int]:
        """tree_alloc's search: the highest start, a multiple of roundup_pow2(size), of a free
        run of size granules ending at or below limit_pfn, or None."""
        if limit_pfn < self.start_pfn or size > limit_pfn - self.start_pfn + 1:
            return None
        return free.highest_fit(size, limit_pfn)

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
        last_lo = limit_pfn - (1 << order) + 1  # pfn_hi <= limit_pfn  <=>  pfn_lo <= this
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
            raise error_for(errno.EINVAL, Reason.IOVA_SIZE)
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
        pfn = self._tree_alloc_pfn(size, limit_pfn, self._free)
        if pfn is None and flush_rcache and self._n_cached:
            # The kernel frees every cached range and retries.  Search the space as it would
            # be without them first, so that a retry that fails too leaves everything as it
            # was (the C unlinks them and links them back).
            members = set(self._cached_members())
            keep = [i for i, lo in enumerate(self._lo) if lo not in members]
            without_cached = FreeSpace(
                self.start_pfn, [self._lo[i] for i in keep], [self._hi[i] for i in keep]
            )
            pfn = self._tree_alloc_pfn(size, limit_pfn, without_cached)
            if pfn is not None:
                self._rcache_clear(unlink=True)
        if pfn is None:
            raise error_for(errno.ENOMEM, Reason.IOVA_EXHAUSTED, value=size, limit=limit_pfn)
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
            raise error_for(errno.EINVAL, Reason.IOVA_SIZE)
        i = self._index_containing(pfn)
        if i < 0:
            raise error_for(errno.ENOENT, Reason.IOVA_NOT_FOUND, value=pfn)
        state = self._state[i]
        if state != IOVA_RANGE_LIVE:
            raise error_for(errno.EINVAL, Reason.IOVA_NOT_LIVE, value=pfn)
        lo = self._lo[i]
        if lo != pfn:
            raise error_for(errno.EINVAL, Reason.IOVA_NOT_START, value=pfn)
        size = self._hi[i] - lo + 1
        if fast_size(size_granules) != size:
            raise error_for(
                errno.EINVAL, Reason.IOVA_SIZE_MISMATCH, value=size_granules, limit=size
            )
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
            raise error_for(errno.EINVAL, Reason.IOVA_RANGE, value=lo_pfn, limit=hi_pfn)
        overlaps_cached = False
        n = len(self._lo)
        j = bisect_left(self._hi, lo_pfn)  # the first range ending at or after lo_pfn
        while j < n and self._lo[j] <= hi_pfn:
            state = self._state[j]
            if state == IOVA_RANGE_LIVE:
                raise error_for(errno.EBUSY, Reason.IOVA_BUSY, value=self._lo[j], limit=self._hi[j])
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
            raise error_for(errno.ENOENT, Reason.IOVA_NOT_FOUND, value=pfn)
        return self._lo[i], self._hi[i], self._state[i]

    def flush_rcache(self) -> None:
        """iova_flush_rcache: every cached range goes back to free space."""
        self._rcache_clear(unlink=True)

    def ranges(
        self, from_pfn: int = 0, state_mask: int = IOVA_MASK_ALL
    ) -> List[Tuple[int, int, int]]:
        """iova_ranges without a capacity: (pfn_lo, pfn_hi, state) of every range whose state
        bit is in state_mask and whose pfn_hi >= from_pfn, ascending."""
        start = bisect_left(self._hi, from_pfn)
        return [
            (lo, hi, state)
            for lo, hi, state in zip(self._lo[start:], self._hi[start:], self._state[start:])
            if state_mask & (1 << state)
        ]
