/* DMA mapping of scatter-gather tables for emulated devices, direct or through an emulated
 * IOMMU (shared/spec/kernel-semantics.md, sections 7 and 8), and device-side memory access.
 *
 * An sl_iommu pairs an IOMMU domain (page table, fault log) with the IOVA allocator that hands
 * out its address space, behind one mutex, so that devices on several threads can share it.
 * A dma_device is what a driver sees of a device: its memory, its IOMMU (or none: direct
 * mapping, DMA address = physical address) and its limits.
 *
 * The mapping state lives in the table (sl_table.dma_*): a table is mapped for at most one
 * device at a time, and unmap needs the device it was mapped for. */
#ifndef SL_DMA_H
#define SL_DMA_H

#include <stddef.h>
#include <stdint.h>

#include "iommu.h"
#include "iova.h"
#include "physmem.h"
#include "scatterlist.h"
#include "sl_common.h"

enum dma_data_direction {
    DMA_BIDIRECTIONAL = 0,
    DMA_TO_DEVICE = 1,
    DMA_FROM_DEVICE = 2,
    DMA_NONE = 3,
};

struct sl_iommu;

/* An IOMMU with a granule_bytes page size and an aperture of 2^aperture_bits bytes.  Its IOVA
 * space starts at one granule, so IOVA 0 is never handed out. */
int sl_iommu_create(uint32_t granule_bytes, unsigned aperture_bits, struct sl_iommu **out);
void sl_iommu_destroy(struct sl_iommu *iommu);
/* The parts, for direct use and inspection.  Callers other than dma.c take the lock. */
struct iommu_domain *sl_iommu_domain(struct sl_iommu *iommu);
struct iova_domain *sl_iommu_iovad(struct sl_iommu *iommu);
void sl_iommu_lock(struct sl_iommu *iommu);
void sl_iommu_unlock(struct sl_iommu *iommu);

struct dma_device {
    struct physmem *mem;
    struct sl_iommu *iommu;        /* NULL: direct mapping */
    uint64_t dma_mask;             /* highest address the device can generate */
    uint32_t max_segment_size;     /* dma_get_max_seg_size: 64 KiB by default */
    uint64_t seg_boundary_mask;    /* dma_get_seg_boundary: all ones by default */
    uint64_t max_mapping_size;     /* dma_max_mapping_size: all ones (SIZE_MAX) by default */
    int pci_32bit_workaround;      /* try IOVAs below 4 GiB first (cleared after one failure) */
    int bound;                     /* mapping is refused (-ENODEV) while unbound */
    uint64_t live_mappings;        /* tables mapped for this device and not unmapped */
    /* Fault injection: a map call fails late (after its IOVA block and page-table entries
     * exist, so the rollback runs) with -inject_errno when inject_countdown counts down to 0
     * (the Nth map from when it was set), or with probability inject_ppm per million drawn
     * from splitmix64(inject_rng_state).  Both 0: off. */
    uint64_t inject_countdown;
    uint32_t inject_ppm;
    int inject_errno;
    uint64_t inject_rng_state;
    uint64_t injected_failures;
};

/* A bound device with the kernel's defaults (32-bit DMA mask, as when a driver sets none).
 * With an IOMMU, the granule must not exceed the memory's page size. */
int dma_device_create(struct physmem *mem, struct sl_iommu *iommu, struct dma_device **out);
void dma_device_destroy(struct dma_device *dev);

/* dma_map_sgtable: maps the table's orig_nents entries for dir, sets nents to the DMA segment
 * count and returns 0; or returns -EINVAL, -ENOMEM, -EIO or -ENODEV having changed nothing. */
int dma_map_sgtable(struct dma_device *dev, struct sl_table *table, int dir);
/* dma_unmap_sgtable: releases the mapping (the whole IOVA block at once).  The table keeps its
 * stale DMA fields and nents, as in the kernel. */
int dma_unmap_sgtable(struct dma_device *dev, struct sl_table *table, int dir);
/* dma_sync_sgtable_for_cpu (for_cpu != 0) / _for_device: checks the mapping; memory here is
 * coherent, so no bytes move. */
int dma_sync_sgtable(struct dma_device *dev, struct sl_table *table, int dir, int for_cpu);

/* The count-taking calls drivers use beside the table ones: dma_map_sg maps the first nents
 * entries (1..orig_nents) and returns the DMA segment count without storing it in the table
 * (the driver does); dma_unmap_sg and dma_sync_sg take the count the driver passes, which
 * must be the one passed to dma_map_sg (dma-debug checks that; the mapping itself is
 * released whole either way, as in the kernel). */
int64_t dma_map_sg(struct dma_device *dev, struct sl_table *table, uint32_t nents, int dir);
int dma_unmap_sg(struct dma_device *dev, struct sl_table *table, uint32_t nents, int dir);
int dma_sync_sg(struct dma_device *dev, struct sl_table *table, uint32_t nents, int dir,
                int for_cpu);

/* Device-side access by DMA address.  Through the IOMMU every page is translated first and a
 * fault (logged in the IOMMU's fault log) fails the whole access with -EFAULT before any byte
 * moves.  Direct devices fault on addresses above their DMA mask or past the memory. */
int dma_device_read(struct dma_device *dev, uint64_t dma_addr, void *buf, uint64_t n_bytes);
int dma_device_write(struct dma_device *dev, uint64_t dma_addr, const void *buf,
                     uint64_t n_bytes);
/* Whole-table transfers over the nents DMA segments, in order, from their start: the first
 * n_bytes (at most the segments' total, else -EINVAL).  All translated before any byte moves. */
int dma_device_read_sg(struct dma_device *dev, const struct sl_table *table, void *buf,
                       uint64_t n_bytes);
int dma_device_write_sg(struct dma_device *dev, const struct sl_table *table, const void *buf,
                        uint64_t n_bytes);

#endif
