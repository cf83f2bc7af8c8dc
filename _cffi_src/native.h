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
void vu_store_u16_release(uint8_t *base, size_t off, uint16_t v);
uint32_t vu_load_u32_acquire(const uint8_t *base, size_t off);
void vu_store_u32_release(uint8_t *base, size_t off, uint32_t v);

uint8_t vu_or_u8(uint8_t *base, size_t off, uint8_t mask);

void vu_copy(uint8_t *dst, size_t dst_off, const uint8_t *src, size_t src_off,
             size_t n);
