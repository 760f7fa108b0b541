"""Scatter-gather tables in pure Python: the model of csrc/scatterlist.c.

The structures are the kernel's (``struct scatterlist``, ``struct sg_append_table``):

* an :class:`Entry` is one ``struct scatterlist``.  Its ``page_link`` holds ``pfn << 2`` plus
  the flag bits SG_CHAIN and SG_END in the two low bits.  A chain slot (SG_CHAIN set) holds no
  data: it names the next entry array.  C keeps that array's address in ``page_link``; Python
  cannot put an object in an int, so the model keeps the flag in ``page_link`` and the
  reference in :attr:`Entry.chain`;
* a :class:`Chunk` is one entry array (at most ``page_size // 32`` slots);
* a position in the list is simply an :class:`Entry` (a C ``struct scatterlist *``); each
  entry knows the slot after it in its array, which is what C's ``sg + 1`` reaches, so
  :func:`sg_next` works on entries alone, as in the kernel;
* an :class:`SgTable` is the kernel's ``sg_append_table`` plus what the emulation keeps
  beside it (page size, max segment, the chunk list, the "final" flag).

Where the C core decides where the next entry goes with slot arithmetic (a dry run so that a
failed malloc changes nothing), the model asks the entries themselves, as the kernel's
get_next_sg does: the next slot is reused unless it is marked as the end of its chunk and more
than one entry is still needed.  The two must agree; the engines are tested against each
other.  Every check runs before the table is touched, so a call that raises changes nothing.
"""

from __future__ import annotations

import errno
from array import array
from itertools import islice
from typing import Iterator, List, Optional, Sequence

from ..errors import Reason, error_for
from .physmem import PhysMem, is_valid_page_size

SG_CHAIN = 0x01
SG_END = 0x02
SG_PAGE_LINK_MASK = 0x03
SG_ENTRY_BYTES = 32
SG_MAX_SEGMENT_UNLIMITED = 0xFFFFFFFF
U32_MAX = 0xFFFFFFFF
U64_MAX = (1 << 64) - 1


class Entry:
    """One ``struct scatterlist``; a fresh entry is all zeros.

    ``following`` is the slot after this one in the same array (``sg + 1`` in C), None for an
    array's last slot; it is fixed when the array is made and is not part of the entry's
    data."""

    __slots__ = (
        "page_link",
        "offset",
        "length",
        "dma_address",
        "dma_length",
        "dma_flags",
        "chain",
        "following",
    )

    def __init__(self, following: Optional[Entry]) -> None:
        self.page_link = 0  # pfn << 2 | SG_END, or SG_CHAIN on a chain slot
        self.offset = 0  # bytes into the first page
        self.length = 0  # CPU length in bytes
        self.dma_address = 0
        self.dma_length = 0
        self.dma_flags = 0
        self.chain: Optional[Chunk] = None  # the array a chain slot points at
        self.following = following

    @property
    def pfn(self) -> int:
        return self.page_link >> 2


class Chunk:
    """One entry array, as sg_init_table leaves it: zeroed, its last slot marked END."""

    __slots__ = ("entries",)

    def __init__(self, n_slots: int) -> None:
        entries: List[Entry] = []
        following: Optional[Entry] = None
        for _ in range(n_slots):  # built back to front so each slot knows the next one
            following = Entry(following)
            entries.append(following)
        entries.reverse()
        entries[-1].page_link = SG_END
        self.entries = entries

    @property
    def n_slots(self) -> int:
        return len(self.entries)


# -- the kernel's entry helpers ----------------------------------------------------------


def sg_is_chain(sg: Entry) -> bool:
    return sg.page_link & SG_CHAIN != 0


def sg_is_last(sg: Entry) -> bool:
    return sg.page_link & SG_END != 0


def sg_next(sg: Entry) -> Optional[Entry]:
    """None after the END entry; otherwise the next slot, following one chain link."""
    if sg.page_link & SG_END:  # sg_is_last
        return None
    nxt = sg.following
    assert nxt is not None  # only an END entry can be an array's last slot
    if nxt.page_link & SG_CHAIN:  # sg_is_chain
        assert nxt.chain is not None
        return nxt.chain.entries[0]
    return nxt


def sg_set_page(sg: Entry, pfn: int, length: int, offset: int) -> None:
    """Stores the page and keeps the entry's flag bits."""
    sg.page_link = (pfn << 2) | (sg.page_link & SG_PAGE_LINK_MASK)
    sg.offset = offset
    sg.length = length


def sg_mark_end(sg: Entry) -> None:
    sg.page_link = (sg.page_link | SG_END) & ~SG_CHAIN


