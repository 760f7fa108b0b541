"""The bad-input matrix: every public entry point, fed bad input, raises the documented
exception and changes nothing.

Each row of the matrix (``CASES``) is one failing call: a *target builder* (a function of a
fresh :class:`World` that returns the callable under test), the bad arguments, and the
exception the call must raise:

- (a) ``type``:    wrong types (str, float, None, bytes, object(), bool where an int is
                   expected, numpy floats) -> ``TypeError``;
- (b) ``range``:   negative, out-of-range and huge values (2**64, 2**100), misuse the
                   kernel would BUG/WARN on -> ``InvalidArgument`` (a ``ValueError``), or the
                   documented ``OutOfMemory`` / ``IommuFault``;
- (c) ``closed``:  closed memories, pages, tables, IOMMUs, devices, SGTable owners, borrowed
                   views, stale entries and iterators, unbound devices -> ``ClosedError``
                   (``DeviceUnbound`` is one);
- (d) ``foreign``: objects of another memory, IOMMU, device or engine -> ``InvalidArgument``;
                   objects still in use -> ``BusyError``.

For every row the runner snapshots all observable state of the world before the call
(memory free/resident pages and page contents, table exports and counters, IOMMU mapped
pages, IOVA ranges (live, cached, reserved) and fault log, device limits, binding and live
mappings, SGTable/Pages ownership, the dma-debug mode and counters) and asserts it is
identical afterwards, and that no bare OverflowError / AttributeError / KeyError /
IndexError / AssertionError / MemoryError escaped from the package.

Parameters that name one of a few choices (``direction``, ``layout``, ``access``,
``engine``, debug ``mode``, ``errno_value``) are documented to raise ``InvalidArgument``
for anything that is not one of them; for those, a wrong type may raise either
``TypeError`` or ``InvalidArgument`` (``CHOICE``), but it must raise.

Crash safety: the matrix runs in supervised child interpreters (one per engine, both at
once, started by the first case of the session); a case that kills the interpreter (a
segfault in the C core, say) is reported as that case's failure and the child is restarted
after it; a case that hangs in Python is interrupted by a timer after ``Case.timeout``
seconds and reported.  The children cap their address space so that a call that tries to
allocate terabytes fails fast instead of swapping, and run with dma-debug off
(``SCATTERLIST_DMA_DEBUG=off``) so the rows mean the same in every environment.  Set
``SCATTERLIST_MATRIX_INPROCESS=1`` to run the cases in the pytest process instead (for
debugging with pdb; a crash then takes pytest down).

To extend the matrix: add rows in the section of the API concerned (``Family`` registers
the valid call the rows vary, and ``test_base_calls_succeed`` checks that call works, so
every row fails because of its one bad argument).  ``test_matrix_covers_the_public_api``
fails when a public callable has no row and is not in ``ALLOW_LIST``.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import faulthandler
import functools
import hashlib
import inspect
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from array import array
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Type, Union

import numpy as np
import pytest

import scatterlist as sg
from scatterlist import DataDirection as Dir
from scatterlist import debug as sg_debug
from scatterlist import faults as sg_faults

PAGE = 4096
U32_MAX = (1 << 32) - 1
U63_MAX = (1 << 63) - 1
U64_MAX = (1 << 64) - 1
MEM_SIZE = 64 << 20  # the world's main memory: 64 MiB, 16384 pages

ExcSpec = Union[Type[BaseException], Tuple[Type[BaseException], ...]]

#: A wrong type for a "one of these choices" parameter: either class is documented.
CHOICE: Tuple[Type[BaseException], ...] = (TypeError, sg.InvalidArgument)

#: Never acceptable out of the package (a ScatterlistError subclass such as OutOfMemory is).
FORBIDDEN = (OverflowError, AttributeError, KeyError, IndexError, AssertionError, MemoryError)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
INPROCESS = os.environ.get("SCATTERLIST_MATRIX_INPROCESS", "") not in ("", "0")


class BadIndex:
    """An int-like whose ``__index__`` breaks its contract (returns a str)."""

    def __index__(self) -> Any:
        return "4096"

    def __repr__(self) -> str:
        return "BadIndex()"


#: Wrong types for an int parameter, each must raise TypeError.
WRONG_INT: List[Tuple[str, Any]] = [
    ("str", "4096"),
    ("float", 4096.0),
    ("None", None),
    ("bytes", b"\x00\x10"),
    ("object", object()),
    ("bool", True),
    ("np.float64", np.float64(4096.0)),
]

#: A bytes-like ``data`` argument of the wrong type -> TypeError.
WRONG_DATA: List[Tuple[str, Any]] = [
    ("str", "data"),
    ("None", None),
    ("int", 5),
    ("float", 1.5),
    ("object", object()),
    ("list", [1, 2, 3]),
    ("non-contiguous", memoryview(b"abcdefgh")[::2]),
]

#: Bad DMA directions: (label, value, exception, category).
DIR_BAD: List[Tuple[str, Any, ExcSpec, str]] = [
    ("NONE", Dir.NONE, sg.InvalidArgument, "range"),  # the kernel BUGs on DMA_NONE
    ("4", 4, sg.InvalidArgument, "range"),
    ("-1", -1, sg.InvalidArgument, "range"),
    ("2**64", 1 << 64, sg.InvalidArgument, "range"),
    ("str", "TO_DEVICE", CHOICE, "type"),
    ("None", None, CHOICE, "type"),
    ("object", object(), CHOICE, "type"),
    ("bool", True, CHOICE, "type"),  # bool where an int (enum) is expected
    ("float", 1.0, CHOICE, "type"),
]


def _num(value: int) -> str:
    """A readable label for a number: 2**64, 2**32-1, -1, 4097."""
    if value > 1 and value & (value - 1) == 0:
        return f"2**{value.bit_length() - 1}"
    if value > 1 and (value + 1) & value == 0:
        return f"2**{value.bit_length()}-1"
    return str(value)


def _range_probes(lo: int, hi: int) -> List[int]:
    """Values just outside [lo, hi], plus negative and huge ones."""
    values = {-1, lo - 1, hi + 1, 1 << 64, 1 << 100}
    return sorted(v for v in values if not lo <= v <= hi)


# ======================================================================================
# The world every case runs against (a fresh one per case)
# ======================================================================================


class World:
    """Memories, pages, tables, IOMMUs, devices and SGTables on the engine under test.

    The core is built eagerly; everything else (closed objects, objects of another memory
    or engine) is built on first use, before the state snapshot, and then becomes part of
    it."""

    def __init__(self, engine: str) -> None:
        self.engine = engine
        self.alien_engine = "model" if engine == "native" else "native"
        self.mem = sg.PhysicalMemory(MEM_SIZE, engine=engine)
        self.iommu = sg.Iommu(self.mem)
        self.dev = sg.Device(self.mem, self.iommu, name="dev")
        self.direct = sg.Device(self.mem, name="direct")  # no IOMMU: DMA = phys
        self.pages = self.mem.alloc_pages(4, "scattered")  # open, owned by nobody
        self.table = sg.alloc_table_from_pages(self.pages.pfns, engine=engine)  # 4 entries
        self.mapped_pages = self.mem.alloc_pages(3, "scattered")
        self.mapped = sg.alloc_table_from_pages(self.mapped_pages.pfns, engine=engine)
        sg.dma_map_sgtable(self.dev, self.mapped, Dir.BIDIRECTIONAL)  # mapped by hand
        for index, pfn in enumerate(list(self.pages) + list(self.mapped_pages)):
            self.mem.write(pfn * PAGE, bytes([0xA0 + index]) * 64)
        self.entry = self.table.entries()[0]  # a live view

    # -- handy values ---------------------------------------------------------------------
    @property
    def mapped_iova(self) -> int:
        """The IOVA where ``mapped`` starts (granule-aligned: its first entry has offset 0)."""
        return int(self.mapped.export_dma(1)[0])

    # -- more open objects ------------------------------------------------------------------
    @functools.cached_property
    def open_table(self) -> sg.RawTable:
        """An append table still open for 4 more pages."""
        return sg.alloc_table_from_pages([1, 3], left_pages=4, engine=self.engine)

    @functools.cached_property
    def sgt_pages(self) -> sg.Pages:
        return self.mem.alloc_pages(2, "scattered")

    @functools.cached_property
    def sgt(self) -> sg.SGTable:
        """An SGTable[Owned] mapped for ``dev``; it owns ``sgt_pages``."""
        return sg.SGTable.new(self.dev, self.sgt_pages, Dir.BIDIRECTIONAL)

    @functools.cached_property
    def borrowed(self) -> sg.SGTable:
        return self.sgt.borrow()

    @functools.cached_property
    def raw_view(self) -> sg.SGTable:
        return sg.SGTable.from_raw(self.mapped)

    @functools.cached_property
    def huge_mem(self) -> sg.PhysicalMemory:
        """The largest memory there may be: 64 TiB (sparse, so it costs nothing)."""
        return sg.PhysicalMemory(1 << 46, engine=self.engine)

    @functools.cached_property
    def big_page_table(self) -> sg.RawTable:
        """A table of 8 KiB pages (the memories use 4 KiB pages)."""
        return sg.alloc_table_from_pages([1], page_size=8192, engine=self.engine)

    @functools.cached_property
    def far_table(self) -> sg.RawTable:
        """A table of a page of ``mem`` that lies outside the small memory ``mem2``."""
        return sg.alloc_table_from_pages([10_000], engine=self.engine)

    # -- closed objects ---------------------------------------------------------------------
    @functools.cached_property
    def closed_mem(self) -> sg.PhysicalMemory:
        mem = sg.PhysicalMemory(1 << 20, engine=self.engine)
        mem.close()
        return mem

    @functools.cached_property
    def closed_pages(self) -> sg.Pages:
        pages = self.mem.alloc_pages(1)
        pages.close()
        return pages

    @functools.cached_property
    def closed_table(self) -> sg.RawTable:
        table = sg.alloc_table_from_pages([1, 3], engine=self.engine)
        self.closed_entry = table.entries()[0]
        self.closed_iter = iter(table)
        table.close()
        return table

    @functools.cached_property
    def stale_entry(self) -> sg.SGEntry:
        """An entry of a table that changed (an append) after the entry was read."""
        table = sg.alloc_table_from_pages([1], left_pages=1, engine=self.engine)
        entry = table.entries()[0]
        table.append_pages([5])
        self.stale_owner = table
        return entry

    @functools.cached_property
    def closed_iommu(self) -> sg.Iommu:
        iommu = sg.Iommu(self.mem)
        iommu.close()
        return iommu

    @functools.cached_property
    def closed_dev(self) -> sg.Device:
        dev = sg.Device(self.mem, self.iommu, name="closed")
        dev.close()
        return dev

    @functools.cached_property
    def closed_sgt(self) -> sg.SGTable:
        """A closed SGTable owner; ``closed_borrowed`` is a view taken before it closed."""
        sgt = sg.SGTable.new(self.dev, self.mem.alloc_pages(2), Dir.TO_DEVICE)
        self.closed_borrowed = sgt.borrow()
        sgt.close()
        return sgt

    @functools.cached_property
    def unbound_dev(self) -> sg.Device:
        """An unbound device; unbinding revoked the mapping of ``revoked_sgt``."""
        dev = sg.Device(self.mem, self.iommu, name="unbound")
        self.revoked_sgt = sg.SGTable.new(dev, self.mem.alloc_pages(2), Dir.TO_DEVICE)
        dev.unbind()
        return dev

    @functools.cached_property
    def closed_raw_view(self) -> sg.SGTable:
        """A borrowed view (from_raw) of a RawTable that was closed afterwards."""
        table = sg.alloc_table_from_pages([1], engine=self.engine)
        view = sg.SGTable.from_raw(table)
        table.close()
        return view

    @functools.cached_property
    def freed_native_pointer(self) -> Any:
        """The ``struct sl_table *`` of a native table that was freed."""
        table = sg.alloc_table_from_pages([1], engine="native")
        pointer = table._life.handle
        table.close()
        return pointer

    @functools.cached_property
    def made_up_native_pointer(self) -> Any:
        from scatterlist._sg import ffi

        return ffi.cast("struct sl_table *", 0x1000)

    @functools.cached_property
    def int_pointer(self) -> Any:
        from scatterlist._sg import ffi

        return ffi.new("int *")

    # -- another memory of the same engine (1 MiB: 256 pages) ----------------------------------
    @functools.cached_property
    def mem2(self) -> sg.PhysicalMemory:
        return sg.PhysicalMemory(1 << 20, engine=self.engine)

    @functools.cached_property
    def iommu2(self) -> sg.Iommu:
        return sg.Iommu(self.mem2)

    @functools.cached_property
    def dev2(self) -> sg.Device:
        return sg.Device(self.mem2, self.iommu2, name="dev2")

    @functools.cached_property
    def pages2(self) -> sg.Pages:
        return self.mem2.alloc_pages(2)

    @functools.cached_property
    def table2(self) -> sg.RawTable:
        """A table of ``pages2`` (pages of ``mem2``)."""
        return sg.alloc_table_from_pages(self.pages2.pfns, engine=self.engine)

    # -- objects of the other engine --------------------------------------------------------------
    @functools.cached_property
    def amem(self) -> sg.PhysicalMemory:
        return sg.PhysicalMemory(1 << 20, engine=self.alien_engine)

    @functools.cached_property
    def aiommu(self) -> sg.Iommu:
        return sg.Iommu(self.amem)

    @functools.cached_property
    def adev(self) -> sg.Device:
        return sg.Device(self.amem, self.aiommu, name="alien")

    @functools.cached_property
    def apages(self) -> sg.Pages:
        return self.amem.alloc_pages(2)

    @functools.cached_property
    def atable(self) -> sg.RawTable:
        return sg.alloc_table_from_pages([1, 3], engine=self.alien_engine)

    @functools.cached_property
    def amapped(self) -> sg.RawTable:
        """A table of the other engine, mapped for that engine's device."""
        table = sg.alloc_table_from_pages([1, 3], engine=self.alien_engine)
        sg.dma_map_sgtable(self.adev, table, Dir.TO_DEVICE)
        return table


