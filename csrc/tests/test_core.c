/* Tests of the C core on its own (memory, tables, DMA, fork safety), built with ASan and UBSan
 * by `make -C csrc test`.  Prints "N passed, M failed" and exits non-zero on any failure. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "dma.h"
#include "physmem.h"
#include "scatterlist.h"

static int passed, failed;

#define CHECK(cond)                                                                        \
    do {                                                                                   \
        if (cond) {                                                                        \
            passed++;                                                                      \
        } else {                                                                           \
            failed++;                                                                      \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);       \
        }                                                                                  \
    } while (0)

#define CHECK_EQ(a, b)                                                                     \
    do {                                                                                   \
        uint64_t a_ = (uint64_t)(a), b_ = (uint64_t)(b);                                   \
        if (a_ == b_) {                                                                    \
            passed++;                                                                      \
        } else {                                                                           \
            failed++;                                                                      \
            fprintf(stderr, "%s:%d: %s == %s failed: 0x%" PRIx64 " != 0x%" PRIx64 "\n",    \
                    __FILE__, __LINE__, #a, #b, a_, b_);                                   \
        }                                                                                  \
    } while (0)

/* A failing call: its errno and the reason it recorded. */
#define CHECK_FAIL(call, err, reason_code)                                                 \
    do {                                                                                   \
        long long rc_ = (long long)(call);                                                 \
        CHECK_EQ(rc_, -(long long)(err));                                                  \
        CHECK_EQ(sl_last_error()->reason, (reason_code));                                  \
    } while (0)

/* The whole detail record of the last failure. */
#define CHECK_DETAIL(element_, value_, limit_, access_)                                    \
    do {                                                                                   \
        CHECK_EQ(sl_last_error()->element, (element_));                                    \
        CHECK_EQ(sl_last_error()->value, (value_));                                        \
        CHECK_EQ(sl_last_error()->limit, (limit_));                                        \
        CHECK_EQ(sl_last_error()->access, (access_));                                      \
    } while (0)

#define PAGE 4096u

static struct sl_table *build(const uint64_t *pfns, uint64_t n, uint32_t offset,
                              uint64_t size, uint32_t max_segment, uint64_t left, int *rc)
{
    struct sl_table *t = NULL;
    *rc = sl_table_create(PAGE, max_segment, &t);
    if (*rc)
        return NULL;
    *rc = sg_alloc_append_table_from_pages(t, pfns, n, offset, size, left);
    return t;
}

static int rows_equal(const struct sl_table *t, const uint64_t *expected, uint64_t n)
{
    uint64_t *rows = calloc(3 * n, sizeof(*rows));
    int ok = sl_table_export_cpu(t, n, rows) == 0 && memcmp(rows, expected, 24 * n) == 0;
    free(rows);
    return ok;
}

static void test_physmem(void)
{
    struct physmem *mem = NULL;
    CHECK(physmem_create(0, PAGE, &mem) == -EINVAL && !mem);
    CHECK(physmem_create(PAGE, 3000, &mem) == -EINVAL);
    CHECK(physmem_create(UINT64_C(1) << 40, PAGE, &mem) == 0);
    CHECK(physmem_n_pages(mem) == (UINT64_C(1) << 28));
    uint64_t pfns[8];
    CHECK(physmem_alloc_pages(mem, 4, SL_LAYOUT_CONTIGUOUS, 0, pfns) == 0);
    CHECK(pfns[0] == 0 && pfns[3] == 3);
    CHECK(physmem_alloc_pages(mem, 3, SL_LAYOUT_SCATTERED, 0, pfns + 4) == 0);
    CHECK(pfns[4] == 4 && pfns[5] == 6 && pfns[6] == 8);
    CHECK(physmem_free_pages_list(mem, pfns, 4) == 0);
    CHECK(physmem_free_pages_list(mem, pfns, 1) == -EINVAL); /* double free */
    CHECK(sl_last_error()->reason == SL_REASON_NOT_ALLOCATED);
    CHECK_DETAIL(0, pfns[0], 0, 0);
    uint64_t twice[2] = {pfns[4], pfns[4]};
    CHECK(physmem_free_pages_list(mem, twice, 2) == -EINVAL);
    CHECK(sl_last_error()->reason == SL_REASON_DUPLICATE_PFN);
    CHECK_DETAIL(1, pfns[4], 0, 0);
    uint64_t beyond[2] = {pfns[4], UINT64_C(1) << 28};
    CHECK_FAIL(physmem_free_pages_list(mem, beyond, 2), EINVAL, SL_REASON_PHYS_RANGE);
    CHECK_DETAIL(1, UINT64_C(1) << 28, 0, 0);
    CHECK(physmem_free_pages(mem) == physmem_n_pages(mem) - 3); /* nothing freed */
    const char msg[] = "across a page boundary";
    CHECK(physmem_write(mem, PAGE - 5, msg, sizeof msg) == 0);
    char back[sizeof msg];
    CHECK(physmem_read(mem, PAGE - 5, back, sizeof back) == 0 && !memcmp(back, msg, sizeof msg));
    CHECK(physmem_resident_pages(mem) == 2);
    CHECK(physmem_read(mem, (UINT64_C(1) << 40) - 1, back, 2) == -EFAULT);
    CHECK_EQ(sl_last_error()->reason, SL_REASON_PHYS_RANGE);
    CHECK_DETAIL(0, (UINT64_C(1) << 40) - 1, 0, 0);
    CHECK(physmem_write(mem, UINT64_MAX, back, 2) == -EFAULT);
    physmem_destroy(mem);

    CHECK(physmem_create(8 * PAGE, PAGE, &mem) == 0);
    uint64_t many[9];
    CHECK(physmem_alloc_pages(mem, 9, SL_LAYOUT_CONTIGUOUS, 0, many) == -ENOMEM);
    CHECK_EQ(sl_last_error()->reason, SL_REASON_OUT_OF_PAGES);
    CHECK_DETAIL(0, 9, 0, 0);
    CHECK_FAIL(physmem_alloc_pages(mem, 1, 7, 0, many), EINVAL, SL_REASON_LAYOUT);
    CHECK_DETAIL(0, 7, 0, 0);
    CHECK(physmem_alloc_pages(mem, 5, SL_LAYOUT_SCATTERED, 0, many) == -ENOMEM);
    CHECK(physmem_free_pages(mem) == 8);
    CHECK(physmem_alloc_pages(mem, 8, SL_LAYOUT_RANDOM, 42, many) == -ENOMEM); /* gaps */
    CHECK(physmem_alloc_pages(mem, 8, SL_LAYOUT_CONTIGUOUS, 0, many) == 0);
    CHECK(physmem_free_pages(mem) == 0);
    physmem_destroy(mem);
}

