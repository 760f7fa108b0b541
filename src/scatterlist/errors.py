"""One exception hierarchy for both engines.

Every exception carries the kernel errno the C core returned (``.errno``) and a message that
names the argument and the rule.  The C core reports a reason code beside the errno; the model
engine raises with the same codes, so both engines produce the same class and message.
"""

from __future__ import annotations

import errno as _errno
from enum import IntEnum
from typing import NamedTuple, Optional


class ScatterlistError(Exception):
    """Root of every error scatterlist raises."""

    default_errno = _errno.EINVAL

    def __init__(
        self, message: str, *, errno: Optional[int] = None, reason: Optional["Reason"] = None
    ) -> None:
        super().__init__(message)
        self.errno = self.default_errno if errno is None else errno
        self.reason = reason
        #: The detail fields of the failure (reason, element, value, limit, access), where the
        #: engine reported them.
        self.detail: Optional["ErrorDetail"] = None

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


class DeviceUnbound(ClosedError):
    """A mapping requested for a device that is not bound (the kernel's -ENODEV)."""

    default_errno = _errno.ENODEV


class MappingError(ScatterlistError, OSError):  # type: ignore[misc]  # errno is always set
    """DMA mapping failed for a reason retrying will not fix (the kernel's -EIO)."""

    default_errno = _errno.EIO


class IommuFault(ScatterlistError, OSError):  # type: ignore[misc]  # errno is always set
    """A device access the IOMMU (or, without one, the device's reach) does not allow.

    ``iova`` is the faulting device address, ``access`` is ``"read"`` or ``"write"`` (the
    device reading or writing memory), ``fault_reason`` one of ``"not mapped"``, ``"no
    permission"``, ``"outside the aperture"``, ``"above the DMA mask"`` or ``"outside
    memory"``."""

    default_errno = _errno.EFAULT

    def __init__(
        self,
        message: str,
        *,
        errno: Optional[int] = None,
        reason: Optional["Reason"] = None,
        iova: int = 0,
        access: str = "read",
        fault_reason: str = "",
    ) -> None:
        super().__init__(message, errno=errno, reason=reason)
        self.iova = iova
        self.access = access
        self.fault_reason = fault_reason


class DmaApiError(ScatterlistError):
    """A DMA-API misuse found by the debug layer (``scatterlist.debug``) in ``raise`` mode.

    ``rule`` names the check (e.g. ``"unmap-entry-count"``); the message follows the kernel's
    dma-debug wording and ends with the traceback of the map call where there is one."""

    def __init__(self, message: str, *, rule: str = "", errno: Optional[int] = None) -> None:
        super().__init__(message, errno=errno)
        self.rule = rule


class DmaApiWarning(UserWarning):
    """A DMA-API misuse found by the debug layer in ``warn`` mode."""


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
    TABLE_MAPPED = 21
    ENTRY_LENGTH = 22
    GRANULE = 32
    IOVA_START_PFN = 33
    IOVA_SIZE = 34
    IOVA_EXHAUSTED = 35
    IOVA_RANGE = 36
    IOVA_BUSY = 37
    IOVA_NOT_FOUND = 38
    IOVA_NOT_LIVE = 39
    IOVA_NOT_START = 40
    IOVA_SIZE_MISMATCH = 41
    APERTURE_BITS = 42
    IOMMU_ALIGN = 43
    IOMMU_APERTURE = 44
    IOMMU_PHYS_RANGE = 45
    IOMMU_PROT = 46
    IOMMU_MAPPED = 47
    IOMMU_ACCESS = 48
    IOMMU_FAULT_NOT_MAPPED = 49
    IOMMU_FAULT_PERMISSION = 50
    IOMMU_FAULT_APERTURE = 51
    IOMMU_RUNS_CAPACITY = 52
    IOVA_INCONSISTENT = 53
    DMA_DIRECTION = 64
    DEVICE_UNBOUND = 65
    TABLE_NOT_FINAL = 66
    TABLE_FREED = 67
    NOT_MAPPED = 68
    WRONG_DEVICE = 69
    DMA_MASK = 70
    IOVA_SPACE = 71
    GRANULE_PAGE = 72
    DMA_ACCESS_MASK = 73
    DMA_ACCESS_MEMORY = 74
    DMA_LENGTH = 75
    FOREIGN = 76
    NENTS_RANGE = 77
    INJECTED = 78
    DMA_SEGMENT_LENGTH = 79
    DEVICE_DMA_MASK = 80
    DEVICE_MAX_SEGMENT = 81
    DEVICE_SEG_BOUNDARY = 82
    INJECT_ERRNO = 83
    INJECT_PPM = 84