# ======================================================================================
# Snapshots of observable state
# ======================================================================================


def _attempt(read: Callable[[], Any]) -> Any:
    """A value, or the name of the exception reading it raised (part of the state too)."""
    try:
        return read()
    except Exception as exc:  # noqa: BLE001 - the class is the observation
        return f"<raises {type(exc).__name__}>"


def _memory_state(mem: sg.PhysicalMemory) -> Dict[str, Any]:
    if mem.closed:
        return {"closed": True}
    span = min(mem.size, 64 * mem.page_size)  # every page the world allocates lies in here
    return {
        "closed": False,
        "free_pages": mem.free_pages,
        "resident_pages": mem.resident_pages,
        "contents": hashlib.sha1(mem.read(0, span)).hexdigest()[:16],
        # what close() consults: the Pages, IOMMUs and devices that pin this memory
        "pinned_by": mem._life.pinned_by(),
    }


def _table_state(table: sg.RawTable) -> Dict[str, Any]:
    if table.closed:
        return {"closed": True}
    return {
        "closed": False,
        "nents": table.nents,
        "orig_nents": table.orig_nents,
        "total_nents": table.total_nents,
        "final": table.final,
        "cpu": table.export_cpu().tolist(),
        "dma": table.export_dma(table.orig_nents).tolist(),
        "mapped": table.mapped,
        "direction": table.direction,
        "chunk_slots": table.chunk_slots(),
        "sg_nents": table.sg_nents(),
        "epoch": table._state.epoch,
    }  # the version SGEntry views and iterators check


def _iommu_state(iommu: sg.Iommu) -> Dict[str, Any]:
    if iommu.closed:
        return {"closed": True}
    return {
        "closed": False,
        "mapped_pages": iommu.mapped_pages,
        "fault_total": iommu.fault_total,
        "faults": iommu.faults(),
        "iova_ranges": iommu.iova_ranges(live=True, cached=True, reserved=True),
        "pinned_by": iommu._life.pinned_by(),
    }  # the devices on it


def _device_state(dev: sg.Device) -> Dict[str, Any]:
    if dev.closed:
        return {"closed": True}
    state = {
        "closed": False,
        "bound": dev.bound,
        "live_mappings": dev.live_mappings,
        "dma_mask": dev.dma_mask,
        "max_segment_size": dev.max_segment_size,
        "seg_boundary_mask": dev.seg_boundary_mask,
        "max_mapping_size": dev.max_mapping_size,
        "debug": dev.debug,
        "injected_failures": dev.injected_failures,
        "debug_error_count": dev.debug_error_count,
    }
    # the fault-injection state fail_maps() arms (no public getter)
    state["injection"] = dev._engine.device_injection(dev._life.handle)
    return state


def _pages_state(pages: sg.Pages) -> Dict[str, Any]:
    state = {"closed": pages.closed, "owned_by_an_SGTable": pages.owned}
    if not pages.closed:
        state.update(pfns=pages.pfns.tolist(), size=pages.size)
    return state


def _sgtable_state(table: sg.SGTable) -> Dict[str, Any]:
    return {
        "closed": table.closed,
        "revoked": table._life is not None and table.revoked,
        "nents": _attempt(lambda: table.nents),
        "orig_nents": _attempt(lambda: table.orig_nents),
        "segments": _attempt(lambda: [(e.dma_address, e.dma_len) for e in table.entries()]),
    }


def _entry_state(entry: sg.SGEntry) -> Dict[str, Any]:
    return {
        "fields": _attempt(
            lambda: (
                entry.index,
                entry.pfn,
                entry.offset,
                entry.length,
                entry.dma_address,
                entry.dma_len,
            )
        )
    }


_STATE_OF: List[Tuple[type, Callable[[Any], Any]]] = [
    (sg.PhysicalMemory, _memory_state),
    (sg.RawTable, _table_state),
    (sg.Iommu, _iommu_state),
    (sg.Device, _device_state),
    (sg.Pages, _pages_state),
    (sg.SGTable, _sgtable_state),
    (sg.SGEntry, _entry_state),
]


def snapshot(world: World) -> Dict[str, Dict[str, Any]]:
    """``{world attribute: {field: value}}`` for every object the world holds."""
    state: Dict[str, Dict[str, Any]] = {}
    for name, obj in sorted(vars(world).items()):
        for cls, read in _STATE_OF:
            if isinstance(obj, cls):
                state[name] = read(obj)
                break
    state["scatterlist.debug"] = {
        "mode": sg_debug.get_mode(),
        "error_count": sg_debug.error_count(),
        "records": len(sg_debug.dump()),
    }
    return state


def _diff(before: Dict[str, Dict[str, Any]], after: Dict[str, Dict[str, Any]]) -> List[str]:
    lines = []
    for obj in sorted(set(before) | set(after)):
        old, new = before.get(obj, {}), after.get(obj, {})
        for key in sorted(set(old) | set(new), key=str):
            if old.get(key, "<absent>") != new.get(key, "<absent>"):
                lines.append(
                    f"  w.{obj}.{key}: {_short(old.get(key, '<absent>'))}\n"
                    f"  {' ' * (len(obj) + len(key) + 3)} -> "
                    f"{_short(new.get(key, '<absent>'))}"
                )
    return lines


def _short(value: Any, limit: int = 400) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # noqa: BLE001 - a broken repr is itself worth showing
        text = f"<{type(value).__name__} whose repr raises {type(exc).__name__}: {exc}>"
    return text if len(text) <= limit else text[:limit] + "...'"


# ======================================================================================
# The matrix
# ======================================================================================


class R:
    """A reference to a world attribute (or a function of the world), resolved per case."""

    def __init__(self, ref: Union[str, Callable[[World], Any]]) -> None:
        self.ref = ref

    def resolve(self, world: World) -> Any:
        return getattr(world, self.ref) if isinstance(self.ref, str) else self.ref(world)

    def __repr__(self) -> str:
        return f"w.{self.ref}" if isinstance(self.ref, str) else "w.<expr>"


def _resolve(value: Any, world: World) -> Any:
    return value.resolve(world) if isinstance(value, R) else value


Target = Callable[[World], Callable[..., Any]]


@dataclass(frozen=True)
class Case:
    api: str  # the public callable it covers ("Device.dma_mask=" is a setter)
    category: str  # type | range | closed | foreign
    label: str  # what is bad about the call
    target: Target  # world -> the callable under test
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    expected: ExcSpec
    success_ok: bool = False  # the documented outcome may also be success (huge sizes)
    timeout: float = 10.0  # seconds before the child reports the case as hung
    headroom: int = 4 << 30  # address space the child may add while running the case

    @property
    def id(self) -> str:
        return f"{self.api}|{self.label}"


