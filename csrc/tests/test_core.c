/* Tests of the C core on its own (memory, tables, DMA), built with ASan and UBSan by
 * `make -C csrc test`.  Prints "N passed, M failed" and exits non-zero on any failure. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
    uint64_t twice[2] = {pfns[4], pfns[4]};
    CHECK(physmem_free_pages_list(mem, twice, 2) == -EINVAL);
    CHECK(sl_last_error()->reason == SL_REASON_DUPLICATE_PFN);
    CHECK(physmem_free_pages(mem) == physmem_n_pages(mem) - 3); /* nothing freed */
    const char msg[] = "across a page boundary";
    CHECK(physmem_write(mem, PAGE - 5, msg, sizeof msg) == 0);
    char back[sizeof msg];
    CHECK(physmem_read(mem, PAGE - 5, back, sizeof back) == 0 && !memcmp(back, msg, sizeof msg));
    CHECK(physmem_resident_pages(mem) == 2);
    CHECK(physmem_read(mem, (UINT64_C(1) << 40) - 1, back, 2) == -EFAULT);
    CHECK(physmem_write(mem, UINT64_MAX, back, 2) == -EFAULT);
    physmem_destroy(mem);

    CHECK(physmem_create(8 * PAGE, PAGE, &mem) == 0);
    uint64_t many[9];
    CHECK(physmem_alloc_pages(mem, 9, SL_LAYOUT_CONTIGUOUS, 0, many) == -ENOMEM);
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
    /* Spec section 4 worked results. */
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
    CHECK(sl_last_error()->reason == SL_REASON_PFN_RANGE && sl_last_error()->index == 1);
    CHECK(t->total_nents == total && t->sgt.orig_nents == 3 && !t->final);
    CHECK(sg_alloc_append_table_from_pages(t, many + 3, 2, 5, 2 * PAGE, 0) == -EINVAL);
    CHECK(sl_last_error()->reason == SL_REASON_APPEND_OFFSET);
    CHECK(sg_alloc_append_table_from_pages(t, many + 3, 2, 0, 2 * PAGE, 0) == 0);
    CHECK(t->sgt.orig_nents == 5 && t->final);
    sl_table_destroy(t);

    /* Entries set by hand. */
    uint64_t rows[] = {9, 4000, 200, 11, 0, 8192};
    CHECK(sl_table_create(PAGE, SG_MAX_SEGMENT_UNLIMITED, &t) == 0);
    CHECK(sg_alloc_table_from_entries(t, rows, 2) == 0 && rows_equal(t, rows, 2));
    sl_table_destroy(t);
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
    CHECK(physmem_resident_pages(mem) == 2);
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

    /* Spec section 8: (4096), (8192), (1000 at 512) -> 2 segments in a 16 KiB block. */
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
    CHECK(dma_device_read(dev, iova + 16384, back, 1) == -EFAULT);
    CHECK(sl_last_error()->reason == SL_REASON_IOMMU_FAULT_NOT_MAPPED);
    CHECK(dma_unmap_sgtable(dev, t, DMA_BIDIRECTIONAL) == 0);
    CHECK(dma_device_read(dev, iova, back, 1) == -EFAULT);
    CHECK(dev->live_mappings == 0 && iommu_mapped_pages(sl_iommu_domain(iommu)) == 0);

    /* Direct mapping and the DMA mask. */
    CHECK(dma_map_sgtable(direct, t, DMA_TO_DEVICE) == 0);
    CHECK(sl_table_export_dma(t, 3, dma) == 0 && dma[0] == 100 * PAGE && dma[5] == 1000);
    CHECK(dma_unmap_sgtable(direct, t, DMA_TO_DEVICE) == 0);
    direct->dma_mask = 0xFFFFF; /* 1 MiB: pfn 300 is beyond */
    CHECK(dma_map_sgtable(direct, t, DMA_TO_DEVICE) == -EIO);
    CHECK(t->dma_dev == NULL && direct->live_mappings == 0);
    sl_table_destroy(t);

    /* IOVA exhaustion leaves nothing mapped. */
    dev->dma_mask = 0xFFFF;
    uint64_t pages[16];
    for (int i = 0; i < 16; i++)
        pages[i] = 1000 + 2 * (uint64_t)i;
    int rc;
    t = build(pages, 16, 0, 16 * PAGE, SG_MAX_SEGMENT_UNLIMITED, 0, &rc);
    CHECK(dma_map_sgtable(dev, t, DMA_TO_DEVICE) == -ENOMEM);
    CHECK(iommu_mapped_pages(sl_iommu_domain(iommu)) == 0);
    CHECK(iova_live_ranges(sl_iommu_iovad(iommu)) == 0);
    CHECK(rows_equal(t, (uint64_t[]){1000, 0, 4096}, 1));
    sl_table_destroy(t);

    dma_device_destroy(dev);
    dma_device_destroy(direct);
    sl_iommu_destroy(iommu);
    physmem_destroy(mem);
}

int main(void)
{
    test_physmem();
    test_tables();
    test_copy();
    test_dma();
    sl_chunk_cache_drain(); /* so LeakSanitizer sees every chunk returned */
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