static void test_tables(void)
{
    int rc;
    /* The kernel's merging: consecutive pfns join an entry up to max_segment, and an append
     * continues the previous call's last entry. */
    uint64_t a[] = {0, 1, 3, 4, 5, 6};
    struct sl_table *t = build(a, 6, 0, 6 * PAGE, 12 * PAGE, 6, &rc);
    CHECK(rc == 0);
    uint64_t b[] = {7, 8, 9, 10, 11, 12};
    CHECK(sg_alloc_append_table_from_pages(t, b, 6, 0, 6 * PAGE, 0) == 0);
    uint64_t expect_a[] = {0, 0, 8192, 3, 0, 40960};
    CHECK(t->sgt.orig_nents == 2 && rows_equal(t, expect_a, 2));
    CHECK(sg_alloc_append_table_from_pages(t, b, 1, 0, PAGE, 0) == -EINVAL);
    CHECK(sl_last_error()->reason == SL_REASON_TABLE_FINAL);
    sl_table_destroy(t);

    uint64_t c[] = {0, 2, 4};
    t = build(c, 3, 100, 3 * PAGE - 200, SG_MAX_SEGMENT_UNLIMITED, 0, &rc);
    uint64_t expect_c[] = {0, 100, 3996, 2, 0, 4096, 4, 0, 3996};
    CHECK(rc == 0 && rows_equal(t, expect_c, 3));
    CHECK(sg_nents_for_len(t, 1) == 1 && sg_nents_for_len(t, 3997) == 2);
    CHECK(sg_nents_for_len(t, 3 * PAGE) == -EINVAL);
    CHECK_EQ(sl_last_error()->reason, SL_REASON_NENTS_FOR_LEN);
    CHECK_DETAIL(0, 3 * PAGE, 3 * PAGE - 200, 0);
    uint64_t rows4[12];
    CHECK_FAIL(sl_table_export_cpu(t, 4, rows4), EINVAL, SL_REASON_NENTS_RANGE);
    CHECK_DETAIL(0, 4, 3, 0);
    CHECK_FAIL(sl_table_export_dma(t, 5, rows4), EINVAL, SL_REASON_NENTS_RANGE);
    CHECK_DETAIL(0, 5, 3, 0);
    uint64_t visited[4];
    CHECK(sl_table_page_pfns(t, 1, visited, 4) == 2 && visited[0] == 2 && visited[1] == 4);
    sl_table_destroy(t);

    /* Chaining: 129 scattered pages use a full chunk (127 + link) and a chunk of 2. */
    uint64_t *many = malloc(10000 * sizeof(*many));
    for (uint64_t i = 0; i < 10000; i++)
        many[i] = 2 * i;
    t = build(many, 129, 0, 129 * PAGE, SG_MAX_SEGMENT_UNLIMITED, 0, &rc);
    uint32_t slots[2];
    CHECK(rc == 0 && t->n_chunks == 2);
    sl_table_chunk_slots(t, slots);
    CHECK(slots[0] == 128 && slots[1] == 2 && sg_nents(t) == 129);
    sl_table_destroy(t);
    t = build(many, 10000, 0, 10000 * PAGE, SG_MAX_SEGMENT_UNLIMITED, 0, &rc);
    CHECK(rc == 0 && sg_nents(t) == 10000 && t->sgt.orig_nents == 10000);
    sl_table_destroy(t);

    /* Failures change nothing. */
    t = build(many, 3, 0, 3 * PAGE, SG_MAX_SEGMENT_UNLIMITED, 5, &rc);
    uint32_t total = t->total_nents;
    uint64_t bad[] = {100, UINT64_C(1) << 60};
    CHECK(sg_alloc_append_table_from_pages(t, bad, 2, 0, 2 * PAGE, 0) == -EINVAL);
    CHECK(sl_last_error()->reason == SL_REASON_PFN_RANGE);
    CHECK_DETAIL(1, UINT64_C(1) << 60, 0, 0);
    CHECK(t->total_nents == total && t->sgt.orig_nents == 3 && !t->final);
    CHECK(sg_alloc_append_table_from_pages(t, many + 3, 2, 5, 2 * PAGE, 0) == -EINVAL);
    CHECK(sl_last_error()->reason == SL_REASON_APPEND_OFFSET);
    CHECK_DETAIL(0, 5, 0, 0);
    CHECK(sg_alloc_append_table_from_pages(t, many + 3, 2, 0, 2 * PAGE, 0) == 0);
    CHECK(t->sgt.orig_nents == 5 && t->final);
    sl_table_destroy(t);

    /* Entries set by hand. */
    uint64_t rows[] = {9, 4000, 200, 11, 0, 8192};
    CHECK(sl_table_create(PAGE, SG_MAX_SEGMENT_UNLIMITED, &t) == 0);
    CHECK(sg_alloc_table_from_entries(t, rows, 2) == 0 && rows_equal(t, rows, 2));
    sl_table_destroy(t);
    uint64_t bad_rows[] = {9, 0, 200, 11, UINT64_C(1) << 32, 8192, 12, 0, 0};
    CHECK(sl_table_create(PAGE, SG_MAX_SEGMENT_UNLIMITED, &t) == 0);
    CHECK_FAIL(sg_alloc_table_from_entries(t, bad_rows, 3), EINVAL, SL_REASON_OFFSET);
    CHECK_DETAIL(1, UINT64_C(1) << 32, 0, 0);
    bad_rows[4] = 0;
    CHECK_FAIL(sg_alloc_table_from_entries(t, bad_rows, 3), EINVAL, SL_REASON_ENTRY_LENGTH);
    CHECK_DETAIL(2, 0, 0, 0);
    sl_table_destroy(t);
    CHECK_FAIL(sl_table_create(PAGE, 4095, &t), EINVAL, SL_REASON_MAX_SEGMENT);
    CHECK_DETAIL(0, 4095, 0, 0);
    free(many);
}

static void test_copy(void)
{
    struct physmem *mem = NULL;
    CHECK(physmem_create(64 * PAGE, PAGE, &mem) == 0);
    uint64_t pfns[] = {3, 9};
    int rc;
    struct sl_table *t = build(pfns, 2, 0, 2 * PAGE, SG_MAX_SEGMENT_UNLIMITED, 0, &rc);
    char data[300];
    for (int i = 0; i < 300; i++)
        data[i] = (char)i;
    uint64_t copied = 0;
    /* 96 bytes left in the first page after the skip, then 204 in the second. */
    CHECK(sg_copy_buffer(t, mem, data, 300, 4000, 0, &copied) == 0 && copied == 300);
    char back[300] = {0};
    CHECK(sg_copy_buffer(t, mem, back, 300, 4000, 1, &copied) == 0 && copied == 300);
    CHECK(memcmp(back, data, 300) == 0);
    CHECK(sg_copy_buffer(t, mem, back, 300, 2 * PAGE, 1, &copied) == 0 && copied == 0);
    sl_table_destroy(t);
    uint64_t outside[] = {100};
    t = build(outside, 1, 0, PAGE, SG_MAX_SEGMENT_UNLIMITED, 0, &rc);
    CHECK(sg_copy_buffer(t, mem, data, 10, 0, 0, &copied) == -EFAULT);
    CHECK_EQ(sl_last_error()->reason, SL_REASON_PHYS_RANGE);
    CHECK_DETAIL(0, 100, 0, 0);
    CHECK(physmem_resident_pages(mem) == 2);
    sl_table_destroy(t);
    physmem_destroy(mem);
    /* Page sizes that differ: value = the memory's, limit = the table's. */
    CHECK(physmem_create(16 * 16384, 16384, &mem) == 0);
    t = build(pfns, 2, 0, 2 * PAGE, SG_MAX_SEGMENT_UNLIMITED, 0, &rc);
    CHECK_FAIL(sg_copy_buffer(t, mem, data, 10, 0, 0, &copied), EINVAL,
               SL_REASON_PAGE_SIZE_MISMATCH);
    CHECK_DETAIL(0, 16384, PAGE, 0);
    sl_table_destroy(t);
    physmem_destroy(mem);
}

static void test_dma(void)
{
    struct physmem *mem = NULL;
    struct sl_iommu *iommu = NULL;
    struct dma_device *dev = NULL, *direct = NULL;
    CHECK(physmem_create(UINT64_C(1) << 26, PAGE, &mem) == 0);
    CHECK(sl_iommu_create(PAGE, 48, &iommu) == 0);
    CHECK(dma_device_create(mem, iommu, &dev) == 0);
    CHECK(dma_device_create(mem, NULL, &direct) == 0);

    /* iommu_dma_map_sg: (4096), (8192), (1000 at 512) -> 2 segments in a 16 KiB block. */
    struct sl_table *t = NULL;
    CHECK(sl_table_create(PAGE, SG_MAX_SEGMENT_UNLIMITED, &t) == 0);
    uint64_t rows[] = {100, 0, 4096, 200, 0, 8192, 300, 512, 1000};
    CHECK(sg_alloc_table_from_entries(t, rows, 3) == 0);
    CHECK(dma_map_sgtable(dev, t, DMA_NONE) == -EINVAL);
    CHECK(dma_map_sgtable(dev, t, DMA_BIDIRECTIONAL) == 0);
    uint64_t dma[6];
    CHECK(sl_table_export_dma(t, 3, dma) == 0);
    uint64_t iova = dma[0];
    CHECK(t->sgt.nents == 2 && dma[1] == 12288);
    CHECK(dma[2] == iova + 12288 + 512 && dma[3] == 1000);
    CHECK(dma[4] == DMA_MAPPING_ERROR && dma[5] == 0);
    CHECK(rows_equal(t, rows, 3));
    CHECK(dma_map_sgtable(dev, t, DMA_TO_DEVICE) == -EBUSY);
    CHECK(dma_unmap_sgtable(direct, t, DMA_BIDIRECTIONAL) == -EINVAL);

    char buf[16] = "device data";
    CHECK(dma_device_write(dev, iova + 10, buf, 12) == 0);
    char back[16] = {0};
    CHECK(physmem_read(mem, 100 * PAGE + 10, back, 12) == 0 && !strcmp(back, buf));
    CHECK(dma_device_read_sg(dev, t, back, 16) == 0);
    /* The block is the highest under 4 GiB: just past it is above the 32-bit mask, refused
     * before the IOMMU; just below it is unmapped, an IOMMU fault. */
    CHECK_EQ(iova + 16384, UINT64_C(1) << 32);
    CHECK(dma_device_read(dev, iova + 16384, back, 1) == -EFAULT);
    CHECK(sl_last_error()->reason == SL_REASON_DMA_ACCESS_MASK);
    CHECK(dma_device_read(dev, iova - 1, back, 1) == -EFAULT);
    CHECK(sl_last_error()->reason == SL_REASON_IOMMU_FAULT_NOT_MAPPED);
    CHECK(dma_unmap_sgtable(dev, t, DMA_BIDIRECTIONAL) == 0);
    CHECK(dma_device_read(dev, iova, back, 1) == -EFAULT);
    CHECK(dma_device_live_mappings(dev) == 0 && iommu_mapped_pages(sl_iommu_domain(iommu)) == 0);

    /* Direct mapping and the DMA mask. */
    CHECK(dma_map_sgtable(direct, t, DMA_TO_DEVICE) == 0);
    CHECK(sl_table_export_dma(t, 3, dma) == 0 && dma[0] == 100 * PAGE && dma[5] == 1000);
    CHECK(dma_unmap_sgtable(direct, t, DMA_TO_DEVICE) == 0);
    struct dma_device_limits limits;
    dma_device_get_limits(direct, &limits);
    limits.dma_mask = 0xFFFFF; /* 1 MiB: pfn 300 is beyond */
    CHECK(dma_device_set_limits(direct, &limits) == 0);
    CHECK(dma_map_sgtable(direct, t, DMA_TO_DEVICE) == -EIO);
    CHECK_EQ(sl_last_error()->reason, SL_REASON_DMA_MASK);
    CHECK_DETAIL(2, 300 * PAGE + 512, 0xFFFFF, 0);
    CHECK(t->dma_dev == NULL && dma_device_live_mappings(direct) == 0);
    sl_table_destroy(t);

    /* IOVA exhaustion leaves nothing mapped. */
    dma_device_get_limits(dev, &limits);
    limits.dma_mask = 0xFFFF;
    CHECK(dma_device_set_limits(dev, &limits) == 0);
    uint64_t pages[16];
    for (int i = 0; i < 16; i++)
        pages[i] = 1000 + 2 * (uint64_t)i;
    int rc;
    t = build(pages, 16, 0, 16 * PAGE, SG_MAX_SEGMENT_UNLIMITED, 0, &rc);
    CHECK(dma_map_sgtable(dev, t, DMA_TO_DEVICE) == -ENOMEM);
    CHECK_EQ(sl_last_error()->reason, SL_REASON_IOVA_SPACE);
    CHECK_DETAIL(0, 16 * PAGE, 0xFFFF, 0);
    CHECK(iommu_mapped_pages(sl_iommu_domain(iommu)) == 0);
    CHECK(iova_live_ranges(sl_iommu_iovad(iommu)) == 0);
    CHECK(rows_equal(t, (uint64_t[]){1000, 0, 4096}, 1));
    sl_table_destroy(t);

    dma_device_destroy(dev);
    dma_device_destroy(direct);
    sl_iommu_destroy(iommu);
    physmem_destroy(mem);
}

