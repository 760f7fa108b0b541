#include "dma.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* ---- the IOMMU object ---- */

struct sl_iommu {
    struct iommu_domain *domain;
    struct iova_domain *iovad;
    uint64_t granule;
    unsigned granule_shift;
    pthread_mutex_t lock;
};

int sl_iommu_create(uint32_t granule_bytes, unsigned aperture_bits, struct sl_iommu **out)
{
    *out = NULL;
    struct iommu_domain *domain = NULL;
    struct iova_domain *iovad = NULL;
    int err = iommu_domain_create(granule_bytes, aperture_bits, &domain);
    if (err)
        return err;
    /* start_pfn 1: IOVA 0 is never handed out.  One depot magazine: one emulated CPU. */
    err = iova_domain_create(granule_bytes, 1, 1, &iovad);
    if (err) {
        iommu_domain_destroy(domain);
        return err;
    }
    struct sl_iommu *iommu = calloc(1, sizeof(*iommu));
    if (!iommu || pthread_mutex_init(&iommu->lock, NULL) != 0) {
        free(iommu);
        iova_domain_destroy(iovad);
        iommu_domain_destroy(domain);
        return sl_fail(ENOMEM, SL_REASON_NO_MEMORY, 0, 0);
    }
    iommu->domain = domain;
    iommu->iovad = iovad;
    iommu->granule = granule_bytes;
    iommu->granule_shift = (unsigned)__builtin_ctz(granule_bytes);
    *out = iommu;
    return 0;
}

void sl_iommu_destroy(struct sl_iommu *iommu)
{
    if (!iommu)
        return;
    iova_domain_destroy(iommu->iovad);
    iommu_domain_destroy(iommu->domain);
    pthread_mutex_destroy(&iommu->lock);
    free(iommu);
}

struct iommu_domain *sl_iommu_domain(struct sl_iommu *iommu) { return iommu->domain; }
struct iova_domain *sl_iommu_iovad(struct sl_iommu *iommu) { return iommu->iovad; }
void sl_iommu_lock(struct sl_iommu *iommu) { pthread_mutex_lock(&iommu->lock); }
void sl_iommu_unlock(struct sl_iommu *iommu) { pthread_mutex_unlock(&iommu->lock); }

/* ---- devices ---- */

int dma_device_create(struct physmem *mem, struct sl_iommu *iommu, struct dma_device **out)
{
    *out = NULL;
    /* The kernel's IOVA domains need granule <= PAGE_SIZE. */
    if (iommu && iommu->granule > physmem_page_size(mem))
        return sl_fail(EINVAL, SL_REASON_GRANULE_PAGE, 0, iommu->granule);
    struct dma_device *dev = calloc(1, sizeof(*dev));
    if (!dev)
        return sl_fail(ENOMEM, SL_REASON_NO_MEMORY, 0, 0);
    dev->mem = mem;
    dev->iommu = iommu;
    dev->dma_mask = UINT32_MAX;
    dev->max_segment_size = 65536;
    dev->seg_boundary_mask = UINT64_MAX;
    dev->max_mapping_size = UINT64_MAX;
    dev->pci_32bit_workaround = 1;
    dev->bound = 1;
    *out = dev;
    return 0;
}

void dma_device_destroy(struct dma_device *dev) { free(dev); }

/* ---- helpers ---- */

static inline int valid_direction(int dir)
{
    return dir == DMA_BIDIRECTIONAL || dir == DMA_TO_DEVICE || dir == DMA_FROM_DEVICE;
}

/* dma_info_to_prot: what the device may do with the memory. */
static inline uint32_t direction_prot(int dir)
{
    switch (dir) {
    case DMA_BIDIRECTIONAL: return IOMMU_READ | IOMMU_WRITE;
    case DMA_TO_DEVICE: return IOMMU_READ;
    case DMA_FROM_DEVICE: return IOMMU_WRITE;
    default: return 0;
    }
}

static inline struct scatterlist *next_entry(struct scatterlist *sg) { return sg_next(sg); }
static inline uint64_t entry_pfn(const struct scatterlist *sg) { return sg->page_link >> 2; }

static inline uint64_t entry_phys(const struct sl_table *table, const struct scatterlist *sg)
{
    return (entry_pfn(sg) << table->page_shift) + sg->offset;
}

static uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

/* Whether fault injection fails this map call: decided once per call, before mapping. */
static int inject_failure(struct dma_device *dev)
{
    if (dev->inject_countdown)
        return --dev->inject_countdown == 0;
    if (dev->inject_ppm)
        return splitmix64(&dev->inject_rng_state) % 1000000u < dev->inject_ppm;
    return 0;
}

static int check_mappable(const struct dma_device *dev, const struct sl_table *table,
                          uint32_t n_entries, int dir)
{
    if (!valid_direction(dir))
        return sl_fail(EINVAL, SL_REASON_DMA_DIRECTION, 0, (uint64_t)dir);
    if (!dev->bound)
        return sl_fail(ENODEV, SL_REASON_DEVICE_UNBOUND, 0, 0);
    if (!table->sgt.sgl)
        return sl_fail(EINVAL, SL_REASON_TABLE_FREED, 0, 0);
    if (table->dma_dev)
        return sl_fail(EBUSY, SL_REASON_TABLE_MAPPED, 0, 0);
    if (!table->final)
        return sl_fail(EINVAL, SL_REASON_TABLE_NOT_FINAL, 0, 0);
    if (table->page_size != physmem_page_size(dev->mem))
        return sl_fail(EINVAL, SL_REASON_PAGE_SIZE_MISMATCH, 0, physmem_page_size(dev->mem));
    if (n_entries == 0 || n_entries > table->sgt.orig_nents)
        return sl_fail(EINVAL, SL_REASON_NENTS_RANGE, n_entries, table->sgt.orig_nents);
    uint64_t mem_end = physmem_n_pages(dev->mem) << table->page_shift;
    struct scatterlist *sg = table->sgt.sgl;
    for (uint32_t i = 0; i < n_entries; i++, sg = next_entry(sg))
        if (entry_phys(table, sg) + sg->length > mem_end)
            return sl_fail(EINVAL, SL_REASON_PHYS_RANGE, i, entry_pfn(sg));
    return 0;
}

/* ---- direct mapping ---- */

static int map_direct(struct dma_device *dev, struct sl_table *table, uint32_t n_entries,
                      int inject, uint32_t *count_out)
{
    /* Check every entry first: a failure maps nothing and writes no DMA field. */
    struct scatterlist *sg = table->sgt.sgl;
    for (uint32_t i = 0; i < n_entries; i++, sg = next_entry(sg)) {
        uint64_t phys = entry_phys(table, sg);
        if (phys > dev->dma_mask || sg->length - 1 > dev->dma_mask - phys)
            return sl_fail(EIO, SL_REASON_DMA_MASK, i, phys);
    }
    if (inject)
        return sl_fail(dev->inject_errno, SL_REASON_INJECTED, 0, 0);
    sg = table->sgt.sgl;
    for (uint32_t i = 0; i < n_entries; i++, sg = next_entry(sg)) {
        sg->dma_address = entry_phys(table, sg); /* phys_to_dma is the identity here */
        sg->dma_length = sg->length;
    }
    *count_out = n_entries;
    return 0;
}

/* ---- IOMMU mapping (iommu_dma_map_sg) ---- */

/* Undoes the layout pass on every entry and poisons the DMA fields (__invalidate_sg). */
static void invalidate_layout(struct sl_table *table, uint32_t n_entries)
{
    struct scatterlist *sg = table->sgt.sgl;
    for (uint32_t i = 0; i < n_entries; i++, sg = next_entry(sg)) {
        if (sg->dma_address != DMA_MAPPING_ERROR)
            sg->offset += (uint32_t)sg->dma_address;
        if (sg->dma_length)
            sg->length = sg->dma_length;
        sg->dma_address = DMA_MAPPING_ERROR;
        sg->dma_length = 0;
    }
}

/* Unmaps [iova, iova + len) page run by page run, stepping over holes (a page someone unmapped
 * by hand), so that teardown always leaves nothing of the block mapped. */
static void unmap_block(struct sl_iommu *iommu, uint64_t iova, uint64_t len)
{
    uint64_t done = 0;
    while (done < len) {
        int64_t unmapped = iommu_unmap(iommu->domain, iova + done, len - done);
        if (unmapped < 0)
            return;
        done += (uint64_t)unmapped;
        if (done < len)
            done += iommu->granule; /* the hole */
    }
}

