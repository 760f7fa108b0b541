#include "iova.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* Every range, whatever its state, is a node of an AVL tree ordered by pfn_lo.  Each node also
 * knows the free gap directly below it, and the largest such gap in its subtree, so that the
 * search for the highest fit can skip whole subtrees with no room instead of walking every
 * range below the limit.  A permanent anchor node at the very top owns the gap above the
 * highest range, so every free granule belongs to exactly one node's gap. */

#define NODE_ANCHOR 3u /* state of the anchor; never visible outside */
#define NODE_FREE 4u   /* state of a node in the pool's free list */
#define ANCHOR_PFN UINT64_MAX

struct iova_node {
    struct iova_node *left, *right, *parent;
    uint64_t pfn_lo, pfn_hi;
    uint64_t gap;     /* free granules just below pfn_lo (those below start_pfn do not count) */
    uint64_t max_gap; /* largest gap in this subtree */
    int32_t height;   /* 1 for a leaf */
    uint32_t state;   /* enum iova_range_state, NODE_ANCHOR or NODE_FREE */
};

/* Magazines hold node pointers rather than pfns: taking a range from the cache then touches
 * no tree at all, and emptying the cache needs no lookups. */
struct iova_magazine {
    struct iova_magazine *next; /* next full magazine in the depot */
    uint32_t size;
    struct iova_node *node[IOVA_MAG_SIZE];
};

struct iova_rcache {
    struct iova_magazine *loaded, *prev; /* never NULL while the domain lives */
    struct iova_magazine *depot;         /* stack of full magazines */
    uint32_t depot_len;
};

/* Nodes come from chunks owned by the domain: a tree of 100k ranges then sits in a few MiB of
 * neighbouring memory instead of 100k separate heap blocks, and the allocator's cost per range
 * is a list pop.  Chunks are returned to the host only when the domain is destroyed. */
#define NODES_PER_CHUNK 255u

struct node_chunk {
    struct node_chunk *next;
    struct iova_node node[NODES_PER_CHUNK];
};

struct iova_domain {
    uint32_t granule_bytes;
    unsigned granule_shift;
    uint64_t start_pfn;
    uint64_t max_pfn;
    uint32_t depot_max;
    struct iova_node *root;
    struct iova_node anchor;
    struct node_chunk *chunks;
    struct iova_node *free_nodes; /* linked through ->left */
    uint64_t n_live, live_granules, n_cached, n_reserved;
    struct iova_rcache rcache[IOVA_RANGE_CACHE_MAX_ORDER];
};

/* ---- small arithmetic ---- */

/* x in [1, 2^63]. */
static inline uint64_t roundup_pow2(uint64_t x)
{
    return x <= 1 ? 1 : UINT64_C(1) << (64 - __builtin_clzll(x - 1));
}

/* The size the allocator really takes for a request: alloc_iova_fast rounds small sizes up so
 * that freed ranges of one order can serve any request of that order. */
static inline uint64_t fast_size(uint64_t size_granules)
{
    return size_granules < IOVA_FAST_ROUND_BELOW ? roundup_pow2(size_granules) : size_granules;
}

/* order_base_2 of a cacheable size (at most 32 after fast_size, so a power of two). */
static inline unsigned size_order(uint64_t size_granules)
{
    return (unsigned)__builtin_ctzll(size_granules);
}

static inline uint64_t node_size(const struct iova_node *n) { return n->pfn_hi - n->pfn_lo + 1; }

/* ---- AVL tree with gap bookkeeping ---- */

static inline int32_t height(const struct iova_node *n) { return n ? n->height : 0; }
static inline uint64_t max_gap(const struct iova_node *n) { return n ? n->max_gap : 0; }
static inline uint64_t max3(uint64_t a, uint64_t b, uint64_t c)
{
    uint64_t m = a > b ? a : b;
    return m > c ? m : c;
}

static void update(struct iova_node *n)
{
    int32_t hl = height(n->left), hr = height(n->right);
    n->height = 1 + (hl > hr ? hl : hr);
    n->max_gap = max3(n->gap, max_gap(n->left), max_gap(n->right));
}

static void replace_child(struct iova_domain *dom, struct iova_node *parent,
                          struct iova_node *old, struct iova_node *new_child)
{
    if (!parent)
        dom->root = new_child;
    else if (parent->left == old)
        parent->left = new_child;
    else
        parent->right = new_child;
}