/* ---- helpers for the DMA tests ---- */

struct rig {
    struct physmem *mem;
    struct sl_iommu *iommu;
    struct dma_device *dev;    /* behind the IOMMU */
    struct dma_device *direct; /* no IOMMU */
};

static void rig_create(struct rig *r, uint64_t mem_bytes)
{
    memset(r, 0, sizeof(*r));
    if (physmem_create(mem_bytes, PAGE, &r->mem) || sl_iommu_create(PAGE, 48, &r->iommu) ||
        dma_device_create(r->mem, r->iommu, &r->dev) ||
        dma_device_create(r->mem, NULL, &r->direct)) {
        fprintf(stderr, "rig_create failed\n");
        exit(2);
    }
}

static void rig_destroy(struct rig *r)
{
    dma_device_destroy(r->dev);
    dma_device_destroy(r->direct);
    sl_iommu_destroy(r->iommu);
    physmem_destroy(r->mem);
}

static uint64_t mapped_pages(struct sl_iommu *iommu)
{
    sl_iommu_lock(iommu);
    uint64_t n = iommu_mapped_pages(sl_iommu_domain(iommu));
    sl_iommu_unlock(iommu);
    return n;
}

static uint64_t live_ranges(struct sl_iommu *iommu)
{
    sl_iommu_lock(iommu);
    uint64_t n = iova_live_ranges(sl_iommu_iovad(iommu));
    sl_iommu_unlock(iommu);
    return n;
}

static uint64_t fault_total(struct sl_iommu *iommu)
{
    sl_iommu_lock(iommu);
    uint64_t n = iommu_fault_total(sl_iommu_domain(iommu));
    sl_iommu_unlock(iommu);
    return n;
}

static struct sl_table *table_from_rows(const uint64_t *rows, uint64_t n)
{
    struct sl_table *t = NULL;
    if (sl_table_create(PAGE, SG_MAX_SEGMENT_UNLIMITED, &t) ||
        sg_alloc_table_from_entries(t, rows, n)) {
        fprintf(stderr, "table_from_rows failed: %d\n", sl_last_error()->reason);
        exit(2);
    }
    return t;
}

/* Every entry of a table, raw (CPU and DMA fields), for "changed nothing" checks. */
static struct scatterlist *snapshot_entries(const struct sl_table *t)
{
    struct scatterlist *copy = calloc(t->sgt.orig_nents, sizeof(*copy));
    struct scatterlist *sg = t->sgt.sgl;
    for (uint32_t i = 0; i < t->sgt.orig_nents; i++, sg = sg_next(sg))
        copy[i] = *sg;
    return copy;
}

static int same_entries(const struct sl_table *t, const struct scatterlist *copy)
{
    struct scatterlist *sg = t->sgt.sgl;
    for (uint32_t i = 0; i < t->sgt.orig_nents; i++, sg = sg_next(sg))
        if (memcmp(sg, &copy[i], sizeof(*sg)) != 0)
            return 0;
    return 1;
}

/* A table exactly as before a failed map: entries, counters and mapping state. */
struct table_state {
    struct scatterlist *entries;
    uint32_t nents, orig_nents, mapped_count, map_nents;
    uint64_t iova, iova_len;
};

static void save_state(const struct sl_table *t, struct table_state *st)
{
    st->entries = snapshot_entries(t);
    st->nents = t->sgt.nents;
    st->orig_nents = t->sgt.orig_nents;
    st->mapped_count = t->dma_mapped_count;
    st->map_nents = t->dma_map_nents;
    st->iova = t->dma_iova;
    st->iova_len = t->dma_iova_len;
}

static int unchanged(const struct sl_table *t, struct table_state *st)
{
    int same = same_entries(t, st->entries) && t->sgt.nents == st->nents &&
               t->sgt.orig_nents == st->orig_nents && t->dma_dev == NULL &&
               t->dma_mapped_count == st->mapped_count && t->dma_map_nents == st->map_nents &&
               t->dma_iova == st->iova && t->dma_iova_len == st->iova_len;
    free(st->entries);
    st->entries = NULL;
    return same;
}

/* Every entry from first on has DMA_MAPPING_ERROR / 0. */
static int cleared_from(const struct sl_table *t, uint32_t first)
{
    struct scatterlist *sg = t->sgt.sgl;
    for (uint32_t i = 0; i < t->sgt.orig_nents; i++, sg = sg_next(sg))
        if (i >= first && (sg->dma_address != DMA_MAPPING_ERROR || sg->dma_length != 0))
            return 0;
    return 1;
}

/* ---- the device's accessors ---- */

/* Field by field: the struct has padding. */
static int same_limits(const struct dma_device_limits *a, const struct dma_device_limits *b)
{
    return a->dma_mask == b->dma_mask && a->max_segment_size == b->max_segment_size &&
           a->seg_boundary_mask == b->seg_boundary_mask &&
           a->max_mapping_size == b->max_mapping_size;
}

