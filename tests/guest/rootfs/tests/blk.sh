# Guest test "blk": a random pattern written with O_DIRECT to /dev/vda at
# vu.offset_mib (MiB), read back with O_DIRECT and compared; 4 KiB reads at
# queue depth 1 timed; with vu.discard_mib=M, 1 MiB at M MiB written then
# discarded.
# With vu.check_mib=C, the vu.size_mib MiB at C MiB are read first (check_md5).
# Results: size_sectors, ro, serial, pattern_md5, readback_md5, read4k_*.
offset=${vu_offset_mib:-16}
size=${vu_size_mib:-8}
if wait_for /dev/vda; then
    result size_sectors "$(cat /sys/block/vda/size)"
    result ro "$(cat /sys/block/vda/ro)"
    result serial "$(cat /sys/block/vda/serial 2>/dev/null)"
    result hw_queues "$(ls /sys/block/vda/mq | wc -l)"
    result discard_max "$(cat /sys/block/vda/queue/discard_max_bytes)"
    if [ -n "${vu_check_mib:-}" ]; then
        # What an earlier run left at vu.check_mib (before this run writes).
        result check_md5 "$(dd if=/dev/vda bs=1M skip="$vu_check_mib" count="$size" iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
    fi
    dd if=/dev/urandom of=/tmp/pattern bs=1M count="$size" 2>/dev/null
    result pattern_md5 "$(md5sum < /tmp/pattern | cut -d' ' -f1)"
    if dd if=/tmp/pattern of=/dev/vda bs=1M seek="$offset" oflag=direct conv=fsync 2>/tmp/err; then
        result write rc0
    else
        result write "$(tail -1 /tmp/err)"
    fi
    dd if=/dev/vda of=/tmp/readback bs=1M skip="$offset" count="$size" iflag=direct 2>/dev/null
    result readback_md5 "$(md5sum < /tmp/readback | cut -d' ' -f1)"
    rm -f /tmp/readback
    t0=$(uptime_s)
    dd if=/dev/vda of=/dev/null bs=4k count=4096 iflag=direct 2>/dev/null
    result read4k_ios 4096
    result read4k_window "$t0 $(uptime_s)"
    if [ -n "${vu_discard_mib:-}" ]; then
        # 1 MiB of random data at vu.discard_mib, then discarded.
        dd if=/dev/urandom of=/dev/vda bs=1M seek="$vu_discard_mib" count=1 oflag=direct conv=fsync 2>/dev/null
        blkdiscard -o $((vu_discard_mib * 1048576)) -l 1048576 /dev/vda && result discard rc0
    fi
else
    fail "no /dev/vda"
fi
