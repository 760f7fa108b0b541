/* Concurrency test of the C core under ThreadSanitizer (`make -C csrc tsan`).
 *
 * Several worker threads share one memory, one IOMMU and one device behind it (plus one direct
 * device).  Each worker builds tables from its own pages, maps and unmaps them on both devices
 * in a loop, moves bytes through the devices and checks them, while fault injection by
 * probability on the shared device makes maps fail from several threads at once.  A control
 * thread toggles bind/unbind, changes the limits and the injection settings; a monitor thread
 * reads every counter.  Tables are created and destroyed all the time (the shared chunk cache).
 * At the end every count must be back where it started.  Any data race makes TSan report and
 * (with TSAN_OPTIONS=halt_on_error=1) fail the run; the test itself fails on a wrong result. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dma.h"
#include "physmem.h"
#include "scatterlist.h"

#define PAGE 4096u
#define WORKERS 6
#define ROUNDS 150       /* per worker */
#define WORKER_PAGES 160 /* each worker's own pages */

static struct physmem *mem;
static struct sl_iommu *iommu;
static struct dma_device *shared_dev, *direct_dev;
static int workers_done;     /* atomic */
static int total_errors;     /* atomic */
static uint64_t maps_ok;     /* atomic */
static uint64_t maps_failed; /* atomic */

#define FAIL(...)                                                                          \
    do {                                                                                   \
        fprintf(stderr, __VA_ARGS__);                                                      \
        __atomic_add_fetch(&total_errors, 1, __ATOMIC_RELAXED);                            \
    } while (0)

