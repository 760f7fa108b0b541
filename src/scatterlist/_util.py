"""Argument conversion, and the one lifetime protocol every owner of an engine object uses.

Argument conversion comes first in every public call: ints through ``__index__`` (which may run
user code), page arrays into a form no other thread can change.  Only then does the call enter
the objects it uses, through their :class:`Lifetime`.
"""

from __future__ import annotations

import errno
import operator
import os
import sys
import threading
import time
import weakref
from array import array
from collections import Counter
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple, TypeVar, Union

from .errors import BusyError, ClosedError, InvalidArgument, OutOfMemory, Reason, error_for

# -- argument conversion ---------------------------------------------------------------------

# Buffer formats read as 64-bit pfns; signed ones too (a negative value reads as a huge pfn,
# which the engine's range check refuses).
_U64_FORMATS = {"Q", "L", "q", "l", "N", "n"}

PfnsLike = Union[Iterable[int], memoryview, "array[int]", Any]


def require_int(name: str, value: object) -> int:
    """``value`` as an exact int (through ``__index__``, as ``operator.index`` does);
    TypeError for anything else, bools included.  An int subclass comes back as a plain int,
    so that no user method (``__eq__``, ``__and__``...) runs later, inside a call."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        if hasattr(type(value), "__index__"):
            raise TypeError(f"{name}: __index__ did not return an int") from None
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None


def require_str(name: str, value: object) -> str:
    """``value`` as an exact str, without running a subclass's methods."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    return str.__str__(value)


def require_range(
    name: str, value: object, low: int, high: int, reason: Reason = Reason.NONE
) -> int:
    """``value`` as an int in [low, high], or InvalidArgument naming the argument."""
    number = require_int(name, value)
    if not low <= number <= high:
        if reason is not Reason.NONE:
            raise error_for(errno.EINVAL, reason, value=number)
        raise InvalidArgument(f"{name}={number} is out of range [{low}, {high}]")
    return number


def as_pfn_view(pfns: PfnsLike, name: str = "pfns") -> memoryview:
    """A 1-D ``memoryview`` of format ``Q`` holding the values of ``pfns``, which no other
    thread can change while an engine reads it.

    The C core reads a page array twice (a counting pass, then a filling pass) with the GIL
    released, so a caller's buffer, which another thread could write meanwhile, is copied
    once (one ``memcpy``); other sequences are converted once."""
    if isinstance(pfns, (str, bytes, bytearray)):
        raise TypeError(
            f"{name} must be a sequence or buffer of integers, not {type(pfns).__name__}"
        )
    try:
        view = memoryview(pfns)  # type: ignore[arg-type]
    except TypeError:
        view = None
    if view is not None:
        if view.ndim != 1:
            raise InvalidArgument(f"{name} must be one-dimensional, not {view.ndim}-D")
        if view.itemsize == 8 and view.format.lstrip("@=<") in _U64_FORMATS and view.c_contiguous:
            return memoryview(view.tobytes()).cast("Q")  # one copy, which nobody else holds
        try:
            items: Iterable[Any] = view.tolist()
        except NotImplementedError as exc:
            raise TypeError(f"{name}: unsupported buffer format {view.format!r}") from exc
    else:
        items = pfns
    if not isinstance(items, range):
        items = list(items)
        if any(isinstance(item, bool) for item in items):
            raise TypeError(f"{name} must hold integers, not bools")
    try:
        converted = array("Q", items)
    except OverflowError:
        values = list(items)
        for index, value in enumerate(values):
            if value < 0:
                raise InvalidArgument(f"{name}[{index}]={value} is negative") from None
        for index, value in enumerate(values):
            if value >= 1 << 64:
                raise InvalidArgument(f"{name}[{index}]={value} does not fit in 64 bits") from None
        raise
    except TypeError as exc:
        raise TypeError(f"{name} must hold integers: {exc}") from None
    return memoryview(converted)


T = TypeVar("T")


def allocating(produce: Callable[[], T]) -> T:
    """``produce()``, where a result buffer the host cannot allocate is OutOfMemory (the
    package's class, on both engines) rather than a bare MemoryError."""
    try:
        return produce()
    except MemoryError as exc:
        if isinstance(exc, OutOfMemory):
            raise
        raise error_for(errno.ENOMEM, Reason.NO_MEMORY) from None