/* __finalise_sg: merges the laid-out entries into DMA segments, restores the CPU fields, and
 * returns the segment count. */
static uint32_t finalise_segments(const struct dma_device *dev, struct sl_table *table,
                                  uint32_t n_entries, uint64_t iova)
{
    uint64_t dma_addr = iova;
    const uint64_t seg_mask = dev->seg_boundary_mask;
    const uint32_t max_len = dev->max_segment_size;
    struct scatterlist *cur = table->sgt.sgl;
    struct scatterlist *sg = table->sgt.sgl;
    uint32_t cur_len = 0, count = 0;
    for (uint32_t i = 0; i < n_entries; i++, sg = next_entry(sg)) {
        uint32_t s_iova_off = (uint32_t)sg->dma_address; /* stashed by the layout pass */
        uint32_t s_length = sg->dma_length;
        uint32_t s_iova_len = sg->length;
        sg->dma_address = DMA_MAPPING_ERROR;
        sg->dma_length = 0;
        sg->offset += s_iova_off;
        sg->length = s_length;
        /* Merge only onto an open segment, from a granule start, not at a boundary, within
         * the length limit (32-bit unsigned, as the kernel computes it). */
        if (cur_len && !s_iova_off && (dma_addr & seg_mask) &&
            (uint32_t)(max_len - cur_len) >= s_length) {
            cur_len += s_length;
        } else {
            if (i > 0)
                cur = next_entry(cur);
            cur_len = s_length;
            count++;
            cur->dma_address = dma_addr + s_iova_off;
        }
        cur->dma_length = cur_len;
        dma_addr += s_iova_len;
        if ((uint64_t)s_length + s_iova_off < s_iova_len)
            cur_len = 0; /* ends before its granule does (or was padded): nothing merges on */
    }
    return count;
}

