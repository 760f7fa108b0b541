/* Shared definitions of the scatterlist C core: error details, the ABI version and the lock
 * order.
 *
 * Errors.  Every fallible function returns 0 or a negative errno.  When an errno alone would not
 * tell the caller which rule was broken, the function also records a detail record (reason code,
 * offending element, value and bound, access kind) in a thread-local record that the caller
 * reads right after the failing call.  Every field of the record is written on every failure,
 * so no field is left over from an earlier one.  The record means something only right after
 * a failing call: a call that succeeds may still have rewritten it (an internal attempt that
 * failed and was retried another way, for example).  The Python layer turns the record into
 * one message, and its pure-Python model engine must produce identical records, so each reason
 * fills the fields exactly as its comment below says (a field not named there is 0).
 *
 * Lock order.  The C core has these mutexes; a thread that holds several takes them in this
 * order and never the other way round.  This is the one place the order is defined; the fork
 * handlers (sl_fork.h) take all of them in it.
 *   1. the fork registry mutex (sl_fork.c): held only to add or remove an object and by the
 *      fork handlers;
 *   2. device locks (struct dma_device, dma.c): leaf sections only (limits, bound flag, fault
 *      injection); no other lock is taken while one is held;
 *   3. IOMMU locks (struct sl_iommu, dma.c; also sl_iommu_lock): held over IOVA allocation and
 *      page-table changes, and over a device access through the IOMMU from its first
 *      translation to its last byte, so a memory lock may be taken under it;
 *   4. memory locks (struct physmem): every page or byte access; nothing is taken under one;
 *   5. the chunk cache lock (scatterlist.c): a leaf.
 * No code path holds two locks of the same level at once, except the fork handlers. */
#ifndef SL_COMMON_H
#define SL_COMMON_H

#include <stddef.h>
#include <stdint.h>

/* Bumped whenever a declaration the bindings rely on changes; checked at import. */
#define SL_ABI_VERSION 3

