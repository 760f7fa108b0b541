"""Stateful differential tests: the native and model engines driven in lockstep.

One hypothesis state machine builds the same system on both engines (a small memory, an IOMMU,
two devices behind it and one direct device, with random DMA limits) and applies the same
random sequence of operations to both: page allocation and freeing, table building and
appending, DMA mapping and unmapping, device reads and writes (valid and faulting), CPU copies,
syncs, owned SGTables, device unbind/bind, fault injection, IOVA reservation and close()
calls that must be refused.

After every operation the two engines must agree on the outcome (the value, or the exception's
class, errno, reason and message) and on every piece of observable state; on each engine the
machine also checks invariants it can derive on its own:

* the pages the machine holds are distinct, never free, and every open table only covers pages
  of the ``Pages`` it was built from;
* every live IOVA range belongs to exactly one IOMMU-mapped table, of the size the IOVA
  allocator's rounding gives the table's laid-out length, and ``mapped_pages`` is the sum of
  the laid-out lengths (boundary padding included), derived here from the CPU entries;
* after an unmap, no granule of the table's IOVA block is mapped and a device access there
  faults ("not mapped");
* data written by the device through DMA addresses is what the CPU reads at the matching
  offset of the table (and the other way round).

``SCATTERLIST_HYPOTHESIS_PROFILE=fuzz`` runs many more and longer examples.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import scatterlist as sg
from scatterlist import DataDirection as Dir

PAGE = 4096
GRANULE = 4096
U64_MAX = (1 << 64) - 1
U32_MAX = 0xFFFFFFFF
ENGINES = ("native", "model")
DEVICES = ("iommu0", "iommu1", "direct")
MAX_TABLES = 8
MAX_PAGES_OBJECTS = 8
MAX_TABLE_PAGES = 40
INDEX = st.integers(0, 10**6)
DIRECTIONS = st.sampled_from([Dir.BIDIRECTIONAL, Dir.TO_DEVICE, Dir.FROM_DEVICE])
ANY_DIRECTION = st.integers(0, 9).flatmap(lambda k: st.just(Dir.NONE) if k == 0 else DIRECTIONS)

# The suite's profile (tests/conftest.py registers "ci" and "fuzz"): "fuzz" runs many more
# and longer programs.  One failure is shrunk at a time, and the explain phase (slow on state
# machines) is skipped, so that a failure is reported in minutes rather than tens of them.
PROFILE = os.environ.get("SCATTERLIST_HYPOTHESIS_PROFILE", "ci")
MACHINE_SETTINGS = settings(
    settings.get_profile(PROFILE),
    max_examples=1500 if PROFILE == "fuzz" else 60,
    stateful_step_count=60 if PROFILE == "fuzz" else 30,
    deadline=None,
    report_multiple_bugs=False,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# -- helpers ---------------------------------------------------------------------------------


def may_read(direction: Dir) -> bool:
    """Whether the device may read memory mapped in this direction (IOMMU_READ)."""
    return direction in (Dir.BIDIRECTIONAL, Dir.TO_DEVICE)


def may_write(direction: Dir) -> bool:
    return direction in (Dir.BIDIRECTIONAL, Dir.FROM_DEVICE)


def roundup_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def iova_block_granules(iova_len: int) -> int:
    """Granules of the IOVA range the allocator hands out for iova_len bytes: sizes below 32
    granules are rounded up to a power of two (alloc_iova_fast)."""
    n = iova_len // GRANULE
    return roundup_pow2(n) if n < 32 else n


def laid_out_length(cpu_rows: Sequence[Tuple[int, int, int]], boundary_mask: int) -> int:
    """iommu_dma_map_sg's layout pass: each entry takes whole granules from its in-granule
    offset; an entry that would cross a segment boundary pads the previous one up to it."""
    mask = GRANULE - 1
    iova_len = 0
    for _pfn, offset, length in cpu_rows:
        s_length = (length + (offset & mask) + mask) & ~mask
        pad_len = (boundary_mask - iova_len + 1) & boundary_mask
        if pad_len and pad_len < s_length - 1:
            iova_len += pad_len
        iova_len += s_length
    return iova_len


def rows(flat: Sequence[int], width: int) -> List[Tuple[int, ...]]:
    values = list(flat)
    return [tuple(values[i : i + width]) for i in range(0, len(values), width)]


def normalize(value: Any) -> Any:
    """A comparable, engine-independent form of a result."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, memoryview):
        return value.tolist()
    if hasattr(value, "tolist"):  # array('Q')
        return value.tolist()
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(normalize(v) for v in value)
    if isinstance(value, list):
        return [normalize(v) for v in value]
    return value


def exc_signature(exc: BaseException) -> Tuple[Any, ...]:
    sig: Tuple[Any, ...] = (
        type(exc).__name__,
        str(exc),
        getattr(exc, "errno", None),
        getattr(exc, "reason", None),
    )
    if isinstance(exc, sg.IommuFault):
        sig += (exc.iova, exc.access, exc.fault_reason)
    return sig


@dataclass
class Outcome:
    value: Any = None
    exc: Optional[BaseException] = None

    @property
    def ok(self) -> bool:
        return self.exc is None

    def describe(self) -> str:
        if self.exc is None:
            return f"returned {self.value!r:.300}"
        errno = getattr(self.exc, "errno", None)
        return f"raised {type(self.exc).__name__}({self.exc}) errno={errno}"


def attempt(fn: Callable[[], Any]) -> Outcome:
    try:
        return Outcome(fn(), None)
    except Exception as exc:  # noqa: BLE001 - compared below
        return Outcome(None, exc)


# -- the records the machine keeps -----------------------------------------------------------


@dataclass(eq=False)
class PagesRec:
    objs: Tuple[sg.Pages, sg.Pages]
    pfns: List[int]
    owner: Optional["SGRec"] = None


@dataclass(eq=False)
class TableRec:
    objs: Tuple[sg.RawTable, sg.RawTable]
    sources: List[PagesRec] = field(default_factory=list)
    mapped: Optional[Tuple[str, Dir]] = None  # (device key, direction) while mapped


@dataclass(eq=False)
class SGRec:
    objs: Tuple[Any, Any]  # SGTable[Owned[Pages]] on each engine
    pages: PagesRec
    dev: str
    direction: Dir
    revoked: bool = False


@dataclass(eq=False)
class MappedItem:
    """A live DMA mapping, hand-made (RawTable) or owned (SGTable)."""

    raws: Tuple[sg.RawTable, sg.RawTable]
    dev: str
    direction: Dir
    via: Any  # what to hand to dma_read_table/dma_write_table per engine: raw or SGTable
    owner: Any


@dataclass
class Config:
    page_size: int
    mem_pages: int
    aperture_bits: int
    devices: Dict[str, Dict[str, int]]