static struct iova_node *rotate_left(struct iova_domain *dom, struct iova_node *x)
{
    struct iova_node *y = x->right;
    x->right = y->left;
    if (y->left)
        y->left->parent = x;
    y->parent = x->parent;
    replace_child(dom, x->parent, x, y);
    y->left = x;
    x->parent = y;
    update(x);
    update(y);
    return y;
}

static struct iova_node *rotate_right(struct iova_domain *dom, struct iova_node *x)
{
    struct iova_node *y = x->left;
    x->left = y->right;
    if (y->right)
        y->right->parent = x;
    y->parent = x->parent;
    replace_child(dom, x->parent, x, y);
    y->right = x;
    x->parent = y;
    update(x);
    update(y);
    return y;
}

/* Restores heights, balance and max_gap from n up to the root.  Always walks to the root: a gap
 * that changed anywhere must reach every ancestor, even where no height changes. */
static void fixup(struct iova_domain *dom, struct iova_node *n)
{
    while (n) {
        update(n);
        int32_t balance = height(n->left) - height(n->right);
        if (balance > 1) {
            if (height(n->left->left) < height(n->left->right))
                rotate_left(dom, n->left);
            n = rotate_right(dom, n);
        } else if (balance < -1) {
            if (height(n->right->right) < height(n->right->left))
                rotate_right(dom, n->right);
            n = rotate_left(dom, n);
        }
        n = n->parent;
    }
}

static struct iova_node *next_node(const struct iova_node *n)
{
    if (n->right) {
        n = n->right;
        while (n->left)
            n = n->left;
        return (struct iova_node *)n;
    }
    while (n->parent && n->parent->right == n)
        n = n->parent;
    return n->parent;
}

static struct iova_node *prev_node(const struct iova_node *n)
{
    if (n->left) {
        n = n->left;
        while (n->right)
            n = n->right;
        return (struct iova_node *)n;
    }
    while (n->parent && n->parent->left == n)
        n = n->parent;
    return n->parent;
}

/* The free granules between pred (or the bottom of the space) and n, ignoring those below
 * start_pfn, which are never handed out. */
static uint64_t gap_below(const struct iova_domain *dom, const struct iova_node *n,
                          const struct iova_node *pred)
{
    uint64_t free_lo = pred ? pred->pfn_hi + 1 : 0;
    if (free_lo < dom->start_pfn)
        free_lo = dom->start_pfn;
    return n->pfn_lo > free_lo ? n->pfn_lo - free_lo : 0;
}

/* Links x (pfn_lo, pfn_hi and state set; must not overlap anything) into the tree. */
static void tree_insert(struct iova_domain *dom, struct iova_node *x)
{
    /* The last node the descent leaves to the left is x's successor, the last it leaves to the
     * right its predecessor: no second walk needed to find them. */
    struct iova_node *parent = NULL, **link = &dom->root, *pred = NULL, *succ = NULL;
    while (*link) {
        parent = *link;
        if (x->pfn_lo < parent->pfn_lo) {
            succ = parent;
            link = &parent->left;
        } else {
            pred = parent;
            link = &parent->right;
        }
    }
    x->left = x->right = NULL;
    x->parent = parent;
    x->height = 1;
    *link = x;
    /* x splits the gap of its successor (the anchor at worst) in two.  A new leaf's successor
     * is one of its ancestors, so the one fixup pass from x also refreshes the successor. */
    x->gap = gap_below(dom, x, pred);
    x->max_gap = x->gap;
    succ->gap = gap_below(dom, succ, x);
    fixup(dom, x);
}

/* Unlinks x (never the anchor); its successor's gap grows by x's range and x's gap. */
static void tree_remove(struct iova_domain *dom, struct iova_node *x)
{
    struct iova_node *pred = prev_node(x), *succ = next_node(x), *start;
    succ->gap = gap_below(dom, succ, pred);
    /* One fixup pass from the lowest changed node.  The successor is on that pass's path,
     * except when x has only a right subtree: then it sits in that subtree, below x's place,
     * and the pass starts from it. */
    if (!x->left || !x->right) {
        struct iova_node *child = x->left ? x->left : x->right;
        replace_child(dom, x->parent, x, child);
        if (child)
            child->parent = x->parent;
        start = x->right ? succ : x->parent;
    } else {
        /* succ is the leftmost node of x's right subtree: it takes x's place. */
        struct iova_node *y = succ;
        if (y->parent != x) {
            start = y->parent;
            y->parent->left = y->right;
            if (y->right)
                y->right->parent = y->parent;
            y->right = x->right;
            x->right->parent = y;
        } else {
            start = y;
        }
        y->left = x->left;
        x->left->parent = y;
        y->parent = x->parent;
        replace_child(dom, x->parent, x, y);
        y->height = x->height;
    }
    fixup(dom, start);
}

