"""Every request id and feature bit against the reference tables
(docs/reference/vhost-user-protocol.md §2-§3, rust-vmm §2.2-§2.6), written
out here independently of the implementation."""

from __future__ import annotations

from vubackend.protocol import (
    BACKEND_REQUEST_SPEC,
    FRONTEND_REQUEST_SPEC,
    PROTOCOL_FEATURE_CONVENTIONS,
    BackendReq,
    FrontendReq,
    HeaderFlags,
    ProtocolFeatures,
    VirtioFeatures,
)

FRONTEND_IDS = {
    1: "GET_FEATURES", 2: "SET_FEATURES", 3: "SET_OWNER", 4: "RESET_OWNER",
    5: "SET_MEM_TABLE", 6: "SET_LOG_BASE", 7: "SET_LOG_FD", 8: "SET_VRING_NUM",
    9: "SET_VRING_ADDR", 10: "SET_VRING_BASE", 11: "GET_VRING_BASE",
    12: "SET_VRING_KICK", 13: "SET_VRING_CALL", 14: "SET_VRING_ERR",
    15: "GET_PROTOCOL_FEATURES", 16: "SET_PROTOCOL_FEATURES", 17: "GET_QUEUE_NUM",
    18: "SET_VRING_ENABLE", 19: "SEND_RARP", 20: "NET_SET_MTU",
    21: "SET_BACKEND_REQ_FD", 22: "IOTLB_MSG", 23: "SET_VRING_ENDIAN",
    24: "GET_CONFIG", 25: "SET_CONFIG", 26: "CREATE_CRYPTO_SESSION",
    27: "CLOSE_CRYPTO_SESSION", 28: "POSTCOPY_ADVISE", 29: "POSTCOPY_LISTEN",
    30: "POSTCOPY_END", 31: "GET_INFLIGHT_FD", 32: "SET_INFLIGHT_FD",
    33: "GPU_SET_SOCKET", 34: "RESET_DEVICE", 35: "VRING_KICK",
    36: "GET_MAX_MEM_SLOTS", 37: "ADD_MEM_REG", 38: "REM_MEM_REG",
    39: "SET_STATUS", 40: "GET_STATUS", 41: "GET_SHARED_OBJECT",
    42: "SET_DEVICE_STATE_FD", 43: "CHECK_DEVICE_STATE", 44: "GET_SHMEM_CONFIG",
}  # fmt: skip

BACKEND_IDS = {
    1: "IOTLB_MSG", 2: "CONFIG_CHANGE_MSG", 3: "VRING_HOST_NOTIFIER_MSG",
    4: "VRING_CALL", 5: "VRING_ERR", 6: "SHARED_OBJECT_ADD",
    7: "SHARED_OBJECT_REMOVE", 8: "SHARED_OBJECT_LOOKUP", 9: "SHMEM_MAP",
    10: "SHMEM_UNMAP",
}  # fmt: skip

PROTOCOL_BITS = {
    "MQ": 0, "LOG_SHMFD": 1, "RARP": 2, "REPLY_ACK": 3, "MTU": 4,
    "BACKEND_REQ": 5, "CROSS_ENDIAN": 6, "CRYPTO_SESSION": 7, "PAGEFAULT": 8,
    "CONFIG": 9, "BACKEND_SEND_FD": 10, "HOST_NOTIFIER": 11,
    "INFLIGHT_SHMFD": 12, "RESET_DEVICE": 13, "INBAND_NOTIFICATIONS": 14,
    "CONFIGURE_MEM_SLOTS": 15, "STATUS": 16, "XEN_MMAP": 17,
    "SHARED_OBJECT": 18, "DEVICE_STATE": 19,
}  # fmt: skip

VIRTIO_BITS = {
    "NOTIFY_ON_EMPTY": 24, "LOG_ALL": 26, "ANY_LAYOUT": 27, "INDIRECT_DESC": 28,
    "EVENT_IDX": 29, "PROTOCOL_FEATURES": 30, "VERSION_1": 32,
    "ACCESS_PLATFORM": 33, "RING_PACKED": 34, "IN_ORDER": 35,
    "ORDER_PLATFORM": 36, "NOTIFICATION_DATA": 38, "RING_RESET": 40,
}  # fmt: skip


def test_frontend_request_ids_match_the_reference() -> None:
    assert {r.value: r.name for r in FrontendReq} == FRONTEND_IDS


def test_backend_request_ids_match_the_reference() -> None:
    assert {r.value: r.name for r in BackendReq} == BACKEND_IDS


def test_settled_protocol_feature_bits_match_the_reference() -> None:
    for name, bit in PROTOCOL_BITS.items():
        assert ProtocolFeatures[name] == 1 << bit, name