def sg_chain(link: Entry, next_chunk: Chunk) -> None:
    """Turns ``link`` into a chain slot naming ``next_chunk`` (SG_END is cleared)."""
    link.offset = 0
    link.length = 0
    link.page_link = SG_CHAIN
    link.chain = next_chunk


# -- the table ---------------------------------------------------------------------------


class SgTable:
    """An append table (``sg_append_table``) and its emulation-side settings."""

    def __init__(self, page_size: int, max_segment_bytes: int) -> None:
        if not is_valid_page_size(page_size):
            raise error_for(errno.EINVAL, Reason.PAGE_SIZE, value=page_size)
        rounded = max_segment_bytes & ~(page_size - 1)  # the kernel's ALIGN_DOWN
        if rounded < page_size:
            raise error_for(errno.EINVAL, Reason.MAX_SEGMENT, value=max_segment_bytes)
        self.page_size = page_size
        self.page_shift = page_size.bit_length() - 1
        self.chunk_entries = page_size // SG_ENTRY_BYTES  # SG_MAX_SINGLE_ALLOC
        self.max_segment_bytes = rounded
        # sg_table
        self.sgl: Optional[Entry] = None
        self.nents = 0
        self.orig_nents = 0
        # sg_append_table
        self.prv: Optional[Entry] = None  # the last populated entry
        self.total_nents = 0  # usable slots allocated (chain links excluded)
        # emulation
        self.final = False  # the last append had left_pages == 0
        self.chunks: List[Chunk] = []  # every entry array, in chain order
        # DMA mapping state (struct sl_table's dma_* fields, kept by the DMA layer): the
        # device the table is mapped for (None when not mapped), direction, IOVA block.
        self.dma_dev: Optional[object] = None
        self.dma_dir = 0
        self.dma_iova = 0
        self.dma_iova_len = 0
        self.dma_map_nents = 0
        self.dma_mapped_count = 0  # the DMA segment count of the live mapping

    def free_entries(self) -> None:
        """sg_free_table: drops the chunks; the counters stay as they were."""
        self.chunks = []
        self.sgl = None
        self.prv = None

    # -- walking -----------------------------------------------------------------------
    def walk(self) -> Iterator[Entry]:
        """Every entry reachable from sgl with sg_next (stops after the END entry)."""
        sg = self.sgl
        while sg is not None:
            yield sg
            sg = sg_next(sg)

    def walk_cpu(self) -> Iterator[Entry]:
        """The first orig_nents entries (for_each_sgtable_sg), fewer if the list is short."""
        return islice(self.walk(), self.orig_nents)

    # -- building ----------------------------------------------------------------------
    def _get_next_sg(self, cur: Optional[Entry], needed: int) -> Entry:
        """The kernel's get_next_sg: the slot for the next entry.  The slot after ``cur``
        is reused unless it is the END slot of its array while more than one entry is still
        needed: then it must become a chain link to a new array of min(needed,
        chunk_entries) slots."""
        link: Optional[Entry] = None
        if cur is not None:
            nxt = sg_next(cur)
            assert nxt is not None  # cur is never the END entry of a non-final table
            if not sg_is_last(nxt) or needed == 1:
                return nxt
            link = nxt
        alloc_size = min(needed, self.chunk_entries)
        chunk = Chunk(alloc_size)
        self.chunks.append(chunk)
        if link is not None:
            sg_chain(link, chunk)
            self.total_nents += alloc_size - 1
        else:
            self.sgl = chunk.entries[0]
            self.total_nents = alloc_size
        return chunk.entries[0]

    def _segment_starts(self, pfns: Sequence[int], start: int) -> List[int]:
        """Where the segments of pfns[start:] begin, split the kernel's way: a segment ends
        where pfns stop being consecutive or when it holds max_segment's worth of whole pages
        (the offset is ignored)."""
        max_pages = self.max_segment_bytes >> self.page_shift
        starts: List[int] = []
        run_start = start
        # Each run of consecutive pfns is cut into pieces of at most max_pages pages.
        breaks = [j for j in range(start + 1, len(pfns)) if pfns[j] != pfns[j - 1] + 1]
        for run_end in breaks + [len(pfns)]:
            starts.extend(range(run_start, run_end, max_pages))
            run_start = run_end
        return starts

    def _check_pfn_range(self, pfns: Sequence[int]) -> None:
        """Every pfn must keep its physical address below 2**63 (so address + length never
        wraps); the first offender is reported."""
        pfn_limit = (1 << (63 - self.page_shift)) - 1
        if pfns and max(pfns) > pfn_limit:
            for i, pfn in enumerate(pfns):
                if pfn > pfn_limit:
                    raise error_for(errno.EINVAL, Reason.PFN_RANGE, element=i, value=pfn)

    def append(self, pfns: Sequence[int], offset: int, size_bytes: int, left_pages: int) -> None:
        """sg_alloc_append_table_from_pages, with the checks of csrc/scatterlist.c."""
        page_size = self.page_size
        shift = self.page_shift
        n_pages = len(pfns)
        if self.final:
            raise error_for(errno.EINVAL, Reason.TABLE_FINAL)
        if n_pages == 0:
            raise error_for(errno.EINVAL, Reason.ZERO_PAGES)
        if self.prv is not None and offset != 0:
            raise error_for(errno.EINVAL, Reason.APPEND_OFFSET, value=offset)
        if offset >= page_size:
            raise error_for(errno.EINVAL, Reason.OFFSET, value=offset)
        if n_pages > (U64_MAX >> shift):
            raise error_for(errno.EINVAL, Reason.SIZE, value=size_bytes)
        pages_bytes = n_pages << shift
        # size must end inside the last page.
        if size_bytes > pages_bytes - offset or size_bytes + offset <= pages_bytes - page_size:
            raise error_for(errno.EINVAL, Reason.SIZE, value=size_bytes)

        # Merge into the previous call's last entry, as far as the pfns continue it.
        prv = self.prv
        merged = 0
        merged_length = 0
        if prv is not None:
            prv_end = (prv.pfn << shift) + prv.offset + prv.length
            next_pfn = prv_end >> shift
            if pfns[0] == next_pfn:
                if prv_end & (page_size - 1):
                    # The kernel would stretch prv over the rest of the page it ends inside.
                    raise error_for(errno.EINVAL, Reason.MID_PAGE_REPEAT, value=pfns[0])
                last_pfn = next_pfn - 1
                merged_length = prv.length
                while (
                    merged < n_pages
                    and pfns[merged] == last_pfn + 1
                    and merged_length + page_size <= self.max_segment_bytes
                ):
                    merged_length += page_size
                    last_pfn = pfns[merged]
                    merged += 1
                # Merged pages count whole, so a partial size would be silently ignored.
                if merged and size_bytes != pages_bytes:
                    raise error_for(errno.EINVAL, Reason.MERGE_PARTIAL, value=size_bytes)

        # The pfns' range is checked after the merge checks: the C's order (it checks them
        # while counting entries).
        self._check_pfn_range(pfns)
        starts = self._segment_starts(pfns, merged)
        chunks = len(starts)  # the kernel's name: entries this call adds
        if self.total_nents + chunks + self.chunk_entries > U32_MAX:
            raise error_for(errno.EINVAL, Reason.TOO_MANY_ENTRIES, value=chunks)

        # Nothing can fail from here on.
        if prv is not None and merged:
            prv.length = merged_length
        s = prv
        remaining = size_bytes
        entry_offset = offset
        ends = starts[1:] + [n_pages]
        for i, (begin, end) in enumerate(zip(starts, ends)):
            s = self._get_next_sg(s, chunks - i + left_pages)
            chunk_bytes = ((end - begin) << shift) - entry_offset
            length = remaining if remaining < chunk_bytes else chunk_bytes
            sg_set_page(s, pfns[begin], length, entry_offset)
            remaining -= length
            entry_offset = 0
        assert s is not None  # either prv existed or at least one entry was added
        self.nents = (self.nents + chunks) & U32_MAX
        self.orig_nents = self.nents
        self.prv = s
        if left_pages == 0:
            sg_mark_end(s)
            self.final = True

    def set_entries(self, rows: Sequence[int]) -> None:
        """sg_alloc_table followed by sg_set_page per entry, as drivers build tables by hand
        (sg_alloc_table_from_entries in C): rows holds (pfn, offset, length) per entry.  The
        table must be empty; it becomes final."""
        n_entries = len(rows) // 3
        if self.final or self.prv is not None:
            raise error_for(errno.EINVAL, Reason.TABLE_FINAL)
        if n_entries == 0:
            raise error_for(errno.EINVAL, Reason.ZERO_PAGES)
        pfn_limit = (1 << (63 - self.page_shift)) - 1
        for i in range(n_entries):
            pfn, offset, length = rows[3 * i], rows[3 * i + 1], rows[3 * i + 2]
            if pfn > pfn_limit:
                raise error_for(errno.EINVAL, Reason.PFN_RANGE, element=i, value=pfn)
            if offset > U32_MAX:
                raise error_for(errno.EINVAL, Reason.OFFSET, element=i, value=offset)
            if length == 0 or length > U32_MAX:
                raise error_for(errno.EINVAL, Reason.ENTRY_LENGTH, element=i, value=length)
        if n_entries + self.chunk_entries > U32_MAX:
            raise error_for(errno.EINVAL, Reason.TOO_MANY_ENTRIES, value=n_entries)

        # Nothing can fail from here on.  With left_pages == 0 get_next_sg lays the entries out
        # exactly as sg_alloc_table(n_entries) would: full chunks chained, the last one sized
        # to what remains.
        s: Optional[Entry] = None
        for i in range(n_entries):
            s = self._get_next_sg(s, n_entries - i)
            sg_set_page(s, rows[3 * i], rows[3 * i + 2], rows[3 * i + 1])
        assert s is not None
        self.nents = (self.nents + n_entries) & U32_MAX
        self.orig_nents = self.nents
        self.prv = s
        sg_mark_end(s)
        self.final = True

    # -- queries -----------------------------------------------------------------------
    def chunk_slots(self) -> List[int]:
        return [chunk.n_slots for chunk in self.chunks]

    def sg_nents(self) -> int:
        return sum(1 for _ in self.walk())

    def sg_nents_for_len(self, len_bytes: int) -> int:
        if len_bytes == 0:
            return 0
        total = 0
        count = 0
        for sg in self.walk():
            count += 1
            total += sg.length
            if total >= len_bytes:
                return count
        raise error_for(errno.EINVAL, Reason.NENTS_FOR_LEN, value=len_bytes, limit=total)

    def _first_entries(self, n_entries: int) -> List[Entry]:
        """The first n_entries entries, walked with sg_next; an error if the list is short."""
        entries = list(islice(self.walk(), n_entries))
        if len(entries) < n_entries:
            raise error_for(errno.EINVAL, Reason.NENTS_RANGE, value=n_entries, limit=len(entries))
        return entries

    def export_cpu(self, n_entries: int) -> "array[int]":
        """(pfn, offset, length) per entry, flattened."""
        return array(
            "Q",
            [
                field
                for sg in self._first_entries(n_entries)
                for field in (sg.page_link >> 2, sg.offset, sg.length)
            ],
        )

    def export_dma(self, n_entries: int) -> "array[int]":
        """(dma_address, dma_length) per entry, flattened."""
        return array(
            "Q",
            [
                field
                for sg in self._first_entries(n_entries)
                for field in (sg.dma_address, sg.dma_length)
            ],
        )

    def page_count(self, sg: Entry) -> int:
        """PAGE_ALIGN(offset + length) >> PAGE_SHIFT."""
        return (sg.offset + sg.length + self.page_size - 1) >> self.page_shift

    def page_pfns(self, start_pgoffset: int) -> "array[int]":
        """for_each_sgtable_page from start_pgoffset pages in.  The iterator starts at each
        entry's first page: the sub-page offset is not applied."""
        out: "array[int]" = array("Q")
        to_skip = start_pgoffset
        for sg in self.walk_cpu():
            n_pages = self.page_count(sg)
            if to_skip >= n_pages:
                to_skip -= n_pages
                continue
            pfn = sg.pfn
            if n_pages - to_skip == 1:
                out.append(pfn + to_skip)
            else:
                out.extend(range(pfn + to_skip, pfn + n_pages))
            to_skip = 0
        return out

    def copy(self, mem: PhysMem, buf: memoryview, skip: int, to_buffer: bool) -> int:
        """sg_copy_buffer over orig_nents entries: table -> buf when to_buffer, else
        buf -> table.  Returns the bytes copied (0 when skip runs past the end)."""
        if mem.page_size != self.page_size:
            raise error_for(
                errno.EINVAL, Reason.PAGE_SIZE_MISMATCH, value=mem.page_size, limit=self.page_size
            )
        # Every entry must lie inside the memory before a byte moves.
        mem_end = mem.n_pages << self.page_shift
        for i, sg in enumerate(self.walk_cpu()):
            if (sg.pfn << self.page_shift) + sg.offset + sg.length > mem_end:
                raise error_for(errno.EFAULT, Reason.PHYS_RANGE, element=i, value=sg.pfn)
        buflen = len(buf)
        copied = 0
        for sg in self.walk_cpu():
            if copied >= buflen:
                break
            if skip >= sg.length:
                skip -= sg.length
                continue
            phys = (sg.pfn << self.page_shift) + sg.offset + skip
            piece = min(sg.length - skip, buflen - copied)
            skip = 0
            if to_buffer:
                mem.read_into(phys, buf[copied : copied + piece])
            else:
                mem.write(phys, buf[copied : copied + piece])
            copied += piece
        return copied