/* The node with the largest pfn_lo <= pfn, or NULL. */
static struct iova_node *find_le(const struct iova_domain *dom, uint64_t pfn)
{
    struct iova_node *n = dom->root, *best = NULL;
    while (n) {
        if (n->pfn_lo <= pfn) {
            best = n;
            n = n->right;
        } else {
            n = n->left;
        }
    }
    return best;
}

/* The range holding pfn, or NULL (the anchor never counts). */
static struct iova_node *find_containing(const struct iova_domain *dom, uint64_t pfn)
{
    struct iova_node *n = find_le(dom, pfn);
    if (!n || n->state == NODE_ANCHOR || pfn > n->pfn_hi)
        return NULL;
    return n;
}

/* The first node (in order) with pfn_hi >= pfn; ranges are disjoint, so pfn_hi is ordered too.
 * Never NULL: the anchor ends at the top pfn. */
static struct iova_node *first_ending_at_or_after(const struct iova_domain *dom, uint64_t pfn)
{
    struct iova_node *n = dom->root, *best = NULL;
    while (n) {
        if (n->pfn_hi >= pfn) {
            best = n;
            n = n->left;
        } else {
            n = n->right;
        }
    }
    return best;
}

/* ---- top-down search ---- */

struct fit_request {
    uint64_t size, align_mask, limit_pfn;
};

/* The highest aligned start for the request inside n's gap, if there is one. */
static int fit_in_gap(const struct iova_node *n, const struct fit_request *req, uint64_t *pfn)
{
    if (n->gap < req->size)
        return 0;
    uint64_t gap_lo = n->pfn_lo - n->gap;
    uint64_t gap_hi = n->pfn_lo - 1;
    if (gap_lo > req->limit_pfn)
        return 0;
    if (gap_hi > req->limit_pfn)
        gap_hi = req->limit_pfn;
    if (gap_hi - gap_lo + 1 < req->size)
        return 0;
    uint64_t start = (gap_hi + 1 - req->size) & req->align_mask;
    if (start < gap_lo)
        return 0;
    *pfn = start;
    return 1;
}

/* Visits gaps from the highest down, skipping subtrees whose largest gap is too small and
 * nodes whose gap starts above the limit (everything to their right does too).  Gaps are
 * visited in descending order, so the first fit is the highest fit.  O(log n) unless many gaps
 * are large enough but fail the alignment, where it visits those too (the kernel's walk visits
 * every range between the limit and the fit). */
static int search_highest(const struct iova_node *n, const struct fit_request *req,
                          uint64_t *pfn)
{
    while (n && n->max_gap >= req->size) {
        if (n->pfn_lo - n->gap > req->limit_pfn) {
            n = n->left;
            continue;
        }
        if (search_highest(n->right, req, pfn))
            return 1;
        if (fit_in_gap(n, req, pfn))
            return 1;
        n = n->left;
    }
    return 0;
}

/* alloc_iova with size_aligned: links fresh as the new range on success. */
static int tree_alloc(struct iova_domain *dom, uint64_t size, uint64_t limit_pfn,
                      struct iova_node *fresh)
{
    if (limit_pfn < dom->start_pfn || size > limit_pfn - dom->start_pfn + 1)
        return 0;
    struct fit_request req = {size, ~(roundup_pow2(size) - 1), limit_pfn};
    uint64_t pfn;
    if (!search_highest(dom->root, &req, &pfn))
        return 0;
    fresh->pfn_lo = pfn;
    fresh->pfn_hi = pfn + size - 1;
    fresh->state = IOVA_RANGE_LIVE;
    tree_insert(dom, fresh);
    return 1;
}

/* ---- node pool ---- */