def test_unsettled_protocol_bits_follow_the_rust_vmm_convention() -> None:
    settled = set(PROTOCOL_BITS)
    unsettled = {f.name for f in ProtocolFeatures} - settled
    assert unsettled == {"GET_VRING_BASE_INFLIGHT", "SHMEM"}
    for name, bit in PROTOCOL_FEATURE_CONVENTIONS["rust-vmm-0.16"].items():
        assert ProtocolFeatures[name] == 1 << bit
    # Every unsettled bit is 20 or above, and every convention lists it.
    for feature in ProtocolFeatures:
        if feature.name in unsettled:
            assert feature.value >= 1 << 20


def test_virtio_feature_bits_match_the_reference() -> None:
    for name, bit in VIRTIO_BITS.items():
        assert VirtioFeatures[name] == 1 << bit, name


def test_header_flags() -> None:
    assert int(HeaderFlags.VERSION_1 | HeaderFlags.REPLY) == 0x5
    assert int(HeaderFlags.NEED_REPLY) == 0x8


def test_the_table_has_one_row_per_request() -> None:
    assert set(FRONTEND_REQUEST_SPEC) == set(FrontendReq)
    assert set(BACKEND_REQUEST_SPEC) == set(BackendReq)
    for request, spec in [
        *FRONTEND_REQUEST_SPEC.items(),
        *BACKEND_REQUEST_SPEC.items(),
    ]:
        assert spec.request is request


GATES = {
    "GET_QUEUE_NUM": "MQ", "SET_LOG_BASE": "LOG_SHMFD", "SEND_RARP": "RARP",
    "NET_SET_MTU": "MTU", "SET_BACKEND_REQ_FD": "BACKEND_REQ",
    "SET_VRING_ENDIAN": "CROSS_ENDIAN", "GET_CONFIG": "CONFIG",
    "SET_CONFIG": "CONFIG", "CREATE_CRYPTO_SESSION": "CRYPTO_SESSION",
    "CLOSE_CRYPTO_SESSION": "CRYPTO_SESSION", "POSTCOPY_ADVISE": "PAGEFAULT",
    "POSTCOPY_LISTEN": "PAGEFAULT", "POSTCOPY_END": "PAGEFAULT",
    "GET_INFLIGHT_FD": "INFLIGHT_SHMFD", "SET_INFLIGHT_FD": "INFLIGHT_SHMFD",
    "RESET_DEVICE": "RESET_DEVICE", "VRING_KICK": "INBAND_NOTIFICATIONS",
    "GET_MAX_MEM_SLOTS": "CONFIGURE_MEM_SLOTS", "ADD_MEM_REG": "CONFIGURE_MEM_SLOTS",
    "REM_MEM_REG": "CONFIGURE_MEM_SLOTS", "SET_STATUS": "STATUS",
    "GET_STATUS": "STATUS", "GET_SHARED_OBJECT": "SHARED_OBJECT",
    "SET_DEVICE_STATE_FD": "DEVICE_STATE", "CHECK_DEVICE_STATE": "DEVICE_STATE",
    "GET_SHMEM_CONFIG": "SHMEM",
}  # fmt: skip

ALWAYS_REPLIED = {
    "GET_FEATURES", "GET_PROTOCOL_FEATURES", "GET_QUEUE_NUM", "GET_VRING_BASE",
    "SET_LOG_BASE", "GET_INFLIGHT_FD", "GET_CONFIG", "GET_MAX_MEM_SLOTS",
    "POSTCOPY_ADVISE", "POSTCOPY_LISTEN", "POSTCOPY_END", "IOTLB_MSG",
    "GET_STATUS", "GET_SHARED_OBJECT", "SET_DEVICE_STATE_FD",
    "CHECK_DEVICE_STATE", "GET_SHMEM_CONFIG", "CREATE_CRYPTO_SESSION",
}  # fmt: skip


def test_protocol_feature_gates_match_the_reference() -> None:
    for request, spec in FRONTEND_REQUEST_SPEC.items():
        gate = spec.gate.name if spec.gate is not None else None
        assert gate == GATES.get(request.name), request.name


def test_requests_with_a_reply_body_match_the_reference() -> None:
    replied = {
        r.name for r, spec in FRONTEND_REQUEST_SPEC.items() if spec.has_reply_body
    }
    assert replied == ALWAYS_REPLIED
    backend = {
        r.name for r, spec in BACKEND_REQUEST_SPEC.items() if spec.has_reply_body
    }
    assert backend == {"SHARED_OBJECT_LOOKUP"}