static void test_device_api(void)
{
    struct rig r;
    rig_create(&r, UINT64_C(1) << 26);
    struct dma_device_limits lim, back;
    dma_device_get_limits(r.dev, &lim);
    CHECK_EQ(lim.dma_mask, UINT32_MAX);
    CHECK_EQ(lim.max_segment_size, 65536);
    CHECK_EQ(lim.seg_boundary_mask, UINT64_MAX);
    CHECK_EQ(lim.max_mapping_size, UINT64_MAX);
    CHECK(dma_device_is_bound(r.dev) == 1);
    CHECK_EQ(dma_device_live_mappings(r.dev), 0);
    CHECK_EQ(dma_device_injected_failures(r.dev), 0);

    /* All four at once. */
    struct dma_device_limits want = {(UINT64_C(1) << 40) - 1, 4096, 0xFFFFF, 12345};
    CHECK(dma_device_set_limits(r.dev, &want) == 0);
    dma_device_get_limits(r.dev, &back);
    CHECK(same_limits(&back, &want));
    /* The smallest masks allowed: page size - 1. */
    struct dma_device_limits small = {PAGE - 1, 1, PAGE - 1, 0};
    CHECK(dma_device_set_limits(r.dev, &small) == 0);

    /* Refused with nothing changed, checked in the order mask, segment, boundary. */
    CHECK(dma_device_set_limits(r.dev, &want) == 0);
    struct dma_device_limits bad = {0x1FFE, 0, 0x1234, 0};
    CHECK_FAIL(dma_device_set_limits(r.dev, &bad), EINVAL, SL_REASON_DEVICE_DMA_MASK);
    CHECK_DETAIL(0, 0x1FFE, PAGE - 1, 0);
    bad.dma_mask = 0x7FF; /* a mask, but below a page */
    CHECK_FAIL(dma_device_set_limits(r.dev, &bad), EINVAL, SL_REASON_DEVICE_DMA_MASK);
    CHECK_DETAIL(0, 0x7FF, PAGE - 1, 0);
    bad.dma_mask = UINT64_MAX;
    CHECK_FAIL(dma_device_set_limits(r.dev, &bad), EINVAL, SL_REASON_DEVICE_MAX_SEGMENT);
    CHECK_DETAIL(0, 0, 0, 0);
    bad.max_segment_size = 1;
    CHECK_FAIL(dma_device_set_limits(r.dev, &bad), EINVAL, SL_REASON_DEVICE_SEG_BOUNDARY);
    CHECK_DETAIL(0, 0x1234, PAGE - 1, 0);
    bad.seg_boundary_mask = 0x7FF;
    CHECK_FAIL(dma_device_set_limits(r.dev, &bad), EINVAL, SL_REASON_DEVICE_SEG_BOUNDARY);
    dma_device_get_limits(r.dev, &back);
    CHECK(same_limits(&back, &want));

    /* Unbound: maps are refused before any table check; binding again maps. */
    uint64_t rows[] = {10, 0, PAGE, 20, 0, PAGE};
    struct sl_table *t = table_from_rows(rows, 2);
    dma_device_set_bound(r.dev, 0);
    CHECK(dma_device_is_bound(r.dev) == 0);
    CHECK_FAIL(dma_map_sgtable(r.dev, t, DMA_TO_DEVICE), ENODEV, SL_REASON_DEVICE_UNBOUND);
    CHECK_DETAIL(0, 0, 0, 0);
    CHECK_FAIL(dma_map_sgtable(r.dev, t, 7), EINVAL, SL_REASON_DMA_DIRECTION);
    CHECK_DETAIL(0, 7, 0, 0);
    dma_device_set_bound(r.dev, 1);
    CHECK(dma_map_sgtable(r.dev, t, DMA_TO_DEVICE) == 0);
    CHECK_EQ(dma_device_live_mappings(r.dev), 1);
    /* Unbinding keeps the mapping; unmap still works. */
    dma_device_set_bound(r.dev, 0);
    CHECK(dma_unmap_sgtable(r.dev, t, DMA_TO_DEVICE) == 0);
    CHECK_EQ(dma_device_live_mappings(r.dev), 0);
    dma_device_set_bound(r.dev, 1);

    /* Fault injection: argument checks. */
    CHECK_FAIL(dma_device_inject_failures(r.dev, 1, 0, EBUSY, 0), EINVAL,
               SL_REASON_INJECT_ERRNO);
    CHECK_DETAIL(0, EBUSY, 0, 0);
    CHECK_FAIL(dma_device_inject_failures(r.dev, 1, 0, -ENOMEM, 0), EINVAL,
               SL_REASON_INJECT_ERRNO);
    CHECK_DETAIL(0, (uint64_t)(int64_t)-ENOMEM, 0, 0);
    CHECK_FAIL(dma_device_inject_failures(r.dev, 0, 1000001, EIO, 0), EINVAL,
               SL_REASON_INJECT_PPM);
    CHECK_DETAIL(0, 1000001, 1000000, 0);

    /* Countdown 3: the third map from now fails, late (after the IOVA block was mapped), and
     * leaves nothing behind; the others succeed. */
    CHECK(dma_device_inject_failures(r.dev, 3, 0, EIO, 0) == 0);
    for (int k = 1; k <= 4; k++) {
        struct table_state st;
        save_state(t, &st);
        int rc = dma_map_sgtable(r.dev, t, DMA_BIDIRECTIONAL);
        if (k == 3) {
            CHECK_EQ(rc, -EIO);
            CHECK_EQ(sl_last_error()->reason, SL_REASON_INJECTED);
            CHECK_DETAIL(0, EIO, 0, 0);
            CHECK(unchanged(t, &st));
            CHECK_EQ(mapped_pages(r.iommu), 0);
            CHECK_EQ(live_ranges(r.iommu), 0);
        } else {
            free(st.entries);
            CHECK_EQ(rc, 0);
            CHECK(dma_unmap_sgtable(r.dev, t, DMA_BIDIRECTIONAL) == 0);
        }
    }
    CHECK_EQ(dma_device_injected_failures(r.dev), 1);
    /* Calls refused by the checks draw no decision. */
    CHECK(dma_device_inject_failures(r.dev, 1, 0, ENOMEM, 0) == 0);
    CHECK_FAIL(dma_map_sgtable(r.dev, t, 9), EINVAL, SL_REASON_DMA_DIRECTION);
    CHECK_FAIL(dma_map_sg(r.dev, t, 3, DMA_TO_DEVICE), EINVAL, SL_REASON_NENTS_RANGE);
    CHECK_DETAIL(0, 3, 2, 0);
    CHECK_FAIL(dma_map_sg(r.dev, t, 1, DMA_TO_DEVICE), ENOMEM, SL_REASON_INJECTED);
    CHECK_EQ(dma_device_injected_failures(r.dev), 2);
    /* Direct devices inject too, after the mask checks. */
    CHECK(dma_device_inject_failures(r.direct, 1, 0, EINVAL, 0) == 0);
    CHECK_FAIL(dma_map_sgtable(r.direct, t, DMA_TO_DEVICE), EINVAL, SL_REASON_INJECTED);
    CHECK_DETAIL(0, EINVAL, 0, 0);
    CHECK(t->dma_dev == NULL);
    /* Probability: 10^6 per million fails every map, 0 none. */
    CHECK(dma_device_inject_failures(r.dev, 0, 1000000, ENOMEM, 42) == 0);
    for (int k = 0; k < 5; k++)
        CHECK_FAIL(dma_map_sgtable(r.dev, t, DMA_TO_DEVICE), ENOMEM, SL_REASON_INJECTED);
    CHECK_EQ(dma_device_injected_failures(r.dev), 7);
    /* Half: the draws follow splitmix64(seed), so the same seed fails the same calls. */
    int pattern[2][64];
    for (int run = 0; run < 2; run++) {
        CHECK(dma_device_inject_failures(r.dev, 0, 500000, ENOMEM, 1234) == 0);
        for (int k = 0; k < 64; k++) {
            pattern[run][k] = dma_map_sgtable(r.dev, t, DMA_TO_DEVICE) != 0;
            if (!pattern[run][k])
                CHECK(dma_unmap_sgtable(r.dev, t, DMA_TO_DEVICE) == 0);
        }
    }
    int fails = 0;
    for (int k = 0; k < 64; k++)
        fails += pattern[0][k];
    CHECK(memcmp(pattern[0], pattern[1], sizeof(pattern[0])) == 0);
    CHECK(fails > 10 && fails < 54);
    /* Countdown first, then the probability. */
    CHECK(dma_device_inject_failures(r.dev, 2, 1000000, ENOMEM, 0) == 0);
    CHECK(dma_map_sgtable(r.dev, t, DMA_TO_DEVICE) == 0);
    CHECK(dma_unmap_sgtable(r.dev, t, DMA_TO_DEVICE) == 0);
    CHECK_FAIL(dma_map_sgtable(r.dev, t, DMA_TO_DEVICE), ENOMEM, SL_REASON_INJECTED);
    CHECK_FAIL(dma_map_sgtable(r.dev, t, DMA_TO_DEVICE), ENOMEM, SL_REASON_INJECTED);
    CHECK(dma_device_inject_failures(r.dev, 0, 0, ENOMEM, 0) == 0);
    CHECK(dma_map_sgtable(r.dev, t, DMA_TO_DEVICE) == 0);
    CHECK(dma_unmap_sgtable(r.dev, t, DMA_TO_DEVICE) == 0);
    CHECK_EQ(mapped_pages(r.iommu), 0);
    CHECK_EQ(live_ranges(r.iommu), 0);
    sl_table_destroy(t);

    /* A granule larger than the memory's pages. */
    struct sl_iommu *big = NULL;
    struct dma_device *dev = NULL;
    CHECK(sl_iommu_create(16384, 48, &big) == 0);
    CHECK_FAIL(dma_device_create(r.mem, big, &dev), EINVAL, SL_REASON_GRANULE_PAGE);
    CHECK_DETAIL(0, 16384, PAGE, 0);
    CHECK(dev == NULL);
    sl_iommu_destroy(big);
    rig_destroy(&r);
}

/* ---- what a map defines, what an unmap clears ---- */