# -- the lifetime protocol -------------------------------------------------------------------

#: Per thread, ``state = [depth, put_off, draining]``: how deep the thread is inside the
#: package (calls, holds, closes, teardowns), the work put off until it leaves (safety nets,
#: dma-debug reports: anything that must not run under a package lock), and whether its
#: outermost leave is running that work now.  ``_thread_states`` has every thread's list, for
#: the fork gate.
_DEPTH, _PUT_OFF, _DRAINING = 0, 1, 2
_local = threading.local()
_thread_states: Dict[int, List[Any]] = {}

#: The fork gate: while a fork waits for the calls in flight to leave the package, a thread
#: entering it (at depth 0) waits for the fork to be done -- except the forking thread itself,
#: which runs the at-fork hooks, signal handlers and safety nets of the collector meanwhile.
_forking = False
_fork_thread: Optional[int] = None
_fork_done = threading.Event()
_fork_done.set()
#: How long a fork waits for the calls in flight on other threads before it goes ahead; the
#: objects still in use then are unusable in the child.
FORK_WAIT_SECONDS = 2.0
#: Every wait of the package wakes this often to look again: a signal handler that forks
#: while its thread waits leaves the child's thread waiting on a lock or condition the child
#: replaced (and nobody will release or notify); it must see the new one, or the new state.
_WAIT_SLICE_SECONDS = 0.1


def _thread_state() -> List[Any]:
    try:
        state: List[Any] = _local.state
    except AttributeError:
        state = _local.state = [0, [], False]
        _thread_states[threading.get_ident()] = state
    return state


def _enter_package() -> None:
    state = _thread_state()
    state[_DEPTH] += 1
    # Raise the depth first, then look at the gate; the fork sets the gate first, then looks
    # at the depths: one of the two always sees the other.
    if state[_DEPTH] == 1 and _forking and _fork_thread != threading.get_ident():
        state[_DEPTH] -= 1
        while _forking and _fork_thread != threading.get_ident():
            _fork_done.wait(_WAIT_SLICE_SECONDS)
        state[_DEPTH] += 1


def _leave_package() -> None:
    state = _local.state
    state[_DEPTH] -= 1
    if not state[_DEPTH] and state[_PUT_OFF] and not state[_DRAINING]:
        _run_put_off(state)


def _run_put_off(state: List[Any]) -> None:
    """Run the work put off until this thread left the package, one item after the other:
    an item that enters and leaves the package again (a teardown does) or puts more off (the
    collector may strike inside it) adds to this loop, never a nested one."""
    put_off = state[_PUT_OFF]
    state[_DRAINING] = True
    try:
        while put_off:
            work = put_off.pop(0)
            try:
                work()
            except BaseException as exc:  # noqa: BLE001 - the caller's call has succeeded
                _report_unraisable(exc, f"work put off until the package was left ({work!r})")
    finally:
        state[_DRAINING] = False


def after_leaving(work: Callable[[], None]) -> None:
    """Run ``work`` once this thread is outside every package lock: now if it is outside the
    package, else when its outermost call leaves (failures go to ``sys.unraisablehook``).
    For what may run user code -- dma-debug's warnings, safety nets."""
    state = _thread_state()
    if state[_DEPTH]:
        state[_PUT_OFF].append(work)
        return
    try:
        work()
    except BaseException as exc:  # noqa: BLE001 - as when put off: nobody to raise it to
        _report_unraisable(exc, f"work run after leaving the package ({work!r})")


class _InPackage:
    """``with in_package():`` -- inside the package with no object entered: for a stretch
    of a call between its entries (the fork gate waits for it, and safety nets the collector
    runs meanwhile are put off until it ends)."""

    __slots__ = ()

    def __enter__(self) -> None:
        _enter_package()

    def __exit__(self, *exc: object) -> None:
        _leave_package()


_IN_PACKAGE = _InPackage()


def in_package() -> _InPackage:
    return _IN_PACKAGE


