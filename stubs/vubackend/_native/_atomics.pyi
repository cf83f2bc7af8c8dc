# Stub of the compiled cffi module vubackend._native._atomics, written by hand.
#
# Rules:
# - One method of _Lib per C function in _cffi_src/native.h, same name, same
#   parameter order, positional-only; FFI.CData for pointers, int for integers.
# - tests/native/test_stub_matches_lib.py checks the names and the signatures
#   against the compiled lib; update this file in the same change as native.h.
# - Mirrors the real module: it exports exactly `ffi` and `lib`.

from cffi import FFI

class _Lib:
    VU_NATIVE_ABI: int
    def vu_fence_acquire(self, /) -> None: ...
    def vu_fence_release(self, /) -> None: ...
    def vu_fence_seq_cst(self, /) -> None: ...
    def vu_load_u8_acquire(self, base: FFI.CData, off: int, /) -> int: ...
    def vu_load_u16_acquire(self, base: FFI.CData, off: int, /) -> int: ...
    def vu_store_u16_release(self, base: FFI.CData, off: int, v: int, /) -> None: ...
    def vu_load_u32_acquire(self, base: FFI.CData, off: int, /) -> int: ...
    def vu_store_u32_release(self, base: FFI.CData, off: int, v: int, /) -> None: ...
    def vu_or_u8(self, base: FFI.CData, off: int, mask: int, /) -> int: ...
    def vu_copy(
        self,
        dst: FFI.CData,
        dst_off: int,
        src: FFI.CData,
        src_off: int,
        n: int,
        /,
    ) -> None: ...

ffi: FFI
lib: _Lib