static struct iova_node *node_alloc(struct iova_domain *dom)
{
    if (!dom->free_nodes) {
        struct node_chunk *chunk = malloc(sizeof(*chunk));
        if (!chunk)
            return NULL;
        chunk->next = dom->chunks;
        dom->chunks = chunk;
        for (unsigned i = NODES_PER_CHUNK; i-- > 0;) {
            chunk->node[i].left = dom->free_nodes;
            dom->free_nodes = &chunk->node[i];
        }
    }
    struct iova_node *n = dom->free_nodes;
    dom->free_nodes = n->left;
    memset(n, 0, sizeof(*n));
    return n;
}

static void node_free(struct iova_domain *dom, struct iova_node *n)
{
    n->state = NODE_FREE;
    n->left = dom->free_nodes;
    dom->free_nodes = n;
}

static void release_node(struct iova_domain *dom, struct iova_node *n)
{
    tree_remove(dom, n);
    node_free(dom, n);
}

/* ---- range cache ---- */

/* Takes a cached range of the order that ends at or below limit_pfn: the most recently cached
 * one that fits, as the kernel's magazine pop does; the top entry fills the hole it leaves. */
static struct iova_node *rcache_get(struct iova_domain *dom, unsigned order, uint64_t limit_pfn)
{
    struct iova_rcache *rc = &dom->rcache[order];
    if (rc->loaded->size == 0) {
        if (rc->prev->size != 0) {
            struct iova_magazine *tmp = rc->loaded;
            rc->loaded = rc->prev;
            rc->prev = tmp;
        } else if (rc->depot) {
            free(rc->loaded);
            rc->loaded = rc->depot;
            rc->depot = rc->depot->next;
            rc->loaded->next = NULL;
            rc->depot_len--;
        } else {
            return NULL;
        }
    }
    struct iova_magazine *mag = rc->loaded;
    for (uint32_t i = mag->size; i-- > 0;) {
        struct iova_node *n = mag->node[i];
        if (n->pfn_hi <= limit_pfn) {
            mag->node[i] = mag->node[--mag->size];
            return n;
        }
    }
    return NULL;
}

/* Caches a live range that the caller already uncounted; returns 0 if it could not (the caller
 * then frees it to the tree). */
static int rcache_put(struct iova_domain *dom, unsigned order, struct iova_node *n)
{
    struct iova_rcache *rc = &dom->rcache[order];
    if (rc->loaded->size == IOVA_MAG_SIZE) {
        if (rc->prev->size < IOVA_MAG_SIZE) {
            struct iova_magazine *tmp = rc->loaded;
            rc->loaded = rc->prev;
            rc->prev = tmp;
        } else if (rc->depot_len < dom->depot_max) {
            struct iova_magazine *fresh = calloc(1, sizeof(*fresh));
            if (!fresh)
                return 0;
            rc->loaded->next = rc->depot;
            rc->depot = rc->loaded;
            rc->depot_len++;
            rc->loaded = fresh;
        } else {
            /* The depot is full: the kernel would push this magazine and its trimming work
             * would free it moments later.  Do both now. */
            struct iova_magazine *mag = rc->loaded;
            for (uint32_t i = 0; i < mag->size; i++)
                release_node(dom, mag->node[i]);
            dom->n_cached -= mag->size;
            mag->size = 0;
        }
    }
    rc->loaded->node[rc->loaded->size++] = n;
    n->state = IOVA_RANGE_CACHED;
    dom->n_cached++;
    return 1;
}

/* Calls fn on every cached node, magazine by magazine. */
static void rcache_each(struct iova_domain *dom,
                        void (*fn)(struct iova_domain *, struct iova_node *))
{
    for (unsigned order = 0; order < IOVA_RANGE_CACHE_MAX_ORDER; order++) {
        struct iova_rcache *rc = &dom->rcache[order];
        for (uint32_t i = 0; i < rc->loaded->size; i++)
            fn(dom, rc->loaded->node[i]);
        for (uint32_t i = 0; i < rc->prev->size; i++)
            fn(dom, rc->prev->node[i]);
        for (struct iova_magazine *mag = rc->depot; mag; mag = mag->next)
            for (uint32_t i = 0; i < mag->size; i++)
                fn(dom, mag->node[i]);
    }
}