@dataclass
class Family:
    """The valid call a group of cases varies (checked by ``test_base_calls_succeed``)."""

    api: str
    target: Target
    args: Tuple[Any, ...] = ()
    kwargs: Dict[str, Any] = field(default_factory=dict)
    names: Tuple[str, ...] = ()  # names of positional args, for labels

    def _call_with(
        self, param: Union[int, str], value: Any
    ) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
        args, kwargs = list(self.args), dict(self.kwargs)
        if isinstance(param, int):
            args[param] = value
        else:
            kwargs[param] = value
        return tuple(args), kwargs

    def add(
        self,
        category: str,
        param: Union[int, str],
        label: str,
        value: Any,
        expected: ExcSpec,
        success_ok: bool = False,
    ) -> "Family":
        name = self.names[param] if isinstance(param, int) else param
        args, kwargs = self._call_with(param, value)
        CASES.append(
            Case(
                self.api,
                category,
                f"{name}={label}",
                self.target,
                args,
                kwargs,
                expected,
                success_ok,
            )
        )
        return self

    def ints(
        self,
        param: Union[int, str],
        *,
        none_ok: bool = False,
        lo: int = 0,
        hi: int = U64_MAX,
        also: Sequence[Tuple[Any, ...]] = (),
    ) -> "Family":
        """Wrong types -> TypeError; outside [lo, hi] -> InvalidArgument; ``also`` adds
        (label, value, exception[, success_ok]) rows of further bad values."""
        for label, value in WRONG_INT:
            if value is None and none_ok:
                continue
            self.add("type", param, label, value, TypeError)
        for value in _range_probes(lo, hi):
            self.add("range", param, _num(value), value, sg.InvalidArgument)
        for row in also:
            self.add("range", param, *row)
        return self

    def types(
        self, param: Union[int, str], rows: Sequence[Tuple[str, Any]], expected: ExcSpec = TypeError
    ) -> "Family":
        for label, value in rows:
            self.add("type", param, label, value, expected)
        return self

    def values(
        self, param: Union[int, str], rows: Sequence[Tuple[Any, ...]], category: str = "range"
    ) -> "Family":
        """Rows of (label, value, exception[, success_ok])."""
        for row in rows:
            self.add(category, param, *row)
        return self

    def directions(self, param: Union[int, str] = "direction") -> "Family":
        for label, value, expected, category in DIR_BAD:
            self.add(category, param, label, value, expected)
        return self


CASES: List[Case] = []
FAMILIES: List[Family] = []


def family(
    api: str, target: Target, *args: Any, names: Tuple[str, ...] = (), **kwargs: Any
) -> Family:
    fam = Family(api, target, args, kwargs, names)
    FAMILIES.append(fam)
    return fam


def case(
    api: str,
    category: str,
    label: str,
    target: Target,
    *args: Any,
    expected: ExcSpec,
    **kwargs: Any,
) -> None:
    """A single row that is not a variation of a family's valid call."""
    CASES.append(Case(api, category, label, target, args, kwargs, expected))


# -- target builders -----------------------------------------------------------------------


def method(obj: str, name: str) -> Target:
    return lambda w: getattr(getattr(w, obj), name)


def on_engine(func: Callable[..., Any]) -> Target:
    """A module function or constructor, on the engine under test."""
    return lambda w: functools.partial(func, engine=w.engine)


def plain(func: Callable[..., Any]) -> Target:
    return lambda w: func


def setter(obj: str, prop: str) -> Target:
    return lambda w: functools.partial(setattr, getattr(w, obj), prop)


def getter(obj: str, prop: str) -> Target:
    return lambda w: functools.partial(getattr, getattr(w, obj), prop)


def first_item(obj: str) -> Target:
    return lambda w: (lambda target: lambda: next(iter(target)))(getattr(w, obj))


def length(obj: str) -> Target:
    return lambda w: functools.partial(len, getattr(w, obj))


def next_of(obj: str) -> Target:
    return lambda w: functools.partial(next, getattr(w, obj))


def touching(extra: str, target: Target) -> Target:
    """``target``, after building ``extra`` so that its state is part of the snapshot."""
    return lambda w: (getattr(w, extra), target(w))[1]


# Bad objects where an object of a class is expected (TypeError) ----------------------------
def not_a(*world_objects: str) -> List[Tuple[str, Any]]:
    rows: List[Tuple[str, Any]] = [("None", None), ("int", 5), ("str", "x"), ("object", object())]
    return rows + [(name, R(name)) for name in world_objects]


BAD_PFNS: List[Tuple[str, Any, ExcSpec]] = [
    ("str", "0123", TypeError),
    ("bytes", b"\x00" * 8, TypeError),
    ("bytearray", bytearray(8), TypeError),
    ("None", None, TypeError),
    ("int", 5, TypeError),
    ("object", object(), TypeError),
    ("[float]", [1.5], TypeError),
    ("[str]", ["1"], TypeError),
    ("[None]", [None], TypeError),
    ("[object]", [object()], TypeError),
    ("[bool]", [True, 5], TypeError),  # bool where an int is expected
    ("np.bool_", np.array([True]), TypeError),
    ("np.float64", np.array([1.0]), TypeError),
    ("[]", [], sg.InvalidArgument),
    ("[-1]", [-1], sg.InvalidArgument),
    ("[2**64]", [1 << 64], sg.InvalidArgument),
    ("[2**100]", [1 << 100], sg.InvalidArgument),
    ("[2**52]", [1 << 52], sg.InvalidArgument),  # physical address past 2**63
    ("array-q[-1]", array("q", [-1]), sg.InvalidArgument),
    ("2-D", np.zeros((2, 2), dtype=np.uint64), sg.InvalidArgument),
]


def pfn_rows(fam: Family, param: str = "pfns") -> Family:
    for label, value, expected in BAD_PFNS:
        fam.add("type" if expected is TypeError else "range", param, label, value, expected)
    return fam


# ======================================================================================
# Rows, API by API
# ======================================================================================

# -- scatterlist.PhysicalMemory ---------------------------------------------------------
(
    family("PhysicalMemory()", on_engine(sg.PhysicalMemory), size=1 << 20, page_size=PAGE)
    .ints(
        "size",
        also=[
            ("0", 0, sg.InvalidArgument),
            ("4095", 4095, sg.InvalidArgument),
            ("4097", 4097, sg.InvalidArgument),
            ("2**46+4096", (1 << 46) + PAGE, sg.InvalidArgument),
            ("2**64-4096", (1 << 64) - PAGE, sg.InvalidArgument),
        ],
    )
    .ints(
        "page_size",
        hi=U32_MAX,
        also=[
            ("0", 0, sg.InvalidArgument),
            ("2048", 2048, sg.InvalidArgument),
            ("3000", 3000, sg.InvalidArgument),
            ("131072", 131072, sg.InvalidArgument),
        ],
    )
    .values(
        "engine",
        [
            ("'bogus'", "bogus", CHOICE),
            ("5", 5, CHOICE),
            ("bytes", b"native", CHOICE),
            ("object", object(), CHOICE),
        ],
        category="type",
    )
)
family("PhysicalMemory()", on_engine(sg.PhysicalMemory), size=3 * PAGE, page_size=PAGE).values(
    "page_size", [("8192-not-dividing-size", 8192, sg.InvalidArgument)]
)

(
    family(
        "PhysicalMemory.alloc_pages",
        method("mem", "alloc_pages"),
        n_pages=1,
        layout="scattered",
        seed=0,
    )
    .ints("n_pages", lo=1, hi=U63_MAX, also=[("2**20>free", 1 << 20, sg.OutOfMemory)])
    .values(
        "layout",
        [
            ("'bogus'", "bogus", sg.InvalidArgument),
            ("''", "", sg.InvalidArgument),
            ("1", 1, CHOICE),
            ("None", None, CHOICE),
            ("bytes", b"random", CHOICE),
            ("list", ["random"], CHOICE),
        ],
        category="type",
    )
    .ints("seed")
)

# 2**33 pages are free in a 64 TiB memory, but their pfn array (64 GiB) is more than the host
# has: documented as OutOfMemory ("host memory ran out"), promptly, with nothing allocated.
# (The child runs this row with 1 GiB of address space to spare: a small host; the 64 TiB
# memory's group directory alone reserves 256 MiB of address space.)
CASES.append(
    Case(
        "PhysicalMemory.alloc_pages",
        "range",
        "n_pages=2**33-more-than-host-memory",
        method("huge_mem", "alloc_pages"),
        (1 << 33, "contiguous"),
        {},
        sg.OutOfMemory,
        timeout=5.0,
        headroom=1 << 30,
    )
)

(
    family("PhysicalMemory.vmalloc", method("mem", "vmalloc"), size_bytes=100).ints(
        "size_bytes", lo=1, hi=U63_MAX, also=[("2**40>free", 1 << 40, sg.OutOfMemory)]
    )
)

(
    family("PhysicalMemory.read", method("mem", "read"), phys=0, n_bytes=16)
    .ints(
        "phys",
        also=[("end-of-memory", MEM_SIZE, sg.InvalidArgument), ("BadIndex", BadIndex(), TypeError)],
    )
    .ints(
        "n_bytes",
        hi=U63_MAX,
        also=[
            ("memory+1", MEM_SIZE + 1, sg.InvalidArgument),
            ("2**63-1", U63_MAX, sg.InvalidArgument),
        ],
    )
)
family("PhysicalMemory.read", method("mem", "read"), phys=0, n_bytes=2).values(
    "phys", [("2**64-1-wrapping", U64_MAX, sg.InvalidArgument)]
)

(
    family("PhysicalMemory.write", method("mem", "write"), phys=0, data=b"abc")
    .ints(
        "phys",
        also=[
            ("end-of-memory", MEM_SIZE, sg.InvalidArgument),
            ("2**64-1-wrapping", U64_MAX, sg.InvalidArgument),
        ],
    )
    .types("data", WRONG_DATA)
)
family("PhysicalMemory.write", method("mem", "write"), phys=MEM_SIZE - 1, data=b"a").values(
    "data", [("past-the-end", b"ab", sg.InvalidArgument)]
)

case(
    "PhysicalMemory.close",
    "foreign",
    "pages-still-open",
    method("mem", "close"),
    expected=sg.BusyError,
)
case(
    "PhysicalMemory.close",
    "foreign",
    "devices-still-open",
    lambda w: (w.pages.close(), w.mapped_pages.close(), w.mem.close)[2],
    expected=sg.BusyError,
)
for _name, _call in [
    ("free_pages", getter("closed_mem", "free_pages")),
    ("resident_pages", getter("closed_mem", "resident_pages")),
]:
    case(f"PhysicalMemory.{_name}", "closed", "closed-memory", _call, expected=sg.ClosedError)
case(
    "PhysicalMemory.alloc_pages",
    "closed",
    "closed-memory",
    method("closed_mem", "alloc_pages"),
    1,
    expected=sg.ClosedError,
)
case(
    "PhysicalMemory.vmalloc",
    "closed",
    "closed-memory",
    method("closed_mem", "vmalloc"),
    1,
    expected=sg.ClosedError,
)
case(
    "PhysicalMemory.read",
    "closed",
    "closed-memory",
    method("closed_mem", "read"),
    0,
    1,
    expected=sg.ClosedError,
)
case(
    "PhysicalMemory.write",
    "closed",
    "closed-memory",
    method("closed_mem", "write"),
    0,
    b"x",
    expected=sg.ClosedError,
)