static void test_dma_view(void)
{
    struct rig r;
    rig_create(&r, UINT64_C(1) << 26);
    /* Five entries: 0,1 merge (contiguous, granule aligned); 2 starts mid-granule; 3,4 merge. */
    uint64_t rows[] = {100, 0, PAGE, 101, 0, PAGE, 200, 16, 100, 300, 0, PAGE, 301, 0, PAGE};
    struct sl_table *t = table_from_rows(rows, 5);
    uint64_t dma[10];
    /* A table never mapped: DMA fields 0. */
    CHECK(sl_table_export_dma(t, 5, dma) == 0 && dma[0] == 0 && dma[1] == 0);
    CHECK_EQ(t->dma_mapped_count, 0);

    struct dma_device *devs[2] = {r.dev, r.direct};
    for (int d = 0; d < 2; d++) {
        struct dma_device *dev = devs[d];
        uint32_t want_segments = d == 0 ? 3 : 5;
        CHECK(dma_map_sgtable(dev, t, DMA_BIDIRECTIONAL) == 0);
        CHECK_EQ(t->sgt.nents, want_segments);
        CHECK_EQ(t->dma_mapped_count, want_segments);
        CHECK_EQ(t->dma_map_nents, 5);
        CHECK(cleared_from(t, want_segments));
        CHECK(rows_equal(t, rows, 5));
        CHECK(dma_unmap_sgtable(dev, t, DMA_BIDIRECTIONAL) == 0);
        /* The whole DMA view is cleared, not left stale as the kernel leaves it. */
        CHECK(cleared_from(t, 0));
        CHECK_EQ(t->sgt.nents, 5);
        CHECK_EQ(t->dma_mapped_count, 0);
        CHECK_EQ(t->dma_map_nents, 0);
        CHECK(t->dma_dev == NULL && t->dma_iova == 0 && t->dma_iova_len == 0);

        /* dma_map_sg of the first 3: sgt.nents stays, dma_mapped_count has the count, and
         * every entry past the segments (mapped or not) is DMA_MAPPING_ERROR / 0. */
        int64_t count = dma_map_sg(dev, t, 3, DMA_BIDIRECTIONAL);
        CHECK_EQ(count, d == 0 ? 2 : 3);
        CHECK_EQ(t->sgt.nents, 5);
        CHECK_EQ(t->dma_mapped_count, (uint64_t)count);
        CHECK(cleared_from(t, (uint32_t)count));
        /* The whole-table transfer walks dma_mapped_count segments, not sgt.nents. */
        char buf[PAGE * 2 + 100];
        memset(buf, 0x5A, sizeof(buf));
        CHECK(dma_device_write_sg(dev, t, buf, sizeof(buf)) == 0);
        CHECK_FAIL(dma_device_read_sg(dev, t, buf, sizeof(buf) + 1), EINVAL,
                   SL_REASON_DMA_LENGTH);
        CHECK_DETAIL(0, sizeof(buf) + 1, sizeof(buf), 0);
        char back[100];
        CHECK(physmem_read(r.mem, 200 * PAGE + 16, back, 100) == 0);
        CHECK(back[0] == 0x5A && back[99] == 0x5A);
        CHECK_FAIL(dma_unmap_sg(dev, t, 6, DMA_BIDIRECTIONAL), EINVAL, SL_REASON_NENTS_RANGE);
        CHECK_DETAIL(0, 6, 5, 0);
        CHECK_FAIL(dma_sync_sg(dev, t, 0, DMA_BIDIRECTIONAL, 1), EINVAL, SL_REASON_NENTS_RANGE);
        CHECK_DETAIL(0, 0, 5, 0);
        CHECK(dma_sync_sg(dev, t, 3, DMA_BIDIRECTIONAL, 1) == 0);
        CHECK(dma_unmap_sg(dev, t, 3, DMA_BIDIRECTIONAL) == 0);
        CHECK(cleared_from(t, 0));
        CHECK_EQ(t->sgt.nents, 5);
        CHECK_EQ(t->dma_mapped_count, 0);
        CHECK_FAIL(dma_unmap_sg(dev, t, 3, DMA_BIDIRECTIONAL), EINVAL, SL_REASON_NOT_MAPPED);
        CHECK_FAIL(dma_device_read_sg(dev, t, buf, 1), EINVAL, SL_REASON_NOT_MAPPED);
    }
    CHECK_EQ(mapped_pages(r.iommu), 0);
    CHECK_EQ(live_ranges(r.iommu), 0);

    /* Table checks and their records. */
    struct sl_table *open = NULL;
    CHECK(sl_table_create(PAGE, SG_MAX_SEGMENT_UNLIMITED, &open) == 0);
    uint64_t pfns[] = {5};
    CHECK(sg_alloc_append_table_from_pages(open, pfns, 1, 0, PAGE, 3) == 0);
    CHECK_FAIL(dma_map_sgtable(r.dev, open, DMA_TO_DEVICE), EINVAL, SL_REASON_TABLE_NOT_FINAL);
    sl_table_destroy(open);
    CHECK(dma_map_sgtable(r.dev, t, DMA_TO_DEVICE) == 0);
    CHECK_FAIL(dma_map_sgtable(r.direct, t, DMA_TO_DEVICE), EBUSY, SL_REASON_TABLE_MAPPED);
    CHECK_FAIL(dma_unmap_sgtable(r.direct, t, DMA_TO_DEVICE), EINVAL, SL_REASON_WRONG_DEVICE);
    CHECK_FAIL(dma_device_read_sg(r.direct, t, dma, 1), EINVAL, SL_REASON_WRONG_DEVICE);
    CHECK(dma_unmap_sgtable(r.dev, t, DMA_TO_DEVICE) == 0);
    sl_table_free_entries(t);
    CHECK_FAIL(dma_map_sgtable(r.dev, t, DMA_TO_DEVICE), EINVAL, SL_REASON_TABLE_FREED);
    sl_table_destroy(t);
    uint64_t outside[] = {UINT64_C(1) << 20, 0, PAGE};
    t = table_from_rows(outside, 1);
    CHECK_FAIL(dma_map_sgtable(r.dev, t, DMA_TO_DEVICE), EINVAL, SL_REASON_PHYS_RANGE);
    CHECK_DETAIL(0, UINT64_C(1) << 20, 0, 0);
    sl_table_destroy(t);
    rig_destroy(&r);

    /* A memory with another page size. */
    struct physmem *mem16 = NULL;
    struct dma_device *dev16 = NULL;
    CHECK(physmem_create(64 * 16384, 16384, &mem16) == 0);
    CHECK(dma_device_create(mem16, NULL, &dev16) == 0);
    t = table_from_rows(rows, 5);
    CHECK_FAIL(dma_map_sgtable(dev16, t, DMA_TO_DEVICE), EINVAL, SL_REASON_PAGE_SIZE_MISMATCH);
    CHECK_DETAIL(0, 16384, PAGE, 0);
    sl_table_destroy(t);
    dma_device_destroy(dev16);
    physmem_destroy(mem16);
}

/* ---- a failed map changes nothing ---- */

static void test_failed_map_isolated(void)
{
    struct rig r;
    rig_create(&r, UINT64_C(1) << 26);
    uint64_t rows[] = {100, 0, PAGE, 102, 0, PAGE, 300, 0, PAGE, 106, 0, PAGE};
    struct table_state st;

    /* Failures on a fresh table (DMA fields 0) and on one unmapped before (DMA fields
     * DMA_MAPPING_ERROR): neither changes, even in the DMA fields the kernel would poison. */
    for (int mapped_before = 0; mapped_before < 2; mapped_before++) {
        struct sl_table *t = table_from_rows(rows, 4);
        if (mapped_before) {
            CHECK(dma_map_sgtable(r.dev, t, DMA_TO_DEVICE) == 0);
            CHECK(dma_unmap_sgtable(r.dev, t, DMA_TO_DEVICE) == 0);
        }
        /* A page of the block the map will choose, mapped by hand: the page table refuses
         * (-EEXIST), re-raised as -EINVAL with the page table's record. */
        uint64_t iova = UINT64_C(0xFFFFC000); /* the highest 4-granule block under 4 GiB */
        sl_iommu_lock(r.iommu);
        CHECK(iommu_map(sl_iommu_domain(r.iommu), iova + 2 * PAGE, 0, PAGE, IOMMU_READ) == 0);
        sl_iommu_unlock(r.iommu);
        save_state(t, &st);
        CHECK_FAIL(dma_map_sgtable(r.dev, t, DMA_TO_DEVICE), EINVAL, SL_REASON_IOMMU_MAPPED);
        CHECK_DETAIL(0, iova + 2 * PAGE, 0, 0);
        CHECK(unchanged(t, &st));
        CHECK_EQ(mapped_pages(r.iommu), 1);
        CHECK_EQ(live_ranges(r.iommu), 0);
        sl_iommu_lock(r.iommu);
        CHECK(iommu_unmap(sl_iommu_domain(r.iommu), iova + 2 * PAGE, PAGE) == PAGE);
        iova_flush_rcache(sl_iommu_iovad(r.iommu));
        sl_iommu_unlock(r.iommu);

        /* Injected failure, after everything was mapped. */
        CHECK(dma_device_inject_failures(r.dev, 1, 0, ENOMEM, 0) == 0);
        save_state(t, &st);
        CHECK_FAIL(dma_map_sgtable(r.dev, t, DMA_TO_DEVICE), ENOMEM, SL_REASON_INJECTED);
        CHECK(unchanged(t, &st));
        CHECK_EQ(mapped_pages(r.iommu), 0);
        CHECK_EQ(live_ranges(r.iommu), 0);

        /* IOVA space. */
        struct dma_device_limits lim;
        dma_device_get_limits(r.dev, &lim);
        lim.dma_mask = 0x3FFF; /* 4 pages would need pfn 0 */
        CHECK(dma_device_set_limits(r.dev, &lim) == 0);
        save_state(t, &st);
        CHECK_FAIL(dma_map_sgtable(r.dev, t, DMA_TO_DEVICE), ENOMEM, SL_REASON_IOVA_SPACE);
        CHECK_DETAIL(0, 4 * PAGE, 0x3FFF, 0);
        CHECK(unchanged(t, &st));
        lim.dma_mask = UINT32_MAX;
        CHECK(dma_device_set_limits(r.dev, &lim) == 0);

        /* Direct: the mask. */
        dma_device_get_limits(r.direct, &lim);
        lim.dma_mask = 0xFFFFF; /* 1 MiB: pfn 300 is above */
        CHECK(dma_device_set_limits(r.direct, &lim) == 0);
        save_state(t, &st);
        CHECK_FAIL(dma_map_sgtable(r.direct, t, DMA_TO_DEVICE), EIO, SL_REASON_DMA_MASK);
        CHECK_DETAIL(2, 300 * PAGE, 0xFFFFF, 0);
        CHECK(unchanged(t, &st));
        lim.dma_mask = UINT32_MAX;
        CHECK(dma_device_set_limits(r.direct, &lim) == 0);
        CHECK_EQ(dma_device_live_mappings(r.dev), 0);
        CHECK_EQ(dma_device_live_mappings(r.direct), 0);

        /* And it still maps afterwards. */
        CHECK(dma_map_sgtable(r.dev, t, DMA_TO_DEVICE) == 0);
        CHECK(dma_unmap_sgtable(r.dev, t, DMA_TO_DEVICE) == 0);
        sl_table_destroy(t);
    }
    rig_destroy(&r);
}