/* Empties every magazine, freeing the nodes (already unlinked from the tree, or not). */
static void rcache_clear(struct iova_domain *dom, int unlink)
{
    for (unsigned order = 0; order < IOVA_RANGE_CACHE_MAX_ORDER; order++) {
        struct iova_rcache *rc = &dom->rcache[order];
        struct iova_magazine *mags[2] = {rc->loaded, rc->prev};
        for (int k = 0; k < 2; k++) {
            for (uint32_t i = 0; i < mags[k]->size; i++) {
                if (unlink)
                    tree_remove(dom, mags[k]->node[i]);
                node_free(dom, mags[k]->node[i]);
            }
            mags[k]->size = 0;
        }
        while (rc->depot) {
            struct iova_magazine *mag = rc->depot;
            rc->depot = mag->next;
            for (uint32_t i = 0; i < mag->size; i++) {
                if (unlink)
                    tree_remove(dom, mag->node[i]);
                node_free(dom, mag->node[i]);
            }
            free(mag);
        }
        rc->depot_len = 0;
    }
    dom->n_cached = 0;
}

/* ---- public interface ---- */

int iova_domain_create(uint32_t granule_bytes, uint64_t start_pfn, uint32_t depot_max_magazines,
                       struct iova_domain **out)
{
    *out = NULL;
    if (granule_bytes < 4096 || granule_bytes > 65536 || (granule_bytes & (granule_bytes - 1)))
        return sl_fail(EINVAL, SL_REASON_GRANULE, 0, granule_bytes);
    if (start_pfn == 0)
        return sl_fail(EINVAL, SL_REASON_IOVA_START_PFN, 0, start_pfn);
    struct iova_domain *dom = calloc(1, sizeof(*dom));
    if (!dom)
        return sl_fail(ENOMEM, SL_REASON_NO_MEMORY, 0, 0);
    dom->granule_bytes = granule_bytes;
    dom->granule_shift = (unsigned)__builtin_ctz(granule_bytes);
    dom->max_pfn = UINT64_MAX >> dom->granule_shift;
    dom->start_pfn = start_pfn;
    dom->depot_max = depot_max_magazines;
    /* The magazines are one resource: calloc left every pointer NULL, and the exit path frees
     * whichever were allocated. */
    for (unsigned order = 0; order < IOVA_RANGE_CACHE_MAX_ORDER; order++) {
        dom->rcache[order].loaded = calloc(1, sizeof(struct iova_magazine));
        dom->rcache[order].prev = calloc(1, sizeof(struct iova_magazine));
        if (!dom->rcache[order].loaded || !dom->rcache[order].prev)
            goto err_free_magazines;
    }
    dom->anchor.pfn_lo = dom->anchor.pfn_hi = ANCHOR_PFN;
    dom->anchor.state = NODE_ANCHOR;
    dom->anchor.height = 1;
    dom->anchor.gap = gap_below(dom, &dom->anchor, NULL);
    dom->anchor.max_gap = dom->anchor.gap;
    dom->root = &dom->anchor;
    *out = dom;
    return 0;

err_free_magazines:
    for (unsigned order = 0; order < IOVA_RANGE_CACHE_MAX_ORDER; order++) {
        free(dom->rcache[order].loaded);
        free(dom->rcache[order].prev);
    }
    free(dom);
    return sl_fail(ENOMEM, SL_REASON_NO_MEMORY, 0, 0);
}

void iova_domain_destroy(struct iova_domain *dom)
{
    if (!dom)
        return;
    /* Cached nodes live in the pool's chunks like every other node. */
    for (unsigned order = 0; order < IOVA_RANGE_CACHE_MAX_ORDER; order++) {
        struct iova_rcache *rc = &dom->rcache[order];
        while (rc->depot) {
            struct iova_magazine *mag = rc->depot;
            rc->depot = mag->next;
            free(mag);
        }
        free(rc->loaded);
        free(rc->prev);
    }
    while (dom->chunks) {
        struct node_chunk *chunk = dom->chunks;
        dom->chunks = chunk->next;
        free(chunk);
    }
    free(dom);
}

