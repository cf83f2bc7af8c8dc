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
    VU_CHAIN_WORDS: int
    VU_STATE_WORDS: int
    VU_MAX_QUEUE_SIZE: int
    VU_MAX_INDIRECT: int
    VU_MAX_CHAIN_SEGMENTS: int
    VU_RING_INDIRECT: int
    VU_RING_AVAIL_EVENT: int
    VU_RING_IN_ORDER: int
    VU_RING_EVENT_IDX: int
    VU_RING_PEEK: int
    VU_S_NEXT_AVAIL: int
    VU_S_AVAIL_WRAP: int
    VU_S_NEXT_USED: int
    VU_S_USED_WRAP: int
    VU_S_COUNT: int
    VU_S_SEGS: int
    VU_S_FAULT: int
    VU_S_DETAIL: int
    VU_S_WHERE: int
    VU_S_AVAIL_IDX: int
    VU_S_DRIVER: int
    VU_S_MORE: int
    VU_STOP_EMPTY: int
    VU_STOP_LIMIT: int
    VU_STOP_FULL: int
    VU_STOP_FAULT: int
    VU_STOP_BROKEN: int
    VU_STOP_RING: int
    VU_STOP_ARGS: int
    VU_FAULT_NONE: int
    VU_FAULT_HEAD_RANGE: int
    VU_FAULT_NEXT_RANGE: int
    VU_FAULT_LOOP: int
    VU_FAULT_INDIRECT_NOT_NEGOTIATED: int
    VU_FAULT_INDIRECT_WITH_NEXT: int
    VU_FAULT_INDIRECT_NESTED: int
    VU_FAULT_INDIRECT_LEN: int
    VU_FAULT_INDIRECT_UNMAPPED: int
    VU_FAULT_BUFFER_UNMAPPED: int
    VU_FAULT_TOTAL_OVERFLOW: int
    VU_FAULT_WRITABLE_ORDER: int
    VU_FAULT_TOO_MANY_SEGMENTS: int
    VU_FAULT_ID_RANGE: int
    VU_FAULT_IN_FLIGHT: int
    VU_FAULT_NOT_IN_FLIGHT: int
    VU_FAULT_USED_LEN: int
    VU_CHAIN_IOV: int
    def vu_fence_acquire(self, /) -> None: ...
    def vu_fence_release(self, /) -> None: ...
    def vu_fence_seq_cst(self, /) -> None: ...
    def vu_load_u8_acquire(self, base: FFI.CData, off: int, /) -> int: ...
    def vu_load_u16_acquire(self, base: FFI.CData, off: int, /) -> int: ...
    def vu_fence_load_u16(self, base: FFI.CData, off: int, /) -> int: ...
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
    def vu_split_pop(
        self,
        regions: FFI.CData,
        nregions: int,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        qsize: int,
        flags: int,
        inflight: FFI.CData,
        chains: FFI.CData,
        max_chains: int,
        segs: FFI.CData,
        max_segs: int,
        state: FFI.CData,
        /,
    ) -> int: ...
    def vu_split_push(
        self,
        regions: FFI.CData,
        nregions: int,
        used_gpa: int,
        qsize: int,
        flags: int,
        inflight: FFI.CData,
        entries: FFI.CData,
        count: int,
        state: FFI.CData,
        /,
    ) -> int: ...
    def vu_packed_pop(
        self,
        regions: FFI.CData,
        nregions: int,
        desc_gpa: int,
        qsize: int,
        flags: int,
        inflight: FFI.CData,
        chains: FFI.CData,
        max_chains: int,
        segs: FFI.CData,
        max_segs: int,
        state: FFI.CData,
        /,
    ) -> int: ...
    def vu_packed_push(
        self,
        regions: FFI.CData,
        nregions: int,
        desc_gpa: int,
        qsize: int,
        flags: int,
        inflight: FFI.CData,
        entries: FFI.CData,
        count: int,
        state: FFI.CData,
        /,
    ) -> int: ...
    def vu_ring_pop(self, r: FFI.CData, flags: int, max_chains: int, /) -> int: ...
    def vu_ring_push(
        self, r: FFI.CData, flags: int, entries: FFI.CData, count: int, /
    ) -> int: ...
    def vu_ring_push1(
        self, r: FFI.CData, flags: int, ident: int, length: int, /
    ) -> int: ...
    def vu_ring_complete(
        self, r: FFI.CData, flags: int, entries: FFI.CData, count: int, /
    ) -> int: ...
    def vu_ring_complete1(
        self, r: FFI.CData, flags: int, ident: int, length: int, /
    ) -> int: ...
    def vu_ring_complete_records(
        self,
        r: FFI.CData,
        flags: int,
        records: FFI.CData,
        count: int,
        length: int,
        lengths: FFI.CData,
        /,
    ) -> int: ...
    def vu_chains_fill(
        self,
        regions: FFI.CData,
        nregions: int,
        segs: FFI.CData,
        nsegs: int,
        records: FFI.CData,
        count: int,
        prefix: FFI.CData | bytes,
        prefix_len: int,
        blob: FFI.CData | bytes,
        blob_len: int,
        lengths: FFI.CData,
        used: FFI.CData,
        /,
    ) -> int: ...
    def vu_chains_forward(
        self,
        regions: FFI.CData,
        nregions: int,
        src_segs: FFI.CData,
        src_nsegs: int,
        src_records: FFI.CData,
        dst_segs: FFI.CData,
        dst_nsegs: int,
        dst_records: FFI.CData,
        count: int,
        skip: int,
        prefix: FFI.CData | bytes,
        prefix_len: int,
        used: FFI.CData,
        /,
    ) -> int: ...
    def vu_log_chains(
        self,
        log: FFI.CData,
        pages: int,
        regions: FFI.CData,
        nregions: int,
        segs: FFI.CData,
        nsegs: int,
        records: FFI.CData,
        count: int,
        used: FFI.CData,
        /,
    ) -> int: ...
    def vu_records_sum(
        self, records: FFI.CData, count: int, field: int, skip: int, /
    ) -> int: ...
    def vu_chain_copy(
        self,
        regions: FFI.CData,
        nregions: int,
        segs: FFI.CData,
        nsegs: int,
        first: int,
        count: int,
        skip: int,
        buf: FFI.CData,
        length: int,
        to_chain: int,
        /,
    ) -> int: ...
    def vu_chain_write(
        self,
        regions: FFI.CData,
        nregions: int,
        segs: FFI.CData,
        nsegs: int,
        first: int,
        count: int,
        skip: int,
        src: FFI.CData | bytes,
        length: int,
        /,
    ) -> int: ...
    def vu_chain_file_io(
        self,
        fd: int,
        to_chain: int,
        regions: FFI.CData,
        nregions: int,
        segs: FFI.CData,
        nsegs: int,
        first: int,
        count: int,
        skip: int,
        length: int,
        offset: int,
        /,
    ) -> int: ...

ffi: FFI
lib: _Lib
