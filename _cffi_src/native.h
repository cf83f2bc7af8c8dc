/* vubackend native helper: the cffi cdef (declarations only).
 *
 * Rules:
 *  - This file is parsed by cffi's pycparser, not by a C compiler: no
 *    #include, no macros, no attributes, no definitions.
 *  - Every symbol starts with vu_ (or VU_ for constants).
 *  - Pointers are a base plus a size_t byte offset, so Python never calls
 *    ffi.cast on the hot path. The caller (vubackend/_native/__init__.py)
 *    checks every offset, length and alignment before calling.
 *  - When a declaration changes, bump VU_NATIVE_ABI here, in native.c and in
 *    the facade, and update stubs/vubackend/_native/_atomics.pyi.
 */

static const int VU_NATIVE_ABI;

void vu_fence_acquire(void);
void vu_fence_release(void);
void vu_fence_seq_cst(void);

uint8_t vu_load_u8_acquire(const uint8_t *base, size_t off);
uint16_t vu_load_u16_acquire(const uint8_t *base, size_t off);
uint16_t vu_fence_load_u16(const uint8_t *base, size_t off);
void vu_store_u16_release(uint8_t *base, size_t off, uint16_t v);
uint32_t vu_load_u32_acquire(const uint8_t *base, size_t off);
void vu_store_u32_release(uint8_t *base, size_t off, uint32_t v);

uint8_t vu_or_u8(uint8_t *base, size_t off, uint8_t mask);

void vu_copy(uint8_t *dst, size_t dst_off, const uint8_t *src, size_t src_off,
             size_t n);

/* ---------------------------------------------------------------- ring walks
 *
 * Batch operations on virtqueues (ABI 2). The rules of the hot loops are in
 * native.c ("Ring walks"); in short: every guest-controlled number (index,
 * address, length, flag) is checked here, in C, against the region table and
 * the queue size, with overflow-safe arithmetic; each descriptor is read once
 * into a local. The facade checks what Python hands in (table, buffers,
 * capacities, queue size) before the call.
 */

typedef struct {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
} vu_region;

/* Sizes and limits (the facade checks them against its own at import). */
static const int VU_CHAIN_WORDS;
static const int VU_STATE_WORDS;
static const int VU_MAX_QUEUE_SIZE;
static const int VU_MAX_INDIRECT;
static const int VU_MAX_CHAIN_SEGMENTS;

/* Ring flags (the `flags` argument). */
static const int VU_RING_INDIRECT;
static const int VU_RING_AVAIL_EVENT;
static const int VU_RING_IN_ORDER;
static const int VU_RING_EVENT_IDX;
static const int VU_RING_PEEK;

/* Words of the state array (uint64_t state[VU_STATE_WORDS]). */
static const int VU_S_NEXT_AVAIL;
static const int VU_S_AVAIL_WRAP;
static const int VU_S_NEXT_USED;
static const int VU_S_USED_WRAP;
static const int VU_S_COUNT;
static const int VU_S_SEGS;
static const int VU_S_FAULT;
static const int VU_S_DETAIL;
static const int VU_S_WHERE;
static const int VU_S_AVAIL_IDX;
static const int VU_S_DRIVER;
static const int VU_S_MORE;

/* Why a walk stopped (the return value of the pop functions; push functions
 * return VU_STOP_EMPTY on success). */
static const int VU_STOP_EMPTY;
static const int VU_STOP_LIMIT;
static const int VU_STOP_FULL;
static const int VU_STOP_FAULT;
static const int VU_STOP_BROKEN;
static const int VU_STOP_RING;
static const int VU_STOP_ARGS;

/* What was wrong with a chain or a used entry (state[VU_S_FAULT]). */
static const int VU_FAULT_NONE;
static const int VU_FAULT_HEAD_RANGE;
static const int VU_FAULT_NEXT_RANGE;
static const int VU_FAULT_LOOP;
static const int VU_FAULT_INDIRECT_NOT_NEGOTIATED;
static const int VU_FAULT_INDIRECT_WITH_NEXT;
static const int VU_FAULT_INDIRECT_NESTED;
static const int VU_FAULT_INDIRECT_LEN;
static const int VU_FAULT_INDIRECT_UNMAPPED;
static const int VU_FAULT_BUFFER_UNMAPPED;
static const int VU_FAULT_TOTAL_OVERFLOW;
static const int VU_FAULT_WRITABLE_ORDER;
static const int VU_FAULT_TOO_MANY_SEGMENTS;
static const int VU_FAULT_ID_RANGE;
static const int VU_FAULT_IN_FLIGHT;
static const int VU_FAULT_NOT_IN_FLIGHT;
static const int VU_FAULT_USED_LEN;

