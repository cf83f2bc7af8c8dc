# Guest test "blkro": /dev/vda as a read-only, multi-queue disk. Reports what
# the driver sees, tries one O_DIRECT write (which must fail), and reads the
# first vu.size_mib MiB (default 1) back.
# Results: ro, hw_queues, write (rc0 or the error), head_md5.
if wait_for /dev/vda; then
    result ro "$(cat /sys/block/vda/ro)"
    result hw_queues "$(ls /sys/block/vda/mq | wc -l)"
    if dd if=/dev/zero of=/dev/vda bs=4k count=1 oflag=direct 2>/tmp/err; then
        result write rc0
    else
        result write refused
    fi
    result head_md5 "$(dd if=/dev/vda bs=1M count="${vu_size_mib:-1}" iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
else
    fail "no /dev/vda"
fi
