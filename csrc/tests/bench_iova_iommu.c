/* Timing of the IOVA allocator and IOMMU page table, outside any sanitizer (`make bench`).
 * Prints nanoseconds per page or per call; asserts nothing about time, only about results. */
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "iommu.h"
#include "iova.h"

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static void die(const char *what, long long rc)
{
    fprintf(stderr, "%s failed: %lld\n", what, rc);
    exit(1);
}

int main(void)
{
    struct iova_domain *iovad;
    struct iommu_domain *dom;
    if (iova_domain_create(4096, 1, 1, &iovad))
        die("iova_domain_create", 0);
    if (iommu_domain_create(4096, 48, &dom))
        die("iommu_domain_create", 0);

    /* One 1,048,576-page table: IOVA block, map, unmap, free. */
    const uint64_t n_pages = UINT64_C(1) << 20;
    const int rounds = 20;
    double best = 1e30;
    for (int r = 0; r < rounds; r++) {
        double t0 = now_ns();
        uint64_t pfn;
        int rc = iova_alloc(iovad, n_pages, (UINT64_C(1) << 36) - 1, &pfn);
        if (rc)
            die("iova_alloc", rc);
        rc = iommu_map(dom, pfn << 12, UINT64_C(1) << 32, n_pages << 12, IOMMU_READ);
        if (rc)
            die("iommu_map", rc);
        int64_t unmapped = iommu_unmap(dom, pfn << 12, n_pages << 12);
        if (unmapped != (int64_t)(n_pages << 12))
            die("iommu_unmap", unmapped);
        rc = iova_free(iovad, pfn, n_pages);
        if (rc)
            die("iova_free", rc);
        double per_page = (now_ns() - t0) / (double)n_pages;
        if (per_page < best)
            best = per_page;
    }
    printf("map+unmap of a %llu-page table incl. IOVA alloc/free: %.2f ns/page (best of %d)\n",
           (unsigned long long)n_pages, best, rounds);

    /* The same table made of scattered physical runs of 1..16 pages, mapped in one call. */
    {
        uint64_t cap = n_pages, n_runs = 0, pages = 0, seed = 7;
        struct iommu_run *runs = malloc(cap * sizeof(*runs));
        if (!runs)
            die("malloc", 0);
        while (pages < n_pages) {
            seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
            uint64_t len = 1 + (seed >> 33) % 16;
            if (len > n_pages - pages)
                len = n_pages - pages;
            runs[n_runs++] = (struct iommu_run){(pages * 2) << 12, len << 12};
            pages += len;
        }
        best = 1e30;
        for (int r = 0; r < rounds; r++) {
            double t0 = now_ns();
            uint64_t pfn;
            int rc = iova_alloc(iovad, n_pages, (UINT64_C(1) << 36) - 1, &pfn);
            if (rc)
                die("iova_alloc", rc);
            rc = iommu_map_runs(dom, pfn << 12, runs, n_runs, IOMMU_READ | IOMMU_WRITE);
            if (rc)
                die("iommu_map_runs", rc);
            if (iommu_unmap(dom, pfn << 12, n_pages << 12) != (int64_t)(n_pages << 12))
                die("iommu_unmap", 0);
            rc = iova_free(iovad, pfn, n_pages);
            if (rc)
                die("iova_free", rc);
            double per_page = (now_ns() - t0) / (double)n_pages;
            if (per_page < best)
                best = per_page;
        }
        printf("same, as %llu scattered runs through iommu_map_runs: %.2f ns/page\n",
               (unsigned long long)n_runs, best);
        /* And one iommu_map call per run, as a caller without the list call would. */
        best = 1e30;
        for (int r = 0; r < rounds; r++) {
            double t0 = now_ns();
            uint64_t pfn, iova;
            int rc = iova_alloc(iovad, n_pages, (UINT64_C(1) << 36) - 1, &pfn);
            if (rc)
                die("iova_alloc", rc);
            iova = pfn << 12;
            for (uint64_t i = 0; i < n_runs; i++) {
                rc = iommu_map(dom, iova, runs[i].phys, runs[i].len_bytes, IOMMU_READ);
                if (rc)
                    die("iommu_map run", rc);
                iova += runs[i].len_bytes;
            }
            if (iommu_unmap(dom, pfn << 12, n_pages << 12) != (int64_t)(n_pages << 12))
                die("iommu_unmap", 0);
            rc = iova_free(iovad, pfn, n_pages);
            if (rc)
                die("iova_free", rc);
            double per_page = (now_ns() - t0) / (double)n_pages;
            if (per_page < best)
                best = per_page;
        }
        printf("same, one iommu_map call per run: %.2f ns/page\n", best);
        free(runs);
    }

    /* Many small mappings, as a streaming driver would make: 1..32 pages each. */
    enum { N = 100000 };
    static uint64_t pfns[N], sizes[N];
    uint64_t rng = 1;
    for (int i = 0; i < N; i++) {
        rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
        sizes[i] = 1 + (rng >> 33) % 32;
    }
    double t0 = now_ns();
    for (int round = 0; round < 5; round++) {
        for (int i = 0; i < N; i++) {
            int rc = iova_alloc(iovad, sizes[i], (UINT64_C(1) << 36) - 1, &pfns[i]);
            if (rc)
                die("iova_alloc small", rc);
            rc = iommu_map(dom, pfns[i] << 12, (uint64_t)i << 12, sizes[i] << 12,
                           IOMMU_READ | IOMMU_WRITE);
            if (rc)
                die("iommu_map small", rc);
        }
        for (int i = 0; i < N; i++) {
            if (iommu_unmap(dom, pfns[i] << 12, sizes[i] << 12) != (int64_t)(sizes[i] << 12))
                die("iommu_unmap small", 0);
            int rc = iova_free(iovad, pfns[i], sizes[i]);
            if (rc)
                die("iova_free small", rc);
        }
    }
    printf("small mappings (1..32 pages): %.1f ns per alloc+map+unmap+free\n",
           (now_ns() - t0) / (5.0 * N));

    iommu_domain_destroy(dom);
    iova_domain_destroy(iovad);
    return 0;
}