class World:
    """The system on one engine."""

    def __init__(self, engine: str, cfg: Config) -> None:
        self.engine = engine
        self.mem = sg.PhysicalMemory(cfg.mem_pages * cfg.page_size, cfg.page_size, engine=engine)
        self.iommu = sg.Iommu(self.mem, GRANULE, aperture_bits=cfg.aperture_bits)
        self.devs: Dict[str, sg.Device] = {}
        for key, limits in cfg.devices.items():
            iommu = None if key == "direct" else self.iommu
            # dma-debug off whatever SCATTERLIST_DMA_DEBUG says: the machine checks misuse
            # (wrong direction, unmapped syncs) against the engines, not against dma-debug.
            self.devs[key] = sg.Device(self.mem, iommu, name=key, debug="off", **limits)


device_limits = st.fixed_dictionaries(
    {
        "dma_mask": st.sampled_from([sg.DMA_BIT_MASK(b) for b in (16, 20, 32, 64)]),
        "max_segment_size": st.sampled_from([4096, 6000, 16384, 65536, U32_MAX]),
        "seg_boundary_mask": st.sampled_from([0xFFF, 0x3FFF, 0xFFFF, U64_MAX]),
        "max_mapping_size": st.sampled_from([U64_MAX, 3 * PAGE, 40000]),
    }
)
direct_limits = st.fixed_dictionaries(
    {
        "dma_mask": st.sampled_from([sg.DMA_BIT_MASK(b) for b in (20, 21, 32, 64)]),
        "max_segment_size": st.sampled_from([4096, 65536, U32_MAX]),
        "seg_boundary_mask": st.just(U64_MAX),
        "max_mapping_size": st.sampled_from([U64_MAX, 2 * PAGE]),
    }
)


def mostly(
    good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any], bad_in_ten: int = 2
) -> st.SearchStrategy[Any]:
    """good, with the odd bad value: misuse is tested without starving the valid paths."""
    return st.integers(0, 9).flatmap(lambda k: bad if k < bad_in_ten else good)


# Sizes, offsets and segment limits are drawn as (kind, number) and resolved against the
# memory's page size when the rule runs.
size_choice = mostly(
    st.one_of(st.none(), st.tuples(st.just("valid"), INDEX)), st.tuples(st.just("any"), INDEX)
)
offset_choice = mostly(
    st.one_of(st.just(("zero", 0)), st.tuples(st.just("in_page"), INDEX)),
    st.tuples(st.just("past_page"), INDEX),
    1,
)
max_segment_choice = mostly(
    st.one_of(
        st.none(),
        st.tuples(st.just("pages"), st.integers(1, 20)),
        st.tuples(st.just("bytes"), st.integers(0, 300_000)),
        st.just(("bytes", U32_MAX)),
    ),
    st.tuples(st.just("below_page"), st.sampled_from([0, 1, -1])),
    1,
)
left_pages_choice = mostly(st.just(0), st.integers(1, 30), 4)
count_choice = mostly(st.integers(1, MAX_TABLE_PAGES), st.just(0), 1)
alloc_count = mostly(st.integers(1, MAX_TABLE_PAGES), st.sampled_from([0, 300, 5000]), 1)


def pick(seq: Sequence[Any], index: int) -> Any:
    return seq[index % len(seq)]


