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

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Bump with any change of native.h; the facade checks it at import. */
static const int VU_NATIVE_ABI = 1;

typedef uint16_t __attribute__((may_alias)) vu_u16_alias;
typedef uint32_t __attribute__((may_alias)) vu_u32_alias;

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
