"""Argument checks shared by the Pythonic layer (both engines go through them)."""

from __future__ import annotations

import errno
import functools
from array import array
from typing import Any, Callable, Iterable, TypeVar, Union, cast

from .errors import InvalidArgument, Reason, error_for

# Buffer formats read as 64-bit pfns without a copy; signed ones too (a negative value reads as
# a huge pfn, which the engine's range check refuses).
_U64_FORMATS = {"Q", "L", "q", "l", "N", "n"}

PfnsLike = Union[Iterable[int], memoryview, "array[int]", Any]


def require_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        index = getattr(value, "__index__", None)
        if index is None or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        value = index()
        if not isinstance(value, int):
            raise TypeError(f"{name}: __index__ returned {type(value).__name__}, not int")
    return value


def require_range(name: str, value: object, low: int, high: int,
                  reason: Reason = Reason.NONE) -> int:
    """``value`` as an int in [low, high], or InvalidArgument naming the argument."""
    number = require_int(name, value)
    if not low <= number <= high:
        if reason is not Reason.NONE:
            raise error_for(errno.EINVAL, reason, 0, number)
        raise InvalidArgument(f"{name}={number} is out of range [{low}, {high}]")
    return number


def as_pfn_view(pfns: PfnsLike, name: str = "pfns") -> memoryview:
    """A 1-D ``memoryview`` of format ``Q`` over ``pfns``.

    Contiguous 64-bit integer buffers (``array('Q')``, numpy ``uint64``/``int64``, memoryviews
    of them) are used in place; other sequences are converted once."""
    if isinstance(pfns, (str, bytes, bytearray)):
        raise TypeError(f"{name} must be a sequence or buffer of integers, not "
                        f"{type(pfns).__name__}")
    try:
        view = memoryview(pfns)  # type: ignore[arg-type]
    except TypeError:
        view = None
    if view is not None:
        if view.ndim != 1:
            raise InvalidArgument(f"{name} must be one-dimensional, not {view.ndim}-D")
        if (view.itemsize == 8 and view.format.lstrip("@=<") in _U64_FORMATS
                and view.c_contiguous):
            return view.cast("B").cast("Q")
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


F = TypeVar("F", bound=Callable[..., Any])


def locked(method: F) -> F:
    """Run the method holding the object's ``_lock``: a ``close()`` on another thread then
    cannot free the C object while this call uses it."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return cast(F, wrapper)
