/* vubackend native helper: the C source, compiled by cffi in API mode into
 * vubackend._native._atomics.
 *
 * Rules:
 *  - Flat and tiny: what cannot be expressed with Python's ordering (none),
 *    Python's atomicity (none beyond the GIL) or without holding the GIL.
 *  - Every function takes a base pointer plus a byte offset. Nothing here
 *    checks bounds or alignment: the Python facade does, before each call.
 *    u16/u32 accesses need base + off naturally aligned, or they are not
 *    single-copy atomic.
 *  - cffi's API mode releases the GIL around every call into this file, so a
 *    copy that blocks (a userfaultfd page fault in postcopy) does not stop
 *    other Python threads.
 *  - Guest memory is shared with another process. Accesses go through
 *    may_alias types so that reading a byte buffer as u16/u32 breaks no
 *    aliasing rule, and through __atomic builtins so the compiler neither
 *    tears nor reorders them beyond what the stated order allows.
 */

#include <errno.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

/* Bump with any change of native.h; the facade checks it at import. */
static const int VU_NATIVE_ABI = 5;

typedef uint16_t __attribute__((may_alias)) vu_u16_alias;
typedef uint32_t __attribute__((may_alias)) vu_u32_alias;
typedef uint64_t __attribute__((may_alias)) vu_u64_alias;

/* ---------------------------------------------------------------- fences */

void vu_fence_acquire(void) { atomic_thread_fence(memory_order_acquire); }

void vu_fence_release(void) { atomic_thread_fence(memory_order_release); }

void vu_fence_seq_cst(void) { atomic_thread_fence(memory_order_seq_cst); }

/* ---------------------------------------------------------------- loads and stores */

uint8_t vu_load_u8_acquire(const uint8_t *base, size_t off)
{
    return __atomic_load_n(base + off, __ATOMIC_ACQUIRE);
}