/* Each comment says when the reason is used, then the fields it fills. */
enum sl_reason {
    SL_REASON_NONE = 0,
    SL_REASON_ZERO_PAGES = 1,        /* a page array with no pages */
    SL_REASON_MAX_SEGMENT = 2,       /* max_segment below one page after rounding down;
                                        value = max_segment_bytes as passed */
    SL_REASON_OFFSET = 3,            /* offset not inside the first page (append: value = offset)
                                        or beyond 32 bits (entries: element = row, value = its
                                        offset) */
    SL_REASON_SIZE = 4,              /* size does not end inside the last page; value = size */
    SL_REASON_PFN_RANGE = 5,         /* a pfn whose physical address does not fit in 63 bits;
                                        element = its index, value = the pfn */
    SL_REASON_TABLE_FINAL = 6,       /* append after the call with left_pages == 0 */
    SL_REASON_APPEND_OFFSET = 7,     /* non-zero offset on an append; value = offset */
    SL_REASON_MID_PAGE_REPEAT = 8,   /* append repeats the page the previous call ended inside;
                                        value = pfns[0] */
    SL_REASON_MERGE_PARTIAL = 9,     /* append that merges into the last entry with a partial
                                        size; value = size_bytes */
    SL_REASON_TOO_MANY_ENTRIES = 10, /* entry count would overflow 32 bits; value = the count
                                        that would not fit (entries, or left_pages) */
    SL_REASON_NO_MEMORY = 11,        /* the host allocator failed */
    SL_REASON_PAGE_SIZE = 12,        /* page size not a power of two in [4 KiB, 64 KiB];
                                        value = page size */
    SL_REASON_PAGE_SIZE_MISMATCH = 13, /* a table and a memory with different page sizes;
                                          value = the memory's, limit = the table's */
    SL_REASON_PHYS_RANGE = 14,       /* a physical address beyond the emulated memory: table
                                        entry (element = i, value = its pfn), byte access
                                        (value = phys) or page free (element = i, value = pfn) */
    SL_REASON_OUT_OF_PAGES = 15,     /* the page allocator cannot satisfy it; value = n_pages */
    SL_REASON_LAYOUT = 16,           /* unknown page layout; value = layout */
    SL_REASON_NOT_ALLOCATED = 17,    /* freeing a page that is not allocated; element = i,
                                        value = pfns[i] */
    SL_REASON_NENTS_FOR_LEN = 18,    /* the list ends before the requested length;
                                        value = len_bytes, limit = the list's total CPU bytes */
    SL_REASON_MEMORY_SIZE = 19,      /* memory size not a positive multiple of the page size (or
                                        above 64 TiB); value = size_bytes */
    SL_REASON_DUPLICATE_PFN = 20,    /* the same pfn twice in one free request; element = i,
                                        value = pfns[i] */
    SL_REASON_TABLE_MAPPED = 21,     /* a table change or map while the table is DMA-mapped */
    SL_REASON_ENTRY_LENGTH = 22,     /* an entry length of 0 or beyond 32 bits; element = row,
                                        value = the length */
    /* 32..63: IOVA allocator and IOMMU domain (iova.c, iommu.c) */
    SL_REASON_GRANULE = 32,          /* IOMMU granule not a power of two in [4 KiB, 64 KiB];
                                        value = granule */
    SL_REASON_IOVA_START_PFN = 33,   /* IOVA domain start_pfn 0 (IOVA 0 must never be handed
                                        out); value = start_pfn */
    SL_REASON_IOVA_SIZE = 34,        /* IOVA allocation or free of zero granules */
    SL_REASON_IOVA_EXHAUSTED = 35,   /* no free IOVA range of that size fits under the limit;
                                        value = size in granules (after rounding), limit =
                                        limit_pfn (after clamping to the top pfn) */
    SL_REASON_IOVA_RANGE = 36,       /* IOVA reserve with lo > hi or hi at the top pfn;
                                        value = lo_pfn, limit = hi_pfn */
    SL_REASON_IOVA_BUSY = 37,        /* IOVA reserve overlapping a live range; value = that
                                        range's pfn_lo, limit = its pfn_hi */
    SL_REASON_IOVA_NOT_FOUND = 38,   /* IOVA free or find of a pfn in no range; value = pfn */
    SL_REASON_IOVA_NOT_LIVE = 39,    /* IOVA free of a reserved or already freed (cached) range;
                                        value = pfn */
    SL_REASON_IOVA_NOT_START = 40,   /* IOVA free of a pfn inside, not at the start of, its
                                        range; value = pfn */
    SL_REASON_IOVA_SIZE_MISMATCH = 41, /* IOVA free with a size not matching the allocation;
                                          value = size passed, limit = allocated size (granules) */
    SL_REASON_APERTURE_BITS = 42,    /* IOMMU aperture width not in [granule bits + 1, 64];
                                        value = aperture_bits */
    SL_REASON_IOMMU_ALIGN = 43,      /* IOMMU iova, phys or size not a multiple of the granule;
                                        element = run index (iommu_map_runs), value = the
                                        misaligned number, limit = granule */
    SL_REASON_IOMMU_APERTURE = 44,   /* IOMMU map/unmap/translate range beyond the aperture;
                                        element = run index (iommu_map_runs), value = iova,
                                        limit = the last valid IOVA */
    SL_REASON_IOMMU_PHYS_RANGE = 45, /* IOMMU map whose physical range wraps past 2^64;
                                        element = run index (iommu_map_runs), value = phys */
    SL_REASON_IOMMU_PROT = 46,       /* IOMMU map with unknown permission bits; value = prot */
    SL_REASON_IOMMU_MAPPED = 47,     /* IOMMU map over a page that is already mapped (-EEXIST);
                                        value = the IOVA of that page */
    SL_REASON_IOMMU_ACCESS = 48,     /* access code not exactly IOMMU_READ or IOMMU_WRITE;
                                        value = the code */
    SL_REASON_IOMMU_FAULT_NOT_MAPPED = 49, /* device access to an unmapped IOVA (fault logged);
                                              value = faulting IOVA, access */
    SL_REASON_IOMMU_FAULT_PERMISSION = 50, /* device access its mapping forbids (fault logged);
                                              value = faulting IOVA, access */
    SL_REASON_IOMMU_FAULT_APERTURE = 51,   /* device access beyond the aperture (fault logged);
                                              value = faulting IOVA, access */
    SL_REASON_IOMMU_RUNS_CAPACITY = 52,    /* run array full before the range ended; value =
                                              the IOVA where translation stopped, limit =
                                              capacity */
    SL_REASON_IOVA_INCONSISTENT = 53,      /* iova_check found a broken invariant; value = the
                                              pfn or order involved (0 for a counter) */
    /* 64..95: DMA mapping and device access (dma.c) */
    SL_REASON_DMA_DIRECTION = 64,    /* direction not BIDIRECTIONAL, TO_DEVICE or FROM_DEVICE;
                                        value = dir */
    SL_REASON_DEVICE_UNBOUND = 65,   /* mapping for a device that is not bound */
    SL_REASON_TABLE_NOT_FINAL = 66,  /* mapping an append table still open for appends */
    SL_REASON_TABLE_FREED = 67,      /* mapping a table whose entries were freed */
    SL_REASON_NOT_MAPPED = 68,       /* unmap, sync or transfer of a table that is not mapped */
    SL_REASON_WRONG_DEVICE = 69,     /* unmap, sync or transfer with another device than the
                                        map's */
    SL_REASON_DMA_MASK = 70,         /* direct mapping of memory above the device's DMA mask;
                                        element = entry, value = its phys, limit = dma_mask */
    SL_REASON_IOVA_SPACE = 71,       /* no IOVA block under the DMA mask (the kernel's -ENOMEM);
                                        value = IOVA bytes needed, limit = the limit address
                                        used, min(dma_mask, aperture end) */
    SL_REASON_GRANULE_PAGE = 72,     /* IOMMU granule larger than the memory's page size;
                                        value = granule, limit = page size */
    SL_REASON_DMA_ACCESS_MASK = 73,  /* device access above its DMA mask (a fault that never
                                        reaches the IOMMU); value = dma_addr, limit = dma_mask,
                                        access */
    SL_REASON_DMA_ACCESS_MEMORY = 74, /* device access that reaches past the emulated memory;
                                         value = the physical address of the first physically
                                         contiguous run that does, limit = the memory's size
                                         in bytes, access */
    SL_REASON_DMA_LENGTH = 75,       /* a transfer larger than the table's DMA segments;
                                        value = n_bytes, limit = the bytes the segments hold */
    SL_REASON_FOREIGN = 76,          /* objects of different memories or IOMMUs mixed */
    SL_REASON_NENTS_RANGE = 77,      /* an entry count of 0 or beyond the list: value = the
                                        count passed, limit = orig_nents (map/unmap/sync) or
                                        the entries the list has (exports) */
    SL_REASON_INJECTED = 78,         /* a failure injected on the device; value = its errno */
    SL_REASON_DMA_SEGMENT_LENGTH = 79, /* a DMA segment would exceed 2^32 - 1 bytes; element =
                                          the entry where it did, value = its 64-bit length,
                                          limit = 0xFFFFFFFF */
    SL_REASON_DEVICE_DMA_MASK = 80,  /* DMA mask not 2^n - 1 or below page size - 1; value =
                                        the mask, limit = page size - 1 */
    SL_REASON_DEVICE_MAX_SEGMENT = 81, /* max_segment_size of 0; value = max_segment_size */
    SL_REASON_DEVICE_SEG_BOUNDARY = 82, /* segment boundary mask not 2^n - 1 or below page
                                           size - 1; value = the mask, limit = page size - 1 */
    SL_REASON_INJECT_ERRNO = 83,     /* injected errno not ENOMEM, EINVAL or EIO; value = it
                                        (sign-extended to 64 bits) */
    SL_REASON_INJECT_PPM = 84,       /* injection probability above 10^6 per million; value =
                                        ppm, limit = 1000000 */
};

