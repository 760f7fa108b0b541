"""Helpers shared by the test modules (fixtures live in conftest.py, helpers here)."""

from __future__ import annotations

import threading
from typing import Any, Callable, List, Optional, Tuple

import scatterlist as sg
from scatterlist._engine import get_engine

PAGE = 4096


def cpu_rows(table: sg.RawTable) -> List[Tuple[int, int, int]]:
    return [(e.pfn, e.offset, e.length) for e in table]


class EngineHook:
    """Replace one engine method for the length of a ``with`` block, to force an interleaving:
    ``hook(real, *args)`` runs instead of the method (on every call; ``real`` is the method).

    The engines are shared by all objects of the process, so hooks should act only on the
    handles of the test's own objects (a collected table of another test may pass through)."""

    def __init__(self, engine: str, method: str, hook: Callable[..., Any]) -> None:
        self.engine = get_engine(engine)
        self.method = method
        self.hook = hook
        self.real: Optional[Callable[..., Any]] = None

    def __enter__(self) -> "EngineHook":
        self._own = vars(self.engine).get(self.method)  # a hook already in place, if any
        self.real = getattr(self.engine, self.method)
        real = self.real

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return self.hook(real, *args, **kwargs)

        setattr(self.engine, self.method, wrapper)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._own is None:
            delattr(self.engine, self.method)  # back to the class's method
        else:
            setattr(self.engine, self.method, self._own)


class Pause(EngineHook):
    """Hold the first matching call of an engine method until :meth:`resume`: ``entered`` is
    set once it is held (before the real call, or after it with ``after=True``)."""

    def __init__(
        self,
        engine: str,
        method: str,
        *,
        when: Callable[..., bool] = lambda *a: True,
        after: bool = False,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(engine, method, self._call)
        self.when = when
        self.after = after
        self.timeout = timeout
        self.entered = threading.Event()
        self._resume = threading.Event()
        self._taken = False
        self._lock = threading.Lock()

    def _call(self, real: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            hold = not self._taken and self.when(*args)
            self._taken = self._taken or hold
        if not hold:
            return real(*args, **kwargs)
        if self.after:
            result = real(*args, **kwargs)
            self.entered.set()
            self._resume.wait(self.timeout)
            return result
        self.entered.set()
        self._resume.wait(self.timeout)
        return real(*args, **kwargs)

    def resume(self) -> None:
        self._resume.set()

    def __exit__(self, *exc: object) -> None:
        self.resume()
        super().__exit__(*exc)


class InThread:
    """Run ``fn`` on another thread; ``result()`` joins and returns or re-raises."""

    def __init__(self, fn: Callable[[], Any], name: str = "helper") -> None:
        self._value: Any = None
        self._error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to result()
            self._error = exc

    def running_after(self, seconds: float) -> bool:
        """True if still running (blocked) after waiting ``seconds``."""
        self.thread.join(seconds)
        return self.thread.is_alive()

    def result(self, timeout: float = 10.0) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the thread did not finish (deadlock?)"
        if self._error is not None:
            raise self._error
        return self._value