class LockstepMachine(RuleBasedStateMachine):
    """Both engines, one random sequence of operations, compared after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.worlds: List[World] = []
        self.cfg: Optional[Config] = None
        self.pages: List[PagesRec] = []
        self.tables: List[TableRec] = []
        self.sgtables: List[SGRec] = []
        self.bound: Dict[str, bool] = {key: True for key in DEVICES}

    # -- lockstep plumbing ----------------------------------------------------------------
    def both(
        self, what: str, fn: Callable[[int], Any], key: Callable[[Any], Any] = normalize
    ) -> Tuple[Outcome, Outcome]:
        """Run fn on each engine (0: native, 1: model) and check the outcomes agree."""
        native, model = attempt(lambda: fn(0)), attempt(lambda: fn(1))
        for outcome in (native, model):
            if outcome.exc is not None and not isinstance(outcome.exc, sg.ScatterlistError):
                raise AssertionError(
                    f"{what}: {outcome.describe()}, not a ScatterlistError"
                ) from outcome.exc
        assert native.ok == model.ok, (
            f"{what}: native {native.describe()} but model {model.describe()}"
        )
        if native.ok:
            a, b = key(native.value), key(model.value)
            assert a == b, f"{what}: native returned {a!r:.500} but model {b!r:.500}"
        else:
            a, b = exc_signature(native.exc), exc_signature(model.exc)  # type: ignore[arg-type]
            assert a == b, f"{what}: native raised {a} but model raised {b}"
        event(f"{what.split('(')[0]}: {'ok' if native.ok else type(native.exc).__name__}")
        return native, model

    def value(self, what: str, fn: Callable[[int], Any]) -> Any:
        """An observation that must succeed and agree; returns the native one."""
        native, _ = self.both(what, fn)
        assert native.ok, f"{what}: {native.describe()}"
        return native.value

    def dev(self, w: int, key: str) -> sg.Device:
        return self.worlds[w].devs[key]

    def limits(self, key: str) -> Dict[str, int]:
        assert self.cfg is not None
        return self.cfg.devices[key]

    def mapped_items(self) -> List[MappedItem]:
        items = [
            MappedItem(t.objs, t.mapped[0], t.mapped[1], t.objs, t)
            for t in self.tables
            if t.mapped is not None
        ]
        items += [
            MappedItem((s.objs[0]._raw, s.objs[1]._raw), s.dev, s.direction, s.objs, s)
            for s in self.sgtables
            if not s.revoked
        ]
        return items

    def free_page_counts(self) -> Tuple[int, int]:
        return (self.worlds[0].mem.free_pages, self.worlds[1].mem.free_pages)

    def fault_totals(self) -> Tuple[int, int]:
        return (self.worlds[0].iommu.fault_total, self.worlds[1].iommu.fault_total)

    @staticmethod
    def has_duplicate_pages(raw: sg.RawTable) -> bool:
        pfns = list(raw.page_pfns())
        return len(set(pfns)) != len(pfns)

    @staticmethod
    def segment_rows(raw: sg.RawTable) -> List[Tuple[int, int]]:
        return [(a, n) for a, n in rows(raw.export_dma(), 2)]  # type: ignore[misc]

    # -- setup ----------------------------------------------------------------------------
    @initialize(
        page_size=mostly(st.just(4096), st.just(16384), 3),
        mem_pages=st.sampled_from([512, 1024]),
        aperture_bits=st.sampled_from([24, 32, 48]),
        iommu0=device_limits,
        iommu1=device_limits,
        direct=direct_limits,
        first_pages=st.lists(
            st.tuples(
                st.integers(1, MAX_TABLE_PAGES),
                st.sampled_from(["contiguous", "scattered", "random"]),
                st.integers(0, 2**32),
            ),
            min_size=1,
            max_size=3,
        ),
        first_tables=st.lists(
            st.tuples(
                INDEX,
                INDEX,
                st.integers(1, MAX_TABLE_PAGES),
                INDEX,
                INDEX,
                st.sampled_from(DEVICES),
                DIRECTIONS,
            ),
            max_size=3,
        ),
        first_owned=st.lists(
            st.tuples(st.integers(1, 12), st.sampled_from(DEVICES), DIRECTIONS), max_size=2
        ),
    )
    def setup(
        self,
        page_size: int,
        mem_pages: int,
        aperture_bits: int,
        iommu0: Dict[str, int],
        iommu1: Dict[str, int],
        direct: Dict[str, int],
        first_pages: List[Tuple[int, str, int]],
        first_tables: List[Tuple[int, int, int, int, int, str, Dir]],
        first_owned: List[Tuple[int, str, Dir]],
    ) -> None:
        """The system on both engines, with a few pages and tables (mapped where the limits
        allow) to start from, built through the same checked steps as the rules."""
        iommu0, iommu1 = dict(iommu0), dict(iommu1)
        for limits in (iommu0, iommu1):
            limits["seg_boundary_mask"] |= page_size - 1  # the mask covers a page at least
        self.cfg = Config(
            page_size,
            mem_pages,
            aperture_bits,
            {"iommu0": iommu0, "iommu1": iommu1, "direct": direct},
        )
        self.worlds = [World(engine, self.cfg) for engine in ENGINES]
        for n, layout, seed in first_pages:
            self.alloc_pages(n, layout, seed)
        for i, start, count, offset, size, dev, direction in first_tables:
            if not self.pages:
                break
            before = len(self.tables)
            self.build_table(i, start, count, False, ("in_page", offset), ("valid", size), None, 0)
            if len(self.tables) > before:
                self.map_table(len(self.tables) - 1, dev, direction)
        for n, dev, direction in first_owned:
            self.alloc_pages(n, "random", n)
            self.sgtable_new(len(self.pages) - 1, dev, direction)

    def teardown(self) -> None:
        if len(self.worlds) != 2:
            return
        if sys.exc_info()[0] is not None:
            # A step failed: the records may not match the engines any more.  Release what
            # can be released without checking, so the failure reported is that step's.
            for obj in (
                [r.objs for r in self.sgtables]
                + [t.objs for t in self.tables]
                + [r.objs for r in self.pages]
            ):
                for one in obj:
                    try:
                        one.close()
                    except Exception:  # noqa: BLE001 - best effort after a failure
                        pass
            return
        # Release everything in a legal order, on both engines alike, then check that
        # nothing is left behind.
        for rec in list(self.sgtables):
            self.close_sgtable_rec(rec)
        for t in list(self.tables):
            self.retire_table(t)
        for rec in list(self.pages):
            self.both("teardown Pages.close", lambda w: rec.objs[w].close())
            self.pages.remove(rec)
        for world in self.worlds:
            assert world.iommu.mapped_pages == 0, world.engine
            assert world.iommu.iova_ranges() == [], world.engine
            assert world.mem.free_pages == world.mem.n_pages, world.engine
            for dev in world.devs.values():
                assert dev.live_mappings == 0, (world.engine, dev.name)
                dev.close()
            world.iommu.close()
            world.mem.close()

    # -- pages ----------------------------------------------------------------------------
    @precondition(lambda self: len(self.pages) < MAX_PAGES_OBJECTS)
    @rule(
        n=alloc_count,
        layout=st.sampled_from(["contiguous", "scattered", "random"]),
        seed=st.integers(0, U64_MAX),
    )
    def alloc_pages(self, n: int, layout: str, seed: int) -> None:
        free_before = self.free_page_counts()
        native, model = self.both(
            f"alloc_pages({n}, {layout!r}, seed={seed})",
            lambda w: self.worlds[w].mem.alloc_pages(n, layout, seed=seed),
            key=lambda p: p.pfns.tolist(),
        )
        if not native.ok:
            assert isinstance(native.exc, (sg.OutOfMemory, sg.InvalidArgument))
            assert (n == 0) == isinstance(native.exc, sg.InvalidArgument)
            assert self.free_page_counts() == free_before, "a failed allocation took pages"
            return
        pfns = native.value.pfns.tolist()
        assert len(pfns) == n and len(set(pfns)) == n
        assert all(0 <= p < self.worlds[0].mem.n_pages for p in pfns)
        held = {p for rec in self.pages for p in rec.pfns}
        assert not held & set(pfns), "the allocator handed out pages that are still held"
        if layout == "contiguous":
            assert pfns == list(range(pfns[0], pfns[0] + n))
        else:
            assert pfns == sorted(pfns)
            if layout == "scattered":
                assert all(b != a + 1 for a, b in zip(pfns, pfns[1:]))
        assert self.free_page_counts() == (free_before[0] - n, free_before[1] - n)
        self.pages.append(PagesRec((native.value, model.value), pfns))

    @precondition(
        lambda self: (
            any(rec.owner is None for rec in self.pages)
            and (
                len(self.pages) > 3
                or self.worlds[0].mem.free_pages < self.worlds[0].mem.n_pages // 4
            )
        )
    )
    @rule(i=INDEX)
    def free_pages(self, i: int) -> None:
        rec = pick([r for r in self.pages if r.owner is None], i)
        # The machine never leaves a table on pages it gave back: close those tables first.
        for t in [t for t in self.tables if rec in t.sources]:
            self.retire_table(t)
        free_before = self.free_page_counts()
        self.both("Pages.close", lambda w: rec.objs[w].close())
        self.both("Pages.close again", lambda w: rec.objs[w].close())  # idempotent
        self.both("pfns of closed Pages", lambda w: rec.objs[w].pfns)
        n = len(rec.pfns)
        assert self.free_page_counts() == (free_before[0] + n, free_before[1] + n)
        self.pages.remove(rec)

    @precondition(lambda self: any(rec.owner is not None for rec in self.pages))
    @rule(i=INDEX)
    def close_owned_pages(self, i: int) -> None:
        rec = pick([r for r in self.pages if r.owner is not None], i)
        native, _ = self.both("Pages.close on owned pages", lambda w: rec.objs[w].close())
        assert isinstance(native.exc, sg.BusyError), native.describe()

    # -- tables ---------------------------------------------------------------------------
    def choose_pfns(self, rec: PagesRec, start: int, count: int, reverse: bool) -> List[int]:
        if not rec.pfns or count == 0:
            return []
        start %= len(rec.pfns)
        chosen = rec.pfns[start : start + count]
        return chosen[::-1] if reverse else chosen

    @property
    def page(self) -> int:
        assert self.cfg is not None
        return self.cfg.page_size

    def resolve_size(self, size: Any, count: int, offset: int) -> Optional[int]:
        """None, a size ending inside the last page, or any size up to 45 pages."""
        if size is None:
            return None
        if size[0] == "any":
            return size[1] % (45 * self.page)
        lo = max(1, (count - 1) * self.page - offset + 1)
        hi = count * self.page - offset
        return lo + size[1] % (hi - lo + 1) if hi >= lo else hi

    def resolve_offset(self, offset: Tuple[str, int]) -> int:
        kind, r = offset
        return {"zero": 0, "in_page": r % self.page, "past_page": self.page + r % self.page}[kind]

    def resolve_max_segment(self, choice: Any) -> Optional[int]:
        if choice is None:
            return None
        kind, r = choice
        if kind == "pages":
            return r * self.page
        if kind == "bytes":
            return r if r == U32_MAX else self.page + r
        return self.page - 1 if r < 0 else r  # below one page: refused

    @precondition(
        lambda self: len(self.tables) < MAX_TABLES and any(r.owner is None for r in self.pages)
    )
    @rule(
        i=INDEX,
        start=INDEX,
        count=count_choice,
        reverse=st.booleans(),
        offset=offset_choice,
        size=size_choice,
        max_segment=max_segment_choice,
        left_pages=left_pages_choice,
    )
    def build_table(
        self,
        i: int,
        start: int,
        count: int,
        reverse: bool,
        offset: Any,
        size: Any,
        max_segment: Any,
        left_pages: int,
    ) -> None:
        offset = self.resolve_offset(offset)
        max_segment = self.resolve_max_segment(max_segment)
        rec = pick([r for r in self.pages if r.owner is None], i)
        pfns = self.choose_pfns(rec, start, count, reverse)
        size_bytes = self.resolve_size(size, len(pfns), offset)
        what = (
            f"alloc_table_from_pages({pfns}, offset={offset}, size={size_bytes}, "
            f"max_segment={max_segment}, left_pages={left_pages})"
        )
        native, model = self.both(
            what,
            lambda w: sg.alloc_table_from_pages(
                pfns,
                offset=offset,
                size=size_bytes,
                max_segment=max_segment,
                page_size=self.page,
                left_pages=left_pages,
                engine=ENGINES[w],
            ),
            key=lambda t: (t.export_cpu().tolist(), t.total_nents, t.final),
        )
        if native.ok:
            table = native.value
            assert table.final == (left_pages == 0)
            cpu = rows(table.export_cpu(), 3)
            total = sum(r[2] for r in cpu)
            assert total == (len(pfns) * self.page - offset if size_bytes is None else size_bytes)
            assert cpu[0][1] == offset and all(r[1] == 0 for r in cpu[1:])
            if max_segment is not None:
                limit = max_segment // self.page * self.page
                assert all(r[2] <= limit for r in cpu), (cpu, limit)
            self.tables.append(TableRec((native.value, model.value), [rec]))
        elif not pfns:
            assert isinstance(native.exc, sg.InvalidArgument)

    @precondition(lambda self: self.tables and any(r.owner is None for r in self.pages))
    @rule(
        t=INDEX,
        open_only=st.integers(0, 3),
        i=INDEX,
        start=INDEX,
        count=mostly(st.integers(1, 20), st.just(0), 1),
        reverse=st.booleans(),
        size=size_choice,
        left_pages=mostly(st.just(0), st.integers(1, 30), 5),
    )
    def append_pages(
        self,
        t: int,
        open_only: int,
        i: int,
        start: int,
        count: int,
        reverse: bool,
        size: Any,
        left_pages: int,
    ) -> None:
        open_tables = [x for x in self.tables if not x.objs[0].final]
        table = pick(open_tables if open_only and open_tables else self.tables, t)
        rec = pick([r for r in self.pages if r.owner is None], i)
        pfns = self.choose_pfns(rec, start, count, reverse)
        size_bytes = self.resolve_size(size, len(pfns), 0)
        was_final = table.objs[0].final
        before = table.objs[0].export_cpu().tolist()
        native, _ = self.both(
            f"append_pages({pfns}, size={size_bytes}, left_pages={left_pages})",
            lambda w: table.objs[w].append_pages(pfns, size_bytes, left_pages),
        )
        if native.ok:
            assert not was_final
            table.sources.append(rec)
            assert table.objs[0].final == (left_pages == 0)
        else:
            if was_final:
                assert isinstance(native.exc, sg.InvalidArgument)
                assert "final" in str(native.exc)
            # A failed call changes nothing.
            assert table.objs[0].export_cpu().tolist() == before
            assert table.objs[0].final == was_final

    @precondition(lambda self: self.tables)
    @rule(t=INDEX)
    def close_table(self, t: int) -> None:
        table = pick(self.tables, t)
        native, _ = self.both("RawTable.close", lambda w: table.objs[w].close())
        if table.mapped is not None:
            assert isinstance(native.exc, sg.BusyError), native.describe()
            return
        assert native.ok
        self.both("RawTable.close again", lambda w: table.objs[w].close())
        closed, _ = self.both("export_cpu after close", lambda w: table.objs[w].export_cpu())
        assert isinstance(closed.exc, sg.ClosedError)
        self.tables.remove(table)

    def retire_table(self, table: TableRec) -> None:
        """Unmap (if mapped) and close a table, on both engines, checking both succeed."""
        if table.mapped is not None:
            dev, direction = table.mapped
            native, _ = self.both(
                "dma_unmap_sgtable (retire)",
                lambda w: sg.dma_unmap_sgtable(self.dev(w, dev), table.objs[w], direction),
            )
            assert native.ok, native.describe()
            table.mapped = None
        native, _ = self.both("RawTable.close (retire)", lambda w: table.objs[w].close())
        assert native.ok, native.describe()
        self.tables.remove(table)

    # -- CPU copies -----------------------------------------------------------------------
    @precondition(lambda self: self.tables)
    @rule(
        t=INDEX,
        n=st.integers(0, 3 * PAGE),
        skip=mostly(st.just(0), st.integers(0, 45 * PAGE), 5),
        seed=st.integers(0, 2**32),
    )
    def cpu_copy(self, t: int, n: int, skip: int, seed: int) -> None:
        table = pick(self.tables, t)
        data = random.Random(seed).randbytes(n)
        native, _ = self.both(
            f"copy_from_buffer({n} bytes, skip={skip})",
            lambda w: table.objs[w].copy_from_buffer(self.worlds[w].mem, data, skip),
        )
        assert native.ok, native.describe()
        total = sum(r[2] for r in rows(table.objs[0].export_cpu(), 3))
        copied = native.value
        assert copied == max(0, min(n, total - skip)), (copied, n, total, skip)
        back = self.value(
            f"copy_to_buffer({n}, skip={skip})",
            lambda w: table.objs[w].copy_to_buffer(self.worlds[w].mem, n, skip),
        )
        assert len(back) == copied
        if not self.has_duplicate_pages(table.objs[0]):
            assert back == data[:copied], "the CPU copy did not round-trip"
        whole = self.value(
            "copy_to_buffer()", lambda w: table.objs[w].copy_to_buffer(self.worlds[w].mem)
        )
        assert len(whole) == total

    # -- DMA mapping ----------------------------------------------------------------------
    @precondition(lambda self: self.tables)
    @rule(t=INDEX, dev=st.sampled_from(DEVICES), direction=ANY_DIRECTION)
    def map_table(self, t: int, dev: str, direction: Dir) -> None:
        table = pick(self.tables, t)
        cpu_before = table.objs[0].export_cpu().tolist()
        ranges_before = self.worlds[0].iommu.iova_ranges(cached=True, reserved=True)
        mapped_before = self.worlds[0].iommu.mapped_pages
        native, _ = self.both(
            f"dma_map_sgtable({dev}, {direction.name})",
            lambda w: sg.dma_map_sgtable(self.dev(w, dev), table.objs[w], direction),
        )
        # Mapping never changes the CPU fields, whether it succeeds or not.
        assert table.objs[0].export_cpu().tolist() == cpu_before
        # The checks in csrc/dma.c's order: direction, bound, already mapped, final.
        if direction is Dir.NONE:
            assert isinstance(native.exc, sg.InvalidArgument), native.describe()
            return
        if not self.bound[dev]:
            assert isinstance(native.exc, sg.DeviceUnbound), native.describe()
            return
        if table.mapped is not None:
            assert isinstance(native.exc, sg.BusyError), native.describe()
            return
        if not table.objs[0].final:
            assert isinstance(native.exc, sg.InvalidArgument), native.describe()
            return
        if not native.ok:
            # Nothing mapped, nothing of the IOVA space kept live.
            assert self.worlds[0].iommu.mapped_pages == mapped_before
            live = [r for r in self.worlds[0].iommu.iova_ranges() if r.state == "live"]
            assert live == [r for r in ranges_before if r.state == "live"]
            assert not table.objs[0].mapped
            return
        table.mapped = (dev, direction)
        raw = table.objs[0]
        segs = self.segment_rows(raw)
        cpu = rows(cpu_before, 3)
        assert sum(n for _, n in segs) == sum(r[2] for r in cpu)
        if dev == "direct":
            assert segs == [(pfn * self.page + off, length) for pfn, off, length in cpu]
        else:
            assert len(segs) <= len(cpu)
            assert all(n > 0 for _, n in segs)
        assert raw.mapped and raw.direction == direction

    @precondition(lambda self: self.tables)
    @rule(
        t=INDEX,
        dev=st.one_of(st.none(), st.sampled_from(DEVICES)),
        direction=st.one_of(st.none(), ANY_DIRECTION),
    )
    def unmap_table(self, t: int, dev: Optional[str], direction: Optional[Dir]) -> None:
        """Unmap, with the mapping's own device and direction unless told otherwise."""
        mapped = [x for x in self.tables if x.mapped is not None]
        table = pick(mapped or self.tables, t)
        dev = dev or (table.mapped[0] if table.mapped else "iommu0")
        direction = direction or (table.mapped[1] if table.mapped else Dir.TO_DEVICE)
        segs = self.segment_rows(table.objs[0]) if table.mapped else []
        block = self.block_of(table.objs[0], table.mapped[0]) if table.mapped else None
        native, _ = self.both(
            f"dma_unmap_sgtable({dev}, {direction.name})",
            lambda w: sg.dma_unmap_sgtable(self.dev(w, dev), table.objs[w], direction),
        )
        right = table.mapped is not None and table.mapped[0] == dev and direction is not Dir.NONE
        assert native.ok == right, native.describe()
        if not native.ok:
            assert isinstance(native.exc, sg.InvalidArgument)
            return
        table.mapped = None
        assert not table.objs[0].mapped and not table.objs[1].mapped
        if dev != "direct":
            assert block is not None
            self.check_block_unmapped(dev, block, segs)

    def block_of(self, raw: sg.RawTable, dev: str) -> Tuple[int, int]:
        """(IOVA, laid-out length) of an IOMMU-mapped table, derived from its entries."""
        segs = self.segment_rows(raw)
        cpu = rows(raw.export_cpu(), 3)
        iova_len = laid_out_length(
            cpu,  # type: ignore[arg-type]
            self.limits(dev)["seg_boundary_mask"],
        )
        return segs[0][0] & ~(GRANULE - 1), iova_len

    def check_block_unmapped(
        self, dev: str, block: Tuple[int, int], segs: List[Tuple[int, int]]
    ) -> None:
        """After an unmap every address of the table's block faults."""
        start, length = block
        for w in range(2):
            iommu = self.worlds[w].iommu
            live = iommu.iova_ranges()
            for addr in range(start, start + length, GRANULE):
                assert iommu.lookup(addr) is None, f"{ENGINES[w]}: {addr:#x} still mapped"
                assert not any(r.start <= addr < r.start + r.size_bytes for r in live)
        for addr, n in segs:
            for probe in (addr, addr + n - 1):
                totals = self.fault_totals()
                native, _ = self.both(
                    f"dma_read({probe:#x}) after unmap",
                    lambda w: self.dev(w, dev).dma_read(probe, 1),
                )
                assert isinstance(native.exc, sg.IommuFault), native.describe()
                assert native.exc.fault_reason == "not mapped" and native.exc.iova == probe
                assert self.fault_totals() == (totals[0] + 1, totals[1] + 1)

    @precondition(lambda self: self.tables)
    @rule(t=INDEX, dev=st.sampled_from(DEVICES), direction=ANY_DIRECTION, for_cpu=st.booleans())
    def sync_table(self, t: int, dev: str, direction: Dir, for_cpu: bool) -> None:
        table = pick(self.tables, t)
        call = sg.dma_sync_sgtable_for_cpu if for_cpu else sg.dma_sync_sgtable_for_device
        native, _ = self.both(
            f"{call.__name__}({dev}, {direction.name})",
            lambda w: call(self.dev(w, dev), table.objs[w], direction),
        )
        right = table.mapped is not None and table.mapped[0] == dev and direction is not Dir.NONE
        assert native.ok == right, native.describe()

    @rule(
        op=st.sampled_from(["fail_maps", "reserve_iova", "clear_faults", "refused_close"]),
        dev=st.sampled_from(DEVICES),
        nth=st.integers(1, 3),
        errno_value=st.sampled_from([12, 22, 5]),
        start_granule=st.integers(1, 1 << 12),
        n_granules=st.integers(1, 8),
    )
    def admin(
        self, op: str, dev: str, nth: int, errno_value: int, start_granule: int, n_granules: int
    ) -> None:
        """Fault injection on a device's next map calls, an IOVA reservation, a clear of the
        fault log (the total keeps counting), or close() calls that must be refused."""
        if op == "fail_maps":
            self.both(
                "fail_maps", lambda w: self.dev(w, dev).fail_maps(nth=nth, errno_value=errno_value)
            )
        elif op == "reserve_iova":
            self.both(
                "reserve_iova",
                lambda w: self.worlds[w].iommu.reserve_iova(
                    start_granule * GRANULE, n_granules * GRANULE
                ),
            )
        elif op == "clear_faults":
            totals = self.fault_totals()
            self.both("clear_faults", lambda w: self.worlds[w].iommu.clear_faults())
            assert self.worlds[0].iommu.faults() == [] and self.fault_totals() == totals
        else:
            # Memory and IOMMU have users; a device with tables mapped by hand refuses too,
            # and a refused close changes nothing (no unbind, no revoked SGTable).
            for what, close in (
                ("PhysicalMemory.close", lambda w: self.worlds[w].mem.close()),
                ("Iommu.close", lambda w: self.worlds[w].iommu.close()),
            ):
                native, _ = self.both(what, close)
                assert isinstance(native.exc, sg.BusyError), (what, native.describe())
            busy = [t.mapped[0] for t in self.tables if t.mapped is not None]
            if busy:
                key = pick(busy, nth)
                native, _ = self.both(f"Device.close({key})", lambda w: self.dev(w, key).close())
                assert isinstance(native.exc, sg.BusyError), native.describe()
                assert self.dev(0, key).bound == self.bound[key]

    # -- device-side access ---------------------------------------------------------------
    def stream_offset(self, segs: List[Tuple[int, int]], j: int) -> int:
        return sum(n for _, n in segs[:j])

    @precondition(lambda self: self.mapped_items())
    @rule(
        m=INDEX,
        j=INDEX,
        at=INDEX,
        n=st.integers(1, 3 * PAGE),
        write=st.booleans(),
        seed=st.integers(0, 2**32),
    )
    def device_access_valid(self, m: int, j: int, at: int, n: int, write: bool, seed: int) -> None:
        """A device access inside one DMA segment of a live mapping."""
        item = pick(self.mapped_items(), m)
        segs = self.segment_rows(item.raws[0])
        j %= len(segs)
        addr, seg_len = segs[j]
        at %= seg_len
        n = min(n, seg_len - at)
        data = random.Random(seed).randbytes(n)
        totals = self.fault_totals()
        if write:
            native, _ = self.both(
                f"dma_write({addr + at:#x}, {n})",
                lambda w: self.dev(w, item.dev).dma_write(addr + at, data),
            )
        else:
            native, _ = self.both(
                f"dma_read({addr + at:#x}, {n})",
                lambda w: self.dev(w, item.dev).dma_read(addr + at, n),
            )
        allowed = item.dev == "direct" or (may_write if write else may_read)(item.direction)
        if not allowed:
            assert isinstance(native.exc, sg.IommuFault), native.describe()
            assert native.exc.fault_reason == "no permission"
            assert native.exc.iova == addr + at
            assert self.fault_totals() == (totals[0] + 1, totals[1] + 1)
            prot = sg.IOMMU_READ if may_read(item.direction) else sg.IOMMU_WRITE
            last = self.worlds[0].iommu.faults()[-1]
            assert (last.iova, last.access, last.reason, last.prot) == (
                addr + at,
                "write" if write else "read",
                "no permission",
                prot,
            ), last
            return
        assert native.ok, native.describe()
        assert self.fault_totals() == totals
        skip = self.stream_offset(segs, j) + at
        cpu = self.value(
            "copy_to_buffer at the DMA offset",
            lambda w: item.raws[w].copy_to_buffer(self.worlds[w].mem, n, skip),
        )
        if write:
            if not self.has_duplicate_pages(item.raws[0]):
                assert cpu == data, "the device's write is not where the CPU sees it"
        else:
            assert native.value == cpu, "the device read other bytes than the CPU sees"

    @precondition(lambda self: self.mapped_items())
    @rule(
        m=INDEX,
        extra=st.sampled_from([0, 0, -1, 1, -100]),
        write=st.booleans(),
        seed=st.integers(0, 2**32),
    )
    def device_table_access(self, m: int, extra: int, write: bool, seed: int) -> None:
        """dma_read_table / dma_write_table over the whole mapping (or a byte more)."""
        item = pick(self.mapped_items(), m)
        total = sum(n for _, n in self.segment_rows(item.raws[0]))
        n = max(0, total + extra)
        data = random.Random(seed).randbytes(n)
        if write:
            native, _ = self.both(
                f"dma_write_table({n})",
                lambda w: self.dev(w, item.dev).dma_write_table(item.via[w], data),
            )
        else:
            native, _ = self.both(
                f"dma_read_table({n})",
                lambda w: self.dev(w, item.dev).dma_read_table(item.via[w], n),
            )
        if n > total:
            assert isinstance(native.exc, sg.InvalidArgument), native.describe()
            return
        allowed = item.dev == "direct" or (may_write if write else may_read)(item.direction)
        if n and not allowed:
            assert isinstance(native.exc, sg.IommuFault), native.describe()
            return
        assert native.ok, native.describe()
        cpu = self.value(
            "copy_to_buffer of the table",
            lambda w: item.raws[w].copy_to_buffer(self.worlds[w].mem, n),
        )
        if write:
            assert native.value == n
            if not self.has_duplicate_pages(item.raws[0]):
                assert cpu == data
        else:
            assert native.value == cpu

    @rule(
        dev=st.sampled_from(DEVICES),
        write=st.booleans(),
        n=st.integers(1, 2 * PAGE),
        kind=st.sampled_from(
            ["zero", "aperture", "cached", "past_segment", "random", "above_mask", "beyond_memory"]
        ),
        r=INDEX,
        seed=st.integers(0, 2**32),
        burst=mostly(st.just(0), st.just(150), 1),
    )
    def device_access_invalid(
        self, dev: str, write: bool, n: int, kind: str, r: int, seed: int, burst: int
    ) -> None:
        """Device accesses at addresses that are (or may be) outside every mapping: both
        engines fault alike, and where the address is surely unmapped, they must fault.
        A burst first repeats the access, to wrap the 256-record fault log around."""
        assert self.cfg is not None
        mem_bytes = self.cfg.mem_pages * self.page
        mask = self.limits(dev)["dma_mask"]
        aperture = 1 << self.cfg.aperture_bits
        live = self.worlds[0].iommu.iova_ranges()
        if kind == "zero":
            addr = r % GRANULE  # IOVA 0 is never handed out
        elif kind == "aperture":
            addr = aperture + r
        elif kind == "cached":
            cached = self.worlds[0].iommu.iova_ranges(live=False, cached=True)
            if not cached:
                return
            rng = pick(cached, r)
            addr = rng.start + (r // 7) % rng.size_bytes
        elif kind == "past_segment":
            items = self.mapped_items()
            if not items:
                return
            segs = self.segment_rows(pick(items, r).raws[0])
            a, length = pick(segs, r // 3)
            addr = a + length - (r % 16)
        elif kind == "above_mask":
            addr = min(mask + 1 + r, U64_MAX)
        elif kind == "beyond_memory":
            addr = mem_bytes + r
        else:
            addr = random.Random(seed).randrange(0, 1 << 64)
        # What must happen, where it can be told from the machine's own knowledge.
        expect: Optional[str] = None  # "ok", or the fault_reason the access must end in
        if addr > mask or n - 1 > mask - addr:
            # A device cannot emit an address above its mask, with an IOMMU or without.
            expect = "above the DMA mask"
        elif dev == "direct":
            expect = "outside memory" if addr + n > mem_bytes else "ok"
        elif n - 1 <= U64_MAX - addr:  # (a range wrapping past 2**64 is refused otherwise)
            if addr >= aperture:
                expect = "outside the aperture"
            elif not any(x.start <= addr < x.start + x.size_bytes for x in live):
                expect = "not mapped"  # every mapped page lies inside a live IOVA range
        data = random.Random(seed).randbytes(n)
        access = "write" if write else "read"
        if burst:  # the engines' fault logs are compared after the step
            for w in range(2):
                device = self.dev(w, dev)
                for _ in range(burst):
                    try:
                        device.dma_write(addr, data) if write else device.dma_read(addr, n)
                    except sg.ScatterlistError:
                        pass
        totals = self.fault_totals()
        if write:
            native, _ = self.both(
                f"dma_write({addr:#x}, {n}) [{kind}]",
                lambda w: self.dev(w, dev).dma_write(addr, data),
            )
        else:
            native, _ = self.both(
                f"dma_read({addr:#x}, {n}) [{kind}]", lambda w: self.dev(w, dev).dma_read(addr, n)
            )
        logged = self.fault_totals()
        if isinstance(native.exc, sg.IommuFault):
            assert native.exc.access == access
            if dev == "direct" or native.exc.fault_reason == "above the DMA mask":
                assert logged == totals, "a fault the IOMMU never saw was logged by it"
            else:
                assert logged == (totals[0] + 1, totals[1] + 1), "one fault, one log record"
                last = self.worlds[0].iommu.faults()[-1]
                assert (last.iova, last.access, last.reason) == (
                    native.exc.iova,
                    access,
                    native.exc.fault_reason,
                ), last
                assert last.seq == logged[0] - 1, last  # numbered from 0, never reset
                if last.reason != "no permission":
                    assert last.prot == 0, last
        else:
            assert logged == totals
        if expect == "ok":
            assert native.ok, f"{kind} {addr:#x}+{n}: {native.describe()}"
        elif expect is not None:
            assert isinstance(native.exc, sg.IommuFault), f"{kind} {addr:#x}: {native.describe()}"
            assert native.exc.fault_reason == expect, (kind, hex(addr), native.exc.fault_reason)
            assert native.exc.iova == addr
        if dev != "direct":
            self.both(f"iommu.lookup({addr:#x})", lambda w: self.worlds[w].iommu.lookup(addr))
            self.both(
                f"iommu.translate({addr:#x})",
                lambda w: self.worlds[w].iommu.translate(addr, access),
            )

    # -- owned SGTables and Devres --------------------------------------------------------
    @precondition(lambda self: any(r.owner is None for r in self.pages))
    @rule(i=INDEX, dev=st.sampled_from(DEVICES), direction=ANY_DIRECTION)
    def sgtable_new(self, i: int, dev: str, direction: Dir) -> None:
        used = {id(r) for t in self.tables for r in t.sources}
        candidates = [r for r in self.pages if r.owner is None and id(r) not in used]
        if not candidates:
            return
        rec = pick(candidates, i)
        free_before = self.free_page_counts()
        native, model = self.both(
            f"SGTable.new({dev}, {len(rec.pfns)} pages, {direction.name})",
            lambda w: sg.SGTable.new(self.dev(w, dev), rec.objs[w], direction),
            key=lambda t: [(e.dma_address, e.dma_len) for e in t],
        )
        limits = self.limits(dev)
        limit = min(limits["max_mapping_size"], limits["max_segment_size"], U32_MAX)
        limit = limit // self.page * self.page  # the CPU entries' limit: a page or more
        if not native.ok:
            if direction is Dir.NONE or limit == 0:
                assert isinstance(native.exc, sg.InvalidArgument), native.describe()
            elif not self.bound[dev]:
                assert isinstance(native.exc, sg.DeviceUnbound), native.describe()
            # On failure the pages stay the caller's.
            assert not rec.objs[0].closed and rec.objs[0]._life is not None
            assert self.free_page_counts() == free_before
            return
        assert self.bound[dev] and direction is not Dir.NONE
        table = native.value
        cpu = rows(table._raw.export_cpu(), 3)
        assert all(length <= limit for _, _, length in cpu), (cpu, limit)
        assert sorted(p for p in table._raw.page_pfns()) == sorted(rec.pfns)
        sgrec = SGRec((native.value, model.value), rec, dev, direction)
        rec.owner = sgrec
        self.sgtables.append(sgrec)

    @precondition(lambda self: self.sgtables)
    @rule(s=INDEX)
    def sgtable_use(self, s: int) -> None:
        rec = pick(self.sgtables, s)
        native, _ = self.both(
            "list(SGTable)", lambda w: [(e.dma_address, e.dma_len) for e in rec.objs[w]]
        )
        view, _ = self.both("SGTable.borrow().nents", lambda w: rec.objs[w].borrow().nents)
        if rec.revoked:
            assert isinstance(native.exc, sg.ClosedError) and "revoked" in str(native.exc)
            assert isinstance(view.exc, sg.ClosedError)
        else:
            assert native.ok and view.ok and view.value == len(native.value)
        self.both("SGTable.revoked", lambda w: rec.objs[w].revoked)
        assert rec.objs[0].revoked == rec.revoked

    @precondition(lambda self: self.sgtables)
    @rule(s=INDEX)
    def sgtable_close(self, s: int) -> None:
        rec = pick(self.sgtables, s)
        self.close_sgtable_rec(rec)

    def close_sgtable_rec(self, rec: SGRec) -> None:
        live = not rec.revoked
        block = self.block_of(rec.objs[0]._raw, rec.dev) if live and rec.dev != "direct" else None
        segs = self.segment_rows(rec.objs[0]._raw) if live else []
        free_before = self.free_page_counts()
        ranges_before = self.worlds[0].iommu.iova_ranges(cached=True, reserved=True)
        native, _ = self.both("SGTable.close", lambda w: rec.objs[w].close())
        assert native.ok, native.describe()
        self.both("SGTable.close again", lambda w: rec.objs[w].close())
        assert rec.objs[0].closed and rec.pages.objs[0].closed and rec.pages.objs[1].closed
        n = len(rec.pages.pfns)
        assert self.free_page_counts() == (free_before[0] + n, free_before[1] + n)
        after, _ = self.both("list(SGTable) after close", lambda w: list(rec.objs[w]))
        assert isinstance(after.exc, sg.ClosedError)
        if block is not None:
            self.check_block_unmapped(rec.dev, block, segs)
        elif not live:
            # Revoked earlier: closing must not unmap (or free IOVA) a second time.
            assert self.worlds[0].iommu.iova_ranges(cached=True, reserved=True) == ranges_before
        self.sgtables.remove(rec)
        self.pages.remove(rec.pages)

    @rule(
        dev=st.sampled_from(DEVICES),
        op=st.sampled_from(["unbind", "bind", "rebind"]),
        owner_of=st.one_of(st.none(), INDEX),
    )
    def unbind_bind(self, dev: str, op: str, owner_of: Optional[int]) -> None:
        """Unbind (revoking the device's owned SGTables), bind, or both in a row; owner_of
        picks the device of a live SGTable instead, where there is one."""
        live = [rec for rec in self.sgtables if not rec.revoked]
        if owner_of is not None and live:
            dev = pick(live, owner_of).dev
        if op in ("unbind", "rebind"):
            self.unbind(dev)
        if op in ("bind", "rebind"):
            self.both(f"bind({dev})", lambda w: self.dev(w, dev).bind())
            self.bound[dev] = True
            assert self.dev(0, dev).bound and self.dev(1, dev).bound

    def unbind(self, dev: str) -> None:
        owned = [s for s in self.sgtables if s.dev == dev and not s.revoked]
        blocks = [
            (s, self.block_of(s.objs[0]._raw, dev), self.segment_rows(s.objs[0]._raw))
            for s in owned
            if dev != "direct"
        ]
        hand_mapped = sum(1 for t in self.tables if t.mapped and t.mapped[0] == dev)
        native, _ = self.both(f"unbind({dev})", lambda w: self.dev(w, dev).unbind())
        assert native.ok, native.describe()
        # Each live owned table's mapping is released once, by this unbind; mappings made by
        # hand are not Devres resources and stay.
        assert native.value == len(owned), (native.value, len(owned))
        event(f"unbind revoked {min(len(owned), 3)}")
        self.bound[dev] = False
        for s in owned:
            s.revoked = True
            assert s.objs[0].revoked and s.objs[1].revoked
        for w in range(2):
            assert self.dev(w, dev).live_mappings == hand_mapped
            assert not self.dev(w, dev).bound
        for _s, block, segs in blocks:
            self.check_block_unmapped(dev, block, segs)
        again = self.value(f"unbind({dev}) again", lambda w: self.dev(w, dev).unbind())
        assert again == 0

    # -- invariants -------------------------------------------------------------------------
    @invariant()
    def engines_agree_on_state(self) -> None:
        if len(self.worlds) != 2:
            return
        self.both(
            "memory counters",
            lambda w: (self.worlds[w].mem.free_pages, self.worlds[w].mem.resident_pages),
        )
        self.both(
            "iommu counters",
            lambda w: (self.worlds[w].iommu.mapped_pages, self.worlds[w].iommu.fault_total),
        )
        self.both("iommu.faults()", lambda w: self.worlds[w].iommu.faults())
        self.both(
            "iommu.iova_ranges",
            lambda w: self.worlds[w].iommu.iova_ranges(cached=True, reserved=True),
        )
        for key in DEVICES:
            self.both(
                f"{key} state",
                lambda w: (
                    self.dev(w, key).live_mappings,
                    self.dev(w, key).bound,
                    self.dev(w, key).injected_failures,
                ),
            )
        for n, table in enumerate(self.tables):
            self.both(
                f"table {n} state",
                lambda w: (
                    table.objs[w].nents,
                    table.objs[w].orig_nents,
                    table.objs[w].total_nents,
                    table.objs[w].final,
                    table.objs[w].mapped,
                    table.objs[w].direction,
                    table.objs[w].export_cpu(),
                    table.objs[w].export_dma(table.objs[w].orig_nents),
                    table.objs[w].page_pfns(),
                ),
            )
        for n, rec in enumerate(self.sgtables):
            self.both(
                f"SGTable {n} state",
                lambda w: (
                    rec.objs[w].closed,
                    rec.objs[w].revoked,
                    rec.objs[w]._raw.export_cpu(),
                    rec.objs[w]._raw.export_dma(),
                ),
            )

    @invariant()
    def pages_are_held_or_free(self) -> None:
        if len(self.worlds) != 2:
            return
        held: List[int] = [p for rec in self.pages for p in rec.pfns]
        assert len(held) == len(set(held)), "two live Pages share a page"
        for w, world in enumerate(self.worlds):
            assert all(not rec.objs[w].closed for rec in self.pages)
            assert world.mem.free_pages == world.mem.n_pages - len(held), world.engine
            for table in self.tables:
                mine = {p for rec in table.sources for p in rec.pfns}
                covered = set(table.objs[w].page_pfns())
                assert covered <= mine, (world.engine, sorted(covered - mine))
        model_mem = self.worlds[1].mem._life.handle
        assert all(model_mem.is_allocated(p) for p in held)

    @invariant()
    def iova_ranges_belong_to_mapped_tables(self) -> None:
        if len(self.worlds) != 2:
            return
        items = self.mapped_items()
        for w, world in enumerate(self.worlds):
            iommu = world.iommu
            live = [r for r in iommu.iova_ranges() if r.state == "live"]
            assert all(r.state == "live" for r in iommu.iova_ranges())
            owners: Dict[int, int] = {}
            expected_pages = 0
            for n, item in enumerate(items):
                raw = item.raws[w]
                assert raw.mapped, (world.engine, "the machine's mapping is gone")
                if item.dev == "direct":
                    continue
                start, iova_len = self.block_of(raw, item.dev)
                info = raw._engine.table_mapping(raw._life.handle)
                assert info is not None and (info[1], info[2]) == (start, iova_len), (
                    world.engine,
                    info,
                    start,
                    iova_len,
                )
                expected_pages += iova_len // GRANULE
                matches = [k for k, r in enumerate(live) if r.start == start]
                assert len(matches) == 1, (world.engine, hex(start), live)
                k = matches[0]
                assert k not in owners, (world.engine, "two tables in one IOVA range")
                owners[k] = n
                block = live[k]
                granules = iova_block_granules(iova_len)
                assert block.size_bytes == granules * GRANULE, (world.engine, block, iova_len)
                assert block.start % (roundup_pow2(granules) * GRANULE) == 0
                for addr, length in self.segment_rows(raw):
                    assert start <= addr and addr + length <= start + iova_len, (
                        world.engine,
                        hex(addr),
                        length,
                        hex(start),
                        iova_len,
                    )
            assert len(owners) == len(live), (world.engine, "a live IOVA range without table")
            assert iommu.mapped_pages == expected_pages, (
                world.engine,
                iommu.mapped_pages,
                expected_pages,
            )
            for key in DEVICES:
                expected = sum(1 for item in items if item.dev == key)
                assert world.devs[key].live_mappings == expected, (world.engine, key)


LockstepMachine.TestCase.settings = MACHINE_SETTINGS
TestLockstep = LockstepMachine.TestCase