class ErrorDetail(NamedTuple):
    """What a failed call reports beside its errno (``struct sl_error_detail`` in C).

    Each field has one meaning: ``element`` is the index of the offending element of an array
    argument (``pfns[i]``, a table's entry ``i``), ``value`` the offending value, ``limit`` the
    bound it broke where there is one, and ``access`` the device access (1 read, 2 write) for
    faults and refused device accesses."""

    reason: Reason
    element: int = 0
    value: int = 0
    limit: int = 0
    access: int = 0


# Templates see element, value, limit and access (the access as a word).
_MESSAGES = {
    Reason.ZERO_PAGES: "no pages: at least one page (or entry) is needed; for an empty "
    "page array the kernel builds a bogus entry from pages[0]",
    Reason.MAX_SEGMENT: "max_segment={value} is below one page after rounding down to whole pages",
    Reason.OFFSET: "offset={value} is not inside the first page",
    Reason.SIZE: "size={value} does not end inside the last page",
    Reason.PFN_RANGE: "pfns[{element}]={value} is out of range: physical addresses must stay "
    "below 2**63",
    Reason.TABLE_FINAL: "the table is final: the last call had left_pages=0, so nothing can be "
    "appended (the kernel would follow the end mark into NULL)",
    Reason.APPEND_OFFSET: "offset={value} on an append: only the first call may carry an offset",
    Reason.MID_PAGE_REPEAT: "pfns[0]={value} repeats the page the previous call ended inside; "
    "the kernel would stretch that entry past the data it was given",
    Reason.MERGE_PARTIAL: "size={value} is not whole pages while pfns[0] continues the previous "
    "entry: merged pages always count whole, so the size would be ignored",
    Reason.TOO_MANY_ENTRIES: "{value} more entries would take the table past 2**32-1 entries",
    Reason.NO_MEMORY: "the host is out of memory",
    Reason.PAGE_SIZE: "page_size={value} is not a power of two between 4096 and 65536",
    Reason.PAGE_SIZE_MISMATCH: "page sizes differ: the memory uses {value}-byte pages, the "
    "table {limit}-byte pages",
    Reason.PHYS_RANGE: "physical address or pfn {value:#x} is outside the emulated memory",
    Reason.OUT_OF_PAGES: "cannot allocate {value} pages in the requested layout: not enough "
    "free memory",
    Reason.LAYOUT: "unknown page layout {value}",
    Reason.NOT_ALLOCATED: "pfns[{element}]={value} is not an allocated page",
    Reason.NENTS_FOR_LEN: "the list holds {limit} bytes, fewer than the requested {value}",
    Reason.MEMORY_SIZE: "size={value} is not a positive multiple of the page size "
    "(at most 2**46 bytes, 64 TiB)",
    Reason.DUPLICATE_PFN: "pfns[{element}]={value} is listed twice",
    Reason.TABLE_MAPPED: "the table is DMA-mapped: unmap it before changing, remapping or "
    "freeing it",
    Reason.ENTRY_LENGTH: "entries[{element}] has length {value}: an entry holds 1 to 2**32-1 bytes",
    Reason.GRANULE: "granule={value} is not a power of two between 4096 and 65536",
    Reason.IOVA_START_PFN: "start_pfn={value}: an IOVA domain starts at pfn 1 or above, so IOVA 0 "
    "is never handed out",
    Reason.IOVA_SIZE: "an IOVA range of zero granules",
    Reason.IOVA_EXHAUSTED: "no free IOVA range of {value} granules fits under pfn {limit:#x}",
    Reason.IOVA_RANGE: "IOVA range {value:#x}..{limit:#x} is empty or reaches the top",
    Reason.IOVA_BUSY: "IOVA pfns {value:#x}..{limit:#x} are a live mapping",
    Reason.IOVA_NOT_FOUND: "IOVA pfn {value:#x} is in no allocated range",
    Reason.IOVA_NOT_LIVE: "IOVA pfn {value:#x} is not a live range (reserved or already freed)",
    Reason.IOVA_NOT_START: "IOVA pfn {value:#x} is not the start of its range",
    Reason.IOVA_SIZE_MISMATCH: "IOVA free with size {value} granules, not the allocated {limit}",
    Reason.IOVA_INCONSISTENT: "the IOVA allocator's bookkeeping is inconsistent at {value:#x}",
    Reason.APERTURE_BITS: "aperture_bits={value} is not between the granule's bits + 1 and 64",
    Reason.IOMMU_ALIGN: "address or size {value:#x} is not a multiple of the IOMMU granule {limit}",
    Reason.IOMMU_APERTURE: "IOVA {value:#x} is outside the IOMMU aperture (last IOVA {limit:#x})",
    Reason.IOMMU_PHYS_RANGE: "physical range at {value:#x} wraps past 2**64",
    Reason.IOMMU_PROT: "prot={value:#x} has unknown permission bits",
    Reason.IOMMU_MAPPED: "IOVA {value:#x} is already mapped",
    Reason.IOMMU_ACCESS: "access {value} is neither read nor write",
    Reason.IOMMU_FAULT_NOT_MAPPED: "IOMMU fault: device {access} at IOVA {value:#x}: not mapped",
    Reason.IOMMU_FAULT_PERMISSION: "IOMMU fault: device {access} at IOVA {value:#x}: the "
    "mapping does not permit it",
    Reason.IOMMU_FAULT_APERTURE: "IOMMU fault: device {access} at IOVA {value:#x}: outside "
    "the aperture",
    Reason.IOMMU_RUNS_CAPACITY: "the translated range needs more than {limit} physically "
    "contiguous runs (stopped at IOVA {value:#x})",
    Reason.DMA_DIRECTION: "direction={value} is not BIDIRECTIONAL, TO_DEVICE or FROM_DEVICE "
    "(DMA_NONE is for debugging only; the kernel BUGs on it)",
    Reason.DEVICE_UNBOUND: "the device is not bound: no new DMA mappings (-ENODEV)",
    Reason.TABLE_NOT_FINAL: "the table is still open for appends (left_pages > 0): finish "
    "it before mapping",
    Reason.TABLE_FREED: "the table's entries were freed",
    Reason.NOT_MAPPED: "the table is not DMA-mapped",
    Reason.WRONG_DEVICE: "the table is mapped for another device",
    Reason.DMA_MASK: "entry {element} at physical address {value:#x} is above the device's "
    "dma_mask {limit:#x}: direct mapping cannot reach it (-EIO)",
    Reason.IOVA_SPACE: "no IOVA block of {value} bytes under {limit:#x}, the device's dma_mask "
    "within the aperture (-ENOMEM)",
    Reason.GRANULE_PAGE: "the IOMMU granule {value} is larger than the memory's page size {limit}",
    Reason.DMA_ACCESS_MASK: "device {access} at {value:#x}: above the device's dma_mask "
    "{limit:#x}, an address the device cannot emit",
    Reason.DMA_ACCESS_MEMORY: "device {access} at physical {value:#x}: runs past the end of the "
    "emulated memory ({limit:#x} bytes)",
    Reason.DMA_LENGTH: "the table's DMA segments hold {limit} bytes, fewer than the {value} "
    "requested",
    Reason.FOREIGN: "objects from different memories or IOMMUs cannot be mixed",
    Reason.NENTS_RANGE: "nents={value} is not between 1 and the table's {limit} entries",
    Reason.INJECTED: "injected failure (fault injection on the device, errno {value})",
    Reason.DMA_SEGMENT_LENGTH: "entry {element} would make a DMA segment of {value} bytes: a "
    "DMA length holds at most 2**32-1 bytes (the kernel's 32-bit "
    "length would wrap)",
    Reason.DEVICE_DMA_MASK: "dma_mask={value:#x} must be 2**n - 1 and at least {limit:#x} "
    "(one page)",
    Reason.DEVICE_MAX_SEGMENT: "max_segment_size={value} must be between 1 and 2**32-1 bytes",
    Reason.DEVICE_SEG_BOUNDARY: "seg_boundary_mask={value:#x} must be 2**n - 1 and at least "
    "{limit:#x} (one page)",
    Reason.INJECT_ERRNO: "errno_value={value} is not ENOMEM, EINVAL or EIO",
    Reason.INJECT_PPM: "a failure rate of {value} per million is above {limit}",
}

