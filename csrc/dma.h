/* DMA mapping of scatter-gather tables for emulated devices, direct or through an emulated
 * IOMMU, as the kernel's dma_map_sg / dma_map_sgtable (dma-direct and iommu-dma, including
 * __finalise_sg's merging) do, and device-side memory access.
 *
 * An sl_iommu pairs an IOMMU domain (page table, fault log) with the IOVA allocator that hands
 * out its address space, behind one mutex (the IOMMU lock), so that devices on several threads
 * can share it.  A dma_device is what a driver sees of a device: its memory, its IOMMU (or none:
 * direct mapping, DMA address = physical address) and its limits.
 *
 * The mapping state lives in the table (sl_table.dma_*): a table is mapped for at most one
 * device at a time, and unmap needs the device it was mapped for.
 *
 * Units: addresses, lengths and sizes in bytes; counts in entries or segments.
 *
 * Ownership: sl_iommu_create and dma_device_create hand the caller an object that only the
 * matching destroy frees.  A device refers to its memory and IOMMU without owning them: they
 * must outlive it.  An IOMMU must outlive every device using it, and a device every mapping
 * made for it (unmap first; destroying an IOMMU drops whatever is still mapped in it).  Buffers
 * stay the caller's.
 *
 * Errors: 0 or a negative errno with sl_last_error() set (sl_common.h lists the fields each
 * reason fills).  A failing call changes nothing unless its comment says otherwise.
 *
 * Thread safety.  One device, one IOMMU and one memory may be used from any number of threads
 * at once: maps and unmaps of different tables, device reads and writes, limit changes,
 * bind/unbind, fault-injection settings and every getter below.  A table is not synchronised:
 * each table is used (built, mapped, unmapped, transferred, destroyed) by one thread at a time.
 *   - Device lock (level 2 of the lock order in sl_common.h): guards the limits, the bound flag
 *     and the fault-injection state (countdown, RNG state, injected counter).  Held only for
 *     short leaf sections; never held across a call that takes another lock.
 *   - IOMMU lock (level 3): guards the IOMMU domain and the IOVA allocator, and each device's
 *     pci_32bit_workaround flag (used only while the lock is held, in the map path).  A device
 *     access through the IOMMU holds it from the first translation to the last byte copied
 *     (memory locks, level 4, are taken under it), so a concurrent unmap happens wholly before
 *     the access (which then faults, moving no byte) or wholly after it.
 *   - live_mappings is an atomic counter.
 *   - Do not call any dma_* function while holding sl_iommu_lock (that would take a device or
 *     the same IOMMU lock out of order, or twice).
 * Devices and IOMMUs are registered for fork safety (sl_fork.h).
 *
 * Departures from the kernel, each documented where it applies: unmap clears the DMA view; a
 * map defines every DMA field it exposes and a failed map changes nothing; a DMA segment longer
 * than 2^32 - 1 bytes is refused; a device access is checked against the DMA mask behind an
 * IOMMU too. */
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
 * space starts at one granule, so IOVA 0 is never handed out.  Errors: -EINVAL GRANULE or
 * APERTURE_BITS, -ENOMEM NO_MEMORY; *out is NULL on failure. */
int sl_iommu_create(uint32_t granule_bytes, unsigned aperture_bits, struct sl_iommu **out);
/* NULL is accepted.  Must not race with any other use of the IOMMU or its devices. */
void sl_iommu_destroy(struct sl_iommu *iommu);
/* The parts, for direct use and inspection (iommu.h, iova.h): callers other than dma.c hold
 * sl_iommu_lock around every call on them.  The lock is not recursive. */
struct iommu_domain *sl_iommu_domain(struct sl_iommu *iommu);
struct iova_domain *sl_iommu_iovad(struct sl_iommu *iommu);
void sl_iommu_lock(struct sl_iommu *iommu);
void sl_iommu_unlock(struct sl_iommu *iommu);

/* Opaque: use the accessors below. */
struct dma_device;

struct dma_device_limits {
    uint64_t dma_mask;          /* highest address the device can generate: 2^n - 1,
                                   >= page_size - 1 */
    uint32_t max_segment_size;  /* dma_get_max_seg_size, >= 1 (64 KiB by default) */
    uint64_t seg_boundary_mask; /* 2^n - 1, >= page_size - 1 (all ones by default) */
    uint64_t max_mapping_size;  /* dma_max_mapping_size, any value (all ones by default); stored
                                   and reported, not enforced by the map path */
};

/* A bound device with the kernel's defaults: 32-bit DMA mask (as when a driver sets none),
 * 64 KiB max segment, no boundary, no mapping size limit, no fault injection.  With an IOMMU,
 * the granule must not exceed the memory's page size (-EINVAL GRANULE_PAGE, value = granule,
 * limit = page size).  -ENOMEM NO_MEMORY; *out is NULL on failure. */