# -- scatterlist.Pages ------------------------------------------------------------------------
case(
    "Pages.pfns", "closed", "closed-pages", getter("closed_pages", "pfns"), expected=sg.ClosedError
)
case(
    "Pages.__iter__", "closed", "closed-pages", first_item("closed_pages"), expected=sg.ClosedError
)
case(
    "Pages.close",
    "foreign",
    "owned-by-an-SGTable",
    touching("sgt", method("sgt_pages", "close")),
    expected=sg.BusyError,
)
# Pages, RawTable, SGEntry and SGTable are built by the package (alloc_pages,
# alloc_table_from_pages, entries(), SGTable.new); their constructors are still public.
case(
    "Pages()",
    "type",
    "memory=object",
    plain(sg.Pages),
    object(),
    array("Q", [1]),
    PAGE,
    expected=TypeError,
)
case(
    "Pages()",
    "type",
    "memory=None",
    plain(sg.Pages),
    None,
    array("Q", [1]),
    PAGE,
    expected=TypeError,
)

# -- scatterlist.alloc_table_from_pages ---------------------------------------------------
pfn_rows(family("alloc_table_from_pages", on_engine(sg.alloc_table_from_pages), pfns=[1, 2, 5]))
(
    family(
        "alloc_table_from_pages",
        on_engine(sg.alloc_table_from_pages),
        pfns=[1, 2, 5],
        offset=100,
        size=3 * PAGE - 200,
        max_segment=2 * PAGE,
        page_size=PAGE,
        left_pages=0,
    )
    .ints("offset", hi=U32_MAX, also=[("4096", PAGE, sg.InvalidArgument)])
    .ints(
        "size",
        none_ok=True,
        also=[
            ("0", 0, sg.InvalidArgument),
            ("past-last-page", 3 * PAGE, sg.InvalidArgument),
            ("before-last-page", 2 * PAGE - 100, sg.InvalidArgument),
        ],
    )
    .ints(
        "max_segment",
        none_ok=True,
        hi=U32_MAX,
        also=[("0", 0, sg.InvalidArgument), ("4095", 4095, sg.InvalidArgument)],
    )
    .ints(
        "page_size",
        hi=U32_MAX,
        also=[
            ("0", 0, sg.InvalidArgument),
            ("2048", 2048, sg.InvalidArgument),
            ("3000", 3000, sg.InvalidArgument),
            ("131072", 131072, sg.InvalidArgument),
        ],
    )
    .ints(
        "left_pages",
        also=[
            # n_pages + left_pages wraps past 2**64: must not crash (success or InvalidArgument)
            ("2**64-1", U64_MAX, sg.InvalidArgument, True),
            ("2**64-3", U64_MAX - 2, sg.InvalidArgument, True),
        ],
    )
    .values(
        "engine",
        [
            ("'bogus'", "bogus", CHOICE),
            ("5", 5, CHOICE),
            ("bytes", b"model", CHOICE),
            ("object", object(), CHOICE),
        ],
        category="type",
    )
)
family("alloc_table_from_pages", on_engine(sg.alloc_table_from_pages), pfns=[1]).values(
    "left_pages", [("2**64-1-after-one-page", U64_MAX, sg.InvalidArgument, True)]
)

# -- scatterlist.alloc_table_from_entries -------------------------------------------------
(
    family(
        "alloc_table_from_entries",
        on_engine(sg.alloc_table_from_entries),
        entries=[(1, 0, PAGE), (3, 100, 50)],
        page_size=PAGE,
    )
    .types(
        "entries",
        [
            ("None", None),
            ("int", 5),
            ("object", object()),
            ("bytes", b"abc"),
            ("str", "abc"),
            ("[(float)]", [(0, 0, 1.5)]),
            ("[(str)]", [("0", 0, 1)]),
            ("[object]", [object()]),
            ("[(bool)]", [(0, 0, True)]),
        ],
    )
    .values(
        "entries",
        [
            ("[]", [], sg.InvalidArgument),
            ("pair", [(1, 2)], sg.InvalidArgument),
            ("quad", [(1, 2, 3, 4)], sg.InvalidArgument),
            ("flat-not-triples", array("Q", [1, 2]), sg.InvalidArgument),
            ("2-D", np.zeros((2, 3), dtype=np.uint64), sg.InvalidArgument),
            ("length-0", [(0, 0, 0)], sg.InvalidArgument),
            ("length-2**32", [(0, 0, 1 << 32)], sg.InvalidArgument),
            ("length--1", [(0, 0, -1)], sg.InvalidArgument),
            ("pfn--1", [(-1, 0, 1)], sg.InvalidArgument),
            ("pfn-2**64", [(1 << 64, 0, 1)], sg.InvalidArgument),
            ("pfn-2**52", [(1 << 52, 0, 1)], sg.InvalidArgument),
            ("offset-2**32", [(0, 1 << 32, 1)], sg.InvalidArgument),
            ("offset-2**100", [(0, 1 << 100, 1)], sg.InvalidArgument),
        ],
    )
    .ints("page_size", hi=U32_MAX, also=[("3000", 3000, sg.InvalidArgument)])
    .values("engine", [("'bogus'", "bogus", CHOICE), ("5", 5, CHOICE)], category="type")
)

# -- scatterlist.RawTable -----------------------------------------------------------------
pfn_rows(family("RawTable.append_pages", method("open_table", "append_pages"), pfns=[7, 9]))
(
    family(
        "RawTable.append_pages",
        method("open_table", "append_pages"),
        pfns=[7, 9],
        size=PAGE + 10,
        left_pages=1,
    )
    .ints(
        "size",
        none_ok=True,
        also=[("0", 0, sg.InvalidArgument), ("past-last-page", 2 * PAGE + 1, sg.InvalidArgument)],
    )
    .ints(
        "left_pages",
        also=[
            ("2**64-1", U64_MAX, sg.InvalidArgument, True),
            ("2**64-2", U64_MAX - 1, sg.InvalidArgument, True),
        ],
    )
)
case(
    "RawTable.append_pages",
    "range",
    "final-table",
    method("table", "append_pages"),
    [9],
    expected=sg.InvalidArgument,
)
case(
    "RawTable.append_pages",
    "range",
    "mapped-final-table",
    method("mapped", "append_pages"),
    [9],
    expected=sg.InvalidArgument,
)

(
    family("RawTable.export_dma", method("table", "export_dma"), n_entries=2).ints(
        "n_entries", none_ok=True, hi=4
    )
)  # hi + 1 is orig_nents + 1
(
    family("RawTable.nents_for_len", method("table", "nents_for_len"), len_bytes=PAGE).ints(
        "len_bytes",
        also=[
            ("all+1", 4 * PAGE + 1, sg.InvalidArgument),
            ("2**64-1", U64_MAX, sg.InvalidArgument),
        ],
    )
)
family("RawTable.page_pfns", method("table", "page_pfns"), start=1).ints("start")

for _api, _fam in [
    (
        "RawTable.copy_to_buffer",
        family(
            "RawTable.copy_to_buffer",
            method("table", "copy_to_buffer"),
            memory=R("mem"),
            n_bytes=10,
            skip=5,
        ),
    ),
    (
        "RawTable.copy_from_buffer",
        family(
            "RawTable.copy_from_buffer",
            method("table", "copy_from_buffer"),
            memory=R("mem"),
            data=b"xyz",
            skip=5,
        ),
    ),
]:
    (
        _fam.types("memory", not_a("pages", "iommu", "table"))
        .values("memory", [("closed-memory", R("closed_mem"), sg.ClosedError)], category="closed")
        .values("memory", [("other-engine", R("amem"), sg.InvalidArgument)], category="foreign")
        .ints("skip")
    )
(
    family(
        "RawTable.copy_to_buffer", method("table", "copy_to_buffer"), memory=R("mem"), n_bytes=10
    ).ints(
        "n_bytes",
        none_ok=True,
        hi=U64_MAX,
        # documented: "Short if the table ends first" - huge n_bytes is not a reason to fail
        also=[
            ("2**62", 1 << 62, (sg.InvalidArgument, sg.OutOfMemory), True),
            ("2**63-1", U63_MAX, (sg.InvalidArgument, sg.OutOfMemory), True),
        ],
    )
)
(
    family(
        "RawTable.copy_from_buffer",
        method("table", "copy_from_buffer"),
        memory=R("mem"),
        data=b"xyz",
    ).types("data", WRONG_DATA)
)
for _api, _meth, _args in [
    ("RawTable.copy_to_buffer", "copy_to_buffer", (16,)),
    ("RawTable.copy_from_buffer", "copy_from_buffer", (b"abc",)),
]:
    case(
        _api,
        "foreign",
        "table-outside-this-memory",
        method("far_table", _meth),
        R("mem2"),
        *_args,
        expected=sg.InvalidArgument,
    )
    case(
        _api,
        "foreign",
        "table-of-other-page-size",
        method("big_page_table", _meth),
        R("mem"),
        *_args,
        expected=sg.InvalidArgument,
    )
    case(
        _api,
        "foreign",
        "other-engine-table",
        method("atable", _meth),
        R("mem"),
        *_args,
        expected=sg.InvalidArgument,
    )

case("RawTable.close", "foreign", "dma-mapped", method("mapped", "close"), expected=sg.BusyError)

# Closed tables: every reader and writer.
for _name, _target, _args in [
    ("nents", getter("closed_table", "nents"), ()),
    ("orig_nents", getter("closed_table", "orig_nents"), ()),
    ("total_nents", getter("closed_table", "total_nents"), ()),
    ("final", getter("closed_table", "final"), ()),
    ("mapped", getter("closed_table", "mapped"), ()),
    ("direction", getter("closed_table", "direction"), ()),
    ("__len__", length("closed_table"), ()),
    ("__iter__", first_item("closed_table"), ()),
    ("append_pages", method("closed_table", "append_pages"), ([9],)),
    ("export_cpu", method("closed_table", "export_cpu"), ()),
    ("counts", method("closed_table", "counts"), ()),
    ("export_dma", method("closed_table", "export_dma"), ()),
    ("entries", method("closed_table", "entries"), ()),
    ("dma_entries", method("closed_table", "dma_entries"), ()),
    ("chunk_slots", method("closed_table", "chunk_slots"), ()),
    ("sg_nents", method("closed_table", "sg_nents"), ()),
    ("nents_for_len", method("closed_table", "nents_for_len"), (1,)),
    ("page_pfns", method("closed_table", "page_pfns"), ()),
    ("copy_to_buffer", method("closed_table", "copy_to_buffer"), (R("mem"), 1)),
    ("copy_from_buffer", method("closed_table", "copy_from_buffer"), (R("mem"), b"x")),
]:
    case(f"RawTable.{_name}", "closed", "closed-table", _target, *_args, expected=sg.ClosedError)