/* ---- DMA segments are 32-bit ---- */

static void test_segment_length(void)
{
    struct rig r;
    rig_create(&r, UINT64_C(1) << 34); /* 16 GiB, backed lazily */
    struct dma_device_limits lim;
    dma_device_get_limits(r.dev, &lim);
    lim.dma_mask = (UINT64_C(1) << 40) - 1;
    CHECK(dma_device_set_limits(r.dev, &lim) == 0);
    struct table_state st;

    /* A physically contiguous 4 GiB table: two entries (4 GiB - 4 KiB and 4 KiB, the longest
     * an entry gets), the first longer than max_segment_size, so the 32-bit max_len - cur_len
     * wraps and the second merges onto it: 2^32 bytes, whose 32-bit length would be 0. */
    uint64_t n_pages = UINT64_C(1) << 20;
    uint64_t *pfns = malloc(n_pages * sizeof(*pfns));
    for (uint64_t i = 0; i < n_pages; i++)
        pfns[i] = i;
    int rc;
    struct sl_table *t = build(pfns, n_pages, 0, n_pages * PAGE, SG_MAX_SEGMENT_UNLIMITED, 0,
                               &rc);
    CHECK(rc == 0 && t->sgt.orig_nents == 2);
    save_state(t, &st);
    CHECK_FAIL(dma_map_sgtable(r.dev, t, DMA_BIDIRECTIONAL), EINVAL,
               SL_REASON_DMA_SEGMENT_LENGTH);
    CHECK_DETAIL(1, UINT64_C(1) << 32, UINT32_MAX, 0);
    CHECK(unchanged(t, &st));
    /* Refused before anything was mapped. */
    CHECK_EQ(mapped_pages(r.iommu), 0);
    CHECK_EQ(live_ranges(r.iommu), 0);
    CHECK_EQ(dma_device_live_mappings(r.dev), 0);
    /* Without the wrap (max_segment_size 2^32 - 1 leaves 4095 bytes of room, less than the
     * next entry) the same table maps in two segments. */
    lim.max_segment_size = UINT32_MAX;
    CHECK(dma_device_set_limits(r.dev, &lim) == 0);
    CHECK(dma_map_sgtable(r.dev, t, DMA_BIDIRECTIONAL) == 0);
    CHECK_EQ(t->sgt.nents, 2);
    CHECK_EQ(mapped_pages(r.iommu), n_pages);
    CHECK(dma_unmap_sgtable(r.dev, t, DMA_BIDIRECTIONAL) == 0);
    CHECK_EQ(mapped_pages(r.iommu), 0);
    lim.max_segment_size = 65536;
    CHECK(dma_device_set_limits(r.dev, &lim) == 0);
    sl_table_destroy(t);
    free(pfns);

    /* The faithful wrap on a small scale: an entry longer than max_segment_size (128 KiB >
     * 64 KiB) lets the next one merge onto it, as the kernel's arithmetic does. */
    uint64_t wrap_rows[] = {0, 0, 131072, 32, 0, PAGE, 40, 0, PAGE};
    t = table_from_rows(wrap_rows, 3);
    CHECK(dma_map_sgtable(r.dev, t, DMA_BIDIRECTIONAL) == 0);
    uint64_t dma[6];
    CHECK(sl_table_export_dma(t, 3, dma) == 0);
    CHECK_EQ(t->sgt.nents, 1);
    CHECK_EQ(dma[1], 131072 + 2 * PAGE);
    CHECK(dma_unmap_sgtable(r.dev, t, DMA_BIDIRECTIONAL) == 0);
    sl_table_destroy(t);

    /* One entry whose granule-rounded length passes 32 bits. */
    uint64_t long_rows[] = {0, 1, UINT32_MAX};
    t = table_from_rows(long_rows, 1);
    save_state(t, &st);
    CHECK_FAIL(dma_map_sgtable(r.dev, t, DMA_TO_DEVICE), EINVAL, SL_REASON_DMA_SEGMENT_LENGTH);
    CHECK_DETAIL(0, UINT64_C(1) << 32, UINT32_MAX, 0);
    CHECK(unchanged(t, &st));
    sl_table_destroy(t);

    /* The previous entry's length plus boundary padding passing 32 bits. */
    lim.seg_boundary_mask = 0xFFFF;
    CHECK(dma_device_set_limits(r.dev, &lim) == 0);
    uint64_t pad_rows[] = {0, 0, 0xFFFFF000, UINT64_C(0x200000), 0, 2 * PAGE};
    t = table_from_rows(pad_rows, 2);
    save_state(t, &st);
    CHECK_FAIL(dma_map_sgtable(r.dev, t, DMA_TO_DEVICE), EINVAL, SL_REASON_DMA_SEGMENT_LENGTH);
    CHECK_DETAIL(0, UINT64_C(1) << 32, UINT32_MAX, 0);
    CHECK(unchanged(t, &st));
    sl_table_destroy(t);
    CHECK_EQ(mapped_pages(r.iommu), 0);
    CHECK_EQ(live_ranges(r.iommu), 0);
    rig_destroy(&r);
}

/* ---- device access ---- */