int dma_device_create(struct physmem *mem, struct sl_iommu *iommu, struct dma_device **out);
/* NULL is accepted.  Must not race with any other use of the device; unmap its tables first. */
void dma_device_destroy(struct dma_device *dev);

/* A consistent snapshot of the four limits (page_size below is the memory's). */
void dma_device_get_limits(const struct dma_device *dev, struct dma_device_limits *out);
/* Replaces all four limits, or none: -EINVAL DEVICE_DMA_MASK, DEVICE_MAX_SEGMENT or
 * DEVICE_SEG_BOUNDARY, checked in that order (value = the bad number, limit = page_size - 1
 * for the masks).  Maps already made keep the limits they were made with; a map in progress
 * uses the limits it saw when it started. */
int dma_device_set_limits(struct dma_device *dev, const struct dma_device_limits *limits);
/* Bound: 1 (the default) or 0.  Mapping an unbound device fails with -ENODEV DEVICE_UNBOUND;
 * unbinding does not unmap anything or stop device accesses (the caller revokes mappings). */
int dma_device_is_bound(const struct dma_device *dev);
void dma_device_set_bound(struct dma_device *dev, int bound);
/* Tables mapped for this device and not unmapped yet. */
uint64_t dma_device_live_mappings(const struct dma_device *dev);
/* Fault injection: the nth map call from now fails (nth 0: off), or each map with probability
 * ppm per million drawn from splitmix64(seed) (ppm 0: off), with -err; err is ENOMEM, EINVAL or
 * EIO (-EINVAL INJECT_ERRNO otherwise), ppm <= 1000000 (-EINVAL INJECT_PPM).  Replaces all four
 * settings at once (the counter below carries on).  While the countdown runs, it alone
 * decides; the probability applies once it is 0.  Only map calls that pass the argument and
 * table checks draw a decision.  An injected failure happens late: with an IOMMU, after the
 * IOVA block is allocated and mapped, so the rollback runs (reason INJECTED, value = err). */
int dma_device_inject_failures(struct dma_device *dev, uint64_t nth, uint32_t ppm, int err,
                               uint64_t seed);
/* Map calls failed by injection so far. */
uint64_t dma_device_injected_failures(const struct dma_device *dev);
/* What dma_device_inject_failures armed, as it stands now (a consistent snapshot): the maps
 * left before the nth one fails (0: no countdown), ppm, err, and the RNG state the next draw
 * starts from.  For tests and debugging. */
struct dma_device_injection {
    uint64_t nth;
    uint32_t ppm;
    int err;
    uint64_t rng_state;
};
void dma_device_get_injection(const struct dma_device *dev, struct dma_device_injection *out);

/* dma_map_sgtable: maps the table's orig_nents entries for dir, sets sgt.nents and
 * dma_mapped_count to the DMA segment count and returns 0.  On failure it returns -EINVAL,
 * -ENOMEM, -EIO, -EBUSY or -ENODEV and the table is exactly as before the call, DMA fields
 * included (the kernel's __invalidate_sg would poison them instead).
 *
 * What a success defines: segment k's dma_address / dma_length in entry k for k < count, and
 * DMA_MAPPING_ERROR / 0 in every other entry up to orig_nents, on both paths (the kernel leaves
 * entries past the segments as they were).
 *
 * Errors, in the order checked: DMA_DIRECTION; DEVICE_UNBOUND (-ENODEV); TABLE_FREED;
 * TABLE_MAPPED (-EBUSY); TABLE_NOT_FINAL; PAGE_SIZE_MISMATCH (value = the memory's page size,
 * limit = the table's); NENTS_RANGE; PHYS_RANGE (an entry beyond the memory: element = entry,
 * value = its pfn).  Then, direct: DMA_MASK (-EIO: element = entry, value = its phys, limit =
 * the mask).  Through the IOMMU: DMA_SEGMENT_LENGTH (below); IOVA_SPACE (-ENOMEM); a page-table
 * failure re-raised as the kernel's __invalidate_sg does (-ENOMEM stays, anything else becomes
 * -EINVAL) with the page table's record kept whole (e.g. IOMMU_MAPPED when a page of the block
 * was mapped by hand).  Last, INJECTED.
 *
 * DMA segment lengths are 32-bit, as in the kernel, and merging follows __finalise_sg's 32-bit
 * arithmetic, including where max_segment_size - cur_len wraps (an entry already longer than
 * max_segment_size lets the following entries merge onto it).  A map in which a DMA segment
 * would grow past 0xFFFFFFFF bytes (for example a physically contiguous 4 GiB table merging
 * into one segment whose 32-bit length would wrap to 0), or in which one entry's granule-rounded
 * length (or the previous entry's length plus boundary padding) would, is refused with -EINVAL
 * DMA_SEGMENT_LENGTH (element = the entry where it happened, value = the 64-bit length, limit =
 * 0xFFFFFFFF) before anything is mapped in the IOMMU. */
