/* Behaviour tests for the IOVA allocator (iova.c) and the IOMMU domain (iommu.c).
 *
 * Plain C, no framework: CHECK counts and reports, and the program's exit status is non-zero
 * when anything failed.  Built with ASan and UBSan by `make test`. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iommu.h"
#include "iova.h"
#include "sl_common.h"

static unsigned n_passed, n_failed;

#define CHECK(cond)                                                                           \
    do {                                                                                      \
        if (cond) {                                                                           \
            n_passed++;                                                                       \
        } else {                                                                              \
            n_failed++;                                                                       \
            fprintf(stderr, "%s:%d: %s: CHECK(%s) failed\n", __FILE__, __LINE__, __func__,   \
                    #cond);                                                                   \
        }                                                                                     \
    } while (0)

#define CHECK_EQ(a, b)                                                                        \
    do {                                                                                      \
        uint64_t a_ = (uint64_t)(a), b_ = (uint64_t)(b);                                      \
        if (a_ == b_) {                                                                       \
            n_passed++;                                                                       \
        } else {                                                                              \
            n_failed++;                                                                       \
            fprintf(stderr, "%s:%d: %s: %s == %s failed: 0x%" PRIx64 " != 0x%" PRIx64 "\n",  \
                    __FILE__, __LINE__, __func__, #a, #b, a_, b_);                            \
        }                                                                                     \
    } while (0)

/* A failing call: its errno and the reason it recorded. */
#define CHECK_FAIL(call, err, reason_code)                                                    \
    do {                                                                                      \
        long long rc_ = (long long)(call);                                                    \
        CHECK_EQ(rc_, -(long long)(err));                                                     \
        CHECK_EQ(sl_last_error()->reason, (reason_code));                                     \
    } while (0)

#define CHECK_OK(call) CHECK_EQ((call), 0)

/* The whole detail record of the last failure (every field, so no stale one slips through). */
#define CHECK_DETAIL(element_, value_, limit_, access_)                                        \
    do {                                                                                      \
        CHECK_EQ(sl_last_error()->element, (element_));                                       \
        CHECK_EQ(sl_last_error()->value, (value_));                                           \
        CHECK_EQ(sl_last_error()->limit, (limit_));                                           \
        CHECK_EQ(sl_last_error()->access, (access_));                                         \
    } while (0)

#define KIB(n) ((uint64_t)(n) << 10)

