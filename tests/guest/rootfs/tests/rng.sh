# Guest test "rng": read vu.kib KiB (default 64) from /dev/hwrng.
# Results: rng_current, rng_bytes, rng_nonzero (bytes that are not 0x00),
# rng_distinct (distinct byte values seen, of 256).
kib=${vu_kib:-64}
if wait_for /dev/hwrng; then
    result rng_current "$(cat /sys/class/misc/hw_random/rng_current)"
    dd if=/dev/hwrng of=/tmp/rng bs=1024 count="$kib" iflag=fullblock 2>/dev/null
    result rng_bytes "$(wc -c < /tmp/rng)"
    result rng_nonzero "$(tr -d '\000' < /tmp/rng | wc -c)"
    result rng_distinct "$(od -An -v -tu1 -w1 /tmp/rng | sort -u | wc -l)"
else
    fail "no /dev/hwrng"
fi