int dma_map_sgtable(struct dma_device *dev, struct sl_table *table, int dir);
/* dma_unmap_sgtable: releases the mapping (the whole IOVA block at once) and clears the DMA
 * view: every one of the orig_nents entries gets dma_address = DMA_MAPPING_ERROR and
 * dma_length = 0, sgt.nents = orig_nents and dma_mapped_count = 0.  The kernel leaves the stale
 * DMA fields and nents; here they are cleared because a stale DMA field would let a device reach
 * IOVAs that another table owns by now.  -EINVAL DMA_DIRECTION, NOT_MAPPED, WRONG_DEVICE or
 * NENTS_RANGE, with nothing changed. */
int dma_unmap_sgtable(struct dma_device *dev, struct sl_table *table, int dir);
/* dma_sync_sgtable_for_cpu (for_cpu != 0) / _for_device: checks the mapping as unmap does;
 * memory here is coherent, so no bytes move. */
int dma_sync_sgtable(struct dma_device *dev, struct sl_table *table, int dir, int for_cpu);

/* The count-taking calls drivers use beside the table ones: dma_map_sg maps the first nents
 * entries (1..orig_nents, else -EINVAL NENTS_RANGE with value = nents, limit = orig_nents) and
 * returns the DMA segment count, stored in dma_mapped_count but not in sgt.nents (the driver
 * does that); entries [count, orig_nents) get DMA_MAPPING_ERROR / 0 as with dma_map_sgtable.
 * dma_unmap_sg and dma_sync_sg take the count the driver passes, which must be the one passed
 * to dma_map_sg (dma-debug checks that; the mapping itself is released whole either way, as in
 * the kernel, and the DMA view is cleared as by dma_unmap_sgtable). */
int64_t dma_map_sg(struct dma_device *dev, struct sl_table *table, uint32_t nents, int dir);
int dma_unmap_sg(struct dma_device *dev, struct sl_table *table, uint32_t nents, int dir);
int dma_sync_sg(struct dma_device *dev, struct sl_table *table, uint32_t nents, int dir,
                int for_cpu);

/* Device-side access by DMA address, n_bytes from dma_addr (0 bytes: nothing, always 0).
 *   1. The range must lie at or below the device's DMA mask, with or without an IOMMU (a
 *      device cannot emit a higher address): else -EFAULT DMA_ACCESS_MASK (value = dma_addr,
 *      limit = the mask, access), not logged in the IOMMU's fault log (the access never
 *      reached it).
 *   2. Through the IOMMU every page is translated; a fault is logged in the IOMMU's fault log
 *      and fails the access with -EFAULT (IOMMU_FAULT_*).
 *   3. Every physical byte must lie inside the memory: else -EFAULT DMA_ACCESS_MEMORY (value =
 *      the start of the first physically contiguous run that reaches past it, limit = the
 *      memory's size in bytes, access), checked once the range is translated.
 * The whole range is translated and checked before any byte moves, so a failure moves no byte.
 * Memory used does not grow with n_bytes: translation goes in batches of a fixed number of
 * runs on the stack (one pass when the range fits in one batch, else a checking pass and a
 * copying pass, under one hold of the IOMMU lock).  A write can still fail with -ENOMEM
 * NO_MEMORY from the memory creating backing bytes, after earlier runs were written. */
int dma_device_read(struct dma_device *dev, uint64_t dma_addr, void *buf, uint64_t n_bytes);
int dma_device_write(struct dma_device *dev, uint64_t dma_addr, const void *buf,
                     uint64_t n_bytes);
/* Translates and checks [dma_addr, dma_addr + n_bytes) exactly as a read (access IOMMU_READ)
 * or a write (IOMMU_WRITE) would, logging a fault as that access would, and moves no byte.
 * -EINVAL IOMMU_ACCESS (value = access) for another access code. */
int dma_device_check_access(struct dma_device *dev, uint64_t dma_addr, uint64_t n_bytes,
                            uint32_t access);
/* Whole-table transfers over the table's dma_mapped_count DMA segments, in order, from their
 * start: the first n_bytes.  -EINVAL NOT_MAPPED / WRONG_DEVICE, -EINVAL DMA_LENGTH if n_bytes is
 * more than the segments hold (value = n_bytes, limit = what they hold); then each segment's
 * piece is checked as dma_device_read/write check a range, in order, and all of them before any
 * byte moves. */
int dma_device_read_sg(struct dma_device *dev, const struct sl_table *table, void *buf,
                       uint64_t n_bytes);
int dma_device_write_sg(struct dma_device *dev, const struct sl_table *table, const void *buf,
                        uint64_t n_bytes);

#endif