/* splitmix64, for reproducible random tests. */
static uint64_t rng_next(uint64_t *state)
{
    uint64_t z = (*state += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

static uint64_t pow2_roundup(uint64_t x)
{
    uint64_t p = 1;
    while (p < x)
        p <<= 1;
    return p;
}

/* ======================= IOVA allocator ======================= */

static struct iova_domain *new_iova(uint32_t granule, uint64_t start_pfn, uint32_t depot_max)
{
    struct iova_domain *dom = NULL;
    int rc = iova_domain_create(granule, start_pfn, depot_max, &dom);
    if (rc != 0 || !dom) {
        fprintf(stderr, "iova_domain_create failed: %d\n", rc);
        exit(2);
    }
    return dom;
}

static uint64_t range_size(const struct iova_domain *dom, uint64_t pfn)
{
    struct iova_range r;
    if (iova_find(dom, pfn, &r) != 0)
        return 0;
    return r.pfn_hi - r.pfn_lo + 1;
}

static void test_iova_create(void)
{
    struct iova_domain *dom = (struct iova_domain *)1;
    CHECK_FAIL(iova_domain_create(2048, 1, 1, &dom), EINVAL, SL_REASON_GRANULE);
    CHECK(dom == NULL);
    CHECK_FAIL(iova_domain_create(12288, 1, 1, &dom), EINVAL, SL_REASON_GRANULE);
    CHECK_FAIL(iova_domain_create(131072, 1, 1, &dom), EINVAL, SL_REASON_GRANULE);
    CHECK_FAIL(iova_domain_create(4096, 0, 1, &dom), EINVAL, SL_REASON_IOVA_START_PFN);
    CHECK_DETAIL(0, 0, 0, 0);
    CHECK_FAIL(iova_domain_create(131072 + 4096, 1, 1, &dom), EINVAL, SL_REASON_GRANULE);
    CHECK_DETAIL(0, 131072 + 4096, 0, 0);
    for (uint32_t g = 4096; g <= 65536; g <<= 1) {
        CHECK_OK(iova_domain_create(g, 1, 1, &dom));
        CHECK_EQ(iova_granule_bytes(dom), g);
        CHECK_EQ(iova_start_pfn(dom), 1);
        CHECK_EQ(iova_max_pfn(dom), UINT64_MAX / g);
        CHECK_EQ(iova_live_ranges(dom), 0);
        CHECK_OK(iova_check(dom));
        iova_domain_destroy(dom);
    }
    iova_domain_destroy(NULL);
}

static void test_iova_top_down(void)
{
    struct iova_domain *dom = new_iova(4096, 1, 1);
    uint64_t limit = 0xFFFFF, a, b, c, d, e;
    CHECK_OK(iova_alloc(dom, 1, limit, &a));
    CHECK_EQ(a, 0xFFFFF);
    CHECK_OK(iova_alloc(dom, 1, limit, &b));
    CHECK_EQ(b, 0xFFFFE);
    /* 4 granules start on a multiple of 4: 0xFFFFC..0xFFFFD is too small and misaligned. */
    CHECK_OK(iova_alloc(dom, 4, limit, &c));
    CHECK_EQ(c, 0xFFFF8);
    CHECK_EQ(range_size(dom, c), 4);
    /* The highest fit wins, even above the previous allocation. */
    CHECK_OK(iova_alloc(dom, 1, limit, &d));
    CHECK_EQ(d, 0xFFFFD);
    CHECK_OK(iova_alloc(dom, 2, limit, &e));
    CHECK_EQ(e, 0xFFFF6);
    CHECK_EQ(iova_live_ranges(dom), 5);
    CHECK_EQ(iova_live_granules(dom), 1 + 1 + 4 + 1 + 2);
    /* A limit far above: the range lands just under it. */
    uint64_t f;
    CHECK_OK(iova_alloc(dom, 16, UINT64_MAX, &f));
    CHECK_EQ(f, iova_max_pfn(dom) + 1 - 16);
    /* A limit that is not one below an alignment boundary. */
    uint64_t g;
    CHECK_OK(iova_alloc(dom, 8, 0x1000A, &g));
    CHECK_EQ(g, 0x10000);
    CHECK_OK(iova_check(dom));
    iova_domain_destroy(dom);
}

static void test_iova_alignment_and_rounding(void)
{
    struct iova_domain *dom = new_iova(4096, 1, 1);
    uint64_t pfn;
    /* Below 32 granules the size is rounded up to a power of two. */
    static const uint64_t sizes[][2] = {{1, 1}, {2, 2}, {3, 4},   {5, 8},   {7, 8},   {9, 16},
                                        {17, 32}, {31, 32}, {32, 32}, {33, 33}, {48, 48},
                                        {63, 63}, {64, 64}, {100, 100}, {1000, 1000}};
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        uint64_t before = iova_live_granules(dom);
        CHECK_OK(iova_alloc(dom, sizes[i][0], 0xFFFFFFF, &pfn));
        CHECK_EQ(range_size(dom, pfn), sizes[i][1]);
        CHECK_EQ(pfn % pow2_roundup(sizes[i][0]), 0);
        CHECK(pfn + sizes[i][1] - 1 <= 0xFFFFFFF);
        CHECK_EQ(iova_live_granules(dom) - before, sizes[i][1]);
    }
    /* 33 granules take 33 but start on a multiple of 64: the rest of the block stays free. */
    struct iova_domain *d2 = new_iova(4096, 1, 1);
    uint64_t p33, p1;
    CHECK_OK(iova_alloc(d2, 33, 0xFFF, &p33));
    CHECK_EQ(p33, 0xFC0);
    CHECK_OK(iova_alloc(d2, 1, 0xFFF, &p1));
    CHECK_EQ(p1, 0xFFF);
    CHECK_OK(iova_check(d2));
    iova_domain_destroy(d2);

    CHECK_FAIL(iova_alloc(dom, 0, 0xFFFF, &pfn), EINVAL, SL_REASON_IOVA_SIZE);
    CHECK_OK(iova_check(dom));
    iova_domain_destroy(dom);
}

static void test_iova_limits_and_pfn0(void)
{
    struct iova_domain *dom = new_iova(4096, 1, 1);
    uint64_t pfn, seen = 0;
    /* pfns 1..7 are usable under limit 7; pfn 0 never is. */
    for (int i = 0; i < 7; i++) {
        CHECK_OK(iova_alloc(dom, 1, 7, &pfn));
        CHECK(pfn >= 1 && pfn <= 7);
        seen |= UINT64_C(1) << pfn;
    }
    CHECK_EQ(seen, 0xFE);
    CHECK_FAIL(iova_alloc(dom, 1, 7, &pfn), ENOMEM, SL_REASON_IOVA_EXHAUSTED);
    iova_domain_destroy(dom);

    dom = new_iova(4096, 1, 1);
    /* 8 granules under limit 7 would have to start at 0. */
    CHECK_FAIL(iova_alloc(dom, 8, 7, &pfn), ENOMEM, SL_REASON_IOVA_EXHAUSTED);
    CHECK_DETAIL(0, 8, 7, 0);
    /* value = the rounded size, limit = the limit clamped to the top pfn. */
    CHECK_FAIL(iova_alloc(dom, 5, 3, &pfn), ENOMEM, SL_REASON_IOVA_EXHAUSTED);
    CHECK_DETAIL(0, 8, 3, 0);
    CHECK_FAIL(iova_alloc(dom, 1, 0, &pfn), ENOMEM, SL_REASON_IOVA_EXHAUSTED);
    CHECK_FAIL(iova_alloc(dom, UINT64_MAX, UINT64_MAX, &pfn), ENOMEM, SL_REASON_IOVA_EXHAUSTED);
    CHECK_DETAIL(0, UINT64_MAX, iova_max_pfn(dom), 0);
    CHECK_FAIL(iova_alloc(dom, UINT64_C(1) << 60, UINT64_MAX, &pfn), ENOMEM,
               SL_REASON_IOVA_EXHAUSTED);
    CHECK_EQ(iova_live_ranges(dom), 0);
    iova_domain_destroy(dom);

    /* A higher start_pfn keeps everything below it out of reach. */
    dom = new_iova(65536, 0x100, 1);
    CHECK_OK(iova_alloc(dom, 0x80, 0x1FF, &pfn));
    CHECK_EQ(pfn, 0x180);
    CHECK_OK(iova_alloc(dom, 0x80, 0x1FF, &pfn));
    CHECK_EQ(pfn, 0x100);
    CHECK_FAIL(iova_alloc(dom, 1, 0x1FF, &pfn), ENOMEM, SL_REASON_IOVA_EXHAUSTED);
    CHECK_FAIL(iova_alloc(dom, 1, 0xFF, &pfn), ENOMEM, SL_REASON_IOVA_EXHAUSTED);
    CHECK_OK(iova_check(dom));
    iova_domain_destroy(dom);
}

/* Snapshot of every range, for "changes nothing" checks. */
struct iova_snapshot {
    struct iova_range r[1024];
    uint64_t n, live, granules, cached, reserved;
};

static void snapshot(const struct iova_domain *dom, struct iova_snapshot *s)
{
    memset(s, 0, sizeof(*s));
    s->n = iova_ranges(dom, 0, IOVA_MASK_ALL, s->r, 1024);
    s->live = iova_live_ranges(dom);
    s->granules = iova_live_granules(dom);
    s->cached = iova_cached_ranges(dom);
    s->reserved = iova_reserved_ranges(dom);
}

static int same_snapshot(const struct iova_snapshot *a, const struct iova_snapshot *b)
{
    return a->n == b->n && a->live == b->live && a->granules == b->granules &&
           a->cached == b->cached && a->reserved == b->reserved &&
           memcmp(a->r, b->r, a->n * sizeof(a->r[0])) == 0;
}

static void test_iova_exhaustion_changes_nothing(void)
{
    static struct iova_snapshot before, after;
    struct iova_domain *dom = new_iova(4096, 1, 1);
    uint64_t pfn, p[64];
    /* Fill pfns 1..63 under limit 63 with a mix, then free some small ones into the cache. */
    for (int i = 0; i < 63; i++)
        CHECK_OK(iova_alloc(dom, 1, 63, &p[i]));
    CHECK_OK(iova_free(dom, p[10], 1));
    CHECK_OK(iova_free(dom, p[20], 1));
    CHECK_EQ(iova_cached_ranges(dom), 2);
    snapshot(dom, &before);
    /* 2 granules: even with the cache flushed, no two neighbouring aligned pfns are free. */
    CHECK_FAIL(iova_alloc(dom, 2, 63, &pfn), ENOMEM, SL_REASON_IOVA_EXHAUSTED);
    snapshot(dom, &after);
    CHECK(same_snapshot(&before, &after));
    CHECK_OK(iova_check(dom));
    CHECK_FAIL(iova_alloc_noflush(dom, 2, 63, &pfn), ENOMEM, SL_REASON_IOVA_EXHAUSTED);
    snapshot(dom, &after);
    CHECK(same_snapshot(&before, &after));
    CHECK_FAIL(iova_alloc(dom, 64, 63, &pfn), ENOMEM, SL_REASON_IOVA_EXHAUSTED);
    snapshot(dom, &after);
    CHECK(same_snapshot(&before, &after));

    /* Freeing a neighbour of a cached pfn into the cache too: now a flush makes room for 2. */
    uint64_t lo = p[10] & ~UINT64_C(1), hi = lo + 1;
    for (int i = 0; i < 63; i++)
        if ((p[i] == lo || p[i] == hi) && p[i] != p[10])
            CHECK_OK(iova_free(dom, p[i], 1));
    CHECK_EQ(iova_cached_ranges(dom), 3);
    CHECK_FAIL(iova_alloc_noflush(dom, 2, 63, &pfn), ENOMEM, SL_REASON_IOVA_EXHAUSTED);
    CHECK_EQ(iova_cached_ranges(dom), 3);
    CHECK_OK(iova_alloc(dom, 2, 63, &pfn));
    CHECK_EQ(pfn, lo);
    CHECK_EQ(iova_cached_ranges(dom), 0); /* the flush emptied every cache */
    CHECK_OK(iova_check(dom));
    iova_domain_destroy(dom);
}

static void test_iova_reserve(void)
{
    struct iova_domain *dom = new_iova(4096, 1, 1);
    struct iova_range r[8];
    uint64_t pfn;
    CHECK_OK(iova_reserve(dom, 0x100, 0x1FF));
    CHECK_EQ(iova_reserved_ranges(dom), 1);
    CHECK_OK(iova_alloc(dom, 0x10, 0x1FF, &pfn));
    CHECK_EQ(pfn, 0xF0); /* below the reserved window */
    /* Overlapping and touching reservations merge into one range. */
    CHECK_OK(iova_reserve(dom, 0x180, 0x250));
    CHECK_OK(iova_reserve(dom, 0x251, 0x260));
    CHECK_OK(iova_reserve(dom, 0x300, 0x310));
    CHECK_EQ(iova_reserved_ranges(dom), 2);
    CHECK_OK(iova_reserve(dom, 0x200, 0x2FF)); /* bridges the two */
    CHECK_EQ(iova_reserved_ranges(dom), 1);
    CHECK_EQ(iova_ranges(dom, 0, IOVA_MASK_RESERVED, r, 8), 1);
    CHECK_EQ(r[0].pfn_lo, 0x100);
    CHECK_EQ(r[0].pfn_hi, 0x310);
    CHECK_EQ(r[0].state, IOVA_RANGE_RESERVED);
    CHECK_OK(iova_reserve(dom, 0x120, 0x130)); /* inside: nothing new */
    CHECK_EQ(iova_reserved_ranges(dom), 1);
    CHECK_EQ(iova_ranges(dom, 0, IOVA_MASK_RESERVED, r, 8), 1);
    CHECK_EQ(r[0].pfn_hi, 0x310);
    /* A reservation touching a live range does not swallow it; one overlapping it fails. */
    CHECK_OK(iova_reserve(dom, 0x80, 0xEF));
    CHECK_EQ(iova_reserved_ranges(dom), 2);
    static struct iova_snapshot before, after;
    snapshot(dom, &before);
    CHECK_FAIL(iova_reserve(dom, 0xFF, 0x100), EBUSY, SL_REASON_IOVA_BUSY);
    CHECK_DETAIL(0, 0xF0, 0xFF, 0); /* the live range hit */
    snapshot(dom, &after);
    CHECK(same_snapshot(&before, &after));
    CHECK_FAIL(iova_reserve(dom, 5, 4), EINVAL, SL_REASON_IOVA_RANGE);
    CHECK_DETAIL(0, 5, 4, 0);
    CHECK_FAIL(iova_reserve(dom, 5, UINT64_MAX), EINVAL, SL_REASON_IOVA_RANGE);
    CHECK_DETAIL(0, 5, UINT64_MAX, 0);
    /* Reserved ranges cannot be freed, and allocation skips them entirely. */
    CHECK_FAIL(iova_free(dom, 0x100, 0x211), EINVAL, SL_REASON_IOVA_NOT_LIVE);
    CHECK_DETAIL(0, 0x100, 0, 0);
    /* Every 0x80-aligned block under 0x310 is reserved, live or starts at pfn 0. */
    CHECK_FAIL(iova_alloc(dom, 0x80, 0x310, &pfn), ENOMEM, SL_REASON_IOVA_EXHAUSTED);
    CHECK_OK(iova_alloc(dom, 0x40, 0x310, &pfn));
    CHECK_EQ(pfn, 0x40);
    CHECK_OK(iova_check(dom));
    iova_domain_destroy(dom);

    /* Reserving over a cached range takes it out of the cache. */
    dom = new_iova(4096, 1, 1);
    CHECK_OK(iova_alloc(dom, 1, 0x1000, &pfn));
    CHECK_OK(iova_free(dom, pfn, 1));
    CHECK_EQ(iova_cached_ranges(dom), 1);
    CHECK_OK(iova_reserve(dom, pfn, pfn));
    CHECK_EQ(iova_cached_ranges(dom), 0);
    CHECK_OK(iova_find(dom, pfn, &r[0]));
    CHECK_EQ(r[0].state, IOVA_RANGE_RESERVED);
    uint64_t again;
    CHECK_OK(iova_alloc(dom, 1, 0x1000, &again));
    CHECK_EQ(again, pfn - 1);
    /* Reserving pfn 0 and ranges below start_pfn is allowed. */
    CHECK_OK(iova_reserve(dom, 0, 0));
    CHECK_OK(iova_reserve(dom, UINT64_MAX - 1, UINT64_MAX - 1));
    CHECK_OK(iova_check(dom));
    iova_domain_destroy(dom);
}

static void test_iova_free_and_find(void)
{
    struct iova_domain *dom = new_iova(4096, 1, 1);
    struct iova_range r;
    uint64_t a, b;
    CHECK_OK(iova_alloc(dom, 100, 0xFFFFF, &a));
    CHECK_OK(iova_find(dom, a + 50, &r));
    CHECK_EQ(r.pfn_lo, a);
    CHECK_EQ(r.pfn_hi, a + 99);
    CHECK_EQ(r.state, IOVA_RANGE_LIVE);
    CHECK_FAIL(iova_find(dom, a + 100, &r), ENOENT, SL_REASON_IOVA_NOT_FOUND);
    CHECK_FAIL(iova_find(dom, UINT64_MAX, &r), ENOENT, SL_REASON_IOVA_NOT_FOUND);
    CHECK_FAIL(iova_free(dom, a + 100, 100), ENOENT, SL_REASON_IOVA_NOT_FOUND);
    CHECK_DETAIL(0, a + 100, 0, 0);
    CHECK_FAIL(iova_free(dom, a + 1, 100), EINVAL, SL_REASON_IOVA_NOT_START);
    CHECK_DETAIL(0, a + 1, 0, 0);
    CHECK_FAIL(iova_free(dom, a, 99), EINVAL, SL_REASON_IOVA_SIZE_MISMATCH);
    CHECK_DETAIL(0, 99, 100, 0);
    CHECK_FAIL(iova_free(dom, a, 0), EINVAL, SL_REASON_IOVA_SIZE);
    CHECK_DETAIL(0, 0, 0, 0);
    CHECK_EQ(iova_live_ranges(dom), 1);
    /* Order >= 6 goes straight back to free space. */
    CHECK_OK(iova_free(dom, a, 100));
    CHECK_EQ(iova_live_ranges(dom), 0);
    CHECK_EQ(iova_cached_ranges(dom), 0);
    CHECK_FAIL(iova_find(dom, a, &r), ENOENT, SL_REASON_IOVA_NOT_FOUND);
    CHECK_DETAIL(0, a, 0, 0);
    /* A cached range is found (state CACHED) but cannot be freed twice. */
    CHECK_OK(iova_alloc(dom, 3, 0xFFFFF, &b));
    CHECK_OK(iova_free(dom, b, 3));
    CHECK_OK(iova_find(dom, b, &r));
    CHECK_EQ(r.state, IOVA_RANGE_CACHED);
    CHECK_FAIL(iova_free(dom, b, 3), EINVAL, SL_REASON_IOVA_NOT_LIVE);
    CHECK_EQ(iova_cached_ranges(dom), 1);
    /* Sizes that round to the allocation are accepted: 3 and 4 are both order 2. */
    uint64_t c;
    CHECK_OK(iova_alloc(dom, 3, 0xFFFFF, &c));
    CHECK_EQ(c, b);
    CHECK_FAIL(iova_free(dom, c, 5), EINVAL, SL_REASON_IOVA_SIZE_MISMATCH);
    CHECK_DETAIL(0, 5, 4, 0); /* the allocation took 4 granules for 3 */
    CHECK_OK(iova_free(dom, c, 4));
    CHECK_OK(iova_check(dom));
    iova_domain_destroy(dom);
}

static void test_iova_rcache(void)
{
    struct iova_domain *dom = new_iova(4096, 1, 1);
    uint64_t a, b, c, x;
    CHECK_OK(iova_alloc(dom, 3, 0xFFFFF, &a));
    CHECK_OK(iova_free(dom, a, 3));
    CHECK_EQ(iova_live_ranges(dom), 0);
    CHECK_EQ(iova_cached_ranges(dom), 1);
    /* The same order takes it back; a different order does not. */
    CHECK_OK(iova_alloc(dom, 2, 0xFFFFF, &x));
    CHECK(x != a);
    CHECK_OK(iova_alloc(dom, 4, 0xFFFFF, &b));
    CHECK_EQ(b, a);
    CHECK_EQ(iova_cached_ranges(dom), 0);
    CHECK_EQ(iova_live_ranges(dom), 2);
    /* Last in, first out. */
    CHECK_OK(iova_alloc(dom, 4, 0xFFFFF, &c));
    CHECK_OK(iova_free(dom, b, 4));
    CHECK_OK(iova_free(dom, c, 4));
    uint64_t first, second;
    CHECK_OK(iova_alloc(dom, 4, 0xFFFFF, &first));
    CHECK_OK(iova_alloc(dom, 4, 0xFFFFF, &second));
    CHECK_EQ(first, c);
    CHECK_EQ(second, b);
    /* A cached range above the limit is skipped; the tree serves instead. */
    uint64_t high, low;
    CHECK_OK(iova_alloc(dom, 1, 0xFFFFF, &high));
    CHECK_OK(iova_free(dom, high, 1));
    CHECK_OK(iova_alloc(dom, 1, 0xFFF, &low));
    CHECK_EQ(low, 0xFFF);
    CHECK_EQ(iova_cached_ranges(dom), 1);
    /* 32 granules are still cached (order 5), 33 are not. */
    uint64_t p32, p33;
    CHECK_OK(iova_alloc(dom, 32, 0xFFFFF, &p32));
    CHECK_OK(iova_free(dom, p32, 17)); /* 17 rounds to 32: same order */
    CHECK_EQ(iova_cached_ranges(dom), 2);
    CHECK_OK(iova_alloc(dom, 33, 0xFFFFF, &p33));
    CHECK_OK(iova_free(dom, p33, 33));
    CHECK_EQ(iova_cached_ranges(dom), 2);
    iova_flush_rcache(dom);
    CHECK_EQ(iova_cached_ranges(dom), 0);
    CHECK_OK(iova_check(dom));
    iova_domain_destroy(dom);

    /* Magazine overflow, depot of 1: loaded and prev hold 127 each, the depot one more full
     * magazine; the next overflow sends a whole magazine back to free space. */
    dom = new_iova(4096, 1, 1);
    enum { N = 508 };
    static uint64_t pf[N];
    for (int i = 0; i < N; i++)
        CHECK_OK(iova_alloc(dom, 1, 0xFFFFF, &pf[i]));
    for (int i = 0; i < 381; i++)
        CHECK_OK(iova_free(dom, pf[i], 1));
    CHECK_EQ(iova_cached_ranges(dom), 381);
    CHECK_OK(iova_check(dom));
    CHECK_OK(iova_free(dom, pf[381], 1));
    CHECK_EQ(iova_cached_ranges(dom), 381 - 127 + 1);
    CHECK_OK(iova_check(dom));
    for (int i = 382; i < N; i++)
        CHECK_OK(iova_free(dom, pf[i], 1));
    CHECK_EQ(iova_cached_ranges(dom), 381);
    CHECK_EQ(iova_live_ranges(dom), 0);
    CHECK_OK(iova_check(dom));
    /* Taking them all back drains loaded, then prev, then the depot. */
    for (int i = 0; i < 381; i++)
        CHECK_OK(iova_alloc(dom, 1, 0xFFFFF, &x));
    CHECK_EQ(iova_cached_ranges(dom), 0);
    CHECK_EQ(iova_live_ranges(dom), 381);
    CHECK_OK(iova_check(dom));
    iova_domain_destroy(dom); /* live ranges are freed with the domain */

    /* Depot of 0: only loaded and prev. */
    dom = new_iova(4096, 1, 0);
    for (int i = 0; i < 300; i++)
        CHECK_OK(iova_alloc(dom, 2, 0xFFFFF, &pf[i]));
    for (int i = 0; i < 300; i++)
        CHECK_OK(iova_free(dom, pf[i], 2));
    CHECK(iova_cached_ranges(dom) <= 254);
    CHECK_OK(iova_check(dom));
    iova_domain_destroy(dom);
}

static void test_iova_ranges_dump(void)
{
    struct iova_domain *dom = new_iova(4096, 1, 1);
    uint64_t p[10];
    struct iova_range r[4];
    for (int i = 0; i < 10; i++)
        CHECK_OK(iova_alloc(dom, 64, 0xFFFFF, &p[i]));
    CHECK_OK(iova_reserve(dom, 0x10, 0x1F));
    CHECK_EQ(iova_ranges(dom, 0, IOVA_MASK_ALL, r, 4), 4);
    CHECK_EQ(r[0].pfn_lo, 0x10);
    CHECK_EQ(r[1].pfn_lo, p[9]);
    CHECK_EQ(r[3].pfn_lo, p[7]);
    /* Paging from the last pfn_hi + 1 visits every range exactly once, in order. */
    uint64_t from = 0, total = 0, prev_hi = 0;
    for (;;) {
        uint64_t n = iova_ranges(dom, from, IOVA_MASK_LIVE, r, 3);
        if (!n)
            break;
        for (uint64_t i = 0; i < n; i++) {
            CHECK(r[i].pfn_lo > prev_hi);
            CHECK_EQ(r[i].state, IOVA_RANGE_LIVE);
            prev_hi = r[i].pfn_hi;
        }
        total += n;
        from = r[n - 1].pfn_hi + 1;
    }
    CHECK_EQ(total, 10);
    CHECK_EQ(iova_ranges(dom, 0, IOVA_MASK_CACHED, r, 4), 0);
    iova_domain_destroy(dom);
}

/* Random allocations checked against a brute-force model of the highest fit.  Flushing the
 * cache before each allocation makes every answer come from the tree. */
#define SPACE 4096u
static uint8_t used[SPACE];

static int64_t model_highest_fit(uint64_t size, uint64_t limit, uint64_t start_pfn)
{
    uint64_t align = pow2_roundup(size);
    if (limit + 1 < size)
        return -1;
    for (int64_t s = (int64_t)((limit + 1 - size) & ~(align - 1)); s >= (int64_t)start_pfn;
         s -= (int64_t)align) {
        uint64_t k = 0;
        while (k < size && !used[s + k])
            k++;
        if (k == size)
            return s;
    }
    return -1;
}

static void test_iova_random_vs_model(void)
{
    enum { MAXLIVE = 256 };
    struct live {
        uint64_t pfn, req, size;
    } live[MAXLIVE];
    unsigned n_live = 0;
    uint64_t rng = 12345;
    memset(used, 0, sizeof(used));
    struct iova_domain *dom = new_iova(4096, 3, 1);
    CHECK_OK(iova_reserve(dom, 1000, 1100));
    memset(used + 1000, 1, 101);
    unsigned mismatches = 0, checks_failed = 0;
    for (int step = 0; step < 20000; step++) {
        int flush = step < 10000;
        if (n_live < MAXLIVE && (n_live == 0 || rng_next(&rng) % 100 < 55)) {
            uint64_t req = 1 + rng_next(&rng) % (rng_next(&rng) % 4 == 0 ? 80 : 9);
            uint64_t limit = 50 + rng_next(&rng) % (SPACE - 50);
            uint64_t size = req < 32 ? pow2_roundup(req) : req;
            if (flush)
                iova_flush_rcache(dom);
            uint64_t pfn;
            int rc = iova_alloc(dom, req, limit, &pfn);
            if (flush) {
                int64_t want = model_highest_fit(size, limit, 3);
                if ((want < 0) != (rc != 0) || (rc == 0 && (int64_t)pfn != want))
                    mismatches++;
            }
            if (rc == 0) {
                /* Whatever served it, the range must be free, aligned and under the limit. */
                if (pfn % pow2_roundup(req) || pfn + size - 1 > limit || pfn < 3)
                    mismatches++;
                for (uint64_t k = 0; k < size; k++) {
                    if (used[pfn + k] == 1)
                        mismatches++;
                    used[pfn + k] = 1;
                }
                live[n_live++] = (struct live){pfn, req, size};
            } else if (rc != -ENOMEM) {
                mismatches++;
            }
        } else {
            unsigned i = (unsigned)(rng_next(&rng) % n_live);
            /* free with any size that rounds to the same allocation */
            uint64_t req = live[i].req;
            if (req < 32 && req > 1 && rng_next(&rng) % 2)
                req = live[i].size / 2 + 1;
            if (iova_free(dom, live[i].pfn, req) != 0)
                mismatches++;
            /* A cached range stays occupied but no longer live; in flush mode it is released
             * before the next allocation, so the model may mark it free now. */
            if (flush || live[i].size > 32)
                memset(used + live[i].pfn, 0, live[i].size);
            else
                memset(used + live[i].pfn, 2, live[i].size); /* cached: free later */
            live[i] = live[--n_live];
        }
        if (step % 97 == 0 && iova_check(dom) != 0)
            checks_failed++;
    }
    CHECK_EQ(mismatches, 0);
    CHECK_EQ(checks_failed, 0);
    CHECK_OK(iova_check(dom));
    CHECK_EQ(iova_live_ranges(dom), n_live);
    iova_domain_destroy(dom);
}

/* Many single-granule allocations: the top-down search must not slow down as ranges pile up. */
static void test_iova_many(void)
{
    struct iova_domain *dom = new_iova(4096, 1, 1);
    enum { N = 200000 };
    uint64_t *pf = malloc(N * sizeof(*pf));
    CHECK(pf != NULL);
    unsigned bad = 0;
    for (uint64_t i = 0; i < N; i++) {
        if (iova_alloc(dom, 1, 0xFFFFFF, &pf[i]) != 0 || pf[i] != 0xFFFFFF - i)
            bad++;
    }
    CHECK_EQ(bad, 0);
    CHECK_OK(iova_check(dom));
    for (uint64_t i = 0; i < N; i += 2)
        if (iova_free(dom, pf[i], 1) != 0)
            bad++;
    iova_flush_rcache(dom);
    CHECK_OK(iova_check(dom));
    /* Every other pfn is free now: a 2-granule range only fits below the whole block. */
    uint64_t p2;
    CHECK_OK(iova_alloc(dom, 2, 0xFFFFFF, &p2));
    CHECK_EQ(p2, 0xFFFFFF - N + 1 - 2);
    CHECK_EQ(bad, 0);
    free(pf);
    iova_domain_destroy(dom);
}

/* ======================= IOMMU domain ======================= */

static struct iommu_domain *new_iommu(uint32_t granule, unsigned bits)
{
    struct iommu_domain *dom = NULL;
    int rc = iommu_domain_create(granule, bits, &dom);
    if (rc != 0 || !dom) {
        fprintf(stderr, "iommu_domain_create failed: %d\n", rc);
        exit(2);
    }
    return dom;
}

static void test_iommu_create(void)
{
    struct iommu_domain *dom = (struct iommu_domain *)1;
    CHECK_FAIL(iommu_domain_create(1024, 48, &dom), EINVAL, SL_REASON_GRANULE);
    CHECK(dom == NULL);
    CHECK_FAIL(iommu_domain_create(4096 * 3, 48, &dom), EINVAL, SL_REASON_GRANULE);
    CHECK_FAIL(iommu_domain_create(4096, 12, &dom), EINVAL, SL_REASON_APERTURE_BITS);
    CHECK_DETAIL(0, 12, 0, 0);
    CHECK_FAIL(iommu_domain_create(4096, 65, &dom), EINVAL, SL_REASON_APERTURE_BITS);
    static const struct {
        uint32_t granule;
        unsigned bits, levels;
    } shapes[] = {{4096, 48, 4},  {4096, 39, 3},  {4096, 57, 5},  {4096, 64, 6}, {4096, 13, 1},
                  {4096, 21, 1},  {4096, 22, 2},  {16384, 48, 4}, {65536, 48, 3}, {65536, 42, 2},
                  {65536, 64, 4}, {65536, 17, 1}};
    for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++) {
        CHECK_OK(iommu_domain_create(shapes[i].granule, shapes[i].bits, &dom));
        CHECK_EQ(iommu_levels(dom), shapes[i].levels);
        CHECK_EQ(iommu_aperture_bits(dom), shapes[i].bits);
        CHECK_EQ(iommu_granule_bytes(dom), shapes[i].granule);
        CHECK_EQ(iommu_table_count(dom), 1);
        CHECK_EQ(iommu_aperture_last(dom),
                 shapes[i].bits == 64 ? UINT64_MAX : (UINT64_C(1) << shapes[i].bits) - 1);
        /* The very last page of the aperture maps and translates. */
        uint64_t last_page = iommu_aperture_last(dom) - (shapes[i].granule - 1), phys;
        CHECK_OK(iommu_map(dom, last_page, 0x7000000 * (uint64_t)shapes[i].granule / 4096,
                           shapes[i].granule, IOMMU_READ));
        CHECK_OK(iommu_translate(dom, iommu_aperture_last(dom), IOMMU_READ, &phys));
        CHECK_EQ(phys, 0x7000000 * (uint64_t)shapes[i].granule / 4096 + shapes[i].granule - 1);
        CHECK_OK(iommu_map(dom, 0, 0, shapes[i].granule, IOMMU_WRITE));
        CHECK_EQ(iommu_mapped_pages(dom), 2);
        iommu_domain_destroy(dom); /* with mappings still present */
    }
    iommu_domain_destroy(NULL);
}

