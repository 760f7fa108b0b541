"""One exception hierarchy for both engines.

Every exception carries the kernel errno the C core returned (``.errno``) and a message that
names the argument and the rule.  The C core reports a reason code beside the errno; the model
engine raises with the same codes, so both engines produce the same class and message.
"""

from __future__ import annotations

import errno as _errno
from enum import IntEnum
from typing import Optional


class ScatterlistError(Exception):
    """Root of every error scatterlist raises."""

    default_errno = _errno.EINVAL

    def __init__(self, message: str, *, errno: Optional[int] = None,
                 reason: Optional["Reason"] = None) -> None:
        super().__init__(message)
        self.errno = self.default_errno if errno is None else errno
        self.reason = reason

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidArgument(ScatterlistError, ValueError):
    """A bad argument or a misuse the kernel would BUG, WARN or silently get wrong on."""


class OutOfMemory(ScatterlistError, MemoryError):
    """Emulated memory, IOVA space or host memory ran out; nothing was allocated."""

    default_errno = _errno.ENOMEM


class BusyError(ScatterlistError, OSError):  # type: ignore[misc]  # errno is always set
    """An object cannot be closed or changed while others still depend on it."""

    default_errno = _errno.EBUSY


class ClosedError(ScatterlistError, ValueError):
    """Use of an object (or a view of one) after it was closed, freed or revoked."""

    default_errno = _errno.EBADF


class Reason(IntEnum):
    """Why a call failed; mirrors ``enum sl_reason`` in csrc/sl_common.h."""

    NONE = 0
    ZERO_PAGES = 1
    MAX_SEGMENT = 2
    OFFSET = 3
    SIZE = 4
    PFN_RANGE = 5
    TABLE_FINAL = 6
    APPEND_OFFSET = 7
    MID_PAGE_REPEAT = 8
    MERGE_PARTIAL = 9
    TOO_MANY_ENTRIES = 10
    NO_MEMORY = 11
    PAGE_SIZE = 12
    PAGE_SIZE_MISMATCH = 13
    PHYS_RANGE = 14
    OUT_OF_PAGES = 15
    LAYOUT = 16
    NOT_ALLOCATED = 17
    NENTS_FOR_LEN = 18
    MEMORY_SIZE = 19
    DUPLICATE_PFN = 20


_MESSAGES = {
    Reason.ZERO_PAGES: "pfns is empty: a table needs at least one page "
                       "(the kernel builds a bogus entry from pages[0] here)",
    Reason.MAX_SEGMENT: "max_segment={value} is below one page after rounding down to whole pages",
    Reason.OFFSET: "offset={value} is not inside the first page",
    Reason.SIZE: "size={value} does not end inside the last page",
    Reason.PFN_RANGE: "pfns[{index}]={value} is out of range: physical addresses must stay "
                      "below 2**63",
    Reason.TABLE_FINAL: "the table is final: the last call had left_pages=0, so nothing can be "
                        "appended (the kernel would follow the end mark into NULL)",
    Reason.APPEND_OFFSET: "offset={value} on an append: only the first call may carry an offset",
    Reason.MID_PAGE_REPEAT: "pfns[0]={value} repeats the page the previous call ended inside; "
                            "the kernel would stretch that entry past the data it was given",
    Reason.MERGE_PARTIAL: "size={value} is not whole pages while pfns[0] continues the previous "
                          "entry: merged pages always count whole, so the size would be ignored",
    Reason.TOO_MANY_ENTRIES: "the table would hold more than 2**32-1 entries",
    Reason.NO_MEMORY: "the host is out of memory",
    Reason.PAGE_SIZE: "page_size={value} is not a power of two between 4096 and 65536",
    Reason.PAGE_SIZE_MISMATCH: "page sizes differ: the memory uses {value}-byte pages",
    Reason.PHYS_RANGE: "physical address or pfn {value:#x} is outside the emulated memory",
    Reason.OUT_OF_PAGES: "cannot allocate {value} pages in the requested layout: not enough "
                         "free memory",
    Reason.LAYOUT: "unknown page layout {value}",
    Reason.NOT_ALLOCATED: "pfns[{index}]={value} is not an allocated page",
    Reason.NENTS_FOR_LEN: "the list ends after {index} entries ({value} bytes) before the "
                          "requested length",
    Reason.MEMORY_SIZE: "size={value} is not a positive multiple of the page size "
                        "(at most 2**52 bytes)",
    Reason.DUPLICATE_PFN: "pfns[{index}]={value} is listed twice",
}

_CLASS_BY_ERRNO = {
    _errno.EINVAL: InvalidArgument,
    _errno.EFAULT: InvalidArgument,
    _errno.ENOMEM: OutOfMemory,
    _errno.EBUSY: BusyError,
    _errno.EBADF: ClosedError,
}


def error_for(err: int, reason: int, index: int = 0, value: int = 0,
              where: str = "") -> ScatterlistError:
    """The exception for a failed call: ``err`` is a positive errno, ``reason`` a Reason code.

    ``where`` names the public call, and prefixes the message."""
    try:
        why = Reason(reason)
    except ValueError:
        why = Reason.NONE
    template = _MESSAGES.get(why)
    if template is None:
        text = f"failed with {_errno.errorcode.get(err, str(err))}"
    else:
        text = template.format(index=index, value=value)
    if why is Reason.NO_MEMORY:
        cls: type[ScatterlistError] = OutOfMemory
    else:
        cls = _CLASS_BY_ERRNO.get(err, ScatterlistError)
    return cls(f"{where}: {text}" if where else text, errno=err, reason=why)