case(
    "RawTable.__iter__",
    "closed",
    "iterator-after-close",
    touching("closed_table", next_of("closed_iter")),
    expected=sg.ClosedError,
)

# -- scatterlist.SGEntry (views) --------------------------------------------------------------
for _prop in ("index", "pfn", "offset", "length", "phys", "dma_address", "dma_len"):
    case(
        f"SGEntry.{_prop}",
        "closed",
        "table-closed",
        touching("closed_table", getter("closed_entry", _prop)),
        expected=sg.ClosedError,
    )
    case(
        f"SGEntry.{_prop}",
        "closed",
        "table-changed",
        getter("stale_entry", _prop),
        expected=sg.ClosedError,
    )
case(
    "SGEntry()",
    "type",
    "owner=object",
    plain(sg.SGEntry),
    object(),
    0,
    0,
    1,
    0,
    PAGE,
    0,
    0,
    expected=TypeError,
)
case(
    "RawTable()",
    "type",
    "engine=object",
    plain(sg.RawTable),
    object(),
    object(),
    PAGE,
    expected=TypeError,
)

# -- scatterlist.Iommu --------------------------------------------------------------------------
(
    family(
        "Iommu()", plain(sg.Iommu), R("mem"), PAGE, names=("memory", "granule"), aperture_bits=48
    )
    .types(0, not_a("pages", "table", "iommu"))
    .values(0, [("closed-memory", R("closed_mem"), sg.ClosedError)], category="closed")
    .ints(
        1,
        hi=U32_MAX,
        also=[
            ("0", 0, sg.InvalidArgument),
            ("2048", 2048, sg.InvalidArgument),
            ("3000", 3000, sg.InvalidArgument),
            ("8192>page", 8192, sg.InvalidArgument),
            ("131072", 131072, sg.InvalidArgument),
        ],
    )
    .ints(
        "aperture_bits",
        hi=64,
        also=[("0", 0, sg.InvalidArgument), ("12<=granule-bits", 12, sg.InvalidArgument)],
    )
)

(
    family("Iommu.map", method("iommu", "map"), iova=1 << 30, phys=0, size_bytes=PAGE, prot=3)
    .ints(
        "iova",
        also=[
            ("unaligned", (1 << 30) + 1, sg.InvalidArgument),
            ("2**48-outside-aperture", 1 << 48, sg.InvalidArgument),
        ],
    )
    .ints("phys", also=[("unaligned", 1, sg.InvalidArgument)])
    .ints("size_bytes", also=[("unaligned", 100, sg.InvalidArgument)])
    .ints("prot", hi=63, also=[("255", 255, sg.InvalidArgument)])
)
family("Iommu.map", method("iommu", "map"), iova=1 << 30, phys=0, size_bytes=2 * PAGE).values(
    "phys", [("wrapping-2**64", U64_MAX - PAGE + 1, sg.InvalidArgument)]
)
family("Iommu.map", method("iommu", "map"), iova=1 << 30, phys=0, size_bytes=2 * PAGE).values(
    "iova", [("crossing-aperture-end", (1 << 48) - PAGE, sg.InvalidArgument)]
)
case(
    "Iommu.map",
    "foreign",
    "iova-already-mapped",
    method("iommu", "map"),
    R("mapped_iova"),
    0,
    PAGE,
    expected=sg.BusyError,
)

(
    family("Iommu.unmap", method("iommu", "unmap"), iova=1 << 30, size_bytes=PAGE)
    .ints("iova", also=[("unaligned", (1 << 30) + 1, sg.InvalidArgument)])
    .ints("size_bytes", hi=U63_MAX, also=[("unaligned", 100, sg.InvalidArgument)])
)

(
    family("Iommu.translate", method("iommu", "translate"), iova=R("mapped_iova"), access="read")
    .ints("iova")
    .values(
        "access",
        [
            ("'exec'", "exec", sg.InvalidArgument),
            ("''", "", sg.InvalidArgument),
            ("1", 1, CHOICE),
            ("None", None, CHOICE),
            ("bytes", b"read", CHOICE),
            ("object", object(), CHOICE),
        ],
        category="type",
    )
)
family("Iommu.lookup", method("iommu", "lookup"), iova=R("mapped_iova")).ints("iova")

(
    family("Iommu.reserve_iova", method("iommu", "reserve_iova"), start=1 << 30, size_bytes=PAGE)
    .ints("start", also=[("unaligned", (1 << 30) + 1, sg.InvalidArgument)])
    .ints("size_bytes", lo=1, also=[("unaligned", 100, sg.InvalidArgument)])
)
family(
    "Iommu.reserve_iova", method("iommu", "reserve_iova"), start=(1 << 64) - PAGE, size_bytes=PAGE
).values("size_bytes", [("wrapping-past-2**64", 2 * PAGE, sg.InvalidArgument)])
case(
    "Iommu.reserve_iova",
    "foreign",
    "over-a-live-mapping",
    method("iommu", "reserve_iova"),
    R("mapped_iova"),
    PAGE,
    expected=sg.BusyError,
)

case(
    "Iommu.close", "foreign", "devices-still-open", method("iommu", "close"), expected=sg.BusyError
)
for _name, _target, _args in [
    ("mapped_pages", getter("closed_iommu", "mapped_pages"), ()),
    ("fault_total", getter("closed_iommu", "fault_total"), ()),
    ("map", method("closed_iommu", "map"), (1 << 30, 0, PAGE)),
    ("unmap", method("closed_iommu", "unmap"), (1 << 30, PAGE)),
    ("translate", method("closed_iommu", "translate"), (1 << 30,)),
    ("lookup", method("closed_iommu", "lookup"), (1 << 30,)),
    ("faults", method("closed_iommu", "faults"), ()),
    ("clear_faults", method("closed_iommu", "clear_faults"), ()),
    ("iova_ranges", method("closed_iommu", "iova_ranges"), ()),
    ("reserve_iova", method("closed_iommu", "reserve_iova"), (1 << 30, PAGE)),
]:
    case(f"Iommu.{_name}", "closed", "closed-iommu", _target, *_args, expected=sg.ClosedError)

# -- scatterlist.Device ---------------------------------------------------------------------------
_MASK_BAD = [
    ("0", 0, sg.InvalidArgument),
    ("0x7ff<page", 0x7FF, sg.InvalidArgument),
    ("0x1234-not-2**n-1", 0x1234, sg.InvalidArgument),
    ("0xffff0000", 0xFFFF0000, sg.InvalidArgument),
]
_MODE_BAD = [
    ("'loud'", "loud", sg.InvalidArgument),
    ("''", "", sg.InvalidArgument),
    ("5", 5, CHOICE),
    ("bytes", b"raise", CHOICE),
    ("object", object(), CHOICE),
]

(
    family(
        "Device()", plain(sg.Device), R("mem"), R("iommu"), names=("memory", "iommu"), name="new"
    )
    .types(0, not_a("iommu", "pages", "table"))
    .values(0, [("closed-memory", R("closed_mem"), sg.ClosedError)], category="closed")
    .values(
        0,
        [
            ("other-engine-memory", R("amem"), sg.InvalidArgument),
            ("memory-not-the-iommus", R("mem2"), sg.InvalidArgument),
        ],
        category="foreign",
    )
    .types(
        1, [("int", 5), ("str", "x"), ("object", object()), ("mem", R("mem")), ("dev", R("dev"))]
    )
    .values(1, [("closed-iommu", R("closed_iommu"), sg.ClosedError)], category="closed")
    .values(
        1,
        [
            ("iommu-of-other-memory", R("iommu2"), sg.InvalidArgument),
            ("other-engine-iommu", R("aiommu"), sg.InvalidArgument),
        ],
        category="foreign",
    )
    # A constructor that fails must not leave a half-built device registered with the memory
    # and the IOMMU (their close() would be refused while the exception is alive).
    .ints("dma_mask", also=_MASK_BAD)
    .ints("max_segment_size", lo=1, hi=U32_MAX)
    .ints("seg_boundary_mask", also=_MASK_BAD)
    .ints("max_mapping_size")
    .values("debug", _MODE_BAD, category="type")
)

for _prop, _kw in [
    ("dma_mask", {"also": _MASK_BAD}),
    ("max_segment_size", {"lo": 1, "hi": U32_MAX}),
    ("seg_boundary_mask", {"also": _MASK_BAD}),
    ("max_mapping_size", {}),
]:
    family(f"Device.{_prop}=", setter("dev", _prop), 0xFFFFFFFF, names=("value",)).ints(0, **_kw)  # type: ignore[arg-type]
    case(
        f"Device.{_prop}=",
        "closed",
        "closed-device",
        setter("closed_dev", _prop),
        0xFFFFFFFF,
        expected=sg.ClosedError,
    )
family("Device.debug=", setter("dev", "debug"), "warn", names=("value",)).values(
    0, _MODE_BAD, category="type"
)
case(
    "Device.debug=",
    "closed",
    "closed-device",
    setter("closed_dev", "debug"),
    "raise",
    expected=sg.ClosedError,
)

(
    family("Device.fail_maps", method("dev", "fail_maps"), nth=3, seed=7, errno_value=errno.EIO)
    .ints("nth", none_ok=True, lo=1)
    .ints("seed")  # checked after the countdown was armed?  the snapshot tells
    .values(
        "errno_value",
        [
            ("EPERM", errno.EPERM, sg.InvalidArgument),
            ("-ENOMEM", -errno.ENOMEM, sg.InvalidArgument),
            ("'ENOMEM'", "ENOMEM", CHOICE),
            ("None", None, CHOICE),
            ("12.0", float(errno.ENOMEM), CHOICE),
            ("object", object(), CHOICE),
        ],
        category="type",
    )
)
(
    family("Device.fail_maps", method("dev", "fail_maps"), probability=0.5, seed=7)
    .types(
        "probability", [("str", "0.5"), ("bytes", b"\x00"), ("object", object()), ("list", [0.5])]
    )
    .values(
        "probability",
        [
            ("-0.1", -0.1, sg.InvalidArgument),
            ("1.5", 1.5, sg.InvalidArgument),
            ("nan", math.nan, sg.InvalidArgument),
            ("inf", math.inf, sg.InvalidArgument),
            ("2**100", 1 << 100, sg.InvalidArgument),
        ],
    )
    .values("nth", [("with-probability", 1, sg.InvalidArgument)])
)

