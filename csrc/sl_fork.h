/* Fork safety: a registry of every live memory, IOMMU and device, and pthread_atfork handlers
 * that take all of their locks around fork().
 *
 * Why: fork() copies only the calling thread.  A mutex another thread held at that moment stays
 * locked forever in the child, and the data it guards may be half-changed.  The prepare handler
 * therefore takes every lock of the core in the lock order (sl_common.h): the registry mutex,
 * every device lock, every IOMMU lock, every memory lock, then the chunk cache lock.  Once it
 * holds them, no other thread is inside a critical section of any object, so the child's copy
 * of every object is consistent.  The parent handler releases them in reverse order; so does
 * the child handler (see sl_fork.c for why unlocking, not re-initialising).
 *
 * The handlers are installed once (pthread_once) by the first registration, that is by the
 * first successful physmem_create, sl_iommu_create or dma_device_create.  Objects register
 * when they are created (after their mutex is initialised) and unregister when they are
 * destroyed (before their mutex is destroyed), under the registry mutex.  Every function here
 * is thread-safe.  Internal to the core: not exported to Python. */
#ifndef SL_FORK_H
#define SL_FORK_H

#include <pthread.h>

#include "sl_common.h"

/* The kinds, in lock order. */
enum sl_fork_kind {
    SL_FORK_DEVICE = 0,
    SL_FORK_IOMMU = 1,
    SL_FORK_MEMORY = 2,
    SL_FORK_KINDS = 3,
};

/* Embedded in each registered object (intrusive doubly linked list per kind). */
struct sl_fork_node {
    struct sl_fork_node *prev, *next;
    pthread_mutex_t *lock; /* the object's lock, taken around fork() */
};

/* Adds node (of an object whose lock is initialised) to the registry; installs the fork
 * handlers on first use.  0, or -ENOMEM (SL_REASON_NO_MEMORY) when pthread_atfork failed: the
 * object must then not be used (its creation fails). */
int sl_fork_register(struct sl_fork_node *node, enum sl_fork_kind kind, pthread_mutex_t *lock);
/* Removes a registered node.  Call before destroying the object's lock. */
void sl_fork_unregister(struct sl_fork_node *node);

/* The chunk cache's lock, taken last by the prepare handler (scatterlist.c). */
void sl_chunk_cache_fork_lock(void);
void sl_chunk_cache_fork_unlock(void);

#endif
