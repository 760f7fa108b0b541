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
#define SL_ABI_VERSION 1

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