static int map_iommu(struct dma_device *dev, struct sl_table *table, uint32_t n_entries,
                     int dir, int inject, uint32_t *count_out)
{
    struct sl_iommu *iommu = dev->iommu;
    const uint64_t granule_mask = iommu->granule - 1;
    const uint64_t boundary_mask = dev->seg_boundary_mask;

    /* Lay the entries out in one IOVA range, whole granules each, stashing the in-granule
     * offset and the CPU length in the DMA fields. */
    uint64_t iova_len = 0;
    struct scatterlist *prev = NULL;
    struct scatterlist *sg = table->sgt.sgl;
    for (uint32_t i = 0; i < n_entries; i++, sg = next_entry(sg)) {
        uint32_t s_iova_off = (uint32_t)(sg->offset & granule_mask);
        uint64_t s_length = ((uint64_t)sg->length + s_iova_off + granule_mask) & ~granule_mask;
        sg->dma_address = s_iova_off;
        sg->dma_length = sg->length;
        sg->offset -= s_iova_off;
        /* Padding so that no segment crosses a boundary: the block is size-aligned, so it
         * starts on a boundary whenever it is larger than one. */
        uint64_t pad_len = (boundary_mask - iova_len + 1) & boundary_mask;
        int pad = pad_len && pad_len < s_length - 1;
        if (s_length > UINT32_MAX || (pad && prev->length + pad_len > UINT32_MAX)) {
            invalidate_layout(table, i + 1);
            return sl_fail(EINVAL, SL_REASON_TOO_MANY_ENTRIES, i, s_length);
        }
        sg->length = (uint32_t)s_length;
        if (pad) {
            prev->length += (uint32_t)pad_len;
            iova_len += pad_len;
        }
        iova_len += s_length;
        prev = sg;
    }

    /* One IOVA block under the DMA mask, trying below 4 GiB first for PCI devices. */
    sl_iommu_lock(iommu);
    uint64_t limit = dev->dma_mask;
    if (limit > iommu_aperture_last(iommu->domain))
        limit = iommu_aperture_last(iommu->domain);
    uint64_t n_granules = iova_len >> iommu->granule_shift;
    uint64_t iova_pfn = 0;
    int err = -ENOMEM;
    if (dev->pci_32bit_workaround && limit > UINT32_MAX) {
        err = iova_alloc_noflush(iommu->iovad, n_granules, UINT32_MAX >> iommu->granule_shift,
                                 &iova_pfn);
        if (err)
            dev->pci_32bit_workaround = 0; /* the kernel's "Using %d-bit DMA addresses" */
    }
    if (err)
        err = iova_alloc(iommu->iovad, n_granules, limit >> iommu->granule_shift, &iova_pfn);
    if (err) {
        sl_iommu_unlock(iommu);
        invalidate_layout(table, n_entries);
        return sl_fail(ENOMEM, SL_REASON_IOVA_SPACE, 0, iova_len);
    }
    const uint64_t iova = iova_pfn << iommu->granule_shift;

    /* iommu_map_sg: the laid-out entries back to back, physically contiguous ones merged
     * into runs, handed to the page table in batches (each batch all or nothing). */
    const uint32_t prot = direction_prot(dir);
    enum { RUN_BATCH = 512 };
    struct iommu_run runs[RUN_BATCH];
    uint64_t n_runs = 0, mapped = 0, batch_bytes = 0;
    sg = table->sgt.sgl;
    for (uint32_t i = 0; i < n_entries && !err; i++, sg = next_entry(sg)) {
        uint64_t phys = entry_phys(table, sg);
        if (n_runs && phys == runs[n_runs - 1].phys + runs[n_runs - 1].len_bytes) {
            runs[n_runs - 1].len_bytes += sg->length;
        } else {
            if (n_runs == RUN_BATCH) {
                err = iommu_map_runs(iommu->domain, iova + mapped, runs, n_runs, prot);
                mapped += err ? 0 : batch_bytes;
                n_runs = 0;
                batch_bytes = 0;
            }
            runs[n_runs++] = (struct iommu_run){phys, sg->length};
        }
        batch_bytes += sg->length;
    }
    if (!err && n_runs) {
        err = iommu_map_runs(iommu->domain, iova + mapped, runs, n_runs, prot);
        mapped += err ? 0 : batch_bytes;
    }
    if (!err && inject) {
        /* Everything is mapped: the rollback below has all of it to undo. */
        unmap_block(iommu, iova, mapped);
        iova_free(iommu->iovad, iova_pfn, n_granules);
        sl_iommu_unlock(iommu);
        invalidate_layout(table, n_entries);
        return sl_fail(dev->inject_errno, SL_REASON_INJECTED, 0, 0);
    }
    if (err) {
        int reason = sl_last_error()->reason;
        unmap_block(iommu, iova, mapped);
        iova_free(iommu->iovad, iova_pfn, n_granules);
        sl_iommu_unlock(iommu);
        invalidate_layout(table, n_entries);
        /* __invalidate_sg passes -ENOMEM through and turns anything else into -EINVAL. */
        return sl_fail(err == -ENOMEM ? ENOMEM : EINVAL, reason, 0, 0);
    }
    sl_iommu_unlock(iommu);

    *count_out = finalise_segments(dev, table, n_entries, iova);
    table->dma_iova = iova;
    table->dma_iova_len = iova_len;
    return 0;
}

static int map_entries(struct dma_device *dev, struct sl_table *table, uint32_t n_entries,
                       int dir, uint32_t *count_out)
{
    int err = check_mappable(dev, table, n_entries, dir);
    if (err)
        return err;
    int inject = inject_failure(dev);
    if (inject)
        __atomic_add_fetch(&dev->injected_failures, 1, __ATOMIC_RELAXED);
    err = dev->iommu ? map_iommu(dev, table, n_entries, dir, inject, count_out)
                     : map_direct(dev, table, n_entries, inject, count_out);
    if (err)
        return err;
    table->dma_map_nents = n_entries;
    table->dma_dev = dev;
    table->dma_dir = dir;
    /* Tables of one device may be mapped on several threads at once. */
    __atomic_add_fetch(&dev->live_mappings, 1, __ATOMIC_RELAXED);
    return 0;
}

int dma_map_sgtable(struct dma_device *dev, struct sl_table *table, int dir)
{
    uint32_t count = 0;
    int err = map_entries(dev, table, table->sgt.orig_nents, dir, &count);
    if (!err)
        table->sgt.nents = count;
    return err;
}

int64_t dma_map_sg(struct dma_device *dev, struct sl_table *table, uint32_t nents, int dir)
{
    uint32_t count = 0;
    int err = map_entries(dev, table, nents, dir, &count);
    return err ? err : (int64_t)count;
}