static void test_device_access(void)
{
    struct rig r;
    rig_create(&r, UINT64_C(1) << 26); /* 64 MiB */
    const uint64_t mem_end = UINT64_C(1) << 26;
    char buf[64] = "device";
    uint64_t faults = fault_total(r.iommu);

    /* Above the DMA mask: refused before the IOMMU, not logged; direct devices alike. */
    struct dma_device *devs[2] = {r.dev, r.direct};
    for (int d = 0; d < 2; d++) {
        CHECK_FAIL(dma_device_read(devs[d], UINT64_C(1) << 32, buf, 1), EFAULT,
                   SL_REASON_DMA_ACCESS_MASK);
        CHECK_DETAIL(0, UINT64_C(1) << 32, UINT32_MAX, IOMMU_READ);
        CHECK_FAIL(dma_device_write(devs[d], UINT32_MAX - 15, buf, 32), EFAULT,
                   SL_REASON_DMA_ACCESS_MASK);
        CHECK_DETAIL(0, UINT32_MAX - 15, UINT32_MAX, IOMMU_WRITE);
        CHECK_FAIL(dma_device_check_access(devs[d], UINT64_MAX, 1, IOMMU_WRITE), EFAULT,
                   SL_REASON_DMA_ACCESS_MASK);
        CHECK_FAIL(dma_device_check_access(devs[d], 0, 1, 3), EINVAL, SL_REASON_IOMMU_ACCESS);
        CHECK_DETAIL(0, 3, 0, 0);
        CHECK(dma_device_check_access(devs[d], UINT64_MAX, 0, IOMMU_READ) == 0);
        CHECK(dma_device_read(devs[d], UINT64_MAX, buf, 0) == 0);
    }
    CHECK_EQ(fault_total(r.iommu), faults);

    /* Through the IOMMU below the mask: a fault, logged. */
    CHECK_FAIL(dma_device_check_access(r.dev, 0x10000, 16, IOMMU_READ), EFAULT,
               SL_REASON_IOMMU_FAULT_NOT_MAPPED);
    CHECK_DETAIL(0, 0x10000, 0, IOMMU_READ);
    CHECK_EQ(fault_total(r.iommu), faults + 1);

    /* Direct, past the memory: value = the first byte's physical address, limit = the
     * memory's size. */
    CHECK_FAIL(dma_device_read(r.direct, mem_end - 10, buf, 20), EFAULT,
               SL_REASON_DMA_ACCESS_MEMORY);
    CHECK_DETAIL(0, mem_end - 10, mem_end, IOMMU_READ);
    CHECK(dma_device_read(r.direct, mem_end - 20, buf, 20) == 0);

    /* A table of 600 scattered pages: 600 runs, more than one batch of translation. */
    enum { N = 600 };
    uint64_t rows[3 * N];
    for (uint64_t i = 0; i < N; i++) {
        rows[3 * i] = 1000 + 2 * i;
        rows[3 * i + 1] = 0;
        rows[3 * i + 2] = PAGE;
    }
    struct sl_table *t = table_from_rows(rows, N);
    CHECK(dma_map_sgtable(r.dev, t, DMA_BIDIRECTIONAL) == 0);
    CHECK_EQ(t->sgt.nents, N * PAGE / 65536 + 1); /* contiguous IOVAs merge up to 64 KiB */
    uint64_t dma[2];
    CHECK(sl_table_export_dma(t, 1, dma) == 0);
    const uint64_t iova = t->dma_iova;
    CHECK_EQ(t->dma_iova_len, N * PAGE);
    uint8_t *big = malloc(N * PAGE), *back = malloc(N * PAGE);
    for (uint64_t i = 0; i < N * PAGE; i++)
        big[i] = (uint8_t)(i * 7 + i / PAGE);
    CHECK(dma_device_check_access(r.dev, iova + 100, N * PAGE - 200, IOMMU_WRITE) == 0);
    CHECK(dma_device_write(r.dev, iova + 100, big, N * PAGE - 200) == 0);
    CHECK(physmem_read(r.mem, 1000 * PAGE + 100, back, PAGE - 100) == 0);
    CHECK(memcmp(back, big, PAGE - 100) == 0);
    CHECK(physmem_read(r.mem, (1000 + 2 * 599) * PAGE, back, PAGE - 100) == 0);
    CHECK(memcmp(back, big + 599 * PAGE - 100, PAGE - 100) == 0);
    memset(back, 0, N * PAGE);
    CHECK(dma_device_read(r.dev, iova + 100, back, N * PAGE - 200) == 0);
    CHECK(memcmp(back, big, N * PAGE - 200) == 0);
    /* Whole-table transfers of more than one batch. */
    CHECK(dma_device_write_sg(r.dev, t, big, N * PAGE) == 0);
    memset(back, 0, N * PAGE);
    CHECK(dma_device_read_sg(r.dev, t, back, N * PAGE) == 0);
    CHECK(memcmp(back, big, N * PAGE) == 0);
    uint64_t copied = 0;
    CHECK(sg_copy_buffer(t, r.mem, back, N * PAGE, 0, 1, &copied) == 0 && copied == N * PAGE);
    CHECK(memcmp(back, big, N * PAGE) == 0);

    /* A fault in the last batch moves no byte, even of the first batches. */
    sl_iommu_lock(r.iommu);
    CHECK(iommu_unmap(sl_iommu_domain(r.iommu), iova + (N - 1) * PAGE, PAGE) == PAGE);
    sl_iommu_unlock(r.iommu);
    memset(back, 0xEE, N * PAGE);
    faults = fault_total(r.iommu);
    CHECK_FAIL(dma_device_write(r.dev, iova, back, N * PAGE), EFAULT,
               SL_REASON_IOMMU_FAULT_NOT_MAPPED);
    CHECK_DETAIL(0, iova + (N - 1) * PAGE, 0, IOMMU_WRITE);
    CHECK_EQ(fault_total(r.iommu), faults + 1);
    CHECK_FAIL(dma_device_write_sg(r.dev, t, back, N * PAGE), EFAULT,
               SL_REASON_IOMMU_FAULT_NOT_MAPPED);
    CHECK_FAIL(dma_device_check_access(r.dev, iova, N * PAGE, IOMMU_READ), EFAULT,
               SL_REASON_IOMMU_FAULT_NOT_MAPPED);
    CHECK_EQ(fault_total(r.iommu), faults + 3);
    CHECK(physmem_read(r.mem, 1000 * PAGE, back, PAGE) == 0);
    CHECK(memcmp(back, big, PAGE) == 0);

    /* A page mapped by hand past the memory, in the first batch: the fault further on is
     * found first (the whole range is translated before the memory check)... */
    sl_iommu_lock(r.iommu);
    CHECK(iommu_unmap(sl_iommu_domain(r.iommu), iova, PAGE) == PAGE);
    CHECK(iommu_map(sl_iommu_domain(r.iommu), iova, mem_end + PAGE, PAGE,
                    IOMMU_READ | IOMMU_WRITE) == 0);
    sl_iommu_unlock(r.iommu);
    CHECK_FAIL(dma_device_read(r.dev, iova, back, N * PAGE), EFAULT,
               SL_REASON_IOMMU_FAULT_NOT_MAPPED);
    /* ...and once that page is back, the memory check names the run past the memory. */
    sl_iommu_lock(r.iommu);
    CHECK(iommu_map(sl_iommu_domain(r.iommu), iova + (N - 1) * PAGE, (1000 + 2 * 599) * PAGE,
                    PAGE, IOMMU_READ | IOMMU_WRITE) == 0);
    sl_iommu_unlock(r.iommu);
    faults = fault_total(r.iommu);
    CHECK_FAIL(dma_device_read(r.dev, iova + 8, back, N * PAGE - 8), EFAULT,
               SL_REASON_DMA_ACCESS_MEMORY);
    CHECK_DETAIL(0, mem_end + PAGE + 8, mem_end, IOMMU_READ);
    CHECK_FAIL(dma_device_check_access(r.dev, iova + 8, 8, IOMMU_WRITE), EFAULT,
               SL_REASON_DMA_ACCESS_MEMORY);
    CHECK_DETAIL(0, mem_end + PAGE + 8, mem_end, IOMMU_WRITE);
    CHECK_EQ(fault_total(r.iommu), faults); /* not an IOMMU fault */
    CHECK(dma_device_read(r.dev, iova + PAGE, back, (N - 1) * PAGE) == 0);

    /* Permissions: a TO_DEVICE mapping may be read, not written. */
    CHECK(dma_unmap_sgtable(r.dev, t, DMA_BIDIRECTIONAL) == 0);
    CHECK_EQ(mapped_pages(r.iommu), 0);
    CHECK(dma_map_sgtable(r.dev, t, DMA_TO_DEVICE) == 0);
    CHECK(dma_device_check_access(r.dev, t->dma_iova, PAGE, IOMMU_READ) == 0);
    CHECK_FAIL(dma_device_check_access(r.dev, t->dma_iova, PAGE, IOMMU_WRITE), EFAULT,
               SL_REASON_IOMMU_FAULT_PERMISSION);
    CHECK_FAIL(dma_device_write_sg(r.dev, t, big, 1), EFAULT, SL_REASON_IOMMU_FAULT_PERMISSION);
    CHECK(dma_unmap_sgtable(r.dev, t, DMA_TO_DEVICE) == 0);

    /* Direct whole-table transfer of 600 segments: more than one batch too. */
    CHECK(dma_map_sgtable(r.direct, t, DMA_FROM_DEVICE) == 0);
    CHECK_EQ(t->sgt.nents, N);
    for (uint64_t i = 0; i < N * PAGE; i++)
        big[i] = (uint8_t)(i * 13);
    CHECK(dma_device_write_sg(r.direct, t, big, N * PAGE - 1) == 0);
    CHECK(sg_copy_buffer(t, r.mem, back, N * PAGE, 0, 1, &copied) == 0);
    CHECK(memcmp(back, big, N * PAGE - 1) == 0);
    CHECK(dma_unmap_sgtable(r.direct, t, DMA_FROM_DEVICE) == 0);
    /* With a mask that cuts the table, the transfer fails on the first piece above it and
     * moves no byte. */
    CHECK(dma_map_sgtable(r.direct, t, DMA_FROM_DEVICE) == 0);
    struct dma_device_limits lim;
    dma_device_get_limits(r.direct, &lim);
    lim.dma_mask = (UINT64_C(1) << 22) - 1; /* pfn 1024 */
    CHECK(dma_device_set_limits(r.direct, &lim) == 0);
    memset(big, 0x11, N * PAGE);
    CHECK_FAIL(dma_device_write_sg(r.direct, t, big, N * PAGE), EFAULT,
               SL_REASON_DMA_ACCESS_MASK);
    CHECK_DETAIL(0, 1024 * PAGE, (UINT64_C(1) << 22) - 1, IOMMU_WRITE);
    CHECK(sg_copy_buffer(t, r.mem, back, PAGE, 0, 1, &copied) == 0);
    CHECK(back[0] == (uint8_t)0);
    CHECK(dma_unmap_sgtable(r.direct, t, DMA_FROM_DEVICE) == 0);
    sl_table_destroy(t);
    free(big);
    free(back);
    rig_destroy(&r);
}