(
    family("Device.dma_read", method("direct", "dma_read"), dma_addr=0, n_bytes=16)
    .ints(
        "dma_addr",
        also=[
            ("above-dma_mask", 1 << 40, sg.IommuFault),
            ("outside-memory", MEM_SIZE, sg.IommuFault),
        ],
    )
    # a read larger than the mapping (or the memory) is a fault found before any allocation, on
    # both engines (the native one used to allocate first and raise a bare MemoryError)
    .ints(
        "n_bytes",
        also=[
            ("memory+1", MEM_SIZE + 1, sg.IommuFault),
            ("2**40", 1 << 40, sg.IommuFault),
            ("2**64-1", U64_MAX, sg.IommuFault),
        ],
    )
)
(
    family("Device.dma_write", method("direct", "dma_write"), dma_addr=0, data=b"abc")
    .ints("dma_addr", also=[("outside-memory", MEM_SIZE, sg.IommuFault)])
    .types("data", WRONG_DATA)
)

_DEV_TABLES_CLOSED = [
    ("closed-table", R("closed_table"), sg.ClosedError),
    ("closed-SGTable", R("closed_sgt"), sg.ClosedError),
    (
        "borrowed-of-closed-SGTable",
        R(lambda w: (w.closed_sgt, w.closed_borrowed)[1]),
        sg.ClosedError,
    ),
    ("revoked-SGTable", R(lambda w: (w.unbound_dev, w.revoked_sgt)[1]), sg.ClosedError),
    ("view-of-closed-table", R("closed_raw_view"), sg.ClosedError),
]
_DEV_TABLES_FOREIGN = [
    ("not-mapped", R("table"), sg.InvalidArgument),
    ("other-engine-table", R("atable"), sg.InvalidArgument),
    ("other-engine-mapped-table", R("amapped"), sg.InvalidArgument),
]
(
    family(
        "Device.dma_read_table",
        method("dev", "dma_read_table"),
        R("mapped"),
        100,
        names=("table", "n_bytes"),
    )
    .types(0, not_a("mem", "pages", "iommu"))
    .values(0, _DEV_TABLES_CLOSED, category="closed")
    .values(0, _DEV_TABLES_FOREIGN, category="foreign")
    .ints(
        1,
        none_ok=True,
        hi=1 << 40,
        also=[
            ("dma_length+1", 3 * PAGE + 1, sg.InvalidArgument),
            ("2**40", 1 << 40, sg.InvalidArgument),
        ],
    )
)
case(
    "Device.dma_read_table",
    "foreign",
    "mapped-for-another-device",
    method("direct", "dma_read_table"),
    R("mapped"),
    expected=sg.InvalidArgument,
)
(
    family(
        "Device.dma_write_table",
        method("dev", "dma_write_table"),
        R("mapped"),
        b"abc",
        names=("table", "data"),
    )
    .types(0, not_a("mem", "pages", "iommu"))
    .values(0, _DEV_TABLES_CLOSED, category="closed")
    .values(0, _DEV_TABLES_FOREIGN, category="foreign")
    .types(1, WRONG_DATA)
    .values(1, [("dma_length+1", b"x" * (3 * PAGE + 1), sg.InvalidArgument)])
)
case(
    "Device.dma_write_table",
    "foreign",
    "mapped-for-another-device",
    method("direct", "dma_write_table"),
    R("mapped"),
    b"abc",
    expected=sg.InvalidArgument,
)

# close() with a table still mapped by hand: refused, and so must change nothing (the
# device stays bound, owned SGTables stay mapped).
case(
    "Device.close",
    "foreign",
    "table-still-mapped",
    touching("sgt", method("dev", "close")),
    expected=sg.BusyError,
)
for _name, _target, _args in [
    ("bound", getter("closed_dev", "bound"), ()),
    ("limits", getter("closed_dev", "limits"), ()),
    ("live_mappings", getter("closed_dev", "live_mappings"), ()),
    ("dma_mask", getter("closed_dev", "dma_mask"), ()),
    ("max_segment_size", getter("closed_dev", "max_segment_size"), ()),
    ("seg_boundary_mask", getter("closed_dev", "seg_boundary_mask"), ()),
    ("max_mapping_size", getter("closed_dev", "max_mapping_size"), ()),
    ("injected_failures", getter("closed_dev", "injected_failures"), ()),
    ("fail_maps", method("closed_dev", "fail_maps"), ()),
    ("bind", method("closed_dev", "bind"), ()),
    ("unbind", method("closed_dev", "unbind"), ()),
    ("dma_read", method("closed_dev", "dma_read"), (0, 1)),
    ("dma_write", method("closed_dev", "dma_write"), (0, b"x")),
    ("dma_read_table", method("closed_dev", "dma_read_table"), (R("mapped"),)),
    ("dma_write_table", method("closed_dev", "dma_write_table"), (R("mapped"), b"x")),
]:
    case(f"Device.{_name}", "closed", "closed-device", _target, *_args, expected=sg.ClosedError)

# -- DMA mapping functions --------------------------------------------------------------------
_DEV_BAD = not_a("mem", "iommu", "table")


def _dma_family(
    api: str, func: Callable[..., Any], table: str, nents: Optional[int], not_mapped_ok: bool
) -> Family:
    direction = Dir.TO_DEVICE if table == "table" else Dir.BIDIRECTIONAL  # as mapped
    kwargs: Dict[str, Any] = {"dev": R("dev"), "table": R(table), "direction": direction}
    if nents is not None:
        kwargs["nents"] = nents
    fam = family(api, plain(func), **kwargs)
    (
        fam.types("dev", _DEV_BAD)
        .types("table", not_a("mem", "pages", "sgt") + [("list", [1, 3])])
        .directions()
        .values("dev", [("closed-device", R("closed_dev"), sg.ClosedError)], category="closed")
        .values("table", [("closed-table", R("closed_table"), sg.ClosedError)], category="closed")
        .values(
            "table",
            [
                ("other-engine-table", R("atable"), sg.InvalidArgument),
                ("other-engine-mapped-table", R("amapped"), sg.InvalidArgument),
            ],
            category="foreign",
        )
        .values("dev", [("other-engine-device", R("adev"), sg.InvalidArgument)], category="foreign")
    )
    if not not_mapped_ok:  # unmap and sync: the table must be mapped, for this device
        fam.values("table", [("not-mapped", R("table"), sg.InvalidArgument)], category="foreign")
        fam.values(
            "dev",
            [
                ("another-device", R("direct"), sg.InvalidArgument),
                ("device-of-other-memory", R("dev2"), sg.InvalidArgument),
            ],
            category="foreign",
        )
    if nents is not None:
        fam.ints(
            "nents",
            lo=1,
            hi=U32_MAX,
            also=[("orig_nents+1", (4 if table == "table" else 3) + 1, sg.InvalidArgument)],
        )
    return fam


for _api, _func, _nents in [
    ("dma_map_sgtable", sg.dma_map_sgtable, None),
    ("dma_map_sg", sg.dma_map_sg, 2),
]:
    _fam = _dma_family(_api, _func, "table", _nents, not_mapped_ok=True)
    (
        _fam.values(
            "dev", [("unbound-device", R("unbound_dev"), sg.DeviceUnbound)], category="closed"
        )
        .values(
            "table",
            [
                ("still-open-for-appends", R("open_table"), sg.InvalidArgument),
                ("of-other-page-size", R("big_page_table"), sg.InvalidArgument),
            ],
        )
        .values("table", [("already-mapped", R("mapped"), sg.BusyError)], category="foreign")
    )
    family(
        _api,
        plain(_func),
        R("dev2"),
        R("table2"),
        *([_nents] if _nents else []),
        Dir.TO_DEVICE,
        names=("dev", "table", "nents", "direction"),
    ).values(
        1,
        [("pages-outside-the-devices-memory", R("far_table"), sg.InvalidArgument)],
        category="foreign",
    )
for _api, _func, _nents in [
    ("dma_unmap_sgtable", sg.dma_unmap_sgtable, None),
    ("dma_sync_sgtable_for_cpu", sg.dma_sync_sgtable_for_cpu, None),
    ("dma_sync_sgtable_for_device", sg.dma_sync_sgtable_for_device, None),
    ("dma_unmap_sg", sg.dma_unmap_sg, 3),
    ("dma_sync_sg_for_cpu", sg.dma_sync_sg_for_cpu, 3),
    ("dma_sync_sg_for_device", sg.dma_sync_sg_for_device, 3),
]:
    _dma_family(_api, _func, "mapped", _nents, not_mapped_ok=False)

for _api, _func in [
    ("dma_sync_single_for_cpu", sg.dma_sync_single_for_cpu),
    ("dma_sync_single_for_device", sg.dma_sync_single_for_device),
]:
    (
        family(
            _api,
            plain(_func),
            dev=R("dev"),
            dma_addr=R("mapped_iova"),
            size=16,
            direction=Dir.BIDIRECTIONAL,
        )
        .types("dev", _DEV_BAD)
        .values("dev", [("closed-device", R("closed_dev"), sg.ClosedError)], category="closed")
        .ints("dma_addr")
        .ints("size", lo=1)
        .directions()
    )

(
    family("DMA_BIT_MASK", plain(sg.DMA_BIT_MASK), 32, names=("bits",)).ints(
        0, lo=1, hi=64, also=[("BadIndex", BadIndex(), TypeError)]
    )
)

# -- scatterlist.SGTable ---------------------------------------------------------------------
(
    family(
        "SGTable.new",
        plain(sg.SGTable.new),
        dev=R("dev"),
        pages=R("pages"),
        direction=Dir.FROM_DEVICE,
    )
    .types("dev", _DEV_BAD)
    .types("pages", not_a("mem", "table") + [("list", [1, 3]), ("pfns", R(lambda w: w.pages.pfns))])
    .directions()
    .values(
        "dev",
        [
            ("closed-device", R("closed_dev"), sg.ClosedError),
            ("unbound-device", R("unbound_dev"), sg.DeviceUnbound),
        ],
        category="closed",
    )
    .values("pages", [("closed-pages", R("closed_pages"), sg.ClosedError)], category="closed")
    .values(
        "pages",
        [
            ("owned-by-another-SGTable", R(lambda w: (w.sgt, w.sgt_pages)[1]), sg.BusyError),
            ("pages-of-other-memory", R("pages2"), sg.InvalidArgument),
            ("other-engine-pages", R("apages"), sg.InvalidArgument),
        ],
        category="foreign",
    )
    .values("dev", [("other-engine-device", R("adev"), sg.InvalidArgument)], category="foreign")
)