static void test_iommu_map_translate(void)
{
    struct iommu_domain *dom = new_iommu(4096, 48);
    uint64_t phys;
    uint32_t prot;
    CHECK_OK(iommu_map(dom, 0x10000, 0x200000, KIB(12), IOMMU_READ | IOMMU_WRITE));
    CHECK_EQ(iommu_mapped_pages(dom), 3);
    CHECK_EQ(iommu_table_count(dom), 4); /* root + one table per lower level */
    for (uint64_t off = 0; off < KIB(12); off += 1000) {
        CHECK_OK(iommu_translate(dom, 0x10000 + off, IOMMU_READ, &phys));
        CHECK_EQ(phys, 0x200000 + off);
        CHECK_OK(iommu_translate(dom, 0x10000 + off, IOMMU_WRITE, &phys));
        CHECK_EQ(phys, 0x200000 + off);
    }
    CHECK_EQ(iommu_lookup(dom, 0x12345, &phys, &prot), 1);
    CHECK_EQ(phys, 0x202345);
    CHECK_EQ(prot, IOMMU_READ | IOMMU_WRITE);
    CHECK_EQ(iommu_lookup(dom, 0x13000, &phys, &prot), 0);
    CHECK_EQ(phys, 0);
    CHECK_EQ(prot, 0);
    CHECK_EQ(iommu_lookup(dom, UINT64_MAX, &phys, &prot), 0);
    CHECK_EQ(iommu_fault_total(dom), 0);
    /* Extra kernel bits are kept and reported, and do not grant access. */
    CHECK_OK(iommu_map(dom, 0x40000, 0x9000, KIB(4), IOMMU_WRITE | IOMMU_CACHE | IOMMU_PRIV));
    CHECK_EQ(iommu_lookup(dom, 0x40000, &phys, &prot), 1);
    CHECK_EQ(prot, IOMMU_WRITE | IOMMU_CACHE | IOMMU_PRIV);
    CHECK_FAIL(iommu_translate(dom, 0x40000, IOMMU_READ, &phys), EFAULT,
               SL_REASON_IOMMU_FAULT_PERMISSION);
    /* Physical addresses near the top of 64 bits. */
    CHECK_OK(iommu_map(dom, 0x50000, UINT64_MAX - KIB(8) + 1, KIB(8), IOMMU_READ));
    CHECK_OK(iommu_translate(dom, 0x51FFF, IOMMU_READ, &phys));
    CHECK_EQ(phys, UINT64_MAX);
    iommu_domain_destroy(dom);
}