uint32_t iova_granule_bytes(const struct iova_domain *dom) { return dom->granule_bytes; }
uint64_t iova_start_pfn(const struct iova_domain *dom) { return dom->start_pfn; }
uint64_t iova_max_pfn(const struct iova_domain *dom) { return dom->max_pfn; }
uint64_t iova_live_ranges(const struct iova_domain *dom) { return dom->n_live; }
uint64_t iova_live_granules(const struct iova_domain *dom) { return dom->live_granules; }
uint64_t iova_cached_ranges(const struct iova_domain *dom) { return dom->n_cached; }
uint64_t iova_reserved_ranges(const struct iova_domain *dom) { return dom->n_reserved; }

static void unlink_cached(struct iova_domain *dom, struct iova_node *n) { tree_remove(dom, n); }
static void relink_cached(struct iova_domain *dom, struct iova_node *n) { tree_insert(dom, n); }

static int alloc_common(struct iova_domain *dom, uint64_t size_granules, uint64_t limit_pfn,
                        int flush_rcache, uint64_t *pfn_out)
{
    if (size_granules == 0)
        return sl_fail(EINVAL, SL_REASON_IOVA_SIZE, 0, 0);
    uint64_t size = fast_size(size_granules);
    if (limit_pfn > dom->max_pfn)
        limit_pfn = dom->max_pfn;
    if (size <= (UINT64_C(1) << (IOVA_RANGE_CACHE_MAX_ORDER - 1))) {
        struct iova_node *n = rcache_get(dom, size_order(size), limit_pfn);
        if (n) {
            n->state = IOVA_RANGE_LIVE;
            dom->n_cached--;
            dom->n_live++;
            dom->live_granules += size;
            *pfn_out = n->pfn_lo;
            return 0;
        }
    }
    /* Allocated up front so that nothing below can fail half-way. */
    struct iova_node *fresh = node_alloc(dom);
    if (!fresh)
        return sl_fail(ENOMEM, SL_REASON_NO_MEMORY, 0, 0);
    int found = tree_alloc(dom, size, limit_pfn, fresh);
    if (!found && flush_rcache && dom->n_cached) {
        /* The kernel frees every cached range to the tree and retries.  Unlink them but keep
         * them in their magazines, so that a retry that fails too can put them all back. */
        rcache_each(dom, unlink_cached);
        found = tree_alloc(dom, size, limit_pfn, fresh);
        if (found)
            rcache_clear(dom, 0);
        else
            rcache_each(dom, relink_cached);
    }
    if (!found) {
        node_free(dom, fresh);
        return sl_fail_limit(ENOMEM, SL_REASON_IOVA_EXHAUSTED, 0, size, limit_pfn);
    }
    dom->n_live++;
    dom->live_granules += size;
    *pfn_out = fresh->pfn_lo;
    return 0;
}

int iova_alloc(struct iova_domain *dom, uint64_t size_granules, uint64_t limit_pfn,
               uint64_t *pfn_out)
{
    return alloc_common(dom, size_granules, limit_pfn, 1, pfn_out);
}

int iova_alloc_noflush(struct iova_domain *dom, uint64_t size_granules, uint64_t limit_pfn,
                       uint64_t *pfn_out)
{
    return alloc_common(dom, size_granules, limit_pfn, 0, pfn_out);
}

int iova_free(struct iova_domain *dom, uint64_t pfn, uint64_t size_granules)
{
    if (size_granules == 0)
        return sl_fail(EINVAL, SL_REASON_IOVA_SIZE, 0, 0);
    struct iova_node *n = find_containing(dom, pfn);
    if (!n)
        return sl_fail(ENOENT, SL_REASON_IOVA_NOT_FOUND, 0, pfn);
    if (n->state != IOVA_RANGE_LIVE)
        return sl_fail(EINVAL, SL_REASON_IOVA_NOT_LIVE, 0, pfn);
    if (n->pfn_lo != pfn)
        return sl_fail(EINVAL, SL_REASON_IOVA_NOT_START, 0, pfn);
    uint64_t size = node_size(n);
    if (fast_size(size_granules) != size)
        return sl_fail_limit(EINVAL, SL_REASON_IOVA_SIZE_MISMATCH, 0, size_granules, size);
    dom->n_live--;
    dom->live_granules -= size;
    /* free_iova_fast takes the order from the caller's unrounded size; fast_size rounded it
     * to exactly this node's size above, so the node's own order is the same number. */
    if (size <= (UINT64_C(1) << (IOVA_RANGE_CACHE_MAX_ORDER - 1)) &&
        rcache_put(dom, size_order(size), n))
        return 0;
    release_node(dom, n);
    return 0;
}