(
    family("SGTable.from_raw", plain(sg.SGTable.from_raw), R("mapped"), names=("raw",))
    .types(0, not_a("mem", "sgt", "pages") + [("int-pointer", R("int_pointer"))])
    .values(0, [("closed-table", R("closed_table"), sg.ClosedError)], category="closed")
    .values(
        0,
        [
            ("freed-native-pointer", R("freed_native_pointer"), sg.InvalidArgument),
            ("made-up-native-pointer", R("made_up_native_pointer"), sg.InvalidArgument),
        ],
        category="foreign",
    )
)
case("SGTable()", "type", "raw=object", plain(sg.SGTable), object(), expected=TypeError)

for _holder, _label, _needs in [
    ("closed_sgt", "closed-owner", None),
    ("closed_borrowed", "borrowed-of-closed-owner", "closed_sgt"),
    ("revoked_sgt", "owner-revoked-by-unbind", "unbound_dev"),
    ("closed_raw_view", "view-of-closed-table", None),
]:
    for _name, _build in [
        ("entries", lambda h: method(h, "entries")),
        ("nents", lambda h: getter(h, "nents")),
        ("orig_nents", lambda h: getter(h, "orig_nents")),
        ("borrow", lambda h: method(h, "borrow")),
        ("__iter__", lambda h: first_item(h)),
    ]:
        _target = _build(_holder)
        if _needs:
            _target = touching(_needs, _target)
        case(f"SGTable.{_name}", "closed", _label, _target, expected=sg.ClosedError)
case(
    "SGTable.pages",
    "closed",
    "closed-owner",
    getter("closed_sgt", "pages"),
    expected=sg.ClosedError,
)
# A borrowed view has no pages, device or direction of its own, and nothing to close.
for _holder in ("borrowed", "raw_view"):
    case(
        "SGTable.close",
        "foreign",
        f"{_holder}-view",
        method(_holder, "close"),
        expected=sg.InvalidArgument,
    )
    for _prop in ("pages", "device", "direction"):
        case(
            f"SGTable.{_prop}",
            "foreign",
            f"{_holder}-view",
            getter(_holder, _prop),
            expected=(sg.InvalidArgument, TypeError),
        )

(
    family("SGTable.copy_from_buffer", method("sgt", "copy_from_buffer"), data=b"abc", skip=5)
    .types("data", WRONG_DATA)
    .ints("skip")
)
(
    family("SGTable.copy_to_buffer", method("sgt", "copy_to_buffer"), n_bytes=16, skip=5)
    .ints(
        "n_bytes",
        none_ok=True,
        hi=U64_MAX,
        also=[("2**62", 1 << 62, (sg.InvalidArgument, sg.OutOfMemory), True)],
    )
    .ints("skip")
)
for _holder, _label, _needs in [
    ("closed_sgt", "closed-owner", None),
    ("revoked_sgt", "owner-revoked-by-unbind", "unbound_dev"),
]:
    for _name, _args in [
        ("copy_from_buffer", (b"x",)),
        ("copy_to_buffer", ()),
        ("sync_for_cpu", ()),
        ("sync_for_device", ()),
    ]:
        _target = method(_holder, _name)
        if _needs:
            _target = touching(_needs, _target)
        case(f"SGTable.{_name}", "closed", _label, _target, *_args, expected=sg.ClosedError)
for _holder in ("borrowed", "raw_view"):
    for _name, _args in [
        ("copy_from_buffer", (b"x",)),
        ("copy_to_buffer", ()),
        ("sync_for_cpu", ()),
        ("sync_for_device", ()),
    ]:
        case(
            f"SGTable.{_name}",
            "foreign",
            f"{_holder}-view",
            method(_holder, _name),
            *_args,
            expected=(sg.InvalidArgument, TypeError),
        )

# -- scatterlist.faults ---------------------------------------------------------------------


def _entered(context_manager_factory: Callable[..., Any]) -> Callable[..., Any]:
    """Call a context-manager factory, then enter and leave the context."""

    def run(*args: Any, **kwargs: Any) -> Any:
        with context_manager_factory(*args, **kwargs) as value:
            return value

    return run


_NOT_AN_IOMMU = not_a("mem", "dev", "table")
(
    family(
        "faults.exhaust_iova",
        plain(_entered(sg_faults.exhaust_iova)),
        R("iommu"),
        names=("iommu",),
        limit=1 << 33,
    )
    .types(0, _NOT_AN_IOMMU)
    .values(0, [("closed-iommu", R("closed_iommu"), sg.ClosedError)], category="closed")
    .ints("limit", none_ok=True)
)
for _api, _func, _extra in [
    ("faults.drop_mapping", sg_faults.drop_mapping, {}),
    ("faults.restrict_permissions", sg_faults.restrict_permissions, {"prot": sg.IOMMU_READ}),
]:
    _fam = (
        family(
            _api,
            plain(_func),
            R("iommu"),
            names=("iommu",),
            iova=R("mapped_iova"),
            size_bytes=PAGE,
            **_extra,
        )
        .types(0, _NOT_AN_IOMMU)
        .values(0, [("closed-iommu", R("closed_iommu"), sg.ClosedError)], category="closed")
        .ints("iova")
        .ints("size_bytes", lo=1, hi=1 << 62)
    )
    if _extra:
        _fam.ints("prot", hi=3)
        family(
            _api,
            plain(_func),
            R("iommu"),
            names=("iommu",),
            iova=R("mapped_iova"),
            size_bytes=PAGE,
            prot=sg.IOMMU_READ,
        ).values("iova", [("nothing-mapped", 1 << 30, sg.InvalidArgument)])
    # The largest size the range check admits: done (only mapped pages matter) or refused,
    # but not a walk over 2**50 granules.
    CASES.append(
        Case(
            _api,
            "range",
            "size_bytes=2**62-walk",
            plain(_func),
            (R("iommu"),),
            dict(iova=R("mapped_iova"), size_bytes=1 << 62, **_extra),
            sg.InvalidArgument,
            success_ok=True,
            timeout=1.0,
        )
    )

# -- scatterlist.debug ----------------------------------------------------------------------------
(
    family(
        "debug.set_mode",
        plain(sg_debug.set_mode),
        R(lambda w: sg_debug.get_mode()),
        names=("mode",),
    ).values(
        0,
        [
            ("'loud'", "loud", sg.InvalidArgument),
            ("''", "", sg.InvalidArgument),
            ("None", None, CHOICE),
            ("5", 5, CHOICE),
            ("bytes", b"raise", CHOICE),
            ("object", object(), CHOICE),
        ],
        category="type",
    )
)
for _api, _func in [
    ("debug.dump", sg_debug.dump),
    ("debug.device_error_count", sg_debug.device_error_count),
]:
    family(_api, plain(_func), R("dev"), names=("device",)).types(
        0,
        [
            ("int", 5),
            ("str", "dev"),
            ("object", object()),
            ("mem", R("mem")),
            ("iommu", R("iommu")),
            ("table", R("table")),
        ],
    )

_ids = [c.id for c in CASES]
assert len(_ids) == len(set(_ids)), sorted({i for i in _ids if _ids.count(i) > 1})


# ======================================================================================
# Running one case
# ======================================================================================


def _exc_names(expected: ExcSpec) -> str:
    classes = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(cls.__name__ for cls in classes)


def _call_text(case_: Case) -> str:
    if case_.api.endswith("="):  # a property setter
        return f"{case_.api[:-1]} = {_short(case_.args[0], 100)}"
    args = [_short(a, 100) for a in case_.args]
    args += [f"{k}={_short(v, 100)}" for k, v in case_.kwargs.items()]
    name = case_.api[:-2] if case_.api.endswith("()") else case_.api
    return f"{name}({', '.join(args)})"