static int check_mapped_for(const struct dma_device *dev, const struct sl_table *table,
                            uint32_t n_entries, int dir)
{
    if (!valid_direction(dir))
        return sl_fail(EINVAL, SL_REASON_DMA_DIRECTION, 0, (uint64_t)dir);
    if (!table->dma_dev)
        return sl_fail(EINVAL, SL_REASON_NOT_MAPPED, 0, 0);
    if (table->dma_dev != dev)
        return sl_fail(EINVAL, SL_REASON_WRONG_DEVICE, 0, 0);
    /* A count past the table would walk off its end in the kernel. */
    if (n_entries == 0 || n_entries > table->sgt.orig_nents)
        return sl_fail(EINVAL, SL_REASON_NENTS_RANGE, n_entries, table->sgt.orig_nents);
    return 0;
}

int dma_unmap_sgtable(struct dma_device *dev, struct sl_table *table, int dir)
{
    return dma_unmap_sg(dev, table, table->sgt.orig_nents, dir);
}

int dma_unmap_sg(struct dma_device *dev, struct sl_table *table, uint32_t nents, int dir)
{
    int err = check_mapped_for(dev, table, nents, dir);
    if (err)
        return err;
    if (dev->iommu) {
        /* The whole block at once, as iommu_dma_unmap_sg does from the first to the last
         * non-empty DMA segment. */
        sl_iommu_lock(dev->iommu);
        unmap_block(dev->iommu, table->dma_iova, table->dma_iova_len);
        iova_free(dev->iommu->iovad, table->dma_iova >> dev->iommu->granule_shift,
                  table->dma_iova_len >> dev->iommu->granule_shift);
        sl_iommu_unlock(dev->iommu);
    }
    table->dma_dev = NULL;
    table->dma_iova = 0;
    table->dma_iova_len = 0;
    __atomic_sub_fetch(&dev->live_mappings, 1, __ATOMIC_RELAXED);
    return 0;
}

int dma_sync_sgtable(struct dma_device *dev, struct sl_table *table, int dir, int for_cpu)
{
    return dma_sync_sg(dev, table, table->sgt.orig_nents, dir, for_cpu);
}

int dma_sync_sg(struct dma_device *dev, struct sl_table *table, uint32_t nents, int dir,
                int for_cpu)
{
    (void)for_cpu; /* coherent memory: ownership moves, bytes do not */
    return check_mapped_for(dev, table, nents, dir);
}

/* ---- device-side access ---- */

/* Translates [dma_addr, dma_addr + n_bytes) for an access into runs appended at
 * runs[*n_runs], checking that every run lies inside the memory. */
static int translate(struct dma_device *dev, uint64_t dma_addr, uint64_t n_bytes,
                     uint32_t access, struct iommu_run *runs, uint64_t capacity,
                     uint64_t *n_runs)
{
    if (n_bytes == 0)
        return 0;
    uint64_t first = *n_runs;
    if (!dev->iommu) {
        if (dma_addr > dev->dma_mask || n_bytes - 1 > dev->dma_mask - dma_addr)
            return sl_fail(EFAULT, SL_REASON_DMA_ACCESS_MASK, access, dma_addr);
        runs[(*n_runs)++] = (struct iommu_run){dma_addr, n_bytes};
    } else {
        uint64_t added = 0, done = 0;
        sl_iommu_lock(dev->iommu);
        int err = iommu_translate_range(dev->iommu->domain, dma_addr, n_bytes, access,
                                        runs + first, capacity - first, &added, &done);
        sl_iommu_unlock(dev->iommu);
        if (err)
            return err;
        *n_runs += added;
    }
    uint64_t mem_end = physmem_n_pages(dev->mem) * physmem_page_size(dev->mem);
    for (uint64_t r = first; r < *n_runs; r++)
        if (runs[r].phys > mem_end || runs[r].len_bytes > mem_end - runs[r].phys)
            return sl_fail(EFAULT, SL_REASON_DMA_ACCESS_MEMORY, access, runs[r].phys);
    return 0;
}

static uint64_t runs_needed(const struct dma_device *dev, uint64_t dma_addr, uint64_t n_bytes)
{
    if (!dev->iommu)
        return 1;
    return ((dma_addr & (dev->iommu->granule - 1)) + n_bytes) / dev->iommu->granule + 1;
}