int iova_reserve(struct iova_domain *dom, uint64_t lo_pfn, uint64_t hi_pfn)
{
    if (lo_pfn > hi_pfn || hi_pfn == ANCHOR_PFN)
        return sl_fail_limit(EINVAL, SL_REASON_IOVA_RANGE, 0, lo_pfn, hi_pfn);
    int overlaps_cached = 0;
    for (struct iova_node *n = first_ending_at_or_after(dom, lo_pfn);
         n->state != NODE_ANCHOR && n->pfn_lo <= hi_pfn; n = next_node(n)) {
        if (n->state == IOVA_RANGE_LIVE)
            return sl_fail_limit(EBUSY, SL_REASON_IOVA_BUSY, 0, n->pfn_lo, n->pfn_hi);
        if (n->state == IOVA_RANGE_CACHED)
            overlaps_cached = 1;
    }
    struct iova_node *fresh = node_alloc(dom);
    if (!fresh)
        return sl_fail(ENOMEM, SL_REASON_NO_MEMORY, 0, 0);
    /* A cached range is free as far as any caller knows; taking it out of the middle of a
     * magazine is not worth the complexity for a call made at setup time. */
    if (overlaps_cached)
        rcache_clear(dom, 1);
    uint64_t lo = lo_pfn, hi = hi_pfn;
    struct iova_node *n = first_ending_at_or_after(dom, lo_pfn ? lo_pfn - 1 : 0);
    while (n->state != NODE_ANCHOR && n->pfn_lo <= hi_pfn + 1) {
        struct iova_node *next = next_node(n);
        if (n->state == IOVA_RANGE_RESERVED) {
            if (n->pfn_lo < lo)
                lo = n->pfn_lo;
            if (n->pfn_hi > hi)
                hi = n->pfn_hi;
            release_node(dom, n);
            dom->n_reserved--;
        }
        n = next;
    }
    fresh->pfn_lo = lo;
    fresh->pfn_hi = hi;
    fresh->state = IOVA_RANGE_RESERVED;
    tree_insert(dom, fresh);
    dom->n_reserved++;
    return 0;
}

int iova_find(const struct iova_domain *dom, uint64_t pfn, struct iova_range *out)
{
    const struct iova_node *n = find_containing(dom, pfn);
    if (!n)
        return sl_fail(ENOENT, SL_REASON_IOVA_NOT_FOUND, 0, pfn);
    out->pfn_lo = n->pfn_lo;
    out->pfn_hi = n->pfn_hi;
    out->state = n->state;
    out->reserved_pad = 0;
    return 0;
}

void iova_flush_rcache(struct iova_domain *dom) { rcache_clear(dom, 1); }

uint64_t iova_ranges(const struct iova_domain *dom, uint64_t from_pfn, uint32_t state_mask,
                     struct iova_range *out, uint64_t capacity)
{
    uint64_t written = 0;
    for (const struct iova_node *n = first_ending_at_or_after(dom, from_pfn);
         n && n->state != NODE_ANCHOR && written < capacity; n = next_node(n)) {
        if (!(state_mask & (1u << n->state)))
            continue;
        out[written].pfn_lo = n->pfn_lo;
        out[written].pfn_hi = n->pfn_hi;
        out[written].state = n->state;
        out[written].reserved_pad = 0;
        written++;
    }
    return written;
}

/* ---- consistency check (tests) ---- */

struct check_state {
    const struct iova_domain *dom;
    const struct iova_node *pred;
    uint64_t n_nodes, n_live, live_granules, n_cached, n_reserved;
    int bad;
    uint64_t bad_pfn; /* pfn_lo of the first node found broken */
};

static void mark_bad(struct check_state *st, const struct iova_node *n)
{
    if (!st->bad)
        st->bad_pfn = n->pfn_lo;
    st->bad = 1;
}