static void test_iommu_faults(void)
{
    struct iommu_domain *dom = new_iommu(4096, 48);
    uint64_t phys = 0xdead;
    struct iommu_fault f[IOMMU_FAULT_LOG_SIZE];
    CHECK_OK(iommu_map(dom, 0x1000, 0x5000, KIB(4), IOMMU_READ));  /* device may read only */
    CHECK_OK(iommu_map(dom, 0x2000, 0x6000, KIB(4), IOMMU_WRITE)); /* device may write only */
    CHECK_OK(iommu_map(dom, 0x3000, 0x7000, KIB(4), 0));           /* nothing */

    CHECK_OK(iommu_translate(dom, 0x1010, IOMMU_READ, &phys));
    CHECK_EQ(phys, 0x5010);
    phys = 0xdead;
    CHECK_FAIL(iommu_translate(dom, 0x1010, IOMMU_WRITE, &phys), EFAULT,
               SL_REASON_IOMMU_FAULT_PERMISSION);
    CHECK_DETAIL(0, 0x1010, 0, IOMMU_WRITE);
    CHECK_EQ(phys, 0xdead); /* untouched on a fault */
    CHECK_OK(iommu_translate(dom, 0x2020, IOMMU_WRITE, &phys));
    CHECK_EQ(phys, 0x6020);
    CHECK_FAIL(iommu_translate(dom, 0x2020, IOMMU_READ, &phys), EFAULT,
               SL_REASON_IOMMU_FAULT_PERMISSION);
    CHECK_FAIL(iommu_translate(dom, 0x3000, IOMMU_READ, &phys), EFAULT,
               SL_REASON_IOMMU_FAULT_PERMISSION);
    CHECK_FAIL(iommu_translate(dom, 0x3000, IOMMU_WRITE, &phys), EFAULT,
               SL_REASON_IOMMU_FAULT_PERMISSION);
    CHECK_FAIL(iommu_translate(dom, 0x4000, IOMMU_READ, &phys), EFAULT,
               SL_REASON_IOMMU_FAULT_NOT_MAPPED);
    CHECK_FAIL(iommu_translate(dom, 0x7FFF00000000, IOMMU_READ, &phys), EFAULT,
               SL_REASON_IOMMU_FAULT_NOT_MAPPED);
    CHECK_FAIL(iommu_translate(dom, UINT64_C(1) << 48, IOMMU_WRITE, &phys), EFAULT,
               SL_REASON_IOMMU_FAULT_APERTURE);
    CHECK_DETAIL(0, UINT64_C(1) << 48, 0, IOMMU_WRITE);
    CHECK_FAIL(iommu_translate(dom, UINT64_MAX, IOMMU_READ, &phys), EFAULT,
               SL_REASON_IOMMU_FAULT_APERTURE);
    /* A bad access argument is a caller error, not a device fault. */
    CHECK_FAIL(iommu_translate(dom, 0x1000, 0, &phys), EINVAL, SL_REASON_IOMMU_ACCESS);
    CHECK_FAIL(iommu_translate(dom, 0x1000, IOMMU_READ | IOMMU_WRITE, &phys), EINVAL,
               SL_REASON_IOMMU_ACCESS);
    CHECK_DETAIL(0, IOMMU_READ | IOMMU_WRITE, 0, 0); /* no access left over from the fault */

    CHECK_EQ(iommu_fault_total(dom), 8);
    CHECK_EQ(iommu_fault_count(dom), 8);
    CHECK_EQ(iommu_faults_read(dom, f, IOMMU_FAULT_LOG_SIZE), 8);
    static const struct {
        uint64_t iova;
        uint32_t access, reason, prot;
    } want[] = {
        {0x1010, IOMMU_WRITE, IOMMU_FAULT_NO_PERMISSION, IOMMU_READ},
        {0x2020, IOMMU_READ, IOMMU_FAULT_NO_PERMISSION, IOMMU_WRITE},
        {0x3000, IOMMU_READ, IOMMU_FAULT_NO_PERMISSION, 0},
        {0x3000, IOMMU_WRITE, IOMMU_FAULT_NO_PERMISSION, 0},
        {0x4000, IOMMU_READ, IOMMU_FAULT_NOT_MAPPED, 0},
        {0x7FFF00000000, IOMMU_READ, IOMMU_FAULT_NOT_MAPPED, 0},
        {UINT64_C(1) << 48, IOMMU_WRITE, IOMMU_FAULT_OUT_OF_APERTURE, 0},
        {UINT64_MAX, IOMMU_READ, IOMMU_FAULT_OUT_OF_APERTURE, 0},
    };
    for (unsigned i = 0; i < 8; i++) {
        CHECK_EQ(f[i].seq, i);
        CHECK_EQ(f[i].iova, want[i].iova);
        CHECK_EQ(f[i].access, want[i].access);
        CHECK_EQ(f[i].reason, want[i].reason);
        CHECK_EQ(f[i].prot, want[i].prot);
    }
    /* Reading with less room gives the oldest ones. */
    CHECK_EQ(iommu_faults_read(dom, f, 3), 3);
    CHECK_EQ(f[2].seq, 2);

    /* The ring keeps the newest IOMMU_FAULT_LOG_SIZE; the total keeps counting. */
    for (unsigned i = 0; i < 300; i++)
        iommu_translate(dom, 0x100000 + i * 4096, IOMMU_READ, &phys);
    CHECK_EQ(iommu_fault_total(dom), 308);
    CHECK_EQ(iommu_fault_count(dom), IOMMU_FAULT_LOG_SIZE);
    CHECK_EQ(iommu_faults_read(dom, f, IOMMU_FAULT_LOG_SIZE), IOMMU_FAULT_LOG_SIZE);
    CHECK_EQ(f[0].seq, 308 - IOMMU_FAULT_LOG_SIZE);
    CHECK_EQ(f[IOMMU_FAULT_LOG_SIZE - 1].seq, 307);
    CHECK_EQ(f[IOMMU_FAULT_LOG_SIZE - 1].iova, 0x100000 + 299 * 4096);
    unsigned ordered = 1;
    for (unsigned i = 1; i < IOMMU_FAULT_LOG_SIZE; i++)
        ordered &= f[i].seq == f[i - 1].seq + 1;
    CHECK(ordered);
    iommu_faults_clear(dom);
    CHECK_EQ(iommu_fault_count(dom), 0);
    CHECK_EQ(iommu_fault_total(dom), 308);
    CHECK_EQ(iommu_faults_read(dom, f, IOMMU_FAULT_LOG_SIZE), 0);
    CHECK_FAIL(iommu_translate(dom, 0, IOMMU_READ, &phys), EFAULT,
               SL_REASON_IOMMU_FAULT_NOT_MAPPED);
    CHECK_EQ(iommu_faults_read(dom, f, IOMMU_FAULT_LOG_SIZE), 1);
    CHECK_EQ(f[0].seq, 308);
    iommu_domain_destroy(dom);
}