_FAULT_REASONS = {
    Reason.IOMMU_FAULT_NOT_MAPPED: "not mapped",
    Reason.IOMMU_FAULT_PERMISSION: "no permission",
    Reason.IOMMU_FAULT_APERTURE: "outside the aperture",
    Reason.DMA_ACCESS_MASK: "above the DMA mask",
    Reason.DMA_ACCESS_MEMORY: "outside memory",
}

#: The IOMMU's access codes (IOMMU_READ / IOMMU_WRITE) as words.
ACCESS_NAMES = {1: "read", 2: "write"}

_CLASS_BY_ERRNO = {
    _errno.EINVAL: InvalidArgument,
    _errno.EFAULT: InvalidArgument,
    _errno.ENOMEM: OutOfMemory,
    _errno.EBUSY: BusyError,
    _errno.EBADF: ClosedError,
    _errno.ENODEV: DeviceUnbound,
    _errno.EIO: MappingError,
    _errno.EEXIST: BusyError,
    _errno.ENOENT: InvalidArgument,
}


def message_for(detail: ErrorDetail, err: int = 0) -> str:
    """The text of a failure: the reason's template filled from the detail fields."""
    template = _MESSAGES.get(detail.reason)
    if template is None:
        return f"failed with {_errno.errorcode.get(err, str(err))}"
    return template.format(
        element=detail.element,
        value=detail.value,
        limit=detail.limit,
        access=ACCESS_NAMES.get(detail.access, str(detail.access)),
    )


def error_for(
    err: int,
    reason: int,
    *,
    element: int = 0,
    value: int = 0,
    limit: int = 0,
    access: int = 0,
    where: str = "",
) -> ScatterlistError:
    """The exception for a failed call: ``err`` is a positive errno, ``reason`` a Reason code,
    the other fields as in :class:`ErrorDetail`.  ``where`` names the public call and prefixes
    the message."""
    try:
        why = Reason(reason)
    except ValueError:
        why = Reason.NONE
    detail = ErrorDetail(why, element, value, limit, access)
    text = message_for(detail, err)
    if where:
        text = f"{where}: {text}"
    if why in _FAULT_REASONS:
        exc: ScatterlistError = IommuFault(
            text,
            errno=err,
            reason=why,
            iova=value,
            access=ACCESS_NAMES.get(access, str(access)),
            fault_reason=_FAULT_REASONS[why],
        )
    elif why is Reason.NO_MEMORY:
        exc = OutOfMemory(text, errno=err, reason=why)
    else:
        exc = _CLASS_BY_ERRNO.get(err, ScatterlistError)(text, errno=err, reason=why)
    exc.detail = detail
    return exc