static int32_t check_subtree(struct check_state *st, const struct iova_node *n,
                             const struct iova_node *parent)
{
    if (!n)
        return 0;
    if (n->parent != parent)
        mark_bad(st, n);
    int32_t hl = check_subtree(st, n->left, n);
    /* In-order position: n follows st->pred. */
    if (n->pfn_lo > n->pfn_hi)
        mark_bad(st, n);
    if (st->pred && st->pred->pfn_hi >= n->pfn_lo)
        mark_bad(st, n);
    if (n->gap != gap_below(st->dom, n, st->pred))
        mark_bad(st, n);
    st->pred = n;
    st->n_nodes++;
    switch (n->state) {
    case IOVA_RANGE_LIVE:
        st->n_live++;
        st->live_granules += node_size(n);
        break;
    case IOVA_RANGE_CACHED:
        st->n_cached++;
        break;
    case IOVA_RANGE_RESERVED:
        st->n_reserved++;
        break;
    default:
        if (n != &st->dom->anchor)
            mark_bad(st, n);
    }
    int32_t hr = check_subtree(st, n->right, n);
    int32_t h = 1 + (hl > hr ? hl : hr);
    if (n->height != h || hl - hr > 1 || hr - hl > 1)
        mark_bad(st, n);
    if (n->max_gap != max3(n->gap, max_gap(n->left), max_gap(n->right)))
        mark_bad(st, n);
    return h;
}

int iova_check(const struct iova_domain *dom)
{
    struct check_state st = {.dom = dom};
    check_subtree(&st, dom->root, NULL);
    if (st.bad)
        return sl_fail(EIO, SL_REASON_IOVA_INCONSISTENT, 0, st.bad_pfn);
    if (st.pred != &dom->anchor)
        return sl_fail(EIO, SL_REASON_IOVA_INCONSISTENT, 0, st.pred ? st.pred->pfn_lo : 0);
    /* A counter that disagrees with the tree: no pfn or order to name. */
    if (st.n_live != dom->n_live || st.live_granules != dom->live_granules ||
        st.n_cached != dom->n_cached || st.n_reserved != dom->n_reserved)
        return sl_fail(EIO, SL_REASON_IOVA_INCONSISTENT, 0, 0);
    /* Adjacent or overlapping reserved ranges would have been merged. */
    const struct iova_node *prev = NULL;
    for (const struct iova_node *n = first_ending_at_or_after(dom, 0); n; n = next_node(n)) {
        if (prev && prev->state == IOVA_RANGE_RESERVED && n->state == IOVA_RANGE_RESERVED &&
            prev->pfn_hi + 1 == n->pfn_lo)
            return sl_fail(EIO, SL_REASON_IOVA_INCONSISTENT, 0, n->pfn_lo);
        prev = n;
    }
    uint64_t in_magazines = 0;
    for (unsigned order = 0; order < IOVA_RANGE_CACHE_MAX_ORDER; order++) {
        const struct iova_rcache *rc = &dom->rcache[order];
        const struct iova_magazine *mags[2] = {rc->loaded, rc->prev};
        uint32_t depot_len = 0;
        for (int k = 0; k < 2; k++) {
            for (uint32_t i = 0; i < mags[k]->size; i++) {
                const struct iova_node *n = mags[k]->node[i];
                if (n->state != IOVA_RANGE_CACHED || node_size(n) != (UINT64_C(1) << order) ||
                    find_containing(dom, n->pfn_lo) != n)
                    return sl_fail(EIO, SL_REASON_IOVA_INCONSISTENT, 0, n->pfn_lo);
            }
            in_magazines += mags[k]->size;
        }
        for (const struct iova_magazine *mag = rc->depot; mag; mag = mag->next) {
            if (mag->size != IOVA_MAG_SIZE)
                return sl_fail(EIO, SL_REASON_IOVA_INCONSISTENT, 0, order);
            for (uint32_t i = 0; i < mag->size; i++) {
                const struct iova_node *n = mag->node[i];
                if (n->state != IOVA_RANGE_CACHED || node_size(n) != (UINT64_C(1) << order) ||
                    find_containing(dom, n->pfn_lo) != n)
                    return sl_fail(EIO, SL_REASON_IOVA_INCONSISTENT, 0, n->pfn_lo);
            }
            in_magazines += mag->size;
            depot_len++;
        }
        if (depot_len != rc->depot_len || depot_len > dom->depot_max)
            return sl_fail(EIO, SL_REASON_IOVA_INCONSISTENT, 0, order);
    }
    if (in_magazines != dom->n_cached)
        return sl_fail(EIO, SL_REASON_IOVA_INCONSISTENT, 0, 0);
    return 0;
}
