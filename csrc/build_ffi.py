"""cffi builder for scatterlist's C core (API mode, out of line).

Used by setup.py through ``cffi_modules=["csrc/build_ffi.py:ffibuilder"]``.  Paths are relative
to the project root, which is where setuptools runs this file; absolute paths would break
``python -m build``.
"""

from __future__ import annotations

import os
from typing import Sequence

import cffi

C_SOURCES = [
    "csrc/sl_common.c",
    "csrc/sl_fork.c",
    "csrc/physmem.c",
    "csrc/scatterlist.c",
    "csrc/iova.c",
    "csrc/iommu.c",
    "csrc/dma.c",
]
C_HEADERS = [
    "csrc/sl_common.h",
    "csrc/sl_fork.h",
    "csrc/physmem.h",
    "csrc/scatterlist.h",
    "csrc/iova.h",
    "csrc/iommu.h",
    "csrc/dma.h",
]

CDEF = """
#define SL_ABI_VERSION ...
#define SG_ENTRY_BYTES ...

struct sl_error_detail {
    int reason;
    uint32_t access;
    uint64_t element;
    uint64_t value;
    uint64_t limit;
};
const struct sl_error_detail *sl_last_error(void);
int sl_abi_version(void);

struct physmem;
int physmem_create(uint64_t size_bytes, uint32_t page_size, struct physmem **out);
void physmem_destroy(struct physmem *mem);
uint32_t physmem_page_size(const struct physmem *mem);
uint64_t physmem_n_pages(const struct physmem *mem);
uint64_t physmem_free_pages(const struct physmem *mem);
uint64_t physmem_resident_pages(const struct physmem *mem);
int physmem_alloc_pages(struct physmem *mem, uint64_t n_pages, int layout, uint64_t seed,
                        uint64_t *pfns_out);
int physmem_free_pages_list(struct physmem *mem, const uint64_t *pfns, uint64_t n_pages);
int physmem_read(struct physmem *mem, uint64_t phys, void *buf, uint64_t n_bytes);
int physmem_write(struct physmem *mem, uint64_t phys, const void *buf, uint64_t n_bytes);

struct sg_table { uint32_t nents; uint32_t orig_nents; ...; };
struct dma_device;
struct sl_table {
    struct sg_table sgt;
    uint32_t total_nents;
    int final;
    uint64_t n_chunks;
    struct dma_device *dma_dev;
    int dma_dir;
    uint32_t dma_map_nents;
    uint64_t dma_iova;
    uint64_t dma_iova_len;
    uint32_t dma_mapped_count;
    ...;
};
int sl_table_create(uint32_t page_size, uint32_t max_segment_bytes, struct sl_table **out);
void sl_table_destroy(struct sl_table *table);
int sg_alloc_append_table_from_pages(struct sl_table *table, const uint64_t *pfns,
                                     uint64_t n_pages, uint32_t offset, uint64_t size_bytes,
                                     uint64_t left_pages);
int sg_alloc_table_from_entries(struct sl_table *table, const uint64_t *rows,
                                uint64_t n_entries);
uint64_t sg_nents(const struct sl_table *table);
int64_t sg_nents_for_len(const struct sl_table *table, uint64_t len_bytes);
int sl_table_export_cpu(const struct sl_table *table, uint64_t n_entries, uint64_t *rows_out);
int sl_table_export_dma(const struct sl_table *table, uint64_t n_entries, uint64_t *rows_out);
void sl_table_chunk_slots(const struct sl_table *table, uint32_t *slots_out);
uint64_t sl_table_page_count(const struct sl_table *table, uint64_t start_pgoffset);
uint64_t sl_table_page_pfns(const struct sl_table *table, uint64_t start_pgoffset,
                            uint64_t *pfns_out, uint64_t capacity);
int sg_copy_buffer(const struct sl_table *table, struct physmem *mem, void *buf,
                   uint64_t buflen, uint64_t skip, int to_buffer, uint64_t *copied_out);
void sl_chunk_cache_drain(void);

/* IOVA allocator */
#define IOVA_MASK_LIVE ...
#define IOVA_MASK_RESERVED ...
#define IOVA_MASK_CACHED ...
#define IOVA_MASK_ALL ...
struct iova_range { uint64_t pfn_lo; uint64_t pfn_hi; uint32_t state; uint32_t reserved_pad; };
struct iova_domain;
int iova_alloc(struct iova_domain *dom, uint64_t size_granules, uint64_t limit_pfn,
               uint64_t *pfn_out);
int iova_free(struct iova_domain *dom, uint64_t pfn, uint64_t size_granules);
int iova_reserve(struct iova_domain *dom, uint64_t lo_pfn, uint64_t hi_pfn);
uint64_t iova_live_ranges(const struct iova_domain *dom);
uint64_t iova_cached_ranges(const struct iova_domain *dom);
uint64_t iova_ranges(const struct iova_domain *dom, uint64_t from_pfn, uint32_t state_mask,
                     struct iova_range *out, uint64_t capacity);

/* IOMMU domain */
#define IOMMU_READ ...
#define IOMMU_WRITE ...
#define IOMMU_FAULT_LOG_SIZE ...
struct iommu_fault { uint64_t seq; uint64_t iova; uint32_t access; uint32_t reason;
                     uint32_t prot; uint32_t reserved_pad; };
struct iommu_domain;
int iommu_map(struct iommu_domain *dom, uint64_t iova, uint64_t phys, uint64_t size_bytes,
              uint32_t prot);
int64_t iommu_unmap(struct iommu_domain *dom, uint64_t iova, uint64_t size_bytes);
int iommu_translate(struct iommu_domain *dom, uint64_t iova, uint32_t access,
                    uint64_t *phys_out);
int iommu_lookup(const struct iommu_domain *dom, uint64_t iova, uint64_t *phys_out,
                 uint32_t *prot_out);
uint64_t iommu_mapped_pages(const struct iommu_domain *dom);
uint64_t iommu_fault_total(const struct iommu_domain *dom);
uint32_t iommu_faults_read(const struct iommu_domain *dom, struct iommu_fault *out,
                           uint32_t capacity);
void iommu_faults_clear(struct iommu_domain *dom);

/* IOMMU object and devices */
struct sl_iommu;
int sl_iommu_create(uint32_t granule_bytes, unsigned aperture_bits, struct sl_iommu **out);
void sl_iommu_destroy(struct sl_iommu *iommu);
struct iommu_domain *sl_iommu_domain(struct sl_iommu *iommu);
struct iova_domain *sl_iommu_iovad(struct sl_iommu *iommu);
void sl_iommu_lock(struct sl_iommu *iommu);
void sl_iommu_unlock(struct sl_iommu *iommu);
struct dma_device_limits {
    uint64_t dma_mask;
    uint32_t max_segment_size;
    uint64_t seg_boundary_mask;
    uint64_t max_mapping_size;
};
int dma_device_create(struct physmem *mem, struct sl_iommu *iommu, struct dma_device **out);
void dma_device_destroy(struct dma_device *dev);
void dma_device_get_limits(const struct dma_device *dev, struct dma_device_limits *out);
int dma_device_set_limits(struct dma_device *dev, const struct dma_device_limits *limits);
int dma_device_is_bound(const struct dma_device *dev);
void dma_device_set_bound(struct dma_device *dev, int bound);
uint64_t dma_device_live_mappings(const struct dma_device *dev);
int dma_device_inject_failures(struct dma_device *dev, uint64_t nth, uint32_t ppm, int err,
                               uint64_t seed);
uint64_t dma_device_injected_failures(const struct dma_device *dev);
struct dma_device_injection { uint64_t nth; uint32_t ppm; int err; uint64_t rng_state; };
void dma_device_get_injection(const struct dma_device *dev, struct dma_device_injection *out);
int dma_map_sgtable(struct dma_device *dev, struct sl_table *table, int dir);
int dma_unmap_sgtable(struct dma_device *dev, struct sl_table *table, int dir);
int dma_sync_sgtable(struct dma_device *dev, struct sl_table *table, int dir, int for_cpu);
int64_t dma_map_sg(struct dma_device *dev, struct sl_table *table, uint32_t nents, int dir);
int dma_unmap_sg(struct dma_device *dev, struct sl_table *table, uint32_t nents, int dir);
int dma_sync_sg(struct dma_device *dev, struct sl_table *table, uint32_t nents, int dir,
                int for_cpu);
int dma_device_read(struct dma_device *dev, uint64_t dma_addr, void *buf, uint64_t n_bytes);
int dma_device_write(struct dma_device *dev, uint64_t dma_addr, const void *buf,
                     uint64_t n_bytes);
int dma_device_read_sg(struct dma_device *dev, const struct sl_table *table, void *buf,
                       uint64_t n_bytes);
int dma_device_write_sg(struct dma_device *dev, const struct sl_table *table, const void *buf,
                        uint64_t n_bytes);
int dma_device_check_access(struct dma_device *dev, uint64_t dma_addr, uint64_t n_bytes,
                            uint32_t access);
"""

COMPILE_ARGS = ["-std=c11", "-O2", "-Wall", "-Wextra"]


def make_ffibuilder(
    root: str = "", extra_compile_args: Sequence[str] = (), extra_link_args: Sequence[str] = ()
) -> cffi.FFI:
    """The builder of ``scatterlist._sg``.  ``root`` prefixes the source paths (empty for
    setuptools, which runs from the project root; a directory for builds made elsewhere, such
    as the AddressSanitizer build of ``tests/reliability/asan_suite.py``)."""
    builder = cffi.FFI()
    builder.cdef(CDEF)
    builder.set_source(
        "scatterlist._sg",
        '#include "sl_common.h"\n#include "physmem.h"\n#include "scatterlist.h"\n'
        '#include "dma.h"\n',
        sources=[os.path.join(root, path) for path in C_SOURCES],
        include_dirs=[os.path.join(root, "csrc")],
        depends=[os.path.join(root, path) for path in C_HEADERS],
        extra_compile_args=COMPILE_ARGS + list(extra_compile_args),
        extra_link_args=list(extra_link_args),
    )
    return builder


ffibuilder = make_ffibuilder()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