class EngineLock:
    """A lock of the model engine: another thread waits for it, but this thread taking it
    again is refused (BusyError).  The model runs Python while it holds the lock, so a signal
    handler or a ``__del__`` the collector runs there may call the package again, and would
    find the model's state half changed; the C core runs no Python inside its calls, so its
    locks never see this.  (The package's own safety nets are put off until the thread
    leaves the package; only user code calls in here.)"""

    __slots__ = ("_lock", "_owner", "_inside", "__weakref__")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: Optional[int] = None  # the thread holding it
        # Threads taking, holding or letting go of it: marked before the lock is taken and
        # unmarked after it is let go, so that a signal handler run on the thread at any
        # point in between (even as the acquire returns) is refused, never left waiting.
        self._inside: Set[int] = set()
        _fork_registry.add(self)

    def _reinit_after_fork(self) -> None:
        # A thread of the parent may have held it; the forking thread keeps it if it did.
        me = threading.get_ident()
        mine = self._owner == me
        self._lock = threading.Lock()
        self._inside = {me} if me in self._inside else set()
        if mine:
            self._lock.acquire()
        else:
            self._owner = None

    def __enter__(self) -> None:
        me = threading.get_ident()
        inside = self._inside
        if me in inside:
            raise BusyError(
                "the model engine is in the middle of a call on this thread: code run inside "
                "it (a signal handler, or a __del__ the collector ran) cannot call into it"
            )
        inside.add(me)
        try:
            while True:  # the current lock (see _WAIT_SLICE_SECONDS)
                lock = self._lock
                if lock.acquire(timeout=_WAIT_SLICE_SECONDS):
                    if lock is self._lock:
                        break
                    lock.release()
        except BaseException:
            self._inside.discard(me)
            raise
        self._owner = me

    def __exit__(self, *exc: object) -> None:
        self._owner = None
        self._lock.release()
        self._inside.discard(threading.get_ident())


#: Objects with locks that a forked child must re-create (a thread of the parent may have held
#: them at the fork): each has a ``_reinit_after_fork()`` method.
_fork_registry: "weakref.WeakSet[Any]" = weakref.WeakSet()


def reinit_after_fork(obj: Any) -> None:
    """Have ``obj._reinit_after_fork()`` called in every child this process forks."""
    _fork_registry.add(obj)


def _before_fork() -> None:
    """Close the gate and wait (a bounded time) until no other thread is inside the package,
    so that the child inherits every object between two calls, never in the middle of one."""
    global _forking, _fork_thread
    me = threading.get_ident()
    _fork_done.clear()
    _fork_thread = me
    _forking = True
    deadline = time.monotonic() + FORK_WAIT_SECONDS
    while time.monotonic() < deadline:
        alive = set(sys._current_frames())
        for tid in [tid for tid in list(_thread_states) if tid not in alive]:
            _thread_states.pop(tid, None)  # threads that have ended
        busy = [tid for tid, state in list(_thread_states.items()) if tid != me and state[0]]
        if not busy:
            return
        time.sleep(0.0005)


def _after_fork_in_parent() -> None:
    global _forking, _fork_thread
    _forking = False
    _fork_thread = None
    _fork_done.set()


def _after_fork_in_child() -> None:
    global _forking, _fork_done, _fork_thread
    _forking = False
    _fork_thread = None
    _fork_done = threading.Event()
    _fork_done.set()
    me = threading.get_ident()
    mine = _thread_states.get(me)
    _thread_states.clear()
    if mine is not None:
        _thread_states[me] = mine
    objects = list(_fork_registry)
    for obj in objects:
        obj._reinit_after_fork()
    for obj in objects:  # once every object knows whether it is usable
        settle = getattr(obj, "_settle_after_fork", None)
        if settle is not None:
            settle()


_OPEN = "open"
_CLOSING = "closing"  # close() is waiting for the calls in flight, or running its prepare
_RELEASED = "released"  # the owner is gone; destroyed once the last call and pin are
_DONE = "done"  # destroyed
_FORKED = "forked"  # in a forked child: it was in use by another thread at the fork

Teardown = Callable[[Any, bool], None]


def _new_sync() -> Tuple["threading.RLock", threading.Condition]:
    """A Lifetime's lock and the condition on it, replaced together (after a fork)."""
    lock = threading.RLock()
    return lock, threading.Condition(lock)