def run_case(case_: Case, engine: str) -> None:
    """Run one row; AssertionError with the whole story if the package misbehaved."""
    world = World(engine)
    func = case_.target(world)
    args = tuple(_resolve(a, world) for a in case_.args)
    kwargs = {k: _resolve(v, world) for k, v in case_.kwargs.items()}
    before = snapshot(world)
    raised: Optional[BaseException] = None
    result: Any = None
    try:
        result = func(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - judged below
        raised = exc
    # Taken while the exception (and its traceback) is still alive, as in an except block.
    after = snapshot(world)
    problems = []
    where = f"{_call_text(case_)} on the {engine} engine"
    if raised is None:
        if not case_.success_ok:
            problems.append(
                f"{where}: returned {_short(result, 200)} instead of raising "
                f"{_exc_names(case_.expected)}"
            )
    elif isinstance(raised, FORBIDDEN) and not isinstance(raised, sg.ScatterlistError):
        problems.append(
            f"{where}: a bare {type(raised).__name__} escaped from the package "
            f"(expected {_exc_names(case_.expected)}): {raised!s:.300}\n"
            + "".join(traceback.format_exception(type(raised), raised, raised.__traceback__)[-4:])
        )
    elif not isinstance(raised, case_.expected):
        problems.append(
            f"{where}: raised {type(raised).__name__}: {raised!s:.300}; expected "
            f"{_exc_names(case_.expected)}"
        )
    if raised is not None or not case_.success_ok:
        changes = _diff(before, after)
        if changes:
            what = "the failed call" if raised is not None else "the call"
            problems.append(f"{where}: {what} changed state:\n" + "\n".join(changes))
    del raised
    if problems:
        raise AssertionError("\n".join(problems))


# ======================================================================================
# The supervised child interpreter
# ======================================================================================


def _cap_address_space(headroom: int) -> None:
    """Let this (child) process grow by ``headroom`` bytes at most: an attempt to allocate
    terabytes fails fast instead of swapping (Linux; elsewhere a no-op)."""
    try:
        import resource

        with open("/proc/self/status") as status:
            vm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    except (ImportError, OSError, StopIteration):
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm_kb * 1024 + headroom
    if hard == resource.RLIM_INFINITY or cap < hard:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


class CaseTimeout(BaseException):
    """Raised in the child by a timer when a case runs past its timeout."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise CaseTimeout()


def _child_main(in_path: str, out_path: str) -> None:
    with open(in_path) as request:
        job = json.load(request)
    by_id = {c.id: c for c in CASES}
    has_timer = hasattr(signal, "setitimer")
    if has_timer:
        signal.signal(signal.SIGALRM, _on_alarm)
    with open(out_path, "a") as out:
        for cid in job["ids"]:
            out.write(json.dumps({"id": cid, "event": "start"}) + "\n")
            out.flush()
            timeout = by_id[cid].timeout
            _cap_address_space(by_id[cid].headroom)
            # A Python-level hang is interrupted by the timer; one inside C is not, and the
            # faulthandler backstop then ends the child (reported by the parent as a hang).
            faulthandler.dump_traceback_later(timeout + 20, exit=True)
            if has_timer:
                signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                run_case(by_id[cid], job["engine"])
                status, message = "pass", ""
            except AssertionError as exc:
                status, message = "fail", str(exc)
            except CaseTimeout:
                status, message = (
                    "fail",
                    (
                        f"{by_id[cid].api} did not return within {timeout:g} s on the "
                        f"{job['engine']} engine (a hang on huge input):\n"
                        + "".join(traceback.format_exc().splitlines(True)[-6:])
                    ),
                )
            except BaseException:  # noqa: BLE001 - a broken world is reported, not hidden
                status, message = "error", traceback.format_exc()
            finally:
                if has_timer:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                faulthandler.cancel_dump_traceback_later()
            out.write(
                json.dumps({"id": cid, "event": "end", "status": status, "message": message}) + "\n"
            )
            out.flush()


_CHILD_CODE = (
    "import sys\n"
    "sys.path.insert(0, {tests!r})\n"
    "import test_bad_input_matrix as matrix\n"
    "matrix._child_main(sys.argv[1], sys.argv[2])\n"
)

_RESULTS: Dict[str, Dict[str, Dict[str, str]]] = {}


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _supervised_results(engine: str) -> Dict[str, Dict[str, str]]:
    """The results of every case on ``engine``; the first call runs the matrix for all
    engines, in concurrent child interpreters."""
    if engine not in _RESULTS:
        engines = ("native", "model") if engine in ("native", "model") else (engine,)
        with ThreadPoolExecutor(len(engines)) as pool:
            for name, results in zip(engines, pool.map(_run_children, engines)):
                _RESULTS[name] = results
    return _RESULTS[engine]


def _run_children(engine: str) -> Dict[str, Dict[str, str]]:
    """Run every case in a child interpreter; restart it after a case that kills it."""
    results: Dict[str, Dict[str, str]] = {}
    by_id = {c.id: c for c in CASES}
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.abspath(sg.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env["SCATTERLIST_DMA_DEBUG"] = "off"
    env.pop("SCATTERLIST_MATRIX_INPROCESS", None)
    code = _CHILD_CODE.format(tests=TESTS_DIR)
    with tempfile.TemporaryDirectory(prefix="sg-matrix-") as tmp:
        for attempt in range(len(CASES) + 1):
            pending = [c.id for c in CASES if c.id not in results]
            if not pending:
                break
            in_path = os.path.join(tmp, f"in{attempt}.json")
            out_path = os.path.join(tmp, f"out{attempt}.jsonl")
            with open(in_path, "w") as request:
                json.dump({"engine": engine, "ids": pending}, request)
            proc = subprocess.run(
                [sys.executable, "-X", "faulthandler", "-c", code, in_path, out_path],
                env=env,
                capture_output=True,
                text=True,
                timeout=sum(c.timeout + 20 for c in CASES),
            )
            started: Optional[str] = None
            finished: Optional[str] = None
            done_before = len(results)
            if os.path.exists(out_path):
                with open(out_path) as out:
                    for line in out:
                        if not line.endswith("\n"):
                            break  # torn last line of a dying child
                        event = json.loads(line)
                        if event["event"] == "start":
                            started = event["id"]
                        else:
                            results[event["id"]] = event
                            started, finished = None, event["id"]
            died = f"{_describe_exit(proc.returncode)}; stderr:\n{proc.stderr[-4000:]}"
            if started is not None:  # died (or hung in C) inside a case: that case's failure
                results[started] = {
                    "status": "crash",
                    "message": (
                        f"the interpreter died (or hung past "
                        f"{by_id[started].timeout + 20:g} s) running this case on the "
                        f"{engine} engine ({died}"
                    ),
                }
            elif proc.returncode != 0 and finished is not None:
                # Died between cases: in the clean-up of the last one (a finalizer freeing
                # memory a bad call corrupted, say).
                earlier = results[finished]
                results[finished] = {
                    "status": "crash",
                    "message": (
                        f"the interpreter died after this case returned, while its "
                        f"objects were freed, on the {engine} engine ({died}\n"
                        f"(before that, the case reported {earlier['status']}: "
                        f"{earlier['message'] or '-'})"
                    ),
                }
            elif len(results) == done_before:  # no progress: give up on the rest
                for cid in pending:
                    results.setdefault(
                        cid,
                        {
                            "status": "error",
                            "message": f"the matrix child failed before running this case ({died}",
                        },
                    )
                break
    return results


# ======================================================================================
# Tests
# ======================================================================================


@pytest.mark.parametrize("case_", CASES, ids=[c.id for c in CASES])
def test_bad_input(engine: str, case_: Case) -> None:
    if INPROCESS:
        run_case(case_, engine)
        return
    result = _supervised_results(engine)[case_.id]
    if result["status"] != "pass":
        pytest.fail(result["message"], pytrace=False)


def _summary(value: Any) -> Any:
    """An engine-independent picture of a result: values as they are, objects by type."""
    if isinstance(value, (bool, int, float, str, bytes, type(None))):
        return value
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return [_summary(item) for item in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return type(value).__name__


@pytest.mark.parametrize("fam", FAMILIES, ids=[f"{f.api}#{i}" for i, f in enumerate(FAMILIES)])
def test_base_calls_succeed(fam: Family) -> None:
    """The valid call each family varies works, and gives the same result on both engines:
    so its rows fail because of their one bad value, not because the base call is wrong."""
    results = []
    for engine in ("native", "model"):
        world = World(engine)
        func = fam.target(world)
        results.append(
            _summary(
                func(
                    *(_resolve(a, world) for a in fam.args),
                    **{k: _resolve(v, world) for k, v in fam.kwargs.items()},
                )
            )
        )
    assert results[0] == results[1]


#: Public callables with no row in the matrix, and why.
ALLOW_LIST = {
    # Pure getters of values fixed at construction: no arguments, never raise (also closed).
    "PhysicalMemory.engine",
    "PhysicalMemory.closed",
    "PhysicalMemory.page_size",
    "PhysicalMemory.size",
    "PhysicalMemory.n_pages",
    "Pages.closed",
    "Pages.memory",
    "Pages.size",
    "Pages.n_pages",
    "Pages.page_size",
    "Pages.__len__",
    "Pages.owned",
    "RawTable.engine",
    "RawTable.closed",
    "RawTable.page_size",
    "Iommu.closed",
    "Iommu.engine",
    "Iommu.memory",
    "Iommu.granule",
    "Iommu.aperture_bits",
    "Device.closed",
    "Device.name",
    "Device.engine",
    "Device.memory",
    "Device.iommu",
    "Device.debug",  # the mode string (a setter row covers debug=)
    "Device.debug_error_count",  # a count kept by the debug layer, readable after close
    "SGTable.closed",
    "SGTable.revoked",
    # Context-manager plumbing: __enter__ returns self, __exit__ is close() (rows cover close).
    "PhysicalMemory.__enter__",
    "PhysicalMemory.__exit__",
    "Pages.__enter__",
    "Pages.__exit__",
    "RawTable.__enter__",
    "RawTable.__exit__",
    "Iommu.__enter__",
    "Iommu.__exit__",
    "Device.__enter__",
    "Device.__exit__",
    "SGTable.__enter__",
    "SGTable.__exit__",
    # Module-level getters and the counter reset: no arguments.
    "debug.get_mode",
    "debug.error_count",
    "debug.reset_error_count",
    # Types whose constructors are plain data holders made by the package: exceptions,
    # enums (DataDirection(x) is the enum lookup itself), named tuples, type-state markers
    # and the dma-debug record.
    "ScatterlistError",
    "InvalidArgument",
    "OutOfMemory",
    "BusyError",
    "ClosedError",
    "DeviceUnbound",
    "MappingError",
    "IommuFault",
    "DmaApiError",
    "DmaApiWarning",
    "debug.DmaApiError",
    "debug.DmaApiWarning",
    "debug.DebugEntry",
    "debug.Finding",
    # The protocol the debug layer reaches devices through: a typing construct, not a call.
    "debug.DebugTarget()",
    "debug.DebugTarget.debug",
    "debug.DebugTarget.name",
    "DataDirection",
    "Reason",
    "FaultRecord",
    "IovaRange",
    "Owned()",
    "Borrowed()",
}

_DUNDERS = {"__init__", "__iter__", "__len__", "__enter__", "__exit__"}


def _is_data_type(cls: type) -> bool:
    return (
        issubclass(cls, (BaseException, enum.Enum))
        or dataclasses.is_dataclass(cls)
        or (issubclass(cls, tuple) and hasattr(cls, "_fields"))
    )


def _class_surface(prefix: str, cls: type) -> Set[str]:
    if _is_data_type(cls):
        return {prefix}
    names = {f"{prefix}()"}
    for attr, value in vars(cls).items():
        if attr.startswith("_") and attr not in _DUNDERS:
            continue
        if attr == "__init__":
            continue
        if isinstance(value, property):
            names.add(f"{prefix}.{attr}")
            if value.fset is not None:
                names.add(f"{prefix}.{attr}=")
        elif isinstance(value, functools.cached_property):
            names.add(f"{prefix}.{attr}")
        elif isinstance(value, (staticmethod, classmethod)) or inspect.isfunction(value):
            names.add(f"{prefix}.{attr}")
    return names


def public_surface() -> Set[str]:
    """Every public callable: the names in ``scatterlist.__all__`` and in the ``__all__`` of
    the public submodules it lists (``debug``, ``faults``), with each public class's
    constructor, methods, properties and property setters."""
    names: Set[str] = set()
    for name in sg.__all__:
        obj = getattr(sg, name)
        if inspect.ismodule(obj):
            for sub in obj.__all__:
                member = getattr(obj, sub)
                if inspect.isclass(member):
                    names |= _class_surface(f"{name}.{sub}", member)
                elif callable(member):
                    names.add(f"{name}.{sub}")
        elif inspect.isclass(obj):
            names |= _class_surface(name, obj)
        elif callable(obj):
            names.add(name)
    return names


def test_matrix_covers_the_public_api() -> None:
    surface = public_surface()
    covered = {c.api for c in CASES}
    missing = sorted(surface - covered - ALLOW_LIST)
    assert not missing, (
        f"public callables with no bad-input row (add rows or allow-list): {missing}"
    )
    unknown = sorted(covered - surface)
    assert not unknown, f"rows name callables that are not public: {unknown}"
    stale = sorted(ALLOW_LIST - surface)
    assert not stale, f"allow-listed names that are no longer public: {stale}"
    both = sorted(ALLOW_LIST & covered)
    assert not both, f"allow-listed names that do have rows (drop them from ALLOW_LIST): {both}"


def test_matrix_has_every_category() -> None:
    counts: Dict[str, int] = {}
    for c in CASES:
        counts[c.category] = counts.get(c.category, 0) + 1
    assert set(counts) == {"type", "range", "closed", "foreign"}, counts