struct sl_error_detail {
    int reason;       /* enum sl_reason */
    uint32_t access;  /* IOMMU_READ (1) / IOMMU_WRITE (2) for faults and refused device
                         accesses, else 0 */
    uint64_t element; /* index of the offending element of an array argument (pfns[i], rows[i],
                         runs[i], entry i of a table), else 0 */
    uint64_t value;   /* the offending value, else 0 */
    uint64_t limit;   /* the bound the value broke, where the reason has one, else 0 */
};

/* The detail of the last failure on this thread (a thread-local record: no locking needed).
 * Read it right after the failing call, before any other call on the same thread. */
const struct sl_error_detail *sl_last_error(void);
/* SL_ABI_VERSION of the compiled core. */
int sl_abi_version(void);

/* Internal: record a failure (every field) and return -err, so call sites read
 * `return sl_fail(...)`.  sl_fail leaves access and limit 0; sl_fail_limit sets limit;
 * sl_fail_access sets access and limit (element 0); sl_fail_record copies a whole record saved
 * earlier, so that a caller can re-raise a lower layer's failure with another errno after
 * unwinding. */
int sl_fail(int err, int reason, uint64_t element, uint64_t value);
int sl_fail_limit(int err, int reason, uint64_t element, uint64_t value, uint64_t limit);
int sl_fail_access(int err, int reason, uint32_t access, uint64_t value, uint64_t limit);
int sl_fail_record(int err, const struct sl_error_detail *record);

#endif