uint16_t vu_load_u16_acquire(const uint8_t *base, size_t off)
{
    const vu_u16_alias *p = (const vu_u16_alias *)(const void *)(base + off);
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

/* A full fence, then an acquire load: the "store ours, then read theirs"
 * handshakes (§5.4 rules 5 and 6) in one call. */
uint16_t vu_fence_load_u16(const uint8_t *base, size_t off)
{
    atomic_thread_fence(memory_order_seq_cst);
    const vu_u16_alias *p = (const vu_u16_alias *)(const void *)(base + off);
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

void vu_store_u16_release(uint8_t *base, size_t off, uint16_t v)
{
    vu_u16_alias *p = (vu_u16_alias *)(void *)(base + off);
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

uint32_t vu_load_u32_acquire(const uint8_t *base, size_t off)
{
    const vu_u32_alias *p = (const vu_u32_alias *)(const void *)(base + off);
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

void vu_store_u32_release(uint8_t *base, size_t off, uint32_t v)
{
    vu_u32_alias *p = (vu_u32_alias *)(void *)(base + off);
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

/* ---------------------------------------------------------------- read-modify-write */

/* Atomic fetch-or, sequentially consistent (the dirty log is shared with the
 * frontend, which clears bits concurrently). Returns the byte before. */
uint8_t vu_or_u8(uint8_t *base, size_t off, uint8_t mask)
{
    return __atomic_fetch_or(base + off, mask, __ATOMIC_SEQ_CST);
}

/* ---------------------------------------------------------------- copy */

/* A plain copy, run without the GIL. memmove, not memcpy, so that a caller
 * copying within one buffer gets a defined result for overlapping ranges. */
void vu_copy(uint8_t *dst, size_t dst_off, const uint8_t *src, size_t src_off,
             size_t n)
{
    memmove(dst + dst_off, src + src_off, n);
}

/* ================================================================ ring walks
 *
 * Batch operations on virtqueues: pop many descriptor chains, push many used
 * elements, in one call each, so that the data path pays Python's price per
 * batch and not per descriptor. The Python twin of every function lives in
 * vubackend/vring (_walk.py, _split.py, _packed.py); the tests run both on
 * the same rings and compare the results, fault for fault.
 *
 * Rules (the guest is hostile, docs/design.md; vhost-user-protocol.md §7.4):
 *  - Everything that comes from guest memory is checked here, in C: head and
 *    next indices against the table size, chain lengths against the hop
 *    limit (queue size, or entries of an indirect table), indirect tables
 *    (length a multiple of 16, not empty, at most VU_MAX_INDIRECT entries,
 *    never nested, never with NEXT), every buffer address and length against
 *    the region table, the u32 total of a chain, the readable-before-writable
 *    order, the segment cap. No arithmetic on guest numbers can overflow:
 *    ranges are tested as `len - 1 > UINT64_MAX - addr` and `off < size`,
 *    sizes are computed in uint64_t from a queue size of at most 32768.
 *  - Each descriptor is read exactly once into a local (vu_read16) before
 *    anything in it is checked or used; the guest may rewrite it at any time
 *    (CVE-2020-14375). A packed head's flags come from the one acquire load
 *    that found it available; its other fields from that single read.
 *  - The ring parts themselves (descriptor table, available and used rings)
 *    are looked up in the region table on every call; a part outside guest
 *    memory, or not naturally aligned in host memory, stops the call with
 *    VU_STOP_RING before anything is read or written.
 *  - Writes go only to the used ring (split), the used descriptors (packed),
 *    avail_event, the caller's output arrays, the in-flight table and the
 *    state array; never into a chain's buffers.
 *  - A faulty chain is not consumed: the call returns the good chains before
 *    it and VU_STOP_FAULT with the fault, its detail and where it was (split
 *    head index, packed ring slot). The Python layer decides what happens to
 *    the queue.
 *  - The facade (vubackend/_native/__init__.py) checks the caller's side:
 *    the region table is sorted, non-overlapping and below 2^64, every
 *    output array and the in-flight table are large enough for the counts
 *    passed, the queue size is in 1..32768 (a power of two for split rings),
 *    the positions in the state array are in range.
 *
 * Memory ordering (vhost-user-protocol.md §5.4; the essays are in
 * vubackend/vring/_split.py and _packed.py): split pops load avail.idx with
 * acquire (rule 1); packed pops load each head's flags with acquire (rule 2);
 * pushes write the used elements, then publish with a release store of
 * used.idx (split) or a release fence and the head's flags last (packed,
 * rule 4); re-arming avail_event is followed by a seq_cst fence and a re-read
 * of avail.idx (rule 6).
 */

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "virtio rings are little-endian; this helper reads them natively"
#endif

typedef struct {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
} vu_region;

#define VU_DESC_F_NEXT 1u
#define VU_DESC_F_WRITE 2u
#define VU_DESC_F_INDIRECT 4u
#define VU_DESC_F_AVAIL (1u << 7)
#define VU_DESC_F_USED (1u << 15)

static const int VU_CHAIN_WORDS = 8;
static const int VU_STATE_WORDS = 16;
static const int VU_MAX_QUEUE_SIZE = 32768;
static const int VU_MAX_INDIRECT = 32768;
static const int VU_MAX_CHAIN_SEGMENTS = 4096;

static const int VU_RING_INDIRECT = 1;
static const int VU_RING_AVAIL_EVENT = 2;
static const int VU_RING_IN_ORDER = 4;
static const int VU_RING_EVENT_IDX = 8;
static const int VU_RING_PEEK = 16;

static const int VU_S_NEXT_AVAIL = 0;
static const int VU_S_AVAIL_WRAP = 1;
static const int VU_S_NEXT_USED = 2;
static const int VU_S_USED_WRAP = 3;
static const int VU_S_COUNT = 4;
static const int VU_S_SEGS = 5;
static const int VU_S_FAULT = 6;
static const int VU_S_DETAIL = 7;
static const int VU_S_WHERE = 8;
static const int VU_S_AVAIL_IDX = 9;
static const int VU_S_DRIVER = 10;
static const int VU_S_MORE = 11;

static const int VU_STOP_EMPTY = 0;
static const int VU_STOP_LIMIT = 1;
static const int VU_STOP_FULL = 2;
static const int VU_STOP_FAULT = 3;
static const int VU_STOP_BROKEN = 4;
static const int VU_STOP_RING = 5;
static const int VU_STOP_ARGS = 6;

static const int VU_FAULT_NONE = 0;
static const int VU_FAULT_HEAD_RANGE = 1;
static const int VU_FAULT_NEXT_RANGE = 2;
static const int VU_FAULT_LOOP = 3;
static const int VU_FAULT_INDIRECT_NOT_NEGOTIATED = 4;
static const int VU_FAULT_INDIRECT_WITH_NEXT = 5;
static const int VU_FAULT_INDIRECT_NESTED = 6;
static const int VU_FAULT_INDIRECT_LEN = 7;
static const int VU_FAULT_INDIRECT_UNMAPPED = 8;
static const int VU_FAULT_BUFFER_UNMAPPED = 9;
static const int VU_FAULT_TOTAL_OVERFLOW = 10;
static const int VU_FAULT_WRITABLE_ORDER = 11;
static const int VU_FAULT_TOO_MANY_SEGMENTS = 12;
static const int VU_FAULT_ID_RANGE = 13;
static const int VU_FAULT_IN_FLIGHT = 14;
static const int VU_FAULT_NOT_IN_FLIGHT = 15;
static const int VU_FAULT_USED_LEN = 16;

/* In-flight table: one uint64_t per id; FREE, or the chain's writable length
 * (bits 0-31) and ring slots (bits 32-47). CLAIMED marks an entry taken by
 * the push being validated. */
#define VU_FREE UINT64_MAX
#define VU_CLAIMED (1ull << 62)

/* Segment words: offset in region, then len | region << 32 | WRITE. */
#define VU_SEG_WRITE (1ull << 63)

enum { VU_W_OK = 0, VU_W_FAULT = 1, VU_W_FULL = 2 };

typedef struct {
    const vu_region *regions;
    uint32_t nregions;
    uint64_t *segs;      /* output, 2 words per segment */
    uint32_t nsegs;      /* used in this batch */
    uint32_t max_segs;
    /* per chain */
    uint32_t first_seg;
    uint32_t nread_segs;
    uint32_t ndesc;      /* buffer descriptors walked */
    uint64_t total;      /* bytes, checked against UINT32_MAX */
    uint64_t rlen;
    uint64_t wlen;
    int seen_write;
    /* outcome */
    int fault;
    uint64_t detail;
} vu_walk;

static inline uint16_t vu_ld16_relaxed(const uint8_t *p)
{
    return __atomic_load_n((const vu_u16_alias *)(const void *)p, __ATOMIC_RELAXED);
}

static inline uint16_t vu_ld16_acquire(const uint8_t *p)
{
    return __atomic_load_n((const vu_u16_alias *)(const void *)p, __ATOMIC_ACQUIRE);
}

static inline void vu_st16_relaxed(uint8_t *p, uint16_t v)
{
    __atomic_store_n((vu_u16_alias *)(void *)p, v, __ATOMIC_RELAXED);
}

static inline void vu_st16_release(uint8_t *p, uint16_t v)
{
    __atomic_store_n((vu_u16_alias *)(void *)p, v, __ATOMIC_RELEASE);
}

static inline void vu_st32_relaxed(uint8_t *p, uint32_t v)
{
    __atomic_store_n((vu_u32_alias *)(void *)p, v, __ATOMIC_RELAXED);
}

/* Index of the region holding gpa, or -1 (binary search; regions sorted). */
static int64_t vu_find(const vu_region *r, uint32_t n, uint64_t gpa)
{
    uint32_t lo = 0, hi = n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (r[mid].gpa <= gpa)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return -1;
    lo -= 1;
    /* r[lo].gpa <= gpa, so the subtraction cannot wrap. */
    if (gpa - r[lo].gpa < r[lo].size)
        return (int64_t)lo;
    return -1;
}

/* Host address of [gpa, gpa + len) if it lies inside one region, else NULL.
 * len may be 0 (then gpa itself must be mapped). */
static uint8_t *vu_host(const vu_region *r, uint32_t n, uint64_t gpa, uint64_t len)
{
    int64_t i = vu_find(r, n, gpa);
    if (i < 0)
        return NULL;
    uint64_t off = gpa - r[i].gpa;
    if (len > r[i].size - off)
        return NULL;
    return r[i].host + off;
}

/* Whether every byte of [gpa, gpa + len) is mapped, across adjacent regions;
 * len > 0. */
static int vu_mapped(const vu_region *r, uint32_t n, uint64_t gpa, uint64_t len)
{
    if (len - 1 > UINT64_MAX - gpa)
        return 0;
    uint64_t done = 0;
    while (done < len) {
        uint64_t here = gpa + done;
        int64_t i = vu_find(r, n, here);
        if (i < 0)
            return 0;
        uint64_t room = r[i].size - (here - r[i].gpa);
        done += (room < len - done) ? room : len - done;
    }
    return 1;
}

/* Read one 16-byte descriptor into out, once. Aligned: two relaxed 64-bit
 * atomic loads; unaligned: volatile bytes (never torn into re-reads). */
static void vu_read16(uint8_t out[16], const uint8_t *p)
{
    if (((uintptr_t)p & 7u) == 0) {
        uint64_t a = __atomic_load_n((const vu_u64_alias *)(const void *)p,
                                     __ATOMIC_RELAXED);
        uint64_t b = __atomic_load_n((const vu_u64_alias *)(const void *)(p + 8),
                                     __ATOMIC_RELAXED);
        memcpy(out, &a, 8);
        memcpy(out + 8, &b, 8);
    } else {
        const volatile uint8_t *s = p;
        for (int i = 0; i < 16; i++)
            out[i] = s[i];
    }
}

/* Read 16 bytes at gpa that may straddle regions (an indirect table that
 * spans regions); returns 0 if some byte is unmapped. */
static int vu_gather16(const vu_region *r, uint32_t n, uint64_t gpa, uint8_t out[16])
{
    const uint8_t *p = vu_host(r, n, gpa, 16);
    if (p != NULL) {
        vu_read16(out, p);
        return 1;
    }
    for (uint32_t k = 0; k < 16; k++) {
        if (gpa > UINT64_MAX - k)
            return 0;
        const volatile uint8_t *b = vu_host(r, n, gpa + k, 1);
        if (b == NULL)
            return 0;
        out[k] = *b;
    }
    return 1;
}

typedef struct {
    uint64_t addr;
    uint32_t len;
    uint16_t a;  /* split: flags; packed: id */
    uint16_t b;  /* split: next;  packed: flags */
} vu_desc;

static inline vu_desc vu_decode(const uint8_t raw[16])
{
    vu_desc d;
    memcpy(&d.addr, raw, 8);
    memcpy(&d.len, raw + 8, 4);
    memcpy(&d.a, raw + 12, 2);
    memcpy(&d.b, raw + 14, 2);
    return d;
}

static int vu_fault(vu_walk *w, int fault, uint64_t detail)
{
    w->fault = fault;
    w->detail = detail;
    return VU_W_FAULT;
}

static void vu_chain_begin(vu_walk *w)
{
    w->first_seg = w->nsegs;
    w->nread_segs = 0;
    w->ndesc = 0;
    w->total = 0;
    w->rlen = 0;
    w->wlen = 0;
    w->seen_write = 0;
    w->fault = 0;
    w->detail = 0;
}

/* One buffer descriptor: order, total, then translation into segments. */
static int vu_add_buffer(vu_walk *w, uint64_t addr, uint32_t len, int write)
{
    if (write)
        w->seen_write = 1;
    else if (w->seen_write)
        return vu_fault(w, VU_FAULT_WRITABLE_ORDER, addr);
    w->total += len;
    if (w->total > UINT32_MAX)
        return vu_fault(w, VU_FAULT_TOTAL_OVERFLOW, w->total);
    w->ndesc++;
    if (write)
        w->wlen += len;
    else
        w->rlen += len;
    if (len == 0)
        return VU_W_OK;
    if ((uint64_t)len - 1 > UINT64_MAX - addr)
        return vu_fault(w, VU_FAULT_BUFFER_UNMAPPED, addr);
    uint64_t done = 0;
    while (done < len) {
        uint64_t here = addr + done;
        int64_t i = vu_find(w->regions, w->nregions, here);
        if (i < 0)
            return vu_fault(w, VU_FAULT_BUFFER_UNMAPPED, addr);
        uint64_t off = here - w->regions[i].gpa;
        uint64_t room = w->regions[i].size - off;
        uint64_t piece = (room < len - done) ? room : len - done;
        if (w->nsegs - w->first_seg >= (uint32_t)VU_MAX_CHAIN_SEGMENTS)
            return vu_fault(w, VU_FAULT_TOO_MANY_SEGMENTS,
                            (uint64_t)VU_MAX_CHAIN_SEGMENTS);
        if (w->nsegs >= w->max_segs)
            return VU_W_FULL;
        w->segs[2 * (size_t)w->nsegs] = off;
        w->segs[2 * (size_t)w->nsegs + 1] =
            piece | ((uint64_t)i << 32) | (write ? VU_SEG_WRITE : 0);
        w->nsegs++;
        if (!write)
            w->nread_segs++;
        done += piece;
    }
    return VU_W_OK;
}

/* Checks shared by both layouts on a descriptor with INDIRECT set. */
static int vu_check_indirect(vu_walk *w, const vu_desc *d, uint16_t dflags,
                             uint32_t flags, int nested)
{
    if (nested)
        return vu_fault(w, VU_FAULT_INDIRECT_NESTED, 0);
    if (!(flags & (uint32_t)VU_RING_INDIRECT))
        return vu_fault(w, VU_FAULT_INDIRECT_NOT_NEGOTIATED, 0);
    if (dflags & VU_DESC_F_NEXT)
        return vu_fault(w, VU_FAULT_INDIRECT_WITH_NEXT, 0);
    if (d->len == 0 || d->len % 16 != 0 || d->len / 16 > (uint32_t)VU_MAX_INDIRECT)
        return vu_fault(w, VU_FAULT_INDIRECT_LEN, d->len);
    if (!vu_mapped(w->regions, w->nregions, d->addr, d->len))
        return vu_fault(w, VU_FAULT_INDIRECT_UNMAPPED, d->addr);
    return VU_W_OK;
}

/* Walk the split chain at head. desc: host address of the table (qsize
 * entries, inside one region). */
static int vu_split_walk(vu_walk *w, const uint8_t *desc, uint32_t qsize,
                         uint32_t head, uint32_t flags, const uint64_t *inflight)
{
    if (head >= qsize)
        return vu_fault(w, VU_FAULT_HEAD_RANGE, head);
    if (inflight[head] != VU_FREE)
        return vu_fault(w, VU_FAULT_IN_FLIGHT, head);
    uint32_t idx = head, tsize = qsize, limit = qsize, count = 0;
    int in_table = 0;
    uint64_t table_gpa = 0;
    const uint8_t *table = NULL; /* indirect table, NULL if it spans regions */
    for (;;) {
        if (++count > limit)
            return vu_fault(w, VU_FAULT_LOOP, limit);
        uint8_t raw[16];
        if (!in_table)
            vu_read16(raw, desc + 16 * (size_t)idx);
        else if (table != NULL)
            vu_read16(raw, table + 16 * (size_t)idx);
        else if (!vu_gather16(w->regions, w->nregions, table_gpa + 16 * (uint64_t)idx, raw))
            return vu_fault(w, VU_FAULT_INDIRECT_UNMAPPED, table_gpa);
        vu_desc d = vu_decode(raw);
        uint16_t dflags = d.a, next = d.b;
        if (dflags & VU_DESC_F_INDIRECT) {
            int rc = vu_check_indirect(w, &d, dflags, flags, in_table);
            if (rc != VU_W_OK)
                return rc;
            in_table = 1;
            table_gpa = d.addr;
            table = vu_host(w->regions, w->nregions, d.addr, d.len);
            tsize = limit = d.len / 16;
            count = 0;
            idx = 0;
            continue;
        }
        int rc = vu_add_buffer(w, d.addr, d.len, (dflags & VU_DESC_F_WRITE) != 0);
        if (rc != VU_W_OK)
            return rc;
        if (!(dflags & VU_DESC_F_NEXT))
            return VU_W_OK;
        if (next >= tsize)
            return vu_fault(w, VU_FAULT_NEXT_RANGE, next);
        idx = next;
    }
}

static void vu_record(const vu_walk *w, uint32_t *rec, uint32_t id, uint32_t slots)
{
    rec[0] = id;
    rec[1] = slots;
    rec[2] = w->first_seg;
    rec[3] = w->nsegs - w->first_seg;
    rec[4] = w->nread_segs;
    rec[5] = (uint32_t)w->rlen;
    rec[6] = (uint32_t)w->wlen;
    rec[7] = w->ndesc;
}

static int vu_ring_fault(uint64_t *state, uint64_t gpa)
{
    state[VU_S_DETAIL] = gpa;
    return VU_STOP_RING;
}

int vu_split_pop(const vu_region *regions, uint32_t nregions,
                 uint64_t desc_gpa, uint64_t avail_gpa, uint64_t used_gpa,
                 uint32_t qsize, uint32_t flags, uint64_t *inflight,
                 uint32_t *chains, uint32_t max_chains,
                 uint64_t *segs, uint32_t max_segs, uint64_t *state)
{
    const int avail_event = (flags & (uint32_t)VU_RING_AVAIL_EVENT) != 0;
    state[VU_S_COUNT] = 0;
    state[VU_S_SEGS] = 0;
    state[VU_S_FAULT] = 0;
    if (qsize == 0 || qsize > (uint32_t)VU_MAX_QUEUE_SIZE)
        return vu_ring_fault(state, desc_gpa);
    const uint8_t *desc = vu_host(regions, nregions, desc_gpa, 16 * (uint64_t)qsize);
    if (desc == NULL)
        return vu_ring_fault(state, desc_gpa);
    const uint8_t *avail = vu_host(regions, nregions, avail_gpa, 4 + 2 * (uint64_t)qsize);
    if (avail == NULL || ((uintptr_t)avail & 1u))
        return vu_ring_fault(state, avail_gpa);
    uint8_t *used = vu_host(regions, nregions, used_gpa,
                            4 + 8 * (uint64_t)qsize + (avail_event ? 2 : 0));
    if (used == NULL || ((uintptr_t)used & 3u))
        return vu_ring_fault(state, used_gpa);
    uint8_t *event = used + 4 + 8 * (size_t)qsize;

    vu_walk w = {.regions = regions, .nregions = nregions, .segs = segs,
                 .max_segs = max_segs};
    uint16_t next = (uint16_t)state[VU_S_NEXT_AVAIL];
    uint32_t n = 0;
    int stop;
    /* §5.4 rule 1: acquire, then read the ring and the descriptors. */
    uint16_t idx = vu_ld16_acquire(avail + 2);
    for (;;) {
        if ((uint16_t)(idx - next) > qsize) {
            stop = VU_STOP_BROKEN;
            state[VU_S_DETAIL] = idx;
            break;
        }
        if (next == idx) {
            if (avail_event) {
                /* §5.4 rule 6: re-arm, full fence, re-check, so that a
                 * buffer added meanwhile is either seen now or kicked. */
                vu_st16_release(event, next);
                atomic_thread_fence(memory_order_seq_cst);
                idx = vu_ld16_acquire(avail + 2);
                if (idx != next)
                    continue;
            }
            stop = VU_STOP_EMPTY;
            break;
        }
        if (n >= max_chains) {
            stop = VU_STOP_LIMIT;
            break;
        }
        uint16_t head = vu_ld16_relaxed(avail + 4 + 2 * (size_t)(next % qsize));
        vu_chain_begin(&w);
        int rc = vu_split_walk(&w, desc, qsize, head, flags, inflight);
        if (rc == VU_W_FULL) {
            w.nsegs = w.first_seg;
            stop = VU_STOP_FULL;
            break;
        }
        if (rc == VU_W_FAULT) {
            w.nsegs = w.first_seg;
            state[VU_S_FAULT] = (uint64_t)w.fault;
            state[VU_S_DETAIL] = w.detail;
            state[VU_S_WHERE] = head;
            stop = VU_STOP_FAULT;
            break;
        }
        inflight[head] = w.wlen;
        vu_record(&w, chains + (size_t)n * (size_t)VU_CHAIN_WORDS, head, 1);
        n++;
        next++;
    }
    if (avail_event && stop != VU_STOP_BROKEN)
        vu_st16_release(event, next);
    state[VU_S_NEXT_AVAIL] = next;
    state[VU_S_AVAIL_IDX] = idx;
    state[VU_S_COUNT] = n;
    state[VU_S_SEGS] = w.nsegs;
    return stop;
}

/* Validate a batch of used entries (id, len) against the in-flight table and
 * claim them; on a fault, undo the claims and report the entry. */
static int vu_claim(uint32_t qsize, uint64_t *inflight, const uint32_t *entries,
                    uint32_t count, uint64_t *state)
{
    for (uint32_t k = 0; k < count; k++) {
        uint32_t id = entries[2 * (size_t)k], len = entries[2 * (size_t)k + 1];
        int fault = 0;
        uint64_t v = 0;
        if (id >= qsize) {
            fault = VU_FAULT_ID_RANGE;
        } else {
            v = inflight[id];
            if (v == VU_FREE || (v & VU_CLAIMED))
                fault = VU_FAULT_NOT_IN_FLIGHT;
            else if (len > (uint32_t)v)
                fault = VU_FAULT_USED_LEN;
        }
        if (fault) {
            for (uint32_t j = 0; j < k; j++)
                inflight[entries[2 * (size_t)j]] &= ~VU_CLAIMED;
            state[VU_S_FAULT] = (uint64_t)fault;
            state[VU_S_DETAIL] = id;
            state[VU_S_WHERE] = k;
            return 0;
        }
        inflight[id] = v | VU_CLAIMED;
    }
    return 1;
}

int vu_split_push(const vu_region *regions, uint32_t nregions,
                  uint64_t used_gpa, uint32_t qsize, uint32_t flags,
                  uint64_t *inflight, const uint32_t *entries, uint32_t count,
                  uint64_t *state)
{
    (void)flags;
    state[VU_S_COUNT] = 0;
    state[VU_S_FAULT] = 0;
    if (qsize == 0 || qsize > (uint32_t)VU_MAX_QUEUE_SIZE)
        return vu_ring_fault(state, used_gpa);
    uint8_t *used = vu_host(regions, nregions, used_gpa, 4 + 8 * (uint64_t)qsize);
    if (used == NULL || ((uintptr_t)used & 3u))
        return vu_ring_fault(state, used_gpa);
    if (!vu_claim(qsize, inflight, entries, count, state))
        return VU_STOP_FAULT;
    uint16_t pos = (uint16_t)state[VU_S_NEXT_USED];
    for (uint32_t k = 0; k < count; k++) {
        uint32_t id = entries[2 * (size_t)k], len = entries[2 * (size_t)k + 1];
        uint8_t *elem = used + 4 + 8 * (size_t)(pos % qsize);
        vu_st32_relaxed(elem, id);
        vu_st32_relaxed(elem + 4, len);
        inflight[id] = VU_FREE;
        pos++;
    }
    /* §5.4 rule 4: the elements (and the data before them) are visible to
     * whoever sees the new used.idx. */
    vu_st16_release(used + 2, pos);
    state[VU_S_NEXT_USED] = pos;
    state[VU_S_COUNT] = count;
    return VU_STOP_EMPTY;
}

/* Walk the packed chain whose head sits at slot with flags hflags (already
 * found available). ring: host address of the descriptor ring. */
static int vu_packed_walk(vu_walk *w, const uint8_t *ring, uint32_t qsize,
                          uint32_t slot, uint16_t hflags, uint32_t flags,
                          uint32_t *id_out, uint32_t *slots_out)
{
    uint32_t count = 0;
    for (;;) {
        if (++count > qsize)
            return vu_fault(w, VU_FAULT_LOOP, qsize);
        uint8_t raw[16];
        vu_read16(raw, ring + 16 * (size_t)slot);
        vu_desc d = vu_decode(raw);
        uint16_t id = d.a, dflags = (count == 1) ? hflags : d.b;
        if (dflags & VU_DESC_F_INDIRECT) {
            int rc = vu_check_indirect(w, &d, dflags, flags, 0);
            if (rc != VU_W_OK)
                return rc;
            uint32_t entries = d.len / 16;
            const uint8_t *table = vu_host(w->regions, w->nregions, d.addr, d.len);
            for (uint32_t j = 0; j < entries; j++) {
                uint8_t eraw[16];
                if (table != NULL)
                    vu_read16(eraw, table + 16 * (size_t)j);
                else if (!vu_gather16(w->regions, w->nregions, d.addr + 16 * (uint64_t)j, eraw))
                    return vu_fault(w, VU_FAULT_INDIRECT_UNMAPPED, d.addr);
                vu_desc e = vu_decode(eraw);
                if (e.b & VU_DESC_F_INDIRECT)
                    return vu_fault(w, VU_FAULT_INDIRECT_NESTED, 0);
                rc = vu_add_buffer(w, e.addr, e.len, (e.b & VU_DESC_F_WRITE) != 0);
                if (rc != VU_W_OK)
                    return rc;
            }
            *id_out = id;
            *slots_out = count;
            return VU_W_OK;
        }
        int rc = vu_add_buffer(w, d.addr, d.len, (dflags & VU_DESC_F_WRITE) != 0);
        if (rc != VU_W_OK)
            return rc;
        if (!(dflags & VU_DESC_F_NEXT)) {
            *id_out = id;
            *slots_out = count;
            return VU_W_OK;
        }
        slot = (slot + 1 == qsize) ? 0 : slot + 1;
    }
}

int vu_packed_pop(const vu_region *regions, uint32_t nregions,
                  uint64_t desc_gpa, uint32_t qsize, uint32_t flags,
                  uint64_t *inflight, uint32_t *chains, uint32_t max_chains,
                  uint64_t *segs, uint32_t max_segs, uint64_t *state)
{
    state[VU_S_COUNT] = 0;
    state[VU_S_SEGS] = 0;
    state[VU_S_FAULT] = 0;
    if (qsize == 0 || qsize > (uint32_t)VU_MAX_QUEUE_SIZE)
        return vu_ring_fault(state, desc_gpa);
    const uint8_t *ring = vu_host(regions, nregions, desc_gpa, 16 * (uint64_t)qsize);
    if (ring == NULL || ((uintptr_t)ring & 3u))
        return vu_ring_fault(state, desc_gpa);
    uint32_t slot = (uint32_t)state[VU_S_NEXT_AVAIL];
    uint32_t wrap = (uint32_t)state[VU_S_AVAIL_WRAP] & 1u;
    if (slot >= qsize)
        return vu_ring_fault(state, desc_gpa);

    vu_walk w = {.regions = regions, .nregions = nregions, .segs = segs,
                 .max_segs = max_segs};
    uint32_t n = 0;
    int stop;
    for (;;) {
        if (n >= max_chains) {
            stop = VU_STOP_LIMIT;
            break;
        }
        /* §5.4 rule 2: the head's flags with acquire, then its fields. */
        uint16_t hflags = vu_ld16_acquire(ring + 16 * (size_t)slot + 14);
        uint32_t avail = (hflags & VU_DESC_F_AVAIL) != 0;
        uint32_t used = (hflags & VU_DESC_F_USED) != 0;
        if (avail != wrap || used == wrap) {
            stop = VU_STOP_EMPTY;
            break;
        }
        uint32_t id = 0, slots = 0;
        vu_chain_begin(&w);
        int rc = vu_packed_walk(&w, ring, qsize, slot, hflags, flags, &id, &slots);
        if (rc == VU_W_OK && id >= qsize)
            rc = vu_fault(&w, VU_FAULT_ID_RANGE, id);
        if (rc == VU_W_OK && inflight[id] != VU_FREE)
            rc = vu_fault(&w, VU_FAULT_IN_FLIGHT, id);
        if (rc == VU_W_FULL) {
            w.nsegs = w.first_seg;
            stop = VU_STOP_FULL;
            break;
        }
        if (rc == VU_W_FAULT) {
            w.nsegs = w.first_seg;
            state[VU_S_FAULT] = (uint64_t)w.fault;
            state[VU_S_DETAIL] = w.detail;
            state[VU_S_WHERE] = slot;
            stop = VU_STOP_FAULT;
            break;
        }
        inflight[id] = w.wlen | ((uint64_t)slots << 32);
        vu_record(&w, chains + (size_t)n * (size_t)VU_CHAIN_WORDS, id, slots);
        n++;
        slot += slots;
        if (slot >= qsize) {
            slot -= qsize;
            wrap ^= 1u;
        }
    }
    state[VU_S_NEXT_AVAIL] = slot;
    state[VU_S_AVAIL_WRAP] = wrap;
    state[VU_S_COUNT] = n;
    state[VU_S_SEGS] = w.nsegs;
    return stop;
}

/* End of the in-order run that starts at entry k: with IN_ORDER, entries
 * whose len is 0 are folded into the next one (one used descriptor for the
 * run, carrying the last id and len, loses nothing). */
static uint32_t vu_run_end(const uint32_t *entries, uint32_t count, uint32_t k,
                           uint32_t flags)
{
    if (!(flags & (uint32_t)VU_RING_IN_ORDER))
        return k;
    while (k + 1 < count && entries[2 * (size_t)k + 1] == 0)
        k++;
    return k;
}

int vu_packed_push(const vu_region *regions, uint32_t nregions,
                   uint64_t desc_gpa, uint32_t qsize, uint32_t flags,
                   uint64_t *inflight, const uint32_t *entries, uint32_t count,
                   uint64_t *state)
{
    state[VU_S_COUNT] = 0;
    state[VU_S_FAULT] = 0;
    if (qsize == 0 || qsize > (uint32_t)VU_MAX_QUEUE_SIZE)
        return vu_ring_fault(state, desc_gpa);
    uint8_t *ring = vu_host(regions, nregions, desc_gpa, 16 * (uint64_t)qsize);
    if (ring == NULL || ((uintptr_t)ring & 3u))
        return vu_ring_fault(state, desc_gpa);
    uint32_t start = (uint32_t)state[VU_S_NEXT_USED];
    uint32_t start_wrap = (uint32_t)state[VU_S_USED_WRAP] & 1u;
    if (start >= qsize)
        return vu_ring_fault(state, desc_gpa);
    if (!vu_claim(qsize, inflight, entries, count, state))
        return VU_STOP_FAULT;
    if (count == 0) {
        state[VU_S_COUNT] = 0;
        return VU_STOP_EMPTY;
    }

    /* Pass 1: id and len of every used descriptor. */
    uint32_t pos = start, wrap = start_wrap, written = 0;
    for (uint32_t k = 0; k < count;) {
        uint32_t last = vu_run_end(entries, count, k, flags);
        uint8_t *d = ring + 16 * (size_t)pos;
        vu_st32_relaxed(d + 8, entries[2 * (size_t)last + 1]);
        vu_st16_relaxed(d + 12, (uint16_t)entries[2 * (size_t)last]);
        for (; k <= last; k++) {
            pos += (uint32_t)((inflight[entries[2 * (size_t)k]] >> 32) & 0xFFFFu);
            if (pos >= qsize) {
                pos -= qsize;
                wrap ^= 1u;
            }
        }
        written++;
    }
    /* §5.4 rule 4: ids and lens before any flags. */
    atomic_thread_fence(memory_order_release);
    /* Pass 2: flags, the first descriptor's last. */
    uint16_t first_flags = 0;
    pos = start;
    wrap = start_wrap;
    for (uint32_t k = 0, m = 0; k < count; m++) {
        uint32_t last = vu_run_end(entries, count, k, flags);
        uint16_t f = wrap ? (uint16_t)(VU_DESC_F_AVAIL | VU_DESC_F_USED) : 0;
        if (entries[2 * (size_t)last + 1] != 0)
            f = (uint16_t)(f | VU_DESC_F_WRITE);
        if (m == 0)
            first_flags = f;
        else
            vu_st16_relaxed(ring + 16 * (size_t)pos + 14, f);
        for (; k <= last; k++) {
            uint32_t id = entries[2 * (size_t)k];
            pos += (uint32_t)((inflight[id] >> 32) & 0xFFFFu);
            inflight[id] = VU_FREE;
            if (pos >= qsize) {
                pos -= qsize;
                wrap ^= 1u;
            }
        }
    }
    vu_st16_release(ring + 16 * (size_t)start + 14, first_flags);
    state[VU_S_NEXT_USED] = pos;
    state[VU_S_USED_WRAP] = wrap;
    state[VU_S_COUNT] = written;
    return VU_STOP_EMPTY;
}


/* ================================================================ bound rings
 *
 * One queue's walk arguments kept in a struct (vu_ring) that the facade fills
 * when the ring is (re)bound to a memory table, so that the data path passes
 * two or three numbers per call instead of thirteen. vu_ring_pop and
 * vu_ring_push call the walks above with the struct's fields; nothing else
 * differs. The facade checks the fields when it sets them (as it checks the
 * arguments of the unbound calls).
 *
 * Peeking: with VU_RING_PEEK, vu_ring_pop also copies the first peek_len
 * bytes of each popped chain's readable part (fewer if it is shorter) into
 * peek[chain * peek_len ...], so that a device reads its request header
 * without another call. The segments it reads were checked by the walk that
 * produced them, against the same table.
 *
 * Tracking (split rings, INFLIGHT_SHMFD; vhost-user-protocol.md §4.9): while
 * track holds a queue's region of the inflight buffer (its 16-byte header,
 * then track_num 16-byte descriptor states), every pop records
 * each popped head (inflight 1, the next counter), and a push links its
 * batch through last_batch_head before used.idx is published, then clears
 * the heads and records used_idx. Heads at or past track_num are not
 * recorded. The region is only ever read back after a reconnect, so plain
 * stores do; a push that fails leaves a link that used_idx says to ignore.
 */

typedef struct {
    const vu_region *regions;
    uint64_t desc_gpa;
    uint64_t avail_gpa;
    uint64_t used_gpa;
    uint64_t *inflight;
    uint32_t *chains;
    uint64_t *segs;
    uint64_t *state;
    uint8_t *peek;
    uint32_t *scratch;
    uint32_t nregions;
    uint32_t qsize;
    uint32_t max_chains;
    uint32_t max_segs;
    uint32_t peek_len;
    uint32_t packed;
    uint8_t *track;
    uint64_t track_counter;
    uint32_t track_num;
} vu_ring;

/* Inflight region offsets: header last_batch_head and used_idx; per
 * descriptor state, the inflight flag, next and counter. */
#define VU_TRACK_LAST_BATCH 12
#define VU_TRACK_USED_IDX 14
#define VU_TRACK_DESC 16
#define VU_TRACK_NEXT 6
#define VU_TRACK_COUNTER 8

static void vu_track_begin(vu_ring *r, uint32_t n)
{
    for (uint32_t c = 0; c < n; c++) {
        uint32_t head = r->chains[(size_t)c * (size_t)VU_CHAIN_WORDS];
        if (head >= r->track_num)
            continue;
        uint8_t *d = r->track + VU_TRACK_DESC + 16 * (size_t)head;
        uint64_t counter = r->track_counter++;
        memset(d, 0, VU_TRACK_COUNTER);
        d[0] = 1;
        memcpy(d + VU_TRACK_COUNTER, &counter, sizeof counter);
    }
}

static void vu_track_link(vu_ring *r, const uint32_t *entries, uint32_t count)
{
    uint16_t last;
    memcpy(&last, r->track + VU_TRACK_LAST_BATCH, sizeof last);
    for (uint32_t k = 0; k < count; k++) {
        uint32_t head = entries[2 * (size_t)k];
        if (head >= r->track_num)
            continue;
        memcpy(r->track + VU_TRACK_DESC + 16 * (size_t)head + VU_TRACK_NEXT, &last,
               sizeof last);
        last = (uint16_t)head;
    }
    memcpy(r->track + VU_TRACK_LAST_BATCH, &last, sizeof last);
}

static void vu_track_clear(vu_ring *r, const uint32_t *entries, uint32_t count,
                           uint16_t used_idx)
{
    for (uint32_t k = 0; k < count; k++) {
        uint32_t head = entries[2 * (size_t)k];
        if (head < r->track_num)
            r->track[VU_TRACK_DESC + 16 * (size_t)head] = 0;
    }
    memcpy(r->track + VU_TRACK_USED_IDX, &used_idx, sizeof used_idx);
}

static void vu_peek(const vu_ring *r, uint32_t n)
{
    for (uint32_t c = 0; c < n; c++) {
        const uint32_t *rec = r->chains + (size_t)c * (size_t)VU_CHAIN_WORDS;
        uint8_t *out = r->peek + (size_t)c * r->peek_len;
        uint64_t done = 0;
        for (uint32_t k = rec[2]; k < rec[2] + rec[4] && done < r->peek_len; k++) {
            uint64_t meta = r->segs[2 * (size_t)k + 1];
            uint64_t len = meta & 0xFFFFFFFFu;
            if (len > r->peek_len - done)
                len = r->peek_len - done;
            memcpy(out + done,
                   r->regions[(meta >> 32) & 0x7FFFFFFFu].host + r->segs[2 * (size_t)k],
                   (size_t)len);
            done += len;
        }
    }
}

/* The bound calls check their own arguments (the facade passes them
 * unchecked): a position out of range, unknown flags or an unbound ring is
 * VU_STOP_ARGS, before anything is read or written. */
static int vu_ring_bad_position(const vu_ring *r, uint64_t pos, uint64_t wrap)
{
    if (r->packed)
        return pos >= r->qsize || wrap > 1;
    return pos > 0xFFFFu;
}

int vu_ring_pop(vu_ring *r, uint32_t flags, uint32_t max_chains)
{
    if (r->regions == NULL || max_chains == 0 ||
        (flags & ~(uint32_t)(VU_RING_INDIRECT | VU_RING_AVAIL_EVENT | VU_RING_IN_ORDER |
                             VU_RING_PEEK)) ||
        vu_ring_bad_position(r, r->state[VU_S_NEXT_AVAIL], r->state[VU_S_AVAIL_WRAP]))
        return VU_STOP_ARGS;
    if (max_chains > r->max_chains)
        max_chains = r->max_chains;
    int stop;
    if (r->packed)
        stop = vu_packed_pop(r->regions, r->nregions, r->desc_gpa, r->qsize, flags,
                             r->inflight, r->chains, max_chains, r->segs,
                             r->max_segs, r->state);
    else
        stop = vu_split_pop(r->regions, r->nregions, r->desc_gpa, r->avail_gpa,
                            r->used_gpa, r->qsize, flags, r->inflight, r->chains,
                            max_chains, r->segs, r->max_segs, r->state);
    if ((flags & (uint32_t)VU_RING_PEEK) && r->peek_len)
        vu_peek(r, (uint32_t)r->state[VU_S_COUNT]);
    if (r->track != NULL && !r->packed)
        vu_track_begin(r, (uint32_t)r->state[VU_S_COUNT]);
    return stop;
}

int vu_ring_push(vu_ring *r, uint32_t flags, const uint32_t *entries, uint32_t count)
{
    if (r->regions == NULL || (flags & ~(uint32_t)VU_RING_IN_ORDER) ||
        vu_ring_bad_position(r, r->state[VU_S_NEXT_USED], r->state[VU_S_USED_WRAP]))
        return VU_STOP_ARGS;
    if (r->packed)
        return vu_packed_push(r->regions, r->nregions, r->desc_gpa, r->qsize, flags,
                              r->inflight, entries, count, r->state);
    const int track = r->track != NULL;
    if (track)
        vu_track_link(r, entries, count);
    int stop = vu_split_push(r->regions, r->nregions, r->used_gpa, r->qsize, flags,
                             r->inflight, entries, count, r->state);
    if (track && stop == VU_STOP_EMPTY)
        vu_track_clear(r, entries, count, (uint16_t)r->state[VU_S_NEXT_USED]);
    return stop;
}

int vu_ring_push1(vu_ring *r, uint32_t flags, uint32_t ident, uint32_t length)
{
    const uint32_t entry[2] = {ident, length};
    return vu_ring_push(r, flags, entry, 1);
}

/* Complete a batch: push the entries (one publication), then one seq_cst
 * fence, then read what the driver asked for and whether it has made more
 * available:
 *  - state[VU_S_DRIVER]: split: avail.flags | used_event << 16 (used_event
 *    only with VU_RING_EVENT_IDX); packed: the driver event suppression
 *    area, off_wrap | flags << 16.
 *  - state[VU_S_MORE]: 1 if a chain is available at the next position.
 * The fence serves both store-then-load handshakes (§5.4 rules 5 and 6):
 * our used.idx (or used flags) before the driver's suppression word, and
 * the avail_event the last pop left (or the device flags, packed) before
 * avail.idx (the next head's flags). The caller decides from the word
 * whether to signal (the same code as needs_notification), so both the
 * native and the Python ring take one decision path. */
int vu_ring_complete(vu_ring *r, uint32_t flags, const uint32_t *entries,
                     uint32_t count)
{
    r->state[VU_S_DRIVER] = 0;
    r->state[VU_S_MORE] = 0;
    int stop = vu_ring_push(r, flags & ~(uint32_t)VU_RING_EVENT_IDX, entries, count);
    if (stop != VU_STOP_EMPTY)
        return stop;
    if (r->packed) {
        const uint8_t *ring = vu_host(r->regions, r->nregions, r->desc_gpa,
                                      16 * (uint64_t)r->qsize);
        const uint8_t *drv = vu_host(r->regions, r->nregions, r->avail_gpa, 4);
        if (ring == NULL || drv == NULL || ((uintptr_t)drv & 3u))
            return vu_ring_fault(r->state, r->avail_gpa);
        uint64_t slot = r->state[VU_S_NEXT_AVAIL];
        uint32_t wrap = (uint32_t)r->state[VU_S_AVAIL_WRAP] & 1u;
        if (slot >= r->qsize)
            return VU_STOP_ARGS;
        atomic_thread_fence(memory_order_seq_cst);
        uint32_t word = __atomic_load_n((const vu_u32_alias *)(const void *)drv,
                                        __ATOMIC_ACQUIRE);
        uint16_t hflags = vu_ld16_acquire(ring + 16 * (size_t)slot + 14);
        uint32_t avail = (hflags & VU_DESC_F_AVAIL) != 0;
        uint32_t used = (hflags & VU_DESC_F_USED) != 0;
        r->state[VU_S_DRIVER] = word;
        r->state[VU_S_MORE] = (avail == wrap && used != wrap);
        return VU_STOP_EMPTY;
    }
    const int event_idx = (flags & (uint32_t)VU_RING_EVENT_IDX) != 0;
    const uint8_t *avail = vu_host(r->regions, r->nregions, r->avail_gpa,
                                   4 + 2 * (uint64_t)r->qsize + (event_idx ? 2 : 0));
    if (avail == NULL || ((uintptr_t)avail & 1u))
        return vu_ring_fault(r->state, r->avail_gpa);
    atomic_thread_fence(memory_order_seq_cst);
    uint64_t word = vu_ld16_acquire(avail);
    if (event_idx)
        word |= (uint64_t)vu_ld16_acquire(avail + 4 + 2 * (size_t)r->qsize) << 16;
    uint16_t idx = vu_ld16_acquire(avail + 2);
    r->state[VU_S_DRIVER] = word;
    r->state[VU_S_MORE] = idx != (uint16_t)r->state[VU_S_NEXT_AVAIL];
    return VU_STOP_EMPTY;
}

/* ================================================================ chain data
 *
 * Moving a chain's bytes: between its buffers and a flat buffer
 * (vu_chain_copy), or between its buffers and a file (vu_chain_file_io, one
 * preadv/pwritev per up to VU_CHAIN_IOV segments). The device's Python code
 * makes one call per request, whatever the number of descriptors, and the
 * bytes move without the GIL (postcopy memory may block on a page fault).
 *
 * Rules:
 *  - The segments are what a walk produced (native or its Python twin)
 *    against the same region table: 2 words each, the offset in the region,
 *    then len | region << 32 | WRITE << 63; nsegs is the array's length.
 *    The range [first, first + count) is checked against it (-ERANGE) and
 *    every segment again against its region (-EFAULT), before anything
 *    moves.
 *  - `first` and `count` select the chain's readable or writable segments;
 *    `skip` bytes of them are passed over first (the chain's read or write
 *    cursor); at most `len` bytes move. Running out of segments is not an
 *    error: the count of bytes moved says how far it got.
 *  - File I/O returns the bytes moved, or -errno when the first system call
 *    fails; a later failure returns what moved before it (POSIX style: the
 *    caller's next call sees the error). EINTR is retried. A read that hits
 *    the end of the file stops there.
 *  - Guest memory is shared: these are plain copies, with no ordering; the
 *    used-ring publication orders them for the driver (§5.4 rule 4).
 */

#define VU_CHAIN_IOV_MAX 64
static const int VU_CHAIN_IOV = VU_CHAIN_IOV_MAX;

/* 0 if segments [first, first + count) are all inside the array (nsegs)
 * and inside their regions; else -ERANGE (the range; no system call
 * returns it here) or -EFAULT. */
static int vu_check_segs(const vu_region *regions, uint32_t nregions,
                         const uint64_t *segs, uint32_t nsegs, uint32_t first,
                         uint32_t count)
{
    if ((uint64_t)first + count > nsegs)
        return -ERANGE;
    for (uint32_t k = first; k < first + count; k++) {
        uint64_t off = segs[2 * (size_t)k];
        uint64_t meta = segs[2 * (size_t)k + 1];
        uint64_t len = meta & 0xFFFFFFFFu;
        uint64_t r = (meta >> 32) & 0x7FFFFFFFu;
        if (r >= nregions || off > regions[r].size || len > regions[r].size - off)
            return -EFAULT;
    }
    return 0;
}

/* Position of byte `skip` of segments [first, first + count): *k and the
 * offset inside segment *k; *k == first + count when skip is past the end. */
static void vu_seek(const uint64_t *segs, uint32_t first, uint32_t count,
                    uint64_t skip, uint32_t *k, uint64_t *inner)
{
    uint32_t i = first;
    while (i < first + count) {
        uint64_t len = segs[2 * (size_t)i + 1] & 0xFFFFFFFFu;
        if (skip < len)
            break;
        skip -= len;
        i++;
    }
    *k = i;
    *inner = skip;
}

int64_t vu_chain_copy(const vu_region *regions, uint32_t nregions,
                      const uint64_t *segs, uint32_t nsegs, uint32_t first,
                      uint32_t count, uint64_t skip, uint8_t *buf, uint64_t length,
                      int to_chain);

/* vu_chain_copy into the chain from a read-only source (a Python bytes
 * object is passed as it is, without pinning a copy of it). */
int64_t vu_chain_write(const vu_region *regions, uint32_t nregions,
                       const uint64_t *segs, uint32_t nsegs, uint32_t first,
                       uint32_t count, uint64_t skip, const uint8_t *src,
                       uint64_t length)
{
    /* Only read through the pointer: to_chain copies from buf. */
    return vu_chain_copy(regions, nregions, segs, nsegs, first, count, skip,
                         (uint8_t *)(uintptr_t)src, length, 1);
}

int64_t vu_chain_copy(const vu_region *regions, uint32_t nregions,
                      const uint64_t *segs, uint32_t nsegs, uint32_t first,
                      uint32_t count, uint64_t skip, uint8_t *buf, uint64_t length,
                      int to_chain)
{
    int bad = vu_check_segs(regions, nregions, segs, nsegs, first, count);
    if (bad)
        return bad;
    uint32_t k;
    uint64_t inner;
    vu_seek(segs, first, count, skip, &k, &inner);
    uint64_t done = 0;
    for (; k < first + count && done < length; k++) {
        uint64_t off = segs[2 * (size_t)k];
        uint64_t meta = segs[2 * (size_t)k + 1];
        uint64_t n = (meta & 0xFFFFFFFFu) - inner;
        if (n > length - done)
            n = length - done;
        uint8_t *host = regions[(meta >> 32) & 0x7FFFFFFFu].host + off + inner;
        if (to_chain)
            memmove(host, buf + done, n);
        else
            memmove(buf + done, host, n);
        done += n;
        inner = 0;
    }
    return (int64_t)done;
}

/* The writable segments of chain record `rec`: [*first, *first + *count).
 * A record is only read here (and its range checked by the copy). */
static void vu_writable(const uint32_t *rec, uint32_t *first, uint32_t *count)
{
    *first = rec[2] + rec[4];
    *count = rec[4] <= rec[3] ? rec[3] - rec[4] : 0;
}

/* Fill chains [0, count) of a pop, chain k with prefix then frame k (bytes
 * [sum(lengths[:k]), + lengths[k]) of blob); used[k] gets the bytes written.
 * Stops at the first frame its chain cannot hold (nothing written into that
 * chain); returns the chains filled, or a negative errno (-ERANGE: the
 * frames overrun blob, or a segment range is outside segs; -EFAULT: a
 * segment outside its region or a record that lies about its length). */
int64_t vu_chains_fill(const vu_region *regions, uint32_t nregions,
                       const uint64_t *segs, uint32_t nsegs, const uint32_t *records,
                       uint32_t count, const uint8_t *prefix, uint32_t prefix_len,
                       const uint8_t *blob, uint64_t blob_len, const uint32_t *lengths,
                       uint32_t *used)
{
    uint64_t at = 0;
    for (uint32_t c = 0; c < count; c++) {
        const uint32_t *rec = records + (size_t)c * (size_t)VU_CHAIN_WORDS;
        uint64_t frame = lengths[c];
        if (frame > blob_len - at)
            return -ERANGE;
        uint64_t need = (uint64_t)prefix_len + frame;
        if (rec[6] < need)
            return c;
        uint32_t first, n;
        vu_writable(rec, &first, &n);
        int64_t a = vu_chain_write(regions, nregions, segs, nsegs, first, n, 0, prefix,
                                   prefix_len);
        if (a < 0)
            return a;
        int64_t b = vu_chain_write(regions, nregions, segs, nsegs, first, n, prefix_len,
                                   blob + at, frame);
        if (b < 0)
            return b;
        if ((uint64_t)a + (uint64_t)b != need)
            return -EFAULT;
        used[c] = (uint32_t)need;
        at += frame;
    }
    return count;
}

/* Copy `length` bytes from segments [sf, sf + sc) of src, from byte sskip,
 * into segments [df, df + dc) of dst, from byte dskip (both ranges
 * checked). Returns the bytes copied or a negative errno. */
static int64_t vu_segs_copy(const vu_region *regions, uint32_t nregions,
                            const uint64_t *src, uint32_t src_n, uint32_t sf,
                            uint32_t sc, uint64_t sskip, const uint64_t *dst,
                            uint32_t dst_n, uint32_t df, uint32_t dc, uint64_t dskip,
                            uint64_t length)
{
    int bad = vu_check_segs(regions, nregions, src, src_n, sf, sc);
    if (!bad)
        bad = vu_check_segs(regions, nregions, dst, dst_n, df, dc);
    if (bad)
        return bad;
    uint32_t i, j;
    uint64_t si, di;
    vu_seek(src, sf, sc, sskip, &i, &si);
    vu_seek(dst, df, dc, dskip, &j, &di);
    uint64_t done = 0;
    while (done < length && i < sf + sc && j < df + dc) {
        uint64_t smeta = src[2 * (size_t)i + 1], dmeta = dst[2 * (size_t)j + 1];
        uint64_t sl = (smeta & 0xFFFFFFFFu) - si, dl = (dmeta & 0xFFFFFFFFu) - di;
        uint64_t n = sl < dl ? sl : dl;
        if (n > length - done)
            n = length - done;
        memmove(regions[(dmeta >> 32) & 0x7FFFFFFFu].host + dst[2 * (size_t)j] + di,
                regions[(smeta >> 32) & 0x7FFFFFFFu].host + src[2 * (size_t)i] + si,
                (size_t)n);
        done += n;
        si += n;
        di += n;
        if (si == (smeta & 0xFFFFFFFFu)) {
            i++;
            si = 0;
        }
        if (di == (dmeta & 0xFFFFFFFFu)) {
            j++;
            di = 0;
        }
    }
    return (int64_t)done;
}

/* Chain k of dst gets prefix, then the readable bytes of chain k of src
 * after its first `skip` (a frame passed from one queue to another without
 * a copy through Python); used[k] gets the bytes written. Stops at the
 * first source chain with nothing after skip, or whose frame the
 * destination chain cannot hold (nothing written into it); returns the
 * chains filled, or a negative errno as vu_chains_fill. */
int64_t vu_chains_forward(const vu_region *regions, uint32_t nregions,
                          const uint64_t *src_segs, uint32_t src_nsegs,
                          const uint32_t *src_records, const uint64_t *dst_segs,
                          uint32_t dst_nsegs, const uint32_t *dst_records,
                          uint32_t count, uint32_t skip, const uint8_t *prefix,
                          uint32_t prefix_len, uint32_t *used)
{
    for (uint32_t c = 0; c < count; c++) {
        const uint32_t *s = src_records + (size_t)c * (size_t)VU_CHAIN_WORDS;
        const uint32_t *d = dst_records + (size_t)c * (size_t)VU_CHAIN_WORDS;
        if (s[5] <= skip)
            return c;
        uint64_t frame = (uint64_t)s[5] - skip;
        uint64_t need = (uint64_t)prefix_len + frame;
        if (d[6] < need)
            return c;
        uint32_t df, dn;
        vu_writable(d, &df, &dn);
        uint32_t sn = s[4] <= s[3] ? s[4] : s[3];
        int64_t a = vu_chain_write(regions, nregions, dst_segs, dst_nsegs, df, dn, 0,
                                   prefix, prefix_len);
        if (a < 0)
            return a;
        int64_t b = vu_segs_copy(regions, nregions, src_segs, src_nsegs, s[2], sn, skip,
                                 dst_segs, dst_nsegs, df, dn, prefix_len, frame);
        if (b < 0)
            return b;
        if ((uint64_t)a + (uint64_t)b != need)
            return -EFAULT;
        used[c] = (uint32_t)need;
    }
    return count;
}

/* Set the log bits of the 4 KiB pages [gpa, gpa + len) touches (len > 0),
 * one fetch-or per log byte; pages at or past `pages` are only counted.
 * Returns that count. */
static uint64_t vu_log_range(uint8_t *log, uint64_t pages, uint64_t gpa,
                             uint64_t len)
{
    uint64_t first = gpa >> 12;
    uint64_t last = (gpa + len - 1) >> 12;
    uint64_t dropped = 0;
    if (last >= pages) {
        dropped = last - (first > pages ? first : pages) + 1;
        if (first >= pages)
            return dropped;
        last = pages - 1;
    }
    for (uint64_t p = first; p <= last;) {
        uint64_t top = (p | 7u) < last ? (p | 7u) : last;
        uint8_t mask = (uint8_t)(((1u << (top - p + 1)) - 1u) << (p & 7u));
        /* seq_cst like vu_or_u8: the frontend clears bits concurrently. */
        __atomic_fetch_or(log + (p >> 3), mask, __ATOMIC_SEQ_CST);
        p = top + 1;
    }
    return dropped;
}

/* Mark in the dirty log (pages bits) the first used[c] bytes of the
 * writable part of chains [0, count) of a pop, after one release fence, so
 * that the frontend never sees a bit before the data (§4.7). Everything is
 * checked before the first bit is set. Returns the pages past the log (not
 * marked), or a negative errno (-ERANGE: a segment range outside segs;
 * -EFAULT: a segment outside its region, or used[c] beyond the chain). */
int64_t vu_log_chains(uint8_t *log, uint64_t pages, const vu_region *regions,
                      uint32_t nregions, const uint64_t *segs, uint32_t nsegs,
                      const uint32_t *records, uint32_t count, const uint32_t *used)
{
    for (uint32_t c = 0; c < count; c++) {
        uint32_t first, n;
        vu_writable(records + (size_t)c * (size_t)VU_CHAIN_WORDS, &first, &n);
        int bad = vu_check_segs(regions, nregions, segs, nsegs, first, n);
        if (bad)
            return bad;
        uint64_t room = 0;
        for (uint32_t k = first; k < first + n; k++)
            room += segs[2 * (size_t)k + 1] & 0xFFFFFFFFu;
        if (used[c] > room)
            return -EFAULT;
    }
    atomic_thread_fence(memory_order_release);
    uint64_t dropped = 0;
    for (uint32_t c = 0; c < count; c++) {
        uint32_t first, n;
        vu_writable(records + (size_t)c * (size_t)VU_CHAIN_WORDS, &first, &n);
        uint64_t left = used[c];
        for (uint32_t k = first; k < first + n && left; k++) {
            uint64_t meta = segs[2 * (size_t)k + 1];
            uint64_t len = meta & 0xFFFFFFFFu;
            if (len > left)
                len = left;
            if (len)
                dropped += vu_log_range(log, pages,
                                        regions[(meta >> 32) & 0x7FFFFFFFu].gpa +
                                            segs[2 * (size_t)k],
                                        len);
            left -= len;
        }
    }
    return (int64_t)dropped;
}

int64_t vu_chain_file_io(int fd, int to_chain, const vu_region *regions,
                         uint32_t nregions, const uint64_t *segs, uint32_t nsegs,
                         uint32_t first, uint32_t count, uint64_t skip,
                         uint64_t length, int64_t offset)
{
    int bad = vu_check_segs(regions, nregions, segs, nsegs, first, count);
    if (bad)
        return bad;
    uint32_t k;
    uint64_t inner;
    vu_seek(segs, first, count, skip, &k, &inner);
    uint64_t done = 0;
    while (k < first + count && done < length) {
        struct iovec iov[VU_CHAIN_IOV_MAX];
        int n = 0;
        uint64_t batch = 0;
        uint32_t j = k;
        uint64_t in = inner;
        for (; j < first + count && n < VU_CHAIN_IOV && done + batch < length; j++) {
            uint64_t off = segs[2 * (size_t)j];
            uint64_t meta = segs[2 * (size_t)j + 1];
            uint64_t piece = (meta & 0xFFFFFFFFu) - in;
            if (piece > length - done - batch)
                piece = length - done - batch;
            iov[n].iov_base = regions[(meta >> 32) & 0x7FFFFFFFu].host + off + in;
            iov[n].iov_len = (size_t)piece;
            n++;
            batch += piece;
            in = 0;
        }
        ssize_t got;
        do {
            if (to_chain)
                got = preadv(fd, iov, n, (off_t)(offset + (int64_t)done));
            else
                got = pwritev(fd, iov, n, (off_t)(offset + (int64_t)done));
        } while (got < 0 && errno == EINTR);
        if (got < 0)
            return done ? (int64_t)done : -(int64_t)errno;
        if (got == 0)
            break;
        done += (uint64_t)got;
        /* Move the position past what the call took (it may be short). */
        uint64_t moved = (uint64_t)got;
        while (k < first + count && moved) {
            uint64_t left = (segs[2 * (size_t)k + 1] & 0xFFFFFFFFu) - inner;
            if (moved < left) {
                inner += moved;
                moved = 0;
            } else {
                moved -= left;
                inner = 0;
                k++;
            }
        }
    }
    return (int64_t)done;
}

int vu_ring_complete1(vu_ring *r, uint32_t flags, uint32_t ident,
                      uint32_t length)
{
    const uint32_t entry[2] = {ident, length};
    return vu_ring_complete(r, flags, entry, 1);
}

/* vu_ring_complete of the first count chains of a pop's records (the ids at
 * word 0 of each VU_CHAIN_WORDS), every one with used length `length`, or
 * lengths[k] when lengths is not NULL: a batch is returned without a Python
 * object per chain. The (id, len) pairs are built in the ring's scratch
 * space (2 * max_chains words: one pop's worth). */
int vu_ring_complete_records(vu_ring *r, uint32_t flags, const uint32_t *records,
                             uint32_t count, uint32_t length,
                             const uint32_t *lengths)
{
    if (r->scratch == NULL || count > r->max_chains)
        return VU_STOP_ARGS;
    for (uint32_t k = 0; k < count; k++) {
        r->scratch[2 * (size_t)k] = records[(size_t)k * (size_t)VU_CHAIN_WORDS];
        r->scratch[2 * (size_t)k + 1] = lengths ? lengths[k] : length;
    }
    return vu_ring_complete(r, flags, r->scratch, count);
}

/* The sum over count chain records of word `field` (5: readable bytes, 6:
 * writable bytes), each less skip (a header; a chain shorter counts 0). */
uint64_t vu_records_sum(const uint32_t *records, uint32_t count, uint32_t field,
                        uint32_t skip)
{
    uint64_t total = 0;
    if (field >= (uint32_t)VU_CHAIN_WORDS)
        return 0;
    for (uint32_t k = 0; k < count; k++) {
        uint32_t v = records[(size_t)k * (size_t)VU_CHAIN_WORDS + field];
        if (v > skip)
            total += v - skip;
    }
    return total;
}