/* ---- error records: every field written on every failure ---- */

static void test_error_records(void)
{
    struct rig r;
    rig_create(&r, UINT64_C(1) << 26);
    char buf[4];
    /* A failure with access, limit and value set... */
    CHECK_FAIL(dma_device_read(r.dev, UINT64_C(1) << 33, buf, 4), EFAULT,
               SL_REASON_DMA_ACCESS_MASK);
    CHECK_DETAIL(0, UINT64_C(1) << 33, UINT32_MAX, IOMMU_READ);
    /* ...then one with an element only: nothing left over. */
    uint64_t bad[] = {1, 2, UINT64_C(1) << 60};
    struct sl_table *t = NULL;
    CHECK(sl_table_create(PAGE, SG_MAX_SEGMENT_UNLIMITED, &t) == 0);
    CHECK_FAIL(sg_alloc_append_table_from_pages(t, bad, 3, 0, 3 * PAGE, 0), EINVAL,
               SL_REASON_PFN_RANGE);
    CHECK_DETAIL(2, UINT64_C(1) << 60, 0, 0);
    /* ...and one with nothing at all. */
    CHECK_FAIL(sg_alloc_append_table_from_pages(t, bad, 0, 0, 0, 0), EINVAL,
               SL_REASON_ZERO_PAGES);
    CHECK_DETAIL(0, 0, 0, 0);
    /* A success that tried nothing else leaves the record as it was. */
    CHECK(sg_alloc_append_table_from_pages(t, bad, 2, 0, 2 * PAGE, 0) == 0);
    CHECK_EQ(sl_last_error()->reason, SL_REASON_ZERO_PAGES);
    sl_table_destroy(t);
    CHECK_FAIL(physmem_create(PAGE, 3000, &r.mem), EINVAL, SL_REASON_PAGE_SIZE);
    CHECK_DETAIL(0, 3000, 0, 0);
    CHECK_FAIL(physmem_create(PAGE + 1, PAGE, &r.mem), EINVAL, SL_REASON_MEMORY_SIZE);
    CHECK_DETAIL(0, PAGE + 1, 0, 0);
    CHECK_EQ(sl_abi_version(), SL_ABI_VERSION);
    CHECK_EQ(SL_ABI_VERSION, 3);
    struct rig fresh;
    rig_create(&fresh, PAGE * 16);
    rig_destroy(&fresh);
    r.mem = NULL; /* the failed creates above cleared it */
    physmem_destroy(r.mem);
    dma_device_destroy(r.dev);
    dma_device_destroy(r.direct);
    sl_iommu_destroy(r.iommu);
}

/* ---- fork safety ---- */

struct fork_bg {
    struct physmem *mem;
    struct sl_iommu *iommu;
    struct dma_device *dev;
    int stop;          /* atomic */
    uint64_t rounds;   /* atomic */
    int errors;
};

/* Builds, maps, writes and reads through the device, unmaps and destroys a table of the given
 * pages; returns the number of things that went wrong. */
static int table_round_trip(struct physmem *mem, struct dma_device *dev, const uint64_t *pfns,
                            uint64_t n, uint8_t seed)
{
    int errors = 0;
    struct sl_table *t = NULL;
    if (sl_table_create(PAGE, SG_MAX_SEGMENT_UNLIMITED, &t) ||
        sg_alloc_append_table_from_pages(t, pfns, n, 0, n * PAGE, 0))
        return 1;
    if (dma_map_sgtable(dev, t, DMA_BIDIRECTIONAL) != 0) {
        sl_table_destroy(t);
        return 1;
    }
    uint8_t data[3 * PAGE], back[3 * PAGE];
    for (unsigned i = 0; i < sizeof(data); i++)
        data[i] = (uint8_t)(seed + i);
    errors += dma_device_write_sg(dev, t, data, sizeof(data)) != 0;
    errors += dma_device_read_sg(dev, t, back, sizeof(back)) != 0;
    errors += memcmp(data, back, sizeof(data)) != 0;
    uint64_t dma[2];
    errors += sl_table_export_dma(t, 1, dma) != 0;
    errors += dma_device_read(dev, dma[0], back, 16) != 0;
    errors += physmem_write(mem, pfns[0] * PAGE, data, 64) != 0;
    errors += physmem_read(mem, pfns[0] * PAGE, back, 64) != 0;
    errors += memcmp(data, back, 64) != 0;
    errors += dma_unmap_sgtable(dev, t, DMA_BIDIRECTIONAL) != 0;
    sl_table_destroy(t);
    return errors;
}

static void *fork_background(void *arg)
{
    struct fork_bg *bg = arg;
    uint64_t pfns[8];
    if (physmem_alloc_pages(bg->mem, 8, SL_LAYOUT_SCATTERED, 0, pfns) != 0) {
        bg->errors++;
        return NULL;
    }
    while (!__atomic_load_n(&bg->stop, __ATOMIC_ACQUIRE)) {
        bg->errors += table_round_trip(bg->mem, bg->dev, pfns, 8, (uint8_t)bg->rounds);
        __atomic_add_fetch(&bg->rounds, 1, __ATOMIC_RELEASE);
    }
    bg->errors += physmem_free_pages_list(bg->mem, pfns, 8) != 0;
    return NULL;
}

/* In the child: everything must work, whatever the parent's thread was doing at fork(). */
static int fork_child(struct fork_bg *bg)
{
    int errors = 0;
    uint64_t pfns[4];
    errors += physmem_alloc_pages(bg->mem, 4, SL_LAYOUT_CONTIGUOUS, 0, pfns) != 0;
    for (int k = 0; k < 20 && !errors; k++)
        errors += table_round_trip(bg->mem, bg->dev, pfns, 4, (uint8_t)k);
    errors += physmem_free_pages_list(bg->mem, pfns, 4) != 0;
    sl_iommu_lock(bg->iommu);
    errors += iova_check(sl_iommu_iovad(bg->iommu)) != 0;
    sl_iommu_unlock(bg->iommu);
    sl_chunk_cache_drain();
    return errors;
}

static void test_fork(void)
{
    struct fork_bg bg = {0};
    if (physmem_create(UINT64_C(1) << 26, PAGE, &bg.mem) ||
        sl_iommu_create(PAGE, 48, &bg.iommu) || dma_device_create(bg.mem, bg.iommu, &bg.dev)) {
        CHECK(!"fork rig");
        return;
    }
    uint64_t free_before = physmem_free_pages(bg.mem);
    pthread_t thread;
    CHECK(pthread_create(&thread, NULL, fork_background, &bg) == 0);
    enum { FORKS = 8 };
    int children_ok = 0;
    for (int k = 0; k < FORKS; k++) {
        /* Let the thread get going again, so that fork() finds it in the middle of a call. */
        uint64_t seen = __atomic_load_n(&bg.rounds, __ATOMIC_ACQUIRE);
        while (__atomic_load_n(&bg.rounds, __ATOMIC_ACQUIRE) < seen + 3)
            sched_yield();
        struct timespec pause = {0, 100000 * k};
        nanosleep(&pause, NULL);
        fflush(NULL);
        pid_t pid = fork();
        if (pid == 0) {
            alarm(30); /* a child stuck on a lock left held by fork() dies instead of hanging */
            _exit(fork_child(&bg) ? 1 : 0); /* _exit: no leak check of the parent's objects */
        }
        CHECK(pid > 0);
        int status = 0;
        CHECK(waitpid(pid, &status, 0) == pid);
        int ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
        if (!ok)
            fprintf(stderr, "fork child %d: %s %d\n", k, WIFEXITED(status) ? "exit" : "signal",
                    WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
        children_ok += ok;
    }
    CHECK_EQ(children_ok, FORKS);
    __atomic_store_n(&bg.stop, 1, __ATOMIC_RELEASE);
    CHECK(pthread_join(thread, NULL) == 0);
    CHECK_EQ(bg.errors, 0);
    CHECK(bg.rounds > 0);
    CHECK_EQ(dma_device_live_mappings(bg.dev), 0);
    CHECK_EQ(mapped_pages(bg.iommu), 0);
    CHECK_EQ(live_ranges(bg.iommu), 0);
    CHECK_EQ(physmem_free_pages(bg.mem), free_before);
    dma_device_destroy(bg.dev);
    sl_iommu_destroy(bg.iommu);
    physmem_destroy(bg.mem);
}

int main(void)
{
    test_physmem();
    test_tables();
    test_copy();
    test_dma();
    test_device_api();
    test_dma_view();
    test_failed_map_isolated();
    test_segment_length();
    test_device_access();
    test_error_records();
    test_fork();
    sl_chunk_cache_drain(); /* so LeakSanitizer sees every chunk returned */
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