class Lifetime:
    """The lifetime of one engine object (a memory, an IOMMU, a device, a table, pages).

    * **Calls** enter it, after converting their arguments: ``with life as handle: ...``.
      Entering raises ClosedError once the object is closed.  A *shared* object (one whose
      engine side has its own locks) counts its calls in flight; an *exclusive* one (a table,
      whose engine side is not thread-safe) takes its mutex instead, so its calls run one at a
      time.  A call that uses several objects enters them in one order: memory, IOMMU,
      device, table.  Entering waits while a close decides (it may be refused) and for a
      table's call in flight, nothing else; a thread's first entry into the package also
      waits while a fork is waiting for the calls in flight to leave it (unless the thread
      is the one forking).
    * **Pins** are dependents whose engine side points at this one (a device on a memory):
      while pinned, the object is not destroyed and ``close()`` refuses with BusyError.
    * ``close()`` is idempotent, also when threads race on it (the later ones wait for the
      first).  It refuses with BusyError when called from inside a call on the same object on
      the same thread (a callback), while pinned, or when its ``prepare`` step raises (calls
      that waited meanwhile then go on); otherwise it waits for the calls in flight, then runs
      the teardown.
    * ``release()`` is for the owner's safety net (garbage collection, interpreter exit): it
      never waits and never raises; the teardown runs once no call is in flight and no pin is
      held, by whichever of the releaser, the last call or the last pin comes last.  Run on a
      thread that is inside the package (the collector strikes at any allocation), it is put
      off until that thread's outermost call leaves (``after_leaving``, as are the reports a
      teardown delivers: no user code runs under the package's locks).
    * ``use()`` lets a dependent that pins a shared object count as a call on it whatever
      its owner did (a map changing a device's IOMMU), so that a fork sees it in use.
    * ``hold()`` lets an exclusive object's dependents use it for their own teardown (a DMA
      mapping undoing itself on its table) whatever its state: it takes the mutex, and the
      dependent checks its own state first.

    The teardown runs exactly once, as ``teardown(handle, by_owner)``: ``by_owner`` is True for
    ``close()`` and False when the owner was dropped without closing.

    Locking: ``_sync`` is a lock and the condition on it, replaced together in a forked
    child.  The lock (re-entrant, so that a safety net the collector runs inside one of these
    sections may take it again) guards the state, the counts and the pins; hot paths take it
    directly, and every wait on the condition wakes every ``_WAIT_SLICE_SECONDS`` to look
    again.  An exclusive object's calls are counted by its mutex alone.
    """

    __slots__ = (
        "what",
        "handle",
        "_teardown",
        "_sync",
        "_state",
        "_calls",
        "_callers",
        "_pins",
        "_mutex",
        "_closer",
        "__weakref__",
    )

    def __init__(
        self, what: str, handle: Any, teardown: Teardown, *, exclusive: bool = False
    ) -> None:
        self.what = what
        self.handle = handle
        self._teardown = teardown
        self._sync = _new_sync()
        self._state = _OPEN
        self._calls = 0  # a shared object's calls in flight
        self._callers: Dict[int, int] = {}  # thread -> its calls in flight (shared)
        self._pins: "Counter[str]" = Counter()
        # Re-entrant only so that its owner can be told atomically (a call re-entering the
        # object, from a callback or a safety net, is refused, never waited for).
        self._mutex: Optional["threading.RLock"] = threading.RLock() if exclusive else None
        self._closer: Optional[int] = None  # the thread running close()
        _fork_registry.add(self)

    # -- state ------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once no new call may enter (closing, closed or released)."""
        return self._state is not _OPEN

    @property
    def destroyed(self) -> bool:
        return self._state is _DONE

    @property
    def forked(self) -> bool:
        """In a forked child: unusable, it was in use by another thread at the fork."""
        return self._state is _FORKED

    def pinned_by(self) -> str:
        """The dependents, for messages: ``"2 Pages, 1 Device"``."""
        with self._sync[0]:
            return ", ".join(
                f"{count} {kind}" for kind, count in sorted(self._pins.items()) if count
            )

    def _in_call_on_this_thread(self, tid: int) -> bool:
        if self._mutex is not None:
            return bool(self._mutex._is_owned())  # type: ignore[attr-defined]
        return tid in self._callers

    # -- calls ------------------------------------------------------------------------
    def __enter__(self) -> Any:
        _enter_package()  # before any lock: a fork in progress is waited for here
        try:
            return self._enter()
        except BaseException:
            _leave_package()
            raise

    def _enter(self) -> Any:
        mutex = self._mutex
        if mutex is not None:
            if mutex._is_owned():  # type: ignore[attr-defined]
                raise BusyError(
                    f"{self.what} is already in use by a call on this thread "
                    f"(a callback re-entering it)"
                )
            self._acquire_mutex()
            # A close takes this mutex before it decides anything; a release may come while
            # the call runs, and then the call tears down when it leaves (__exit__).
            if self._state is _OPEN:
                return self.handle
            self._exit_exclusive()
            raise self._closed_error()
        tid = threading.get_ident()
        lock, cond = self._sync
        with lock:
            # A close deciding (pins, prepare) may yet be refused: wait for its outcome
            # rather than fail, unless this thread is in a call on the object already.
            while self._state is _CLOSING and tid not in self._callers:
                self._refuse_if_closing_here(tid)
                cond.wait(_WAIT_SLICE_SECONDS)
            if self._state is _OPEN or self._state is _CLOSING:
                self._calls += 1
                callers = self._callers
                callers[tid] = callers.get(tid, 0) + 1
                return self.handle
        raise self._closed_error()

    def _closed_error(self) -> ClosedError:
        if self._state is _FORKED:
            return ClosedError(
                f"{self.what} was in use by another thread when the process forked: it "
                f"cannot be used in this child"
            )
        return ClosedError(f"{self.what} is closed")

    def __exit__(self, *exc: object) -> None:
        try:
            if self._mutex is not None:
                self._exit_exclusive()
                return
            tid = threading.get_ident()
            lock, cond = self._sync
            with lock:
                self._calls -= 1
                callers = self._callers
                depth = callers.get(tid, 1) - 1
                if depth > 0:
                    callers[tid] = depth
                else:
                    callers.pop(tid, None)
                if self._state is _OPEN:
                    return
                run = self._take_teardown()
                if self._state is _CLOSING and not self._calls:
                    cond.notify_all()  # the closer waits for the last call
            if run:
                self._run_teardown(False)
        finally:
            _leave_package()

    def _acquire_mutex(self) -> None:
        """Take the exclusive object's mutex, the current one: a fork (from a signal handler
        on this thread) while it waits replaces it in the child, where the old one may be
        held by a thread that is gone."""
        mutex = self._mutex
        assert mutex is not None
        if mutex.acquire(False) and mutex is self._mutex:
            return  # the usual case: free
        while True:
            if mutex._is_owned() or mutex.acquire(timeout=_WAIT_SLICE_SECONDS):  # type: ignore
                if mutex is self._mutex:
                    return
                mutex.release()
            mutex = self._mutex
            assert mutex is not None

    def _exit_exclusive(self) -> None:
        """Leave an exclusive object (its mutex held): a release that came meanwhile found
        the mutex taken, so the teardown is this thread's (or the next holder's)."""
        assert self._mutex is not None
        self._mutex.release()
        if self._state is _RELEASED:  # read after letting go: see release()
            self._tear_down_exclusive()

    def _tear_down_exclusive(self) -> None:
        """Tear a released exclusive object down if its mutex is free (else its holder will,
        when it leaves)."""
        assert self._mutex is not None
        # Inside the package from before the mutex to after it: what the teardown puts off
        # (its reports) runs once the mutex is free.
        _enter_package()
        try:
            if self._mutex._is_owned() or not self._mutex.acquire(blocking=False):  # type: ignore
                return  # a call of this thread (or another holder) tears down when it leaves
            try:
                with self._sync[0]:
                    run = self._take_teardown()
                if run:
                    self._run_teardown(False)
            finally:
                self._mutex.release()
        finally:
            _leave_package()

    def use(self) -> "_Use":
        """For a dependent that pins this shared object (a device its IOMMU): a call in
        flight for the fork gate and the teardown, entered whatever the owner did meanwhile
        (closed or dropped, the object lives on while pinned), and never waiting."""
        return _Use(self)

    def hold(self) -> "_Hold":
        """For an exclusive object's dependents: take its mutex whatever its state."""
        return _Hold(self)

    # -- pins -------------------------------------------------------------------------
    def pin(self, kind: str) -> None:
        """A dependent of ``kind`` now points at this object (the caller is in a call on it,
        which may still pin while a close or a release waits for it).  ClosedError once the
        object is destroyed."""
        with self._sync[0]:
            if self._state is _DONE:
                raise ClosedError(f"{self.what} is closed")
            self._pins[kind] += 1

    def unpin(self, kind: str) -> None:
        with self._sync[0]:
            self._pins[kind] -= 1
            if not self._pins[kind]:
                del self._pins[kind]
            run = self._mutex is None and self._take_teardown()
        if run:
            self._run_teardown(False)
        elif self._mutex is not None and self._state is _RELEASED:
            self._tear_down_exclusive()

    # -- ending -----------------------------------------------------------------------
    def close(
        self, prepare: Optional[Callable[[Any], None]] = None, revocable: Tuple[str, ...] = ()
    ) -> bool:
        """Close: refuse, or wait for the calls in flight and tear down.  ``prepare`` runs
        once no call is in flight and none can start, before the teardown: it may raise to
        refuse (the object stays open) or do the owner's part of the closing, such as
        releasing the dependents of the ``revocable`` kinds, whose pins do not refuse the
        close up front (a device's DMA mappings).  Returns True when this call did the
        teardown (False: it was already closed or released)."""
        _enter_package()
        try:
            return self._close(prepare, revocable)
        finally:
            _leave_package()

    def _close(self, prepare: Optional[Callable[[Any], None]], revocable: Tuple[str, ...]) -> bool:
        tid = threading.get_ident()
        lock, cond = self._sync
        with lock:
            while True:
                if self._state is not _OPEN and self._state is not _CLOSING:
                    return False  # closed, released, or unusable after a fork
                if self._in_call_on_this_thread(tid):
                    raise BusyError(
                        f"{self.what}.close() was called from inside a call on "
                        f"the same object (a callback?): that call would go on "
                        f"with freed memory"
                    )
                if self._state is _OPEN:
                    break
                self._refuse_if_closing_here(tid)
                cond.wait(_WAIT_SLICE_SECONDS)  # another thread is closing it: its outcome
            self._refuse_if_pinned(revocable)
            if self._mutex is None:
                # New calls wait for the outcome; the calls in flight finish first.
                self._state = _CLOSING
                self._closer = tid
                while self._calls:
                    cond.wait(_WAIT_SLICE_SECONDS)
                if self._state is not _CLOSING:
                    return False  # unusable in a child forked (by this thread) meanwhile
        if self._mutex is not None:
            # An exclusive object: its mutex keeps every other call out (waiting, not
            # failing) while this close decides.
            self._acquire_mutex()
            lock, cond = self._sync
            with lock:
                if self._state is not _OPEN:  # another closer, or a release, came first
                    self._exit_exclusive()
                    return False
                self._state = _CLOSING
                self._closer = tid
        try:
            with lock:
                self._refuse_if_pinned(revocable)  # calls in flight may have pinned it
            if prepare is not None:
                prepare(self.handle)
            with lock:
                self._refuse_if_pinned()  # prepare released the revocable ones
            self._teardown(self.handle, True)
        except BaseException:
            lock, cond = self._sync
            with lock:
                self._state = _OPEN
                self._closer = None
                cond.notify_all()
            raise
        finally:
            if self._mutex is not None:
                self._mutex.release()
        lock, cond = self._sync
        with lock:
            self._state = _DONE
            self._closer = None
            cond.notify_all()
        return True

    def release(self) -> None:
        """The owner was dropped without closing: tear down now if nothing uses the object,
        else when the last call or pin goes.  Never waits, never raises.

        The garbage collector may run this at any allocation, also inside the package on
        this thread (say, inside the model engine's memory lock): then it is put off until
        the thread's outermost call into the package leaves."""
        state = _thread_state()
        if state[_DEPTH]:
            state[_PUT_OFF].append(self.release)
            return
        with self._sync[0]:
            if self._state is not _OPEN:
                return
            self._state = _RELEASED
            run = self._mutex is None and self._take_teardown()
        if run:
            self._run_teardown(False)
        elif self._mutex is not None:
            # Set "released" first, then try the mutex: a holder reads the state after
            # letting go of it, so one of the two always sees the other.
            self._tear_down_exclusive()

    # -- internals ----------------------------------------------------------------------
    def _refuse_if_closing_here(self, tid: int) -> None:
        """Waiting for the outcome of a close running on this very thread would never end."""
        if self._closer == tid:
            raise BusyError(
                f"{self.what} is being closed by this thread: code run inside its close() "
                f"(a signal handler, or a __del__ the collector ran) cannot use or close it"
            )

    def _refuse_if_pinned(self, ignore: Tuple[str, ...] = ()) -> None:
        if not self._pins:
            return
        pins = sorted((kind, count) for kind, count in self._pins.items() if kind not in ignore)
        if pins:
            by = ", ".join(f"{count} {kind}" for kind, count in pins)
            raise BusyError(f"{self.what}.close: still in use by {by}; close them first")

    def _take_teardown(self) -> bool:
        """Under the condition: True (and the state becomes done) when this thread must run
        a released object's teardown now (an exclusive object's caller holds its mutex)."""
        if self._state is not _RELEASED or self._calls or self._pins:
            return False
        self._state = _DONE
        return True

    def _run_teardown(self, by_owner: bool) -> None:
        try:
            _enter_package()
            try:
                self._teardown(self.handle, by_owner)
            finally:
                _leave_package()
        except BaseException as exc:  # noqa: BLE001 - a safety net must not fail its caller
            _report_unraisable(exc, f"the safety net of {self.what}")

    def _reinit_after_fork(self) -> None:
        """In a forked child.  The other threads are gone, with the locks they held; the
        forking thread's own calls (a fork from inside a call) go on.  An object another
        thread was still using (the fork waited FORK_WAIT_SECONDS for it) may be half
        changed: it becomes unusable here, and is never torn down (it leaks)."""
        tid = threading.get_ident()
        mine = self._callers.get(tid, 0)
        others_inside = self._calls > mine
        if self._mutex is not None:
            mine_held = bool(self._mutex._is_owned())  # type: ignore[attr-defined]
            if not mine_held:
                if self._mutex.acquire(blocking=False):
                    self._mutex.release()
                else:
                    others_inside = True  # held by a thread of the parent
            self._mutex = threading.RLock()
            if mine_held:
                self._mutex.acquire()
        self._sync = _new_sync()
        self._callers = {tid: mine} if mine else {}
        self._calls = mine
        if self._state is _CLOSING and self._closer != tid:
            others_inside = True  # its closer was another thread, mid-way
        if others_inside:
            self.mark_forked()

    def mark_forked(self) -> None:
        """In a forked child, for an owner that knows its object was half changed by
        another thread of the parent: unusable here, like one with a call in flight."""
        if self._state is not _DONE:
            self._state = _FORKED
            self._closer = None


