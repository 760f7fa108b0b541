"""cffi builder for scatterlist's C core (API mode, out of line).

Used by setup.py through ``cffi_modules=["csrc/build_ffi.py:ffibuilder"]``.  Paths are relative
to the project root, which is where setuptools runs this file; absolute paths would break
``python -m build``.
"""

from __future__ import annotations

import cffi

C_SOURCES = [
    "csrc/sl_common.c",
    "csrc/physmem.c",
    "csrc/scatterlist.c",
]
C_HEADERS = [
    "csrc/sl_common.h",
    "csrc/physmem.h",
    "csrc/scatterlist.h",
]

CDEF = """
#define SL_ABI_VERSION ...
#define SG_CHAIN ...
#define SG_END ...
#define SG_ENTRY_BYTES ...
#define SG_MAX_SEGMENT_UNLIMITED ...
#define SL_GROUP_PAGES ...

struct sl_error_detail { int reason; uint64_t index; uint64_t value; };
const struct sl_error_detail *sl_last_error(void);
int sl_abi_version(void);

enum sl_layout { SL_LAYOUT_CONTIGUOUS, SL_LAYOUT_SCATTERED, SL_LAYOUT_RANDOM };

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

struct scatterlist {
    uint64_t page_link;
    uint32_t offset;
    uint32_t length;
    uint64_t dma_address;
    uint32_t dma_length;
    uint32_t dma_flags;
};
struct sg_table { struct scatterlist *sgl; uint32_t nents; uint32_t orig_nents; };
struct sl_table {
    struct sg_table sgt;
    struct scatterlist *prv;
    uint32_t total_nents;
    uint32_t prv_slot;
    uint32_t page_size;
    unsigned page_shift;
    uint32_t chunk_entries;
    uint32_t max_segment_bytes;
    int final;
    ...;
    uint64_t n_chunks;
};
int sl_table_create(uint32_t page_size, uint32_t max_segment_bytes, struct sl_table **out);
void sl_table_destroy(struct sl_table *table);
void sl_table_free_entries(struct sl_table *table);
int sg_alloc_append_table_from_pages(struct sl_table *table, const uint64_t *pfns,
                                     uint64_t n_pages, uint32_t offset, uint64_t size_bytes,
                                     uint64_t left_pages);
struct scatterlist *sg_next(struct scatterlist *sg);
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
uint64_t sl_chunk_cache_bytes(void);
void sl_chunk_cache_drain(void);
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "scatterlist._sg",
    '#include "sl_common.h"\n#include "physmem.h"\n#include "scatterlist.h"\n',
    sources=C_SOURCES,
    include_dirs=["csrc"],
    depends=C_HEADERS,
    extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