static int copy_runs(struct dma_device *dev, const struct iommu_run *runs, uint64_t n_runs,
                     uint8_t *buf, int to_memory)
{
    for (uint64_t r = 0; r < n_runs; r++) {
        int err = to_memory ? physmem_write(dev->mem, runs[r].phys, buf, runs[r].len_bytes)
                            : physmem_read(dev->mem, runs[r].phys, buf, runs[r].len_bytes);
        if (err)
            return err;
        buf += runs[r].len_bytes;
    }
    return 0;
}

static int device_access(struct dma_device *dev, uint64_t dma_addr, uint8_t *buf,
                         uint64_t n_bytes, int to_memory)
{
    if (n_bytes == 0)
        return 0;
    uint64_t capacity = runs_needed(dev, dma_addr, n_bytes);
    struct iommu_run *runs = malloc(capacity * sizeof(*runs));
    if (!runs)
        return sl_fail(ENOMEM, SL_REASON_NO_MEMORY, 0, 0);
    uint64_t n_runs = 0;
    int err = translate(dev, dma_addr, n_bytes, to_memory ? IOMMU_WRITE : IOMMU_READ, runs,
                        capacity, &n_runs);
    if (!err)
        err = copy_runs(dev, runs, n_runs, buf, to_memory);
    free(runs);
    return err;
}

int dma_device_read(struct dma_device *dev, uint64_t dma_addr, void *buf, uint64_t n_bytes)
{
    return device_access(dev, dma_addr, buf, n_bytes, 0);
}

int dma_device_write(struct dma_device *dev, uint64_t dma_addr, const void *buf,
                     uint64_t n_bytes)
{
    /* The buffer is only read when writing memory. */
    return device_access(dev, dma_addr, (uint8_t *)(uintptr_t)buf, n_bytes, 1);
}

static int device_access_sg(struct dma_device *dev, const struct sl_table *table,
                            uint8_t *buf, uint64_t n_bytes, int to_memory)
{
    if (!table->dma_dev)
        return sl_fail(EINVAL, SL_REASON_NOT_MAPPED, 0, 0);
    if (table->dma_dev != dev)
        return sl_fail(EINVAL, SL_REASON_WRONG_DEVICE, 0, 0);
    uint64_t total = 0, capacity = 0;
    struct scatterlist *sg = table->sgt.sgl;
    for (uint32_t i = 0; i < table->sgt.nents && total < n_bytes; i++, sg = next_entry(sg)) {
        uint64_t piece = n_bytes - total < sg->dma_length ? n_bytes - total : sg->dma_length;
        capacity += runs_needed(dev, sg->dma_address, piece);
        total += piece;
    }
    if (total < n_bytes)
        return sl_fail(EINVAL, SL_REASON_DMA_LENGTH, total, n_bytes);
    if (n_bytes == 0)
        return 0;
    struct iommu_run *runs = malloc(capacity * sizeof(*runs));
    if (!runs)
        return sl_fail(ENOMEM, SL_REASON_NO_MEMORY, 0, 0);
    uint64_t n_runs = 0;
    int err = 0;
    total = 0;
    sg = table->sgt.sgl;
    for (uint32_t i = 0; i < table->sgt.nents && total < n_bytes && !err;
         i++, sg = next_entry(sg)) {
        uint64_t piece = n_bytes - total < sg->dma_length ? n_bytes - total : sg->dma_length;
        err = translate(dev, sg->dma_address, piece, to_memory ? IOMMU_WRITE : IOMMU_READ, runs,
                        capacity, &n_runs);
        total += piece;
    }
    if (!err)
        err = copy_runs(dev, runs, n_runs, buf, to_memory);
    free(runs);
    return err;
}

int dma_device_read_sg(struct dma_device *dev, const struct sl_table *table, void *buf,
                       uint64_t n_bytes)
{
    return device_access_sg(dev, table, buf, n_bytes, 0);
}

int dma_device_write_sg(struct dma_device *dev, const struct sl_table *table, const void *buf,
                        uint64_t n_bytes)
{
    return device_access_sg(dev, table, (uint8_t *)(uintptr_t)buf, n_bytes, 1);
}