static void test_iommu_bad_args(void)
{
    struct iommu_domain *dom = new_iommu(4096, 48);
    CHECK_OK(iommu_map(dom, 0x8000, 0x8000, KIB(4), IOMMU_READ));
    uint64_t tables = iommu_table_count(dom);
    CHECK_FAIL(iommu_map(dom, 0x10800, 0x1000, KIB(4), IOMMU_READ), EINVAL,
               SL_REASON_IOMMU_ALIGN);
    CHECK_DETAIL(0, 0x10800, 4096, 0);
    CHECK_FAIL(iommu_map(dom, 0x10000, 0x1001, KIB(4), IOMMU_READ), EINVAL,
               SL_REASON_IOMMU_ALIGN);
    CHECK_DETAIL(0, 0x1001, 4096, 0);
    CHECK_FAIL(iommu_map(dom, 0x10000, 0x1000, 100, IOMMU_READ), EINVAL, SL_REASON_IOMMU_ALIGN);
    CHECK_DETAIL(0, 100, 4096, 0);
    /* Several misaligned: iova first, then phys. */
    CHECK_FAIL(iommu_map(dom, 0x10001, 0x1001, 100, IOMMU_READ), EINVAL, SL_REASON_IOMMU_ALIGN);
    CHECK_DETAIL(0, 0x10001, 4096, 0);
    CHECK_FAIL(iommu_map(dom, 0x10000, 0x1001, 100, IOMMU_READ), EINVAL, SL_REASON_IOMMU_ALIGN);
    CHECK_DETAIL(0, 0x1001, 4096, 0);
    CHECK_FAIL(iommu_map(dom, 0x10001, 0x1000, 0, IOMMU_READ), EINVAL, SL_REASON_IOMMU_ALIGN);
    CHECK_FAIL(iommu_map(dom, 0x10000, 0x1000, KIB(4), 64), EINVAL, SL_REASON_IOMMU_PROT);
    CHECK_DETAIL(0, 64, 0, 0);
    CHECK_FAIL(iommu_map(dom, (UINT64_C(1) << 48) - KIB(4), 0x1000, KIB(8), IOMMU_READ), EINVAL,
               SL_REASON_IOMMU_APERTURE);
    CHECK_DETAIL(0, (UINT64_C(1) << 48) - KIB(4), (UINT64_C(1) << 48) - 1, 0);
    CHECK_FAIL(iommu_map(dom, UINT64_C(1) << 48, 0x1000, KIB(4), IOMMU_READ), EINVAL,
               SL_REASON_IOMMU_APERTURE);
    CHECK_FAIL(iommu_map(dom, 0x10000, UINT64_MAX - KIB(4) + 1, KIB(8), IOMMU_READ), EINVAL,
               SL_REASON_IOMMU_PHYS_RANGE);
    CHECK_DETAIL(0, UINT64_MAX - KIB(4) + 1, 0, 0);
    CHECK_FAIL(iommu_map(dom, 0x10000, 0, UINT64_MAX - 4095, IOMMU_READ), EINVAL,
               SL_REASON_IOMMU_APERTURE);
    CHECK_OK(iommu_map(dom, 0x10000, 0x1000, 0, IOMMU_READ)); /* size 0: nothing */
    CHECK_EQ(iommu_mapped_pages(dom), 1);
    CHECK_EQ(iommu_table_count(dom), tables);

    CHECK_FAIL(iommu_unmap(dom, 0x8800, KIB(4)), EINVAL, SL_REASON_IOMMU_ALIGN);
    CHECK_FAIL(iommu_unmap(dom, 0x8000, 10), EINVAL, SL_REASON_IOMMU_ALIGN);
    CHECK_FAIL(iommu_unmap(dom, 0x8000, UINT64_C(1) << 48), EINVAL, SL_REASON_IOMMU_APERTURE);
    CHECK_EQ(iommu_unmap(dom, 0x8000, 0), 0);
    CHECK_EQ(iommu_mapped_pages(dom), 1);
    iommu_domain_destroy(dom);

    /* A 64-bit aperture: sizes too large for the int64_t result are refused. */
    dom = new_iommu(4096, 64);
    CHECK_FAIL(iommu_unmap(dom, 0, UINT64_C(1) << 63), EINVAL, SL_REASON_IOMMU_APERTURE);
    CHECK_DETAIL(0, 0, UINT64_MAX, 0);
    CHECK_EQ(iommu_unmap(dom, 0, (UINT64_C(1) << 62)), 0); /* nothing mapped: stops at once */
    iommu_domain_destroy(dom);
}

