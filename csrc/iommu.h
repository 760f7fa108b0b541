/* IOMMU domain: a page table translating I/O virtual addresses (IOVAs) to physical addresses,
 * with read/write permissions per page and a log of the faults a device runs into.
 *
 * The table is a radix tree like real hardware's: the page size is the granule, each table is
 * one granule of 8-byte entries (512 entries at 4 KiB, 2048 at 16 KiB, 8192 at 64 KiB), and as
 * many levels as the aperture needs (4 for 48 bits at 4 KiB; the root takes the leftover bits).
 * Tables are created on first map and freed as soon as an unmap leaves them empty.
 *
 * Units: addresses and sizes in bytes; iova, phys and size must be multiples of the granule for
 * map and unmap.  The aperture is [0, 2^aperture_bits - 1].
 *
 * Ownership: iommu_domain_create hands the caller a domain that only iommu_domain_destroy
 * frees, page tables included.  Run arrays and outputs stay the caller's.
 *
 * Errors: 0 or a negative errno with sl_last_error() set (sl_common.h lists the fields each
 * reason fills).  -EINVAL for bad arguments (misalignment: IOMMU_ALIGN with value = the
 * misaligned number and limit = the granule; outside the aperture: IOMMU_APERTURE with value =
 * iova and limit = the last valid IOVA; unknown bits), with nothing changed.  A device access
 * that cannot be translated is a fault: it is appended to the domain's fault log and the call
 * returns -EFAULT whatever the cause; the cause is in the log record and in sl_last_error()
 * (reason SL_REASON_IOMMU_FAULT_NOT_MAPPED, _PERMISSION or _APERTURE, value = the faulting
 * IOVA, access = the access).  One errno for every fault keeps "IOMMU fault" a single exception
 * class above; a missing permission is not reported as -EACCES.
 *
 * Not thread-safe: a domain must be used by one thread at a time.  No public function calls
 * another and none takes a lock, so one mutex around each public call is enough (struct
 * sl_iommu in dma.h pairs a domain with such a mutex, the IOMMU lock). */
#ifndef SL_IOMMU_H
#define SL_IOMMU_H

#include <stddef.h>
#include <stdint.h>

#include "sl_common.h"

/* Permission bits, the kernel's values.  IOMMU_READ: the device may read memory (DMA to the
 * device); IOMMU_WRITE: the device may write memory.  The others are stored and reported but do
 * not affect translation here. */
#define IOMMU_READ 1u
#define IOMMU_WRITE 2u
#define IOMMU_CACHE 4u
#define IOMMU_NOEXEC 8u
#define IOMMU_MMIO 16u
#define IOMMU_PRIV 32u
#define IOMMU_PROT_MASK 63u

#define IOMMU_FAULT_LOG_SIZE 256u /* records kept; older ones are overwritten */

enum iommu_fault_reason {
    IOMMU_FAULT_NOT_MAPPED = 1,      /* no page mapped at the address */
    IOMMU_FAULT_NO_PERMISSION = 2,   /* mapped without the permission the access needs */
    IOMMU_FAULT_OUT_OF_APERTURE = 3, /* address above the aperture */
};

struct iommu_fault {
    uint64_t seq;     /* 0 for the domain's first fault; keeps counting across wraps and clears */
    uint64_t iova;    /* first byte of the access that faulted */
    uint32_t access;  /* IOMMU_READ or IOMMU_WRITE */
    uint32_t reason;  /* enum iommu_fault_reason */
    uint32_t prot;    /* the page's permission bits for NO_PERMISSION, else 0 */
    uint32_t reserved_pad;
};

/* A physically contiguous piece of a translated range. */
struct iommu_run {
    uint64_t phys;
    uint64_t len_bytes;
};

struct iommu_domain;

/* granule_bytes: a power of two in [4 KiB, 64 KiB]; aperture_bits in [log2(granule) + 1, 64]
 * (48 is the common hardware width). */
int iommu_domain_create(uint32_t granule_bytes, unsigned aperture_bits,
                        struct iommu_domain **out);
/* Frees every table; mappings still present are dropped.  NULL is accepted. */
void iommu_domain_destroy(struct iommu_domain *dom);

uint32_t iommu_granule_bytes(const struct iommu_domain *dom);
unsigned iommu_aperture_bits(const struct iommu_domain *dom);
uint64_t iommu_aperture_last(const struct iommu_domain *dom); /* highest valid IOVA */
unsigned iommu_levels(const struct iommu_domain *dom);
uint64_t iommu_mapped_pages(const struct iommu_domain *dom);
uint64_t iommu_table_count(const struct iommu_domain *dom); /* tables allocated, root included */