static uint64_t rng_next(uint64_t *state)
{
    uint64_t z = (*state += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

/* A table of some of the worker's pages: an append table (a few runs of its pages) or one set
 * by hand with more than a chunk's worth of entries (so full chunks go through the cache). */
static struct sl_table *build_table(const uint64_t *pages, uint64_t *rng, uint64_t *bytes_out)
{
    struct sl_table *t = NULL;
    if (sl_table_create(PAGE, SG_MAX_SEGMENT_UNLIMITED, &t) != 0) {
        FAIL("sl_table_create: %d\n", sl_last_error()->reason);
        return NULL;
    }
    int rc;
    if (rng_next(rng) % 3) {
        uint64_t first = rng_next(rng) % (WORKER_PAGES / 2);
        uint64_t n = 1 + rng_next(rng) % (WORKER_PAGES / 2);
        uint32_t offset = (uint32_t)(rng_next(rng) % 64);
        uint64_t size = n * PAGE - offset - rng_next(rng) % 64;
        rc = sg_alloc_append_table_from_pages(t, pages + first, n, offset, size, 0);
        *bytes_out = size;
    } else {
        enum { ROWS = 200 };
        static _Thread_local uint64_t rows[3 * ROWS];
        uint64_t total = 0;
        for (uint64_t i = 0; i < ROWS; i++) {
            rows[3 * i] = pages[rng_next(rng) % WORKER_PAGES];
            rows[3 * i + 1] = rng_next(rng) % 2048;
            rows[3 * i + 2] = 1 + rng_next(rng) % 2048;
            total += rows[3 * i + 2];
        }
        rc = sg_alloc_table_from_entries(t, rows, ROWS);
        *bytes_out = total;
    }
    if (rc != 0) {
        FAIL("building a table: %d reason %d\n", rc, sl_last_error()->reason);
        sl_table_destroy(t);
        return NULL;
    }
    return t;
}

/* Map, move bytes both ways, check them, unmap.  Failures the test provokes (injection,
 * unbind) are fine; anything else is an error. */
static void map_and_transfer(struct dma_device *dev, struct sl_table *t, uint64_t bytes,
                             uint64_t *rng, int use_map_sg)
{
    int64_t rc;
    uint32_t nents = t->sgt.orig_nents;
    if (use_map_sg) {
        nents = 1 + (uint32_t)(rng_next(rng) % t->sgt.orig_nents);
        rc = dma_map_sg(dev, t, nents, DMA_BIDIRECTIONAL);
    } else {
        rc = dma_map_sgtable(dev, t, DMA_BIDIRECTIONAL);
    }
    if (rc < 0) {
        int reason = sl_last_error()->reason;
        int expected = (reason == SL_REASON_INJECTED &&
                        (rc == -ENOMEM || rc == -EIO || rc == -EINVAL)) ||
                       (reason == SL_REASON_DEVICE_UNBOUND && rc == -ENODEV);
        if (!expected)
            FAIL("map: %" PRId64 " reason %d\n", rc, reason);
        if (t->dma_dev != NULL || t->dma_mapped_count != 0)
            FAIL("a failed map left mapping state\n");
        __atomic_add_fetch(&maps_failed, 1, __ATOMIC_RELAXED);
        return;
    }
    __atomic_add_fetch(&maps_ok, 1, __ATOMIC_RELAXED);
    if (use_map_sg) {
        /* Only the first nents entries are mapped: transfer what their segments hold. */
        bytes = 0;
        struct scatterlist *sg = t->sgt.sgl;
        for (uint32_t i = 0; i < t->dma_mapped_count; i++, sg = sg_next(sg))
            bytes += sg->dma_length;
        if (t->sgt.nents != t->sgt.orig_nents)
            FAIL("dma_map_sg changed sgt.nents\n");
    }
    uint8_t *data = malloc(bytes), *back = malloc(bytes);
    uint8_t seed = (uint8_t)rng_next(rng);
    for (uint64_t i = 0; i < bytes; i++)
        data[i] = (uint8_t)(seed + i * 31);
    if (dma_device_write_sg(dev, t, data, bytes) != 0)
        FAIL("write_sg: reason %d\n", sl_last_error()->reason);
    memset(back, 0, bytes);
    if (dma_device_read_sg(dev, t, back, bytes) != 0)
        FAIL("read_sg: reason %d\n", sl_last_error()->reason);
    /* Entries set by hand may overlap (the same page twice), so compare only the device's
     * own view (read after write through the same segments) for append tables; for all
     * tables compare the first segment, which nothing else overlaps with before it. */
    struct scatterlist *first = t->sgt.sgl;
    uint64_t first_len = first->dma_length < bytes ? first->dma_length : bytes;
    uint8_t head[64];
    uint64_t head_len = first_len < sizeof(head) ? first_len : sizeof(head);
    if (dma_device_read(dev, first->dma_address, head, head_len) != 0)
        FAIL("dma_device_read: reason %d\n", sl_last_error()->reason);
    if (dma_device_check_access(dev, first->dma_address, first_len, IOMMU_READ) != 0)
        FAIL("check_access: reason %d\n", sl_last_error()->reason);
    if (dma_device_write(dev, first->dma_address, head, head_len) != 0)
        FAIL("dma_device_write: reason %d\n", sl_last_error()->reason);
    if (t->sgt.orig_nents < 200 && memcmp(data, back, bytes) != 0)
        FAIL("bytes read back differ\n");
    free(data);
    free(back);
    int err = use_map_sg ? dma_unmap_sg(dev, t, nents, DMA_BIDIRECTIONAL)
                         : dma_unmap_sgtable(dev, t, DMA_BIDIRECTIONAL);
    if (err != 0)
        FAIL("unmap: reason %d\n", sl_last_error()->reason);
}

static void *worker(void *arg)
{
    uint64_t id = (uint64_t)(uintptr_t)arg;
    uint64_t rng = id * 1000003 + 17;
    uint64_t pages[WORKER_PAGES];
    if (physmem_alloc_pages(mem, WORKER_PAGES, SL_LAYOUT_RANDOM, id, pages) != 0) {
        FAIL("alloc pages: reason %d\n", sl_last_error()->reason);
        return NULL;
    }
    for (int round = 0; round < ROUNDS; round++) {
        uint64_t bytes = 0;
        struct sl_table *t = build_table(pages, &rng, &bytes);
        if (!t)
            continue;
        map_and_transfer(shared_dev, t, bytes, &rng, round % 4 == 3);
        map_and_transfer(direct_dev, t, bytes, &rng, round % 5 == 4);
        /* A device access the IOMMU refuses: a fault, logged concurrently. */
        char c;
        if (dma_device_read(shared_dev, 0x1000, &c, 1) != -EFAULT)
            FAIL("read of an unmapped IOVA did not fault\n");
        uint64_t copied;
        char buf[128];
        if (sg_copy_buffer(t, mem, buf, sizeof(buf), 0, 1, &copied) != 0)
            FAIL("sg_copy_buffer\n");
        sl_table_destroy(t);
    }
    if (physmem_free_pages_list(mem, pages, WORKER_PAGES) != 0)
        FAIL("free pages: reason %d\n", sl_last_error()->reason);
    __atomic_add_fetch(&workers_done, 1, __ATOMIC_RELEASE);
    return NULL;
}

static int all_done(void) { return __atomic_load_n(&workers_done, __ATOMIC_ACQUIRE) == WORKERS; }

/* Bind/unbind, limits and injection settings, changing under the workers' feet.  Both limit
 * sets keep every IOVA and physical address the workers use below the DMA mask. */
static void *controller(void *arg)
{
    (void)arg;
    const struct dma_device_limits sets[2] = {
        {UINT32_MAX, 65536, UINT64_MAX, UINT64_MAX},
        {(UINT64_C(1) << 40) - 1, 1u << 20, 0xFFFFF, UINT64_C(1) << 30},
    };
    uint64_t step = 0;
    while (!all_done()) {
        step++;
        dma_device_set_bound(shared_dev, step % 7 != 0);
        if (dma_device_set_limits(shared_dev, &sets[step % 2]) != 0 ||
            dma_device_set_limits(direct_dev, &sets[(step / 2) % 2]) != 0)
            FAIL("set_limits: reason %d\n", sl_last_error()->reason);
        if (step % 5 == 0 &&
            dma_device_inject_failures(shared_dev, step % 3, 150000, step % 2 ? EIO : ENOMEM,
                                       step) != 0)
            FAIL("inject_failures: reason %d\n", sl_last_error()->reason);
        struct dma_device_limits bad = sets[0];
        bad.max_segment_size = 0;
        if (dma_device_set_limits(shared_dev, &bad) != -EINVAL)
            FAIL("bad limits accepted\n");
        for (int k = 0; k < 20; k++)
            sched_yield();
    }
    dma_device_set_bound(shared_dev, 1);
    return NULL;
}

/* Every counter, read while everything changes. */
static void *monitor(void *arg)
{
    (void)arg;
    uint64_t sink = 0;
    while (!all_done()) {
        struct dma_device_limits lim;
        dma_device_get_limits(shared_dev, &lim);
        sink += lim.dma_mask + lim.max_segment_size;
        sink += dma_device_live_mappings(shared_dev) + dma_device_live_mappings(direct_dev);
        sink += dma_device_injected_failures(shared_dev);
        sink += (uint64_t)dma_device_is_bound(shared_dev);
        sink += physmem_free_pages(mem) + physmem_resident_pages(mem);
        sink += sl_chunk_cache_bytes();
        sl_iommu_lock(iommu);
        sink += iommu_mapped_pages(sl_iommu_domain(iommu));
        sink += iommu_fault_total(sl_iommu_domain(iommu));
        sink += iova_live_ranges(sl_iommu_iovad(iommu));
        sl_iommu_unlock(iommu);
        for (int k = 0; k < 20; k++)
            sched_yield();
    }
    return (void *)(uintptr_t)(sink & 1);
}

int main(void)
{
    if (physmem_create(UINT64_C(1) << 28, PAGE, &mem) || sl_iommu_create(PAGE, 48, &iommu) ||
        dma_device_create(mem, iommu, &shared_dev) ||
        dma_device_create(mem, NULL, &direct_dev)) {
        fprintf(stderr, "setup failed: reason %d\n", sl_last_error()->reason);
        return 2;
    }
    if (dma_device_inject_failures(shared_dev, 0, 150000, ENOMEM, 99) != 0)
        return 2;
    const uint64_t free_at_start = physmem_free_pages(mem);

    pthread_t threads[WORKERS + 2];
    for (uintptr_t i = 0; i < WORKERS; i++)
        if (pthread_create(&threads[i], NULL, worker, (void *)i) != 0)
            return 2;
    if (pthread_create(&threads[WORKERS], NULL, controller, NULL) != 0 ||
        pthread_create(&threads[WORKERS + 1], NULL, monitor, NULL) != 0)
        return 2;
    for (int i = 0; i < WORKERS + 2; i++)
        pthread_join(threads[i], NULL);

    /* Everything back where it started. */
    int bad = 0;
    sl_iommu_lock(iommu);
    uint64_t mapped = iommu_mapped_pages(sl_iommu_domain(iommu));
    uint64_t live = iova_live_ranges(sl_iommu_iovad(iommu));
    int consistent = iova_check(sl_iommu_iovad(iommu));
    sl_iommu_unlock(iommu);
    bad += dma_device_live_mappings(shared_dev) != 0;
    bad += dma_device_live_mappings(direct_dev) != 0;
    bad += mapped != 0;
    bad += live != 0;
    bad += consistent != 0;
    bad += physmem_free_pages(mem) != free_at_start;
    bad += dma_device_injected_failures(shared_dev) == 0; /* injection was exercised */
    uint64_t ok = __atomic_load_n(&maps_ok, __ATOMIC_RELAXED);
    uint64_t failed = __atomic_load_n(&maps_failed, __ATOMIC_RELAXED);
    bad += ok == 0;
    printf("%d workers x %d rounds: %" PRIu64 " maps, %" PRIu64 " refused (%" PRIu64
           " injected), %d errors, %d end-state mismatches\n",
           WORKERS, ROUNDS, ok, failed, dma_device_injected_failures(shared_dev),
           total_errors, bad);

    dma_device_destroy(shared_dev);
    dma_device_destroy(direct_dev);
    sl_iommu_destroy(iommu);
    physmem_destroy(mem);
    sl_chunk_cache_drain();
    return total_errors || bad ? 1 : 0;
}