static void test_iommu_eexist_atomic(void)
{
    struct iommu_domain *dom = new_iommu(4096, 48);
    uint64_t phys;
    uint32_t prot;
    /* One page mapped at the start of the second leaf table of a range. */
    uint64_t leaf_span = UINT64_C(512) * 4096; /* one leaf table covers 2 MiB */
    uint64_t base = UINT64_C(0x40000000);
    CHECK_OK(iommu_map(dom, base + leaf_span, 0x100000, KIB(4), IOMMU_READ));
    uint64_t tables = iommu_table_count(dom);
    /* Starts in an empty leaf (its tables are created), clashes in the next one. */
    CHECK_FAIL(iommu_map(dom, base + leaf_span - KIB(40), 0x200000, KIB(80),
                         IOMMU_READ | IOMMU_WRITE),
               EEXIST, SL_REASON_IOMMU_MAPPED);
    CHECK_DETAIL(0, base + leaf_span, 0, 0);
    CHECK_EQ(iommu_mapped_pages(dom), 1);
    CHECK_EQ(iommu_table_count(dom), tables);
    for (uint64_t off = 0; off < KIB(80); off += KIB(4))
        CHECK_EQ(iommu_lookup(dom, base + leaf_span - KIB(40) + off, &phys, &prot),
                 off == KIB(40));
    CHECK_EQ(iommu_lookup(dom, base + leaf_span, &phys, &prot), 1);
    CHECK_EQ(phys, 0x100000);
    CHECK_EQ(prot, IOMMU_READ);
    /* A clash in the middle of a far larger range, spanning many leaves and a new upper table. */
    CHECK_OK(iommu_map(dom, base + 5 * leaf_span + KIB(4) * 7, 0x300000, KIB(4), IOMMU_WRITE));
    tables = iommu_table_count(dom);
    uint64_t start = base - 400 * leaf_span; /* crosses a 1 GiB boundary: a new upper table */
    CHECK_FAIL(iommu_map(dom, start, 0, 700 * leaf_span, IOMMU_READ), EEXIST,
               SL_REASON_IOMMU_MAPPED);
    CHECK_DETAIL(0, base + leaf_span, 0, 0);
    CHECK_EQ(iommu_mapped_pages(dom), 2);
    CHECK_EQ(iommu_table_count(dom), tables);
    /* Mapping the same page twice, and mapping right next to a page, behave. */
    CHECK_FAIL(iommu_map(dom, base + leaf_span, 0x100000, KIB(4), IOMMU_READ), EEXIST,
               SL_REASON_IOMMU_MAPPED);
    CHECK_OK(iommu_map(dom, base + leaf_span - KIB(4), 0x400000, KIB(4), IOMMU_READ));
    CHECK_OK(iommu_map(dom, base + leaf_span + KIB(4), 0x500000, KIB(4), IOMMU_READ));
    CHECK_EQ(iommu_mapped_pages(dom), 4);
    iommu_domain_destroy(dom);
}

static void test_iommu_unmap(void)
{
    struct iommu_domain *dom = new_iommu(4096, 48);
    uint64_t phys;
    uint32_t prot;
    uint64_t base = UINT64_C(0x7F0000000000);
    CHECK_OK(iommu_map(dom, base, 0x10000000, KIB(4) * 1500, IOMMU_READ));
    CHECK_EQ(iommu_mapped_pages(dom), 1500);
    CHECK_EQ(iommu_table_count(dom), 1 + 1 + 1 + 3); /* root, L1, L2, three leaves */
    /* Stops at the first hole. */
    CHECK_EQ(iommu_unmap(dom, base + KIB(4) * 100, KIB(4) * 10), KIB(4) * 10);
    CHECK_EQ(iommu_unmap(dom, base + KIB(4) * 95, KIB(4) * 10), KIB(4) * 5);
    CHECK_EQ(iommu_lookup(dom, base + KIB(4) * 94, &phys, &prot), 1);
    CHECK_EQ(iommu_lookup(dom, base + KIB(4) * 110, &phys, &prot), 1);
    CHECK_EQ(iommu_mapped_pages(dom), 1485);
    CHECK_EQ(iommu_unmap(dom, base + KIB(4) * 100, KIB(4)), 0);
    CHECK_EQ(iommu_unmap(dom, 0, KIB(4)), 0);
    /* Unmapping a whole leaf's worth frees that leaf table at once. */
    CHECK_EQ(iommu_unmap(dom, base + KIB(4) * 512, KIB(4) * 512), KIB(4) * 512);
    CHECK_EQ(iommu_table_count(dom), 5);
    CHECK_EQ(iommu_mapped_pages(dom), 973);
    /* Everything else, piece by piece: every table but the root goes. */
    CHECK_EQ(iommu_unmap(dom, base, KIB(4) * 95), KIB(4) * 95);
    CHECK_EQ(iommu_unmap(dom, base + KIB(4) * 110, KIB(4) * 402), KIB(4) * 402);
    CHECK_EQ(iommu_table_count(dom), 4);
    CHECK_EQ(iommu_unmap(dom, base + KIB(4) * 1024, KIB(4) * 1000), KIB(4) * 476);
    CHECK_EQ(iommu_mapped_pages(dom), 0);
    CHECK_EQ(iommu_table_count(dom), 1);
    /* And it maps again. */
    CHECK_OK(iommu_map(dom, base, 0x10000000, KIB(4) * 1500, IOMMU_WRITE));
    CHECK_OK(iommu_translate(dom, base + KIB(4) * 1499 + 7, IOMMU_WRITE, &phys));
    CHECK_EQ(phys, 0x10000000 + KIB(4) * 1499 + 7);
    iommu_domain_destroy(dom);
}

