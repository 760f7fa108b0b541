"""Arguments as the native engine passes them to C: the model checks them the same way.

cffi raises TypeError for a non-integer and OverflowError for an integer that does not fit its C
type; the model does the same, so that both engines fail alike on every engine call.
"""

from __future__ import annotations

from typing import List


def c_int(value: int, bits: int, signed: bool = False) -> int:
    """value, if it fits the C integer type the native engine passes it as.

    cffi raises TypeError for a non-integer and OverflowError for an integer that does not
    fit; the model does the same so that both engines fail alike."""
    if not isinstance(value, int):
        raise TypeError(f"an integer is required, not {type(value).__name__}")
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if not low <= value <= high:
        if value < 0 and not signed:
            raise OverflowError("can't convert negative number to unsigned")
        raise OverflowError("int too big to convert")
    return int(value)


def u32(value: int) -> int:
    return c_int(value, 32)


def u64(value: int) -> int:
    return c_int(value, 64)


def pfn_list(pfns: memoryview) -> List[int]:
    """The values of a 1-D "Q" view (pfns, or flat rows of an entry table)."""
    if pfns.format != "Q" or pfns.ndim != 1:
        raise TypeError(f"expected a 1-D memoryview of format 'Q', not {pfns.format!r}")
    return pfns.tolist()


def byte_view(buf: memoryview) -> memoryview:
    """buf as a flat view of bytes (format "B")."""
    if buf.format == "B" and buf.ndim == 1 and buf.c_contiguous:
        return buf
    return buf.cast("B")
