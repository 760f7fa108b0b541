"""The pure-Python "model" engine of scatterlist.

An executable description of csrc/ (and of the kernel behaviour it reproduces) in standard
Python: :mod:`.physmem` is the emulated physical memory and its page allocator, :mod:`.table`
the scatter-gather table with the kernel's entries, chunks and chain links, and
:class:`ModelEngine` adapts both to :class:`scatterlist._engine.Engine`.  Both engines must
give the same result, bit for bit, and raise the same errors, for every call.
"""

from __future__ import annotations

from .engine import ModelEngine

__all__ = ["ModelEngine"]