static void test_iommu_translate_range(void)
{
    struct iommu_domain *dom = new_iommu(4096, 32);
    struct iommu_run runs[8];
    uint64_t n_runs, done;
    /* Pages 0,1 contiguous at 0x100000; page 2 elsewhere; page 3 read-only; page 4 unmapped. */
    CHECK_OK(iommu_map(dom, 0x10000, 0x100000, KIB(8), IOMMU_READ | IOMMU_WRITE));
    CHECK_OK(iommu_map(dom, 0x12000, 0x300000, KIB(4), IOMMU_READ | IOMMU_WRITE));
    CHECK_OK(iommu_map(dom, 0x13000, 0x301000, KIB(4), IOMMU_READ));

    CHECK_OK(iommu_translate_range(dom, 0x10100, KIB(16) - 0x200, IOMMU_READ, runs, 8, &n_runs,
                                   &done));
    CHECK_EQ(n_runs, 2);
    CHECK_EQ(done, KIB(16) - 0x200);
    CHECK_EQ(runs[0].phys, 0x100100);
    CHECK_EQ(runs[0].len_bytes, KIB(8) - 0x100);
    CHECK_EQ(runs[1].phys, 0x300000);
    CHECK_EQ(runs[1].len_bytes, KIB(8) - 0x100);
    /* The read-only page stops a write, after the earlier pages were translated. */
    uint64_t before = iommu_fault_total(dom);
    CHECK_FAIL(iommu_translate_range(dom, 0x10000, KIB(16), IOMMU_WRITE, runs, 8, &n_runs, &done),
               EFAULT, SL_REASON_IOMMU_FAULT_PERMISSION);
    CHECK_DETAIL(0, 0x13000, 0, IOMMU_WRITE);
    CHECK_EQ(n_runs, 2);
    CHECK_EQ(done, KIB(12));
    CHECK_EQ(iommu_fault_total(dom), before + 1);
    /* Running into the unmapped page. */
    CHECK_FAIL(iommu_translate_range(dom, 0x13F00, 0x200, IOMMU_READ, runs, 8, &n_runs, &done),
               EFAULT, SL_REASON_IOMMU_FAULT_NOT_MAPPED);
    CHECK_DETAIL(0, 0x14000, 0, IOMMU_READ);
    CHECK_EQ(n_runs, 1);
    CHECK_EQ(done, 0x100);
    CHECK_EQ(runs[0].phys, 0x301F00);
    /* Too few runs: -ENOSPC, no fault logged. */
    before = iommu_fault_total(dom);
    CHECK_FAIL(iommu_translate_range(dom, 0x10000, KIB(16), IOMMU_READ, runs, 1, &n_runs, &done),
               ENOSPC, SL_REASON_IOMMU_RUNS_CAPACITY);
    CHECK_DETAIL(0, 0x10000 + KIB(8), 1, 0); /* stopped where the second run would start */
    CHECK_EQ(n_runs, 1);
    CHECK_EQ(done, KIB(8));
    CHECK_EQ(iommu_fault_total(dom), before);
    /* Bad access, zero length, wrap-around. */
    CHECK_FAIL(iommu_translate_range(dom, 0x10000, 1, 4, runs, 8, &n_runs, &done), EINVAL,
               SL_REASON_IOMMU_ACCESS);
    CHECK_OK(iommu_translate_range(dom, 0x10000, 0, IOMMU_READ, runs, 0, &n_runs, &done));
    CHECK_EQ(n_runs, 0);
    CHECK_FAIL(iommu_translate_range(dom, UINT64_MAX - 10, 12, IOMMU_READ, runs, 8, &n_runs,
                                     &done),
               EINVAL, SL_REASON_IOMMU_APERTURE);
    CHECK_DETAIL(0, UINT64_MAX - 10, (UINT64_C(1) << 32) - 1, 0);
    /* Crossing the top of the aperture. */
    uint64_t top = (UINT64_C(1) << 32) - KIB(4);
    CHECK_OK(iommu_map(dom, top, 0x900000, KIB(4), IOMMU_READ));
    CHECK_FAIL(iommu_translate_range(dom, top + 0xF00, 0x200, IOMMU_READ, runs, 8, &n_runs,
                                     &done),
               EFAULT, SL_REASON_IOMMU_FAULT_APERTURE);
    CHECK_DETAIL(0, UINT64_C(1) << 32, 0, IOMMU_READ);
    CHECK_EQ(done, 0x100);
    CHECK_EQ(runs[0].phys, 0x900F00);
    iommu_domain_destroy(dom);

    /* 64 KiB granule, across leaf tables: one run for a physically contiguous mapping. */
    dom = new_iommu(65536, 48);
    uint64_t leaf_span = UINT64_C(8192) * 65536;
    CHECK_OK(iommu_map(dom, leaf_span - KIB(64) * 3, 0x40000000, KIB(64) * 6, IOMMU_WRITE));
    CHECK_OK(iommu_translate_range(dom, leaf_span - KIB(64) * 3 + 5, KIB(64) * 6 - 10,
                                   IOMMU_WRITE, runs, 1, &n_runs, &done));
    CHECK_EQ(n_runs, 1);
    CHECK_EQ(runs[0].phys, 0x40000005);
    CHECK_EQ(runs[0].len_bytes, KIB(64) * 6 - 10);
    iommu_domain_destroy(dom);
}

