#include "sl_fork.h"

#include <errno.h>

/* One list per kind, each with a sentinel head; guarded by registry.lock. */
static struct {
    pthread_mutex_t lock;
    struct sl_fork_node head[SL_FORK_KINDS];
    int handlers_error; /* pthread_atfork's result, written once under handlers_once */
} registry = {
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .head = {{&registry.head[0], &registry.head[0], NULL},
             {&registry.head[1], &registry.head[1], NULL},
             {&registry.head[2], &registry.head[2], NULL}},
};

static pthread_once_t handlers_once = PTHREAD_ONCE_INIT;

/* Takes every lock in the lock order: registry, devices, IOMMUs, memories, chunk cache.  The
 * registry mutex is taken first, so no object can be created or destroyed meanwhile and every
 * lock in the lists stays valid. */
static void prepare(void)
{
    pthread_mutex_lock(&registry.lock);
    for (int kind = 0; kind < SL_FORK_KINDS; kind++)
        for (struct sl_fork_node *n = registry.head[kind].next; n != &registry.head[kind];
             n = n->next)
            pthread_mutex_lock(n->lock);
    sl_chunk_cache_fork_lock();
}

/* Releases everything prepare took, in reverse order. */
static void release_all(void)
{
    sl_chunk_cache_fork_unlock();
    for (int kind = SL_FORK_KINDS - 1; kind >= 0; kind--)
        for (struct sl_fork_node *n = registry.head[kind].prev; n != &registry.head[kind];
             n = n->prev)
            pthread_mutex_unlock(n->lock);
    pthread_mutex_unlock(&registry.lock);
}

static void parent(void) { release_all(); }

/* The child unlocks rather than re-initialises.  Its only thread is the one that called fork()
 * and ran prepare, so it is the owner of every one of these (default-type) mutexes and may
 * unlock them, which leaves each mutex object intact.  pthread_mutex_init on a mutex that is
 * initialised (and here locked) is undefined behaviour, and re-initialising would not make the
 * data it guards any more consistent than prepare already made it. */
static void child(void) { release_all(); }

static void install_handlers(void)
{
    registry.handlers_error = pthread_atfork(prepare, parent, child);
}

int sl_fork_register(struct sl_fork_node *node, enum sl_fork_kind kind, pthread_mutex_t *lock)
{
    pthread_once(&handlers_once, install_handlers);
    if (registry.handlers_error)
        return sl_fail(ENOMEM, SL_REASON_NO_MEMORY, 0, 0);
    node->lock = lock;
    pthread_mutex_lock(&registry.lock);
    struct sl_fork_node *head = &registry.head[kind];
    node->prev = head->prev;
    node->next = head;
    head->prev->next = node;
    head->prev = node;
    pthread_mutex_unlock(&registry.lock);
    return 0;
}

void sl_fork_unregister(struct sl_fork_node *node)
{
    pthread_mutex_lock(&registry.lock);
    node->prev->next = node->next;
    node->next->prev = node->prev;
    node->prev = node->next = NULL;
    pthread_mutex_unlock(&registry.lock);
}