int vu_split_pop(const vu_region *regions, uint32_t nregions,
                 uint64_t desc_gpa, uint64_t avail_gpa, uint64_t used_gpa,
                 uint32_t qsize, uint32_t flags, uint64_t *inflight,
                 uint32_t *chains, uint32_t max_chains,
                 uint64_t *segs, uint32_t max_segs, uint64_t *state);
int vu_split_push(const vu_region *regions, uint32_t nregions,
                  uint64_t used_gpa, uint32_t qsize, uint32_t flags,
                  uint64_t *inflight, const uint32_t *entries, uint32_t count,
                  uint64_t *state);
int vu_packed_pop(const vu_region *regions, uint32_t nregions,
                  uint64_t desc_gpa, uint32_t qsize, uint32_t flags,
                  uint64_t *inflight, uint32_t *chains, uint32_t max_chains,
                  uint64_t *segs, uint32_t max_segs, uint64_t *state);
int vu_packed_push(const vu_region *regions, uint32_t nregions,
                   uint64_t desc_gpa, uint32_t qsize, uint32_t flags,
                   uint64_t *inflight, const uint32_t *entries, uint32_t count,
                   uint64_t *state);

/* ---------------------------------------------------------------- bound rings
 *
 * The same walks with their arguments kept in a struct (ABI 3), filled by
 * the facade when the ring is bound to a memory table; with VU_RING_PEEK a
 * pop also copies the start of each chain's readable part into peek. While
 * track is set (ABI 5: a split queue's region of the inflight buffer, with
 * track_num descriptor states), pops and pushes record what they do there
 * (native.c, "bound rings").
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

int vu_ring_pop(vu_ring *r, uint32_t flags, uint32_t max_chains);
int vu_ring_push(vu_ring *r, uint32_t flags, const uint32_t *entries, uint32_t count);
int vu_ring_push1(vu_ring *r, uint32_t flags, uint32_t ident, uint32_t length);
int vu_ring_complete(vu_ring *r, uint32_t flags, const uint32_t *entries,
                     uint32_t count);
int vu_ring_complete1(vu_ring *r, uint32_t flags, uint32_t ident,
                      uint32_t length);
int vu_ring_complete_records(vu_ring *r, uint32_t flags, const uint32_t *records,
                             uint32_t count, uint32_t length,
                             const uint32_t *lengths);
uint64_t vu_records_sum(const uint32_t *records, uint32_t count, uint32_t field,
                        uint32_t skip);

/* ---------------------------------------------------------------- chain data
 *
 * A popped chain's bytes, moved in one call per request (ABI 3): to or from
 * a flat buffer, or to or from a file with preadv/pwritev. Segments are the
 * walks' output (2 words each); they are re-checked against the table.
 * They return the bytes moved, or a negative errno (-ERANGE: the segment
 * range is outside the array; -EFAULT: a segment outside its region).
 * vu_chains_fill and vu_chains_forward fill many chains of a pop (one frame
 * each, after a prefix) and return how many they filled.
 */

static const int VU_CHAIN_IOV;

int64_t vu_chain_copy(const vu_region *regions, uint32_t nregions,
                      const uint64_t *segs, uint32_t nsegs, uint32_t first,
                      uint32_t count, uint64_t skip, uint8_t *buf, uint64_t length,
                      int to_chain);
int64_t vu_chain_write(const vu_region *regions, uint32_t nregions,
                       const uint64_t *segs, uint32_t nsegs, uint32_t first,
                       uint32_t count, uint64_t skip, const uint8_t *src,
                       uint64_t length);
int64_t vu_chains_fill(const vu_region *regions, uint32_t nregions,
                       const uint64_t *segs, uint32_t nsegs, const uint32_t *records,
                       uint32_t count, const uint8_t *prefix, uint32_t prefix_len,
                       const uint8_t *blob, uint64_t blob_len, const uint32_t *lengths,
                       uint32_t *used);
int64_t vu_chains_forward(const vu_region *regions, uint32_t nregions,
                          const uint64_t *src_segs, uint32_t src_nsegs,
                          const uint32_t *src_records, const uint64_t *dst_segs,
                          uint32_t dst_nsegs, const uint32_t *dst_records,
                          uint32_t count, uint32_t skip, const uint8_t *prefix,
                          uint32_t prefix_len, uint32_t *used);
/* The dirty log of a batch (ABI 4): the bytes each chain of a pop got,
 * marked in one call (see native.c). */
int64_t vu_log_chains(uint8_t *log, uint64_t pages, const vu_region *regions,
                      uint32_t nregions, const uint64_t *segs, uint32_t nsegs,
                      const uint32_t *records, uint32_t count, const uint32_t *used);
int64_t vu_chain_file_io(int fd, int to_chain, const vu_region *regions,
                         uint32_t nregions, const uint64_t *segs, uint32_t nsegs,
                         uint32_t first, uint32_t count, uint64_t skip,
                         uint64_t length, int64_t offset);