/* Maps [iova, iova + size_bytes) to [phys, phys + size_bytes) with prot (IOMMU_* bits; 0 maps
 * pages no access may use).  All of it or nothing: -EEXIST if any page is already mapped,
 * -EINVAL for misalignment, a range outside the aperture, a physical range past 2^64 or unknown
 * prot bits, -ENOMEM if a table cannot be allocated.  size_bytes == 0 maps nothing (the
 * alignment checks still apply).  sl_last_error(): IOMMU_ALIGN checks iova, then phys, then
 * size, value = the first misaligned one; IOMMU_MAPPED (-EEXIST): value = the IOVA of the first
 * page found mapped; IOMMU_PHYS_RANGE: value = phys. */
int iommu_map(struct iommu_domain *dom, uint64_t iova, uint64_t phys, uint64_t size_bytes,
              uint32_t prot);

/* The kernel's iommu_map_sg: maps runs back to back from iova on (run k starts where run k-1
 * ended), all of them or nothing, with one walk per leaf table for the whole list.  Every run's
 * phys and len_bytes must be granule multiples (-EINVAL IOMMU_ALIGN, element = the run, value =
 * its phys if misaligned, else its length); zero-length runs are skipped.  Errors as iommu_map;
 * IOMMU_PHYS_RANGE and IOMMU_APERTURE name the run too (for the aperture: the first run that
 * reaches past its end). */
int iommu_map_runs(struct iommu_domain *dom, uint64_t iova, const struct iommu_run *runs,
                   uint64_t n_runs, uint32_t prot);

/* Unmaps pages from iova on, stopping at the first page that is not mapped (as the kernel's
 * iommu_unmap does): returns the bytes unmapped, which is less than size_bytes when it stopped
 * early.  -EINVAL, with nothing unmapped, for misalignment, a range outside the aperture or a
 * size above INT64_MAX (IOMMU_APERTURE). */
int64_t iommu_unmap(struct iommu_domain *dom, uint64_t iova, uint64_t size_bytes);

/* A device access to one byte: *phys_out gets its physical address.  access is IOMMU_READ or
 * IOMMU_WRITE (-EINVAL IOMMU_ACCESS otherwise, value = the code; not a fault).  A fault is
 * logged and gives -EFAULT. */
int iommu_translate(struct iommu_domain *dom, uint64_t iova, uint32_t access,
                    uint64_t *phys_out);

/* A device access to [iova, iova + len_bytes): fills runs_out with physically contiguous runs
 * (neighbouring pages merge) in IOVA order.  Stops at the first fault (logged, -EFAULT) or when
 * the range needs more than capacity runs (-ENOSPC IOMMU_RUNS_CAPACITY, value = the IOVA where
 * it stopped, limit = capacity; not a fault: nothing is logged).  The runs written before an
 * -ENOSPC are complete (the next page does not continue the last one), so a caller can hand
 * them on and call again from the IOVA where it stopped.  On every
 * return *n_runs_out and *done_bytes_out say how much was translated before the stop, so a
 * device model can complete the part of a transfer that preceded a fault.  A range that wraps
 * past 2^64 is -EINVAL IOMMU_APERTURE.  ((iova % granule) + len_bytes) / granule + 1 runs always
 * suffice. */
int iommu_translate_range(struct iommu_domain *dom, uint64_t iova, uint64_t len_bytes,
                          uint32_t access, struct iommu_run *runs_out, uint64_t capacity,
                          uint64_t *n_runs_out, uint64_t *done_bytes_out);

/* The kernel's iommu_iova_to_phys, never a fault: 1 and the page's physical address for iova
 * and its prot when mapped, else 0 (both outputs 0). */
int iommu_lookup(const struct iommu_domain *dom, uint64_t iova, uint64_t *phys_out,
                 uint32_t *prot_out);

/* Faults ever logged by this domain (not reduced by clears or by wrapping). */
uint64_t iommu_fault_total(const struct iommu_domain *dom);
/* Faults currently held, at most IOMMU_FAULT_LOG_SIZE. */
uint32_t iommu_fault_count(const struct iommu_domain *dom);
/* Copies the held faults, oldest first, up to capacity; returns how many it copied.  Gaps in
 * seq show records lost to wrapping or clearing. */
uint32_t iommu_faults_read(const struct iommu_domain *dom, struct iommu_fault *out,
                           uint32_t capacity);
/* Forgets the held faults; the total and the seq numbering carry on. */
void iommu_faults_clear(struct iommu_domain *dom);

#endif
