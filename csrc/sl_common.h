/* Shared definitions of the scatterlist C core: error details and the ABI version.
 *
 * Every fallible function returns 0 or a negative errno.  When an errno alone would not tell
 * the caller which rule was broken, the function also records a reason code (and, where it
 * helps, the index of the offending element) in a thread-local detail record that the caller
 * reads right after the failing call.  The Python layer turns the pair into one message. */
#ifndef SL_COMMON_H
#define SL_COMMON_H

#include <stddef.h>
#include <stdint.h>

/* Bumped whenever a declaration the bindings rely on changes; checked at import. */
#define SL_ABI_VERSION 2

enum sl_reason {
    SL_REASON_NONE = 0,
    SL_REASON_ZERO_PAGES = 1,        /* a page array with no pages */
    SL_REASON_MAX_SEGMENT = 2,       /* max_segment below one page after rounding down */
    SL_REASON_OFFSET = 3,            /* offset not inside the first page */
    SL_REASON_SIZE = 4,              /* size does not end inside the last page */
    SL_REASON_PFN_RANGE = 5,         /* a pfn whose physical address does not fit in 64 bits */
    SL_REASON_TABLE_FINAL = 6,       /* append after the call with left_pages == 0 */
    SL_REASON_APPEND_OFFSET = 7,     /* non-zero offset on an append */
    SL_REASON_MID_PAGE_REPEAT = 8,   /* append repeats the page the previous call ended inside */
    SL_REASON_MERGE_PARTIAL = 9,     /* append that merges into the last entry with a partial size */
    SL_REASON_TOO_MANY_ENTRIES = 10, /* entry count would overflow 32 bits */
    SL_REASON_NO_MEMORY = 11,        /* the host allocator failed */
    SL_REASON_PAGE_SIZE = 12,        /* page size not a power of two in [4 KiB, 64 KiB] */
    SL_REASON_PAGE_SIZE_MISMATCH = 13, /* a table and a memory with different page sizes */
    SL_REASON_PHYS_RANGE = 14,       /* a physical address beyond the emulated memory */
    SL_REASON_OUT_OF_PAGES = 15,     /* the page allocator cannot satisfy the request */
    SL_REASON_LAYOUT = 16,           /* unknown page layout */
    SL_REASON_NOT_ALLOCATED = 17,    /* freeing a page that is not allocated */
    SL_REASON_NENTS_FOR_LEN = 18,    /* the list ends before the requested length */
    SL_REASON_MEMORY_SIZE = 19,      /* memory size not a positive multiple of the page size */
    SL_REASON_DUPLICATE_PFN = 20,    /* the same pfn twice in one free request */
    SL_REASON_TABLE_MAPPED = 21,     /* a table change or map while the table is DMA-mapped */
    SL_REASON_ENTRY_LENGTH = 22,     /* an entry length of 0 or beyond 32 bits */
    /* 32..63: IOVA allocator and IOMMU domain (iova.c, iommu.c) */
    SL_REASON_GRANULE = 32,          /* IOMMU granule not a power of two in [4 KiB, 64 KiB] */
    SL_REASON_IOVA_START_PFN = 33,   /* IOVA domain start_pfn 0: IOVA 0 must never be handed out */
    SL_REASON_IOVA_SIZE = 34,        /* IOVA allocation or free of zero granules */
    SL_REASON_IOVA_EXHAUSTED = 35,   /* no free IOVA range of that size fits under the limit */
    SL_REASON_IOVA_RANGE = 36,       /* IOVA reserve with lo > hi or hi at the top pfn */
    SL_REASON_IOVA_BUSY = 37,        /* IOVA reserve overlapping a live range */
    SL_REASON_IOVA_NOT_FOUND = 38,   /* IOVA free or find of a pfn in no range */
    SL_REASON_IOVA_NOT_LIVE = 39,    /* IOVA free of a reserved or already freed (cached) range */
    SL_REASON_IOVA_NOT_START = 40,   /* IOVA free of a pfn inside, not at the start of, its range */
    SL_REASON_IOVA_SIZE_MISMATCH = 41, /* IOVA free with a size not matching the allocation */
    SL_REASON_APERTURE_BITS = 42,    /* IOMMU aperture width not in [granule bits + 1, 64] */
    SL_REASON_IOMMU_ALIGN = 43,      /* IOMMU iova, phys or size not a multiple of the granule */
    SL_REASON_IOMMU_APERTURE = 44,   /* IOMMU map/unmap/translate range beyond the aperture */
    SL_REASON_IOMMU_PHYS_RANGE = 45, /* IOMMU map whose physical range wraps past 2^64 */
    SL_REASON_IOMMU_PROT = 46,       /* IOMMU map with unknown permission bits */
    SL_REASON_IOMMU_MAPPED = 47,     /* IOMMU map over a page that is already mapped */
    SL_REASON_IOMMU_ACCESS = 48,     /* IOMMU access not exactly IOMMU_READ or IOMMU_WRITE */
    SL_REASON_IOMMU_FAULT_NOT_MAPPED = 49, /* device access to an unmapped IOVA (fault logged) */
    SL_REASON_IOMMU_FAULT_PERMISSION = 50, /* device access its mapping forbids (fault logged) */
    SL_REASON_IOMMU_FAULT_APERTURE = 51,   /* device access beyond the aperture (fault logged) */
    SL_REASON_IOMMU_RUNS_CAPACITY = 52,    /* run array full before the translated range ended */
    /* 64..95: DMA mapping and device access (dma.c) */
    SL_REASON_DMA_DIRECTION = 64,    /* direction not BIDIRECTIONAL, TO_DEVICE or FROM_DEVICE */
    SL_REASON_DEVICE_UNBOUND = 65,   /* mapping for a device that is not bound */
    SL_REASON_TABLE_NOT_FINAL = 66,  /* mapping an append table still open for appends */
    SL_REASON_TABLE_FREED = 67,      /* mapping a table whose entries were freed */
    SL_REASON_NOT_MAPPED = 68,       /* unmap or sync of a table that is not mapped */
    SL_REASON_WRONG_DEVICE = 69,     /* unmap or sync with another device than the map's */
    SL_REASON_DMA_MASK = 70,         /* direct mapping of memory above the device's DMA mask */
    SL_REASON_IOVA_SPACE = 71,       /* no IOVA block under the DMA mask (the kernel's -ENOMEM) */
    SL_REASON_GRANULE_PAGE = 72,     /* IOMMU granule larger than the memory's page size */
    SL_REASON_DMA_ACCESS_MASK = 73,  /* direct device access above its DMA mask (a fault) */
    SL_REASON_DMA_ACCESS_MEMORY = 74, /* device access that reaches past the emulated memory */
    SL_REASON_DMA_LENGTH = 75,       /* a transfer larger than the table's DMA segments */
    SL_REASON_FOREIGN = 76,          /* objects of different memories or IOMMUs mixed */
    SL_REASON_NENTS_RANGE = 77,      /* an entry count of 0 or beyond the table's orig_nents */
    SL_REASON_INJECTED = 78,         /* a failure injected on the device (fault injection) */
};

struct sl_error_detail {
    int reason;      /* enum sl_reason */
    uint64_t index;  /* element the reason refers to, when there is one */
    uint64_t value;  /* offending value, when there is one */
};

/* The detail of the last failure on this thread.  Valid until the next failing call. */
const struct sl_error_detail *sl_last_error(void);
int sl_abi_version(void);

/* Internal: record a failure and return -err, so call sites read `return sl_fail(...)`. */
int sl_fail(int err, int reason, uint64_t index, uint64_t value);

#endif