class _Use:
    """``Lifetime.use()``: a call in flight on a pinned shared object, whatever its state."""

    __slots__ = ("_life",)

    def __init__(self, life: Lifetime) -> None:
        self._life = life

    def __enter__(self) -> Any:
        life = self._life
        assert life._mutex is None, "use() is for shared objects"
        _enter_package()
        tid = threading.get_ident()
        with life._sync[0]:
            if life._state is _DONE or life._state is _FORKED:
                _leave_package()
                raise life._closed_error()
            life._calls += 1
            life._callers[tid] = life._callers.get(tid, 0) + 1
        return life.handle

    def __exit__(self, *exc: object) -> None:
        self._life.__exit__(*exc)


class _Hold:
    """``Lifetime.hold()``: an exclusive object's mutex, whatever its state."""

    __slots__ = ("_life",)

    def __init__(self, life: Lifetime) -> None:
        self._life = life

    def __enter__(self) -> Any:
        life = self._life
        assert life._mutex is not None, "hold() is for exclusive objects"
        if life._mutex._is_owned():  # type: ignore[attr-defined]
            raise BusyError(f"{life.what} is already in use by a call on this thread")
        life._acquire_mutex()
        _enter_package()
        return life.handle

    def __exit__(self, *exc: object) -> None:
        try:
            self._life._exit_exclusive()
        finally:
            _leave_package()


def _report_unraisable(exc: BaseException, where: str) -> None:
    """Hand a failure that has no caller to report to (a safety net running at garbage
    collection, or on behalf of another call) to ``sys.unraisablehook``, as Python does for an
    exception in ``__del__``: printed by default, turned into a warning by pytest."""

    class _SafetyNet:
        def __repr__(self) -> str:
            return where

        def __del__(self) -> None:
            raise exc

    _SafetyNet()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


__all__ = [
    "require_int",
    "require_range",
    "as_pfn_view",
    "PfnsLike",
    "Lifetime",
    "after_leaving",
    "in_package",
    "reinit_after_fork",
]