static void test_iommu_map_runs(void)
{
    struct iommu_domain *dom = new_iommu(4096, 48);
    uint64_t phys, n_runs, done;
    uint32_t prot;
    struct iommu_run out[8];
    const struct iommu_run runs[] = {
        {0x100000, KIB(8)}, {0x500000, 0}, {0x200000, KIB(4)}, {0x201000, KIB(12)}, {0x9000, 0},
    };
    uint64_t iova = UINT64_C(0x80000000) - KIB(12); /* crosses into another upper table */
    CHECK_OK(iommu_map_runs(dom, iova, runs, 5, IOMMU_READ));
    CHECK_EQ(iommu_mapped_pages(dom), 6);
    static const uint64_t want[] = {0x100000, 0x101000, 0x200000, 0x201000, 0x202000, 0x203000};
    for (unsigned i = 0; i < 6; i++) {
        CHECK_EQ(iommu_lookup(dom, iova + i * KIB(4), &phys, &prot), 1);
        CHECK_EQ(phys, want[i]);
        CHECK_EQ(prot, IOMMU_READ);
    }
    CHECK_EQ(iommu_lookup(dom, iova + 6 * KIB(4), &phys, &prot), 0);
    CHECK_OK(iommu_translate_range(dom, iova, KIB(24), IOMMU_READ, out, 8, &n_runs, &done));
    CHECK_EQ(n_runs, 2);
    CHECK_EQ(out[1].phys, 0x200000);
    CHECK_EQ(out[1].len_bytes, KIB(16));
    uint64_t tables = iommu_table_count(dom);

    /* Clash inside the third run: nothing of the new list stays mapped. */
    const struct iommu_run clash[] = {{0x700000, KIB(4)}, {0x710000, KIB(8)}, {0x720000, KIB(8)}};
    CHECK_FAIL(iommu_map_runs(dom, iova - KIB(16), clash, 3, IOMMU_WRITE), EEXIST,
               SL_REASON_IOMMU_MAPPED);
    CHECK_DETAIL(0, iova, 0, 0); /* the first page found mapped */
    CHECK_EQ(iommu_mapped_pages(dom), 6);
    CHECK_EQ(iommu_table_count(dom), tables);
    for (unsigned i = 1; i <= 4; i++)
        CHECK_EQ(iommu_lookup(dom, iova - i * KIB(4), &phys, &prot), 0);
    CHECK_EQ(iommu_lookup(dom, iova, &phys, &prot), 1);
    CHECK_EQ(phys, 0x100000);

    /* Bad runs are refused before anything is touched. */
    const struct iommu_run odd_phys[] = {{0x1000, KIB(4)}, {0x2800, KIB(4)}};
    CHECK_FAIL(iommu_map_runs(dom, 0, odd_phys, 2, IOMMU_READ), EINVAL, SL_REASON_IOMMU_ALIGN);
    CHECK_DETAIL(1, 0x2800, 4096, 0);
    const struct iommu_run odd_len[] = {{0x1000, KIB(4)}, {0x3000, 0}, {0x1000, 100}};
    CHECK_FAIL(iommu_map_runs(dom, 0, odd_len, 3, IOMMU_READ), EINVAL, SL_REASON_IOMMU_ALIGN);
    CHECK_DETAIL(2, 100, 4096, 0);
    CHECK_FAIL(iommu_map_runs(dom, 0x800, runs, 1, IOMMU_READ), EINVAL, SL_REASON_IOMMU_ALIGN);
    CHECK_DETAIL(0, 0x800, 4096, 0);
    CHECK_FAIL(iommu_map_runs(dom, 0, runs, 1, 0x80), EINVAL, SL_REASON_IOMMU_PROT);
    CHECK_DETAIL(0, 0x80, 0, 0);
    const struct iommu_run wrap[] = {{0x1000, KIB(4)}, {UINT64_MAX - 4095, KIB(8)}};
    CHECK_FAIL(iommu_map_runs(dom, 0, wrap, 2, IOMMU_READ), EINVAL, SL_REASON_IOMMU_PHYS_RANGE);
    CHECK_DETAIL(1, UINT64_MAX - 4095, 0, 0);
    const struct iommu_run huge[] = {{0, UINT64_C(1) << 47}, {0, UINT64_C(1) << 47}};
    CHECK_FAIL(iommu_map_runs(dom, 0x1000, huge, 2, IOMMU_READ), EINVAL,
               SL_REASON_IOMMU_APERTURE);
    CHECK_DETAIL(1, 0x1000, (UINT64_C(1) << 48) - 1, 0); /* the second run passes the end */
    const struct iommu_run over[] = {{0, UINT64_C(1) << 63}, {0, UINT64_C(1) << 63}};
    CHECK_FAIL(iommu_map_runs(dom, 0, over, 2, IOMMU_READ), EINVAL, SL_REASON_IOMMU_APERTURE);
    CHECK_DETAIL(1, 0, (UINT64_C(1) << 48) - 1, 0); /* the total passes 2^64 at run 1 */
    const struct iommu_run empty[] = {{0x1000, 0}, {0x3000, 0}};
    CHECK_OK(iommu_map_runs(dom, 0x1000, empty, 2, IOMMU_READ));
    CHECK_OK(iommu_map_runs(dom, 0x1000, NULL, 0, IOMMU_READ));
    CHECK_EQ(iommu_mapped_pages(dom), 6);
    CHECK_EQ(iommu_unmap(dom, iova, KIB(24)), KIB(24));
    CHECK_EQ(iommu_table_count(dom), 1);
    iommu_domain_destroy(dom);
}

/* Random map/unmap against a flat model of one window of pages, on a two-level table. */
static void test_iommu_random_vs_model(void)
{
    enum { WINDOW = 4096 }; /* pages: 8 leaf tables of 512 */
    static uint64_t model[WINDOW]; /* 0 or phys | prot | 1 << 11 */
    memset(model, 0, sizeof(model));
    struct iommu_domain *dom = new_iommu(4096, 30);
    CHECK_EQ(iommu_levels(dom), 2);
    uint64_t rng = 99, base = UINT64_C(0x1000000);
    unsigned bad = 0;
    for (int step = 0; step < 4000; step++) {
        uint64_t first = rng_next(&rng) % WINDOW;
        uint64_t n = 1 + rng_next(&rng) % (rng_next(&rng) % 8 ? 16 : 1200);
        if (first + n > WINDOW)
            n = WINDOW - first;
        uint64_t iova = base + first * 4096;
        if (rng_next(&rng) % 2) {
            uint64_t phys = (rng_next(&rng) % 100000) * 4096;
            uint32_t prot = (uint32_t)(rng_next(&rng) % 4);
            uint64_t clash = n;
            for (uint64_t k = 0; k < n; k++)
                if (model[first + k]) {
                    clash = k;
                    break;
                }
            /* Half the time as a list of runs of 0..5 pages with unrelated addresses. */
            struct iommu_run runs[1300];
            uint64_t n_runs = 0, page_phys[1200];
            if (rng_next(&rng) % 2) {
                for (uint64_t k = 0; k < n;) {
                    uint64_t len = rng_next(&rng) % 6;
                    if (len > n - k)
                        len = n - k;
                    uint64_t run_phys = (rng_next(&rng) % 100000) * 4096;
                    runs[n_runs++] = (struct iommu_run){run_phys, len * 4096};
                    for (uint64_t j = 0; j < len; j++)
                        page_phys[k + j] = run_phys + j * 4096;
                    k += len;
                }
            } else {
                runs[n_runs++] = (struct iommu_run){phys, n * 4096};
                for (uint64_t k = 0; k < n; k++)
                    page_phys[k] = phys + k * 4096;
            }
            int rc = n_runs == 1 ? iommu_map(dom, iova, runs[0].phys, n * 4096, prot)
                                 : iommu_map_runs(dom, iova, runs, n_runs, prot);
            if (clash < n) {
                bad += rc != -EEXIST;
            } else {
                bad += rc != 0;
                for (uint64_t k = 0; k < n; k++)
                    model[first + k] = page_phys[k] | prot | (UINT64_C(1) << 11);
            }
        } else {
            uint64_t k = 0;
            while (k < n && model[first + k])
                model[first + k++] = 0;
            bad += iommu_unmap(dom, iova, n * 4096) != (int64_t)(k * 4096);
        }
        if (step % 50 == 0 || step == 3999) {
            uint64_t mapped = 0, leaves = 0;
            for (uint64_t p = 0; p < WINDOW; p++) {
                uint64_t phys;
                uint32_t prot;
                int m = iommu_lookup(dom, base + p * 4096 + 3, &phys, &prot);
                if (m != (model[p] != 0) ||
                    (m && (phys != (model[p] & ~UINT64_C(4095)) + 3 ||
                           prot != (model[p] & IOMMU_PROT_MASK))))
                    bad++;
                mapped += m;
            }
            for (uint64_t leaf = 0; leaf < WINDOW / 512; leaf++) {
                int any = 0;
                for (uint64_t p = leaf * 512; p < leaf * 512 + 512; p++)
                    any |= model[p] != 0;
                leaves += any;
            }
            bad += iommu_mapped_pages(dom) != mapped;
            bad += iommu_table_count(dom) != 1 + leaves;
        }
    }
    CHECK_EQ(bad, 0);
    iommu_domain_destroy(dom);
}

/* The benchmark's shape: one IOVA block for a 1,048,576-page table, mapped and unmapped. */
static void test_big_table(void)
{
    struct iova_domain *iovad = new_iova(4096, 1, 1);
    struct iommu_domain *dom = new_iommu(4096, 48);
    uint64_t n_pages = UINT64_C(1) << 20, pfn, phys;
    CHECK_OK(iova_alloc(iovad, n_pages, (UINT64_C(1) << 36) - 1, &pfn));
    CHECK_EQ(pfn % n_pages, 0);
    uint64_t iova = pfn << 12;
    CHECK_OK(iommu_map(dom, iova, 0x100000000, n_pages * 4096, IOMMU_READ));
    CHECK_EQ(iommu_mapped_pages(dom), n_pages);
    CHECK_EQ(iommu_table_count(dom), 1 + 1 + 4 + 2048);
    CHECK_OK(iommu_translate(dom, iova + n_pages * 4096 - 1, IOMMU_READ, &phys));
    CHECK_EQ(phys, 0x100000000 + n_pages * 4096 - 1);
    CHECK_EQ(iommu_unmap(dom, iova, n_pages * 4096), (int64_t)(n_pages * 4096));
    CHECK_EQ(iommu_mapped_pages(dom), 0);
    CHECK_EQ(iommu_table_count(dom), 1);
    CHECK_OK(iova_free(iovad, pfn, n_pages));
    CHECK_EQ(iova_live_ranges(iovad), 0);
    iommu_domain_destroy(dom);
    iova_domain_destroy(iovad);
}

int main(void)
{
    test_iova_create();
    test_iova_top_down();
    test_iova_alignment_and_rounding();
    test_iova_limits_and_pfn0();
    test_iova_exhaustion_changes_nothing();
    test_iova_reserve();
    test_iova_free_and_find();
    test_iova_rcache();
    test_iova_ranges_dump();
    test_iova_random_vs_model();
    test_iova_many();
    test_iommu_create();
    test_iommu_map_translate();
    test_iommu_faults();
    test_iommu_bad_args();
    test_iommu_eexist_atomic();
    test_iommu_unmap();
    test_iommu_translate_range();
    test_iommu_map_runs();
    test_iommu_random_vs_model();
    test_big_table();
    printf("%u passed, %u failed\n", n_passed, n_failed);
    return n_failed ? 1 : 0;
}
